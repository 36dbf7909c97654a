"""The layer backend switch: selection and its errors (CPU), checkpoints that do not care how a backend
stores a fused weight (CPU, with the same flat-storage hooks the te backend uses), and — where CUDA and
Transformer Engine exist — the te backend's parameter names/shapes, forward parity with the torch
backend, a checkpoint round trip between the backends, and FP8 steps."""

from __future__ import annotations

import pytest
import torch

from scaletrain.cli import main
from scaletrain.config.load import load_config
from scaletrain.config.validate import resolve_model, validate
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters, mark, spec_of
from scaletrain.nn.backend import roles, select_backend, te_importable
from scaletrain.nn.init import store_fused_flat

from conftest import TINY, tiny_overrides

pytestmark = pytest.mark.parity

HAS_TE = torch.cuda.is_available() and te_importable()[0]
needs_te = pytest.mark.skipif(not HAS_TE, reason="needs CUDA and an importable transformer_engine")


def _model_cfg(**model):
    cfg = load_config(TINY, [f"model.{k}={v}" for k, v in model.items()])
    return resolve_model(cfg.model, tokenizer_vocab=512, tp=1, seq_length=cfg.train.seq_length)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_backend_selection_and_its_errors(tmp_path, tokenizer_dir, dataset_prefix, capsys):
    assert select_backend("torch") == ("torch", "requested")
    assert select_backend("auto") == ("torch", "auto: no CUDA device")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        select_backend("te")
    assert roles("torch").column.__name__ == "ColumnParallelLinear"
    with pytest.raises(ValueError, match="unknown backend"):
        roles("tpu")
    args = ["train", "--config", TINY]
    for extra, message in [({"parallel.backend": "te"}, "parallel.backend = 'te' needs CUDA"),
                           ({"precision.fp8": True}, "fp8 = true needs parallel.backend = 'te'"),
                           ({"optim.impl": "te"}, "optim.impl = 'te' is a CUDA kernel"),
                           ({"optim.impl": "apexx"}, "optim.impl = 'apexx': choose one of")]:
        full = args + [x for s in tiny_overrides(tmp_path / "r", tokenizer_dir, dataset_prefix, **extra)
                       for x in ("--set", s)]
        assert main(full) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r" / "checkpoints").exists()  # refused before anything ran


def test_fp8_settings_are_validated_up_front():
    def errors(*sets):
        with pytest.raises(Exception) as e:
            validate(load_config(TINY, list(sets)), 1)
        return str(e.value)

    te = ["parallel.backend=te", "precision.fp8=true", "data.tokenizer=x"]
    assert "precision.fp8_recipe" in errors(*te, "precision.fp8_recipe=mxfp4")
    assert "runs under bf16 autocast" in errors(*te, "precision.dtype=float32")
    assert "leaves none of the 4 in FP8" in errors(*te, "precision.fp8_bf16_layers=2")
    assert "recomputation under FP8" in errors(*te, "parallel.recompute=full")
    assert "Transformer Engine fuses its own" in errors("parallel.backend=te", 'parallel.kernels=["rmsnorm"]')


def _flat_storage(model: torch.nn.Module) -> torch.nn.Module:
    """Store every fused gate/up weight flat, [2·f, h], as the te backend does (same hooks and spec)."""
    for block in model.layers.values():
        lin = block.mlp.gate_up
        spec = spec_of(lin.weight)
        flat = torch.nn.Parameter(lin.weight.detach().flatten(0, 1).clone())
        lin.weight = mark(flat, spec.init, spec.std, spec.shard_dim, 1, view=tuple(lin.weight.shape))
        store_fused_flat(lin, 2)
    return model


