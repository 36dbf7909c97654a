"""FP8 without Transformer Engine: precision.fp8_backend = 'torchao' (torchao's float8 training, tensorwise and
rowwise recipes) on the torch backend, set up inside `parallelize`. On CPU through torchao's emulation mode:
the wiring (which linears run FP8, the head and small layers left out), training forwards only, the same
state_dict names as a bf16 model and checkpoints that go both ways; the errors up front; the Transformer
Engine amax group from ParallelDims."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("torchao.float8")

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.nn.float8 import apply_float8, fp8_linears  # noqa: E402
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

from dist_harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.parity

CPU = torch.device("cpu")
FP8 = PrecisionConfig(dtype="bfloat16", fp8=True, fp8_backend="torchao", fp8_emulate=True, fp8_skip_small=False)
BF16 = Precision(torch.bfloat16, torch.bfloat16, "cpu", "t")


def _cfg(h: int = 64, layers: int = 4) -> ModelConfig:
    return resolve_model(ModelConfig(vocab_size=128, hidden_size=h, num_layers=layers, num_heads=4, num_kv_heads=2,
                                     ffn_hidden_size=2 * h), tokenizer_vocab=None, tp=1, seq_length=16)


def _model(precision: PrecisionConfig | None, seed: int = 0, layers: int = 4) -> tuple[torch.nn.Module, list[str]]:
    lines: list[str] = []
    model = parallelize(build_model(_cfg(layers=layers), dtype=torch.bfloat16), ParallelDims.single(),
                        ParallelConfig(backend="torch"), CPU, precision=precision, log=lines.append)
    init_parameters(model, seed)
    return model, lines


def _batch(seed: int = 0) -> list[dict]:
    t = torch.randint(0, 128, (2, 2, 17), generator=torch.Generator().manual_seed(seed))
    return [{"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(2, 16)} for x in t]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_block_linears_run_fp8_and_the_head_does_not(recipe):
    model, lines = _model(dataclasses.replace(FP8, fp8_recipe=recipe, fp8_bf16_layers=1))
    plain, _ = _model(None)
    converted = fp8_linears(model)
    # Blocks 1 and 2 (fp8_bf16_layers = 1 keeps the first and last in bf16): qkv, proj, gate_up, down each.
    assert converted == [f"layers.{k}.{n}" for k in (1, 2) for n in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")]
    assert "torchao float8" in lines[0] and recipe in lines[0]
    assert list(model.state_dict()) == list(plain.state_dict())  # same names (and shapes): nothing swapped
    x = _batch()[0]["tokens"]
    with torch.no_grad():  # outside training forwards FP8 is not entered: exactly the bf16 model
        assert torch.equal(model(x), plain(x))
    out, ref = model(x), plain(x)  # a training forward: FP8 GEMMs (emulated), close to bf16
    assert not torch.equal(out, ref)
    assert (out.float() - ref.float()).abs().mean() < 0.1 * ref.float().abs().mean()


def test_small_layers_and_dims_not_divisible_by_16_are_left_out():
    """fp8_skip_small (default): torchao's size heuristics per recipe decide, on the local GEMM shape — checked
    on meta models: at h 512 the GEMMs with ≤ 1024 outputs and K ≤ 4096 — the attention output projection
    (512 × 512) and the MLP's down projection (512 × 1536) — stay in bf16 under the tensorwise recipe, while qkv
    (1536 × 512) and the fused gate/up (3072 × 512) convert; a dimension not divisible by 16 never converts."""
    def meta_model(h: int, ffn: int) -> torch.nn.Module:
        m = resolve_model(ModelConfig(vocab_size=1024, hidden_size=h, num_layers=2, num_heads=8, num_kv_heads=8,
                                      ffn_hidden_size=ffn), tokenizer_vocab=None, tp=1, seq_length=16)
        with torch.device("meta"):
            return build_model(m, dtype=torch.bfloat16)

    auto = dataclasses.replace(FP8, fp8_skip_small=True)
    model = meta_model(512, 1536)
    apply_float8(model, auto, CPU)
    assert fp8_linears(model) == [f"layers.{k}.{n}" for k in (0, 1) for n in ("attn.qkv", "mlp.gate_up")]
    model = meta_model(64, 36)  # ffn 36: gate_up has 72 rows, down 36 inputs — neither divisible by 16
    apply_float8(model, FP8, CPU)
    assert fp8_linears(model) == [f"layers.{k}.attn.{n}" for k in (0, 1) for n in ("qkv", "proj")]


def test_fp8_trains_and_checkpoints_go_both_ways(tmp_path):
    """A few emulated-FP8 steps lower the loss like bf16 does; its checkpoint loads into a bf16 model (and back)
    with identical tensors: the state dict names are the bf16 model's."""
    from scaletrain.checkpoint import load_checkpoint, save_checkpoint

    dims = ParallelDims.single()
    losses = {}
    for name, prec in (("fp8", FP8), ("bf16", None)):
        model, _ = _model(prec)
        opt = build_optimizer(model, OptimConfig(lr=3e-3), CPU, dims)
        losses[name] = [train_step(model, opt, LanguageModelingObjective(), _batch(i % 2), lr=3e-3, clip_grad=1.0,
                                   precision=BF16, device=CPU, dims=dims).loss for i in range(8)]
        if name == "fp8":
            save_checkpoint(tmp_path / "fp8", 8, model, opt, {"step": 8, "consumed_samples": 0}, dims=dims)
            fp8_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert losses["fp8"][-1] < losses["fp8"][0] - 0.3
    assert abs(losses["fp8"][-1] - losses["bf16"][-1]) < 0.05 * losses["bf16"][-1]
    plain, _ = _model(None, seed=9)
    opt = build_optimizer(plain, OptimConfig(lr=3e-3), CPU, dims)
    load_checkpoint(tmp_path / "fp8" / "step_0000008", plain, opt, dims=dims)
    assert all(torch.equal(v, fp8_state[k]) for k, v in plain.state_dict().items())
    save_checkpoint(tmp_path / "bf16", 8, plain, opt, {"step": 8, "consumed_samples": 0}, dims=dims)
    back, _ = _model(FP8, seed=11)
    load_checkpoint(tmp_path / "bf16" / "step_0000008", back, build_optimizer(back, OptimConfig(), CPU, dims), dims=dims)
    assert all(torch.equal(v, fp8_state[k]) for k, v in back.state_dict().items())
    assert fp8_linears(back)


def test_fp8_settings_are_refused_up_front():
    from scaletrain.config import ConfigError, load_config, validate

    from conftest import TINY

    def errors(*sets):
        with pytest.raises(ConfigError) as e:
            validate(load_config(TINY, ["data.tokenizer=x", *sets]), 1)
        return str(e.value)

    ao = ["precision.fp8=true", "precision.fp8_backend=torchao"]
    assert "set parallel.backend = 'torch'" in errors(*ao)  # auto might pick te on a GPU
    assert "precision.fp8_recipe = 'delayed' is not one of current, tensorwise, rowwise" in errors(
        *ao, "parallel.backend=torch", "precision.fp8_recipe=delayed")
    assert "precision.fp8_emulate" in errors("precision.fp8_emulate=true")
    assert "precision.fp8_backend = 'bnb'" in errors("precision.fp8_backend=bnb")
    # Recomputation works under torchao's FP8 (it is refused only for Transformer Engine's).
    validate(load_config(TINY, ["data.tokenizer=x", *ao, "parallel.backend=torch", "parallel.recompute=full",
                                "precision.dtype=bfloat16"]), 1)
    with pytest.raises(RuntimeError, match="set precision.fp8_emulate = true"):  # FP8 on a CPU, not emulated
        _model(dataclasses.replace(FP8, fp8_emulate=False))


def _stage(rank: int, world: int) -> tuple[int, int, list[int]]:
    dims = ParallelDims.from_config(ParallelConfig(pp=2, tp=2), world, rank)
    stage = dims.comm("stage")
    return stage.size, stage.rank, stage.global_ranks()


def test_the_fp8_amax_group_is_a_pipeline_stage_from_parallel_dims():
    """Transformer Engine reduces amaxes over one pipeline stage's ranks: ParallelDims builds that group with the
    others (it was created outside ParallelDims, in enable_fp8, before)."""
    assert run_ranks(8, _stage, timeout=60) == [(4, r % 4, [0, 1, 2, 3] if r < 4 else [4, 5, 6, 7]) for r in range(8)]
    single = ParallelDims.single().comm("stage")
    assert single.size == 1


def test_torchao_fp8_through_the_cli_is_set_up_by_the_model_builder(tmp_path, tokenizer_dir, dataset_prefix, capsys):
    """The real entry point: the policy built by the one model-building path (model_builder.py) gets torchao's
    FP8 inside parallelize — logged once, emulated on CPU — trains, checkpoints and resumes to the same losses."""
    from scaletrain.cli import main

    from conftest import TINY, read_metrics, tiny_overrides

    def run(run_dir, **extra) -> int:
        sets = tiny_overrides(run_dir, tokenizer_dir, dataset_prefix, **{
            "precision.dtype": "bfloat16", "precision.fp8": True, "precision.fp8_backend": "torchao",
            "precision.fp8_emulate": True, "precision.fp8_skip_small": False, "parallel.backend": "torch",
            "optim.lr": 3e-3, **extra})
        return main(["train", "--config", TINY, *[a for s in sets for a in ("--set", s)]])

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight) == 0
    assert capsys.readouterr().out.count("fp8: torchao float8 tensorwise recipe (emulated): 8 linears converted") == 1
    assert run(stopped, **{"train.exit_interval": 6, "checkpoint.interval": 3}) == 0
    assert run(stopped) == 0
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and a[-1]["loss"] < a[0]["loss"]