def test_checkpoints_ignore_how_a_backend_stores_a_fused_weight(tmp_path):
    from scaletrain.checkpoint.load import load_checkpoint
    from scaletrain.checkpoint.save import write_checkpoint_dir
    from scaletrain.config.schema import OptimConfig
    from scaletrain.parallel.distributed_optimizer import materialize_optimizer_state
    from scaletrain.trainer.optimizer import build_optimizer

    cfg = _model_cfg()
    plain = build_model(cfg)
    init_parameters(plain, 7)
    flat = _flat_storage(build_model(cfg))
    init_parameters(flat, 7)  # the seeded init fills the flat storage through the view
    for (n, a), (_, b) in zip(plain.state_dict().items(), flat.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), n  # state_dict shows the logical shape
    assert flat.layers["0"].mlp.gate_up.weight.dim() == 2

    # flat → checkpoint (with optimizer state) → plain, and back.
    opt = build_optimizer(flat, OptimConfig(lr=1e-3), torch.device("cpu"), ParallelDims.single())
    materialize_optimizer_state(opt)
    for st in opt.state.values():
        st["exp_avg"].normal_()
    write_checkpoint_dir(tmp_path / "c", flat, opt, {"step": 1, "consumed_samples": 0})
    other = build_model(cfg)
    init_parameters(other, 8)
    opt2 = build_optimizer(other, OptimConfig(lr=1e-3), torch.device("cpu"), ParallelDims.single())
    load_checkpoint(tmp_path / "c", other, opt2, dims=ParallelDims.single())
    for (n, a), (_, b) in zip(plain.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    name_of = {id(p): n for n, p in flat.named_parameters()}
    by_name = {name_of[id(p)]: st for p, st in opt.state.items()}
    name_of2 = {id(p): n for n, p in other.named_parameters()}
    for p, st in opt2.state.items():
        assert torch.equal(st["exp_avg"].flatten(), by_name[name_of2[id(p)]]["exp_avg"].flatten())
        assert st["exp_avg"].shape == p.shape  # back in the storage shape the optimizer steps with
    write_checkpoint_dir(tmp_path / "d", other, opt2, {"step": 1, "consumed_samples": 0})
    flat2 = _flat_storage(build_model(cfg))
    opt3 = build_optimizer(flat2, OptimConfig(lr=1e-3), torch.device("cpu"), ParallelDims.single())
    load_checkpoint(tmp_path / "d", flat2, opt3, dims=ParallelDims.single())
    assert all(torch.equal(a, b) for a, b in zip(flat.parameters(), flat2.parameters()))
    assert all(st["exp_avg"].shape == p.shape for p, st in opt3.state.items())


# --- on a GPU with Transformer Engine (benchmarks/gpu_check.sh runs these) ---------------------------

@needs_te
def test_te_backend_has_the_torch_backends_names_and_shapes():
    cfg = _model_cfg(qkv_bias="true")
    torch_sd = build_model(cfg).state_dict()
    te_sd = build_model(cfg, backend="te").state_dict()
    assert list(te_sd) == list(torch_sd)
    for k in torch_sd:
        assert te_sd[k].shape == torch_sd[k].shape, k


@needs_te
@pytest.mark.parametrize("packed", [False, True])
def test_te_forward_matches_torch_with_the_same_weights(packed):
    cfg = _model_cfg(num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512)
    ref = build_model(cfg).cuda()
    init_parameters(ref, 3)
    te_model = build_model(cfg, backend="te").cuda()
    te_model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 128), device="cuda")
    mask = None
    if packed:  # two documents per row: block-diagonal causal mask
        doc = (torch.arange(128, device="cuda") >= 64).long()
        mask = (doc[:, None] == doc[None, :]) & torch.ones(128, 128, dtype=torch.bool, device="cuda").tril()
        mask = mask[None, None].expand(2, 1, 128, 128)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref(ids, attention_mask=mask), te_model(ids, attention_mask=mask)
    assert ((a.float() - b.float()).abs().max() / a.float().abs().max()).item() < 2e-2  # bf16 GEMM/attention


@needs_te
def test_te_checkpoint_loads_into_the_torch_backend(tmp_path):
    from scaletrain.checkpoint.load import load_checkpoint
    from scaletrain.checkpoint.save import write_checkpoint_dir

    cfg = _model_cfg()
    te_model = build_model(cfg, backend="te").cuda()
    init_parameters(te_model, 5)
    write_checkpoint_dir(tmp_path / "c", te_model, None, {"step": 0, "consumed_samples": 0})
    ref = build_model(cfg)
    load_checkpoint(tmp_path / "c", ref, None, dims=ParallelDims.single())
    for (n, a), (_, b) in zip(te_model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a.cpu(), b), n


@needs_te
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_fp8_training_steps_run_and_learn(tmp_path, tokenizer_dir, dataset_prefix, recipe):
    from conftest import read_metrics

    args = ["train", "--config", TINY]
    for s in tiny_overrides(tmp_path / recipe, tokenizer_dir, dataset_prefix, **{
            "parallel.backend": "te", "precision.fp8": True, "precision.fp8_recipe": recipe,
            "model.hidden_size": 128, "model.ffn_hidden_size": 256, "model.num_layers": 4,
            "precision.fp8_bf16_layers": 1 if recipe == "current" else 0, "train.seq_length": 128,
            "train.steps": 30}):
        args += ["--set", s]
    assert main(args) == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / recipe)]
    assert len(losses) == 30 and losses[-1] < losses[0]
