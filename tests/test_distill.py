"""Knowledge distillation: the vocab-parallel KL (values and gradients against torch's full-vocabulary
reference, and over 2 gloo ranks against one), the teacher's global top-k, the whole `scaletrain
distill` run at tp2·pp2, cp2 and dp2 equal to the single process in float64, and its up-front errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletrain.cli import main
from scaletrain.distributed.comm import Comm
from scaletrain.nn.kl import kl_per_token, teacher_top_k

from conftest import TINY, read_metrics, tiny_overrides
from dist_harness import run_ranks
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.e2e

V, LIMIT = 12, 10  # two padding rows beyond the tokenizer's vocabulary


def _logits(seed: int, shape=(2, 3, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


def _reference(s: torch.Tensor, t: torch.Tensor, tau: float, reverse: bool, limit: int) -> torch.Tensor:
    """torch's own: F.kl_div over the real vocabulary, padding rows dropped."""
    logp_s, logp_t = F.log_softmax(s[..., :limit] / tau, -1), F.log_softmax(t[..., :limit] / tau, -1)
    if reverse:
        return F.kl_div(logp_t, logp_s, log_target=True, reduction="none").sum(-1)
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("kind,tau", [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.5)])
def test_kl_values_and_gradients_match_torch(kind, tau):
    s, t = _logits(0).requires_grad_(), _logits(1)
    kl = kl_per_token(s, t, kind=kind, temperature=tau, vocab_limit=LIMIT)
    s_ref = s.detach().clone().requires_grad_()
    ref = _reference(s_ref, t, tau, kind == "reverse_kl", LIMIT)
    assert torch.allclose(kl, ref, rtol=1e-12, atol=1e-14) and (kl > 0).all()
    w = torch.rand(kl.shape, dtype=torch.float64)
    (kl * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-10, atol=1e-13)
    assert s.grad[..., LIMIT:].abs().max() == 0  # padding rows get no gradient
    same = kl_per_token(t, t, kind=kind, temperature=tau, vocab_limit=LIMIT)
    assert same.abs().max() < 1e-12  # a student equal to its teacher has nothing to learn


def _coarse_reference(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """By hand from the full distributions: KL over the teacher's top k and one "any other token" outcome."""
    logp_s, logp_t = F.log_softmax(s[..., :LIMIT] / tau, -1), F.log_softmax(t[..., :LIMIT] / tau, -1)
    p, q = logp_t.exp().gather(-1, ids), logp_s.exp().gather(-1, ids)
    rest_p, rest_q = 1 - p.sum(-1), 1 - q.sum(-1)
    return (p * (p.log() - q.log())).sum(-1) + rest_p * (rest_p.log() - rest_q.log())


def test_top_k_is_the_coarsened_kl_and_all_of_it_is_dense():
    s, t = _logits(2).requires_grad_(), _logits(3)
    ids, logps = teacher_top_k(t, 4, temperature=2.0, vocab_limit=LIMIT)
    ref_vals, ref_ids = F.log_softmax(t[..., :LIMIT] / 2.0, -1).topk(4, dim=-1)
    assert torch.equal(ids, ref_ids) and torch.allclose(logps, ref_vals, rtol=1e-12)
    kl = kl_per_token(s, top_ids=ids, top_logps=logps, temperature=2.0, vocab_limit=LIMIT)
    s_ref = s.detach().clone().requires_grad_()
    ref = _coarse_reference(s_ref, t, ids, 2.0)
    assert torch.allclose(kl, ref, rtol=1e-10) and (kl > 0).all()
    assert (kl <= _reference(s.detach(), t, 2.0, False, LIMIT)).all()  # coarsening never adds divergence
    w = torch.rand(kl.shape, dtype=torch.float64)
    (kl * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-8, atol=1e-12) and s.grad[..., LIMIT:].abs().max() == 0
    # k = the whole vocabulary: the sparse form is the dense forward KL
    ids, logps = teacher_top_k(t, LIMIT, vocab_limit=LIMIT)
    full = kl_per_token(s.detach(), top_ids=ids, top_logps=logps, vocab_limit=LIMIT)
    assert torch.allclose(full, _reference(s.detach(), t, 1.0, False, LIMIT), rtol=1e-9)
    with pytest.raises(ValueError, match="forward KL only"):
        kl_per_token(s, top_ids=ids, top_logps=logps, kind="reverse_kl")


def _sharded_rank(rank: int, world: int) -> dict:
    comm = Comm(torch.distributed.group.WORLD, world, rank, "tp")
    s_full, t_full = _logits(4), _logits(5)
    out = {}
    for name, kwargs in [("forward", {"kind": "forward_kl", "temperature": 2.0}),
                         ("reverse", {"kind": "reverse_kl", "temperature": 1.0})]:
        s = s_full.chunk(world, -1)[rank].clone().requires_grad_()
        kl = kl_per_token(s, t_full.chunk(world, -1)[rank], comm, vocab_limit=LIMIT, **kwargs)
        (kl * torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3)).sum().backward()
        out[name] = (kl.detach(), s.grad)
    ids, logps = teacher_top_k(t_full.chunk(world, -1)[rank], 5, comm, temperature=1.5, vocab_limit=LIMIT)
    s = s_full.chunk(world, -1)[rank].clone().requires_grad_()
    kl = kl_per_token(s, None, comm, top_ids=ids, top_logps=logps, temperature=1.5, vocab_limit=LIMIT)
    kl.sum().backward()
    out["topk"] = (kl.detach(), s.grad, ids)
    return out


def test_vocab_parallel_kl_over_two_ranks_equals_one():
    ranks = run_ranks(2, _sharded_rank)
    s_full, t_full = _logits(4), _logits(5)
    for name, kwargs in [("forward", {"kind": "forward_kl", "temperature": 2.0}),
                         ("reverse", {"kind": "reverse_kl", "temperature": 1.0})]:
        s = s_full.clone().requires_grad_()
        kl = kl_per_token(s, t_full, vocab_limit=LIMIT, **kwargs)
        (kl * torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3)).sum().backward()
        for r in ranks:
            assert torch.allclose(r[name][0], kl, rtol=1e-12)
        assert torch.allclose(torch.cat([r[name][1] for r in ranks], -1), s.grad, rtol=1e-10, atol=1e-14)
    ids, logps = teacher_top_k(t_full, 5, temperature=1.5, vocab_limit=LIMIT)
    s = s_full.clone().requires_grad_()
    kl = kl_per_token(s, None, top_ids=ids, top_logps=logps, temperature=1.5, vocab_limit=LIMIT)
    kl.sum().backward()
    for r in ranks:
        assert torch.equal(r["topk"][2], ids) and torch.allclose(r["topk"][0], kl, rtol=1e-12)
    assert torch.allclose(torch.cat([r["topk"][1] for r in ranks], -1), s.grad, rtol=1e-10, atol=1e-14)


# --- the whole run --------------------------------------------------------------------------------

TEACHER = {"model.num_layers": 4, "model.hidden_size": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
           "model.ffn_hidden_size": 128}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tokenizer_dir, dataset_prefix):
    """A tiny trained teacher (4 layers, h64), saved as a checkpoint and exported to HF format."""
    run = tmp_path_factory.mktemp("teacher")
    args = ["train", "--config", TINY]
    for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **TEACHER, **{
            "train.steps": 30, "optim.lr": 3e-3, "checkpoint.export_hf": "hf", "train.seq_length": 160}):
        args += ["--set", s]
    assert main(args) == 0
    return run


def _distill_args(run_dir, tokenizer_dir, prefix, teacher, **extra) -> list[str]:
    args = ["distill", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.distill.teacher": str(teacher), "model.num_layers": 4, "train.seq_length": 64,
            "train.global_batch_size": 4, "train.micro_batch_size": 1, "train.steps": 3,
            "precision.dtype": "float64", **extra}):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("layout,world,options", [
    ({"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}, 4,
     {"posttrain.distill.temperature": 2.0, "posttrain.distill.alpha": 0.5, "checkpoint.export_hf": "hf"}),
    ({"parallel.cp": 2}, 2, {"posttrain.distill.top_k": 8, "train.micro_batch_size": 2}),
    ({}, 2, {"posttrain.distill.loss": "reverse_kl"}),
], ids=["tp2pp2-dense", "cp2-topk", "dp2-reverse"])
def test_distill_matches_single_process_across_layouts(tmp_path, tokenizer_dir, dataset_prefix, teacher_run,
                                                       layout, world, options):
    # The teacher as a run directory (its latest checkpoint) or as its Hugging Face export.
    teacher = teacher_run if "parallel.tp" in layout else teacher_run / "hf"
    a, b = run_single_and_parallel(lambda par: (tmp_path / str(par), _distill_args(
        tmp_path / str(par), tokenizer_dir, dataset_prefix, teacher, **options, **(layout if par else {}))), world)
    assert len(a) == 3
    assert_same_steps(a, b, 1e-10)
    for x, y in zip(a, b):
        assert abs(x["kd"] - y["kd"]) <= 1e-10 * x["kd"] and abs(x["ce"] - y["ce"]) <= 1e-10 * x["ce"]
        assert x["kd"] > 0
    alpha, tau = options.get("posttrain.distill.alpha", 1.0), options.get("posttrain.distill.temperature", 1.0)
    for x in a:  # the loss is the configured mix of its two reported parts
        assert x["loss"] == pytest.approx(alpha * tau ** 2 * x["kd"] + (1 - alpha) * x["ce"], rel=1e-9)
    if "checkpoint.export_hf" in options:
        from safetensors.torch import load_file

        single, sharded = (load_file(str(tmp_path / str(par) / "hf" / "model.safetensors")) for par in (False, True))
        assert single.keys() == sharded.keys()
        for k in single:
            assert torch.allclose(single[k], sharded[k], rtol=1e-9, atol=1e-12), k


def test_distillation_pulls_the_student_to_the_teacher(tmp_path, tokenizer_dir, dataset_prefix, teacher_run):
    """A smaller student (2 layers, h32) distilled for 40 steps: its KL to the teacher falls well
    below where it started."""
    run = tmp_path / "student"
    args = _distill_args(run, tokenizer_dir, dataset_prefix, teacher_run, **{
        "model.num_layers": 2, "train.steps": 40, "precision.dtype": "float32", "optim.lr": 3e-3,
        "train.micro_batch_size": 4})
    assert main(args) == 0
    kd = [r["kd"] for r in read_metrics(run)]
    assert sum(kd[-5:]) / 5 < 0.6 * sum(kd[:3]) / 3, kd


def test_bad_distillation_configs_fail_up_front(tmp_path, tokenizer_dir, dataset_prefix, teacher_run, capsys):
    def err(**extra) -> str:
        assert main(_distill_args(tmp_path / "bad", tokenizer_dir, dataset_prefix, **extra)) == 2
        return capsys.readouterr().err

    assert "needs posttrain.distill.teacher" in err(teacher="")
    assert "neither a Hugging Face directory" in err(teacher=tmp_path / "nowhere")
    assert "set model.vocab_size = " in err(teacher=teacher_run, **{"model.vocab_size": 1024})
    assert "reverse KL needs" in err(teacher=teacher_run, **{"posttrain.distill.loss": "reverse_kl",
                                                             "posttrain.distill.top_k": 4})
    assert "posttrain.distill.alpha = 1.5 must be within [0, 1]" in err(teacher=teacher_run, **{"posttrain.distill.alpha": 1.5})
    assert "samples completions of prompts: set posttrain.chat.train_data" in err(
        teacher=teacher_run, **{"posttrain.distill.on_policy": True})
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # Layout checks against the teacher's own shapes (a process per rank would be needed to reach them via the CLI).
    from scaletrain.checkpoint.locate import locate_model
    from scaletrain.config.load import ConfigError
    from scaletrain.config.schema import ModelConfig, ParallelConfig, RunConfig
    from scaletrain.model_builder import check_companion

    teacher_vocab = locate_model("posttrain.distill.teacher", str(teacher_run))[2].vocab_size
    cfg = RunConfig(parallel=ParallelConfig(tp=3, pp=3), model=ModelConfig(vocab_size=teacher_vocab))
    with pytest.raises(ConfigError, match=r"4 heads / 2 kv heads do not divide over parallel.tp = 3; its 4 layers do "
                                          r"not divide over parallel.pp·vpp = 3"):
        check_companion(cfg, "posttrain.distill.teacher", str(teacher_run), role="teacher", tokenizer_vocab=500)
    with pytest.raises(ConfigError, match="smaller than the tokenizer's"):
        check_companion(RunConfig(model=ModelConfig(vocab_size=teacher_vocab)), "posttrain.distill.teacher",
                           str(teacher_run), role="teacher", tokenizer_vocab=teacher_vocab + 1)


def test_planner_counts_the_teacher_by_hand():
    """Teacher 4L h64 (4 heads of 16, 2 kv heads, ffn 128, vocab 512) at pp2: per layer qkv 64·(4+2·2)·16 =
    8,192, proj 4,096, SwiGLU 3·64·128 = 24,576, norms 128 → 36,992; stage 0 = 2 layers + embedding
    512·64 = 106,752 parameters, stage 1 = 2 layers + final norm 64 + head 32,768 = 106,816. Stored dense
    outputs on the last stage: 4 microbatches × 2·64 tokens × 512 logits × 4 bytes (float32)."""
    import dataclasses

    from scaletrain.config.posttrain import DistillConfig, PostTrainConfig
    from scaletrain.config.schema import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.profile.planner import format_plan, plan, stage_params

    def model(layers, hidden, ffn):
        return resolve_model(ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=4, num_kv_heads=2,
                                         ffn_hidden_size=ffn, vocab_size=512), tokenizer_vocab=512, tp=1, seq_length=64)

    cfg = RunConfig(model=model(2, 32, 64), parallel=ParallelConfig(pp=2),
                    train=TrainConfig(global_batch_size=8, micro_batch_size=2, seq_length=64),
                    posttrain=PostTrainConfig(objective="distill", distill=DistillConfig(teacher="t")))
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="float32"))
    teacher = model(4, 64, 128)
    base, dense = plan(cfg, 2), plan(cfg, 2, teacher=teacher)
    assert [s.companion_bytes for s in base.stages] == [0, 0]
    assert dense.stages[0].companion_bytes == 106_752 * 4
    assert dense.stages[1].companion_bytes == 106_816 * 4 + 4 * 128 * 512 * 4
    assert dense.peak_stage.total_bytes == base.stages[1].total_bytes + dense.stages[1].companion_bytes
    sparse = dataclasses.replace(cfg.posttrain, distill=DistillConfig(teacher="t", top_k=16))
    top = plan(dataclasses.replace(cfg, posttrain=sparse), 2, teacher=teacher)
    assert top.stages[1].companion_bytes == 106_816 * 4 + 4 * 128 * 16 * 12  # int64 id + fp32 logit per kept token
    assert dense.teacher_flops_per_token > 0 and "teacher forward" in format_plan(dense)
    # without a pipeline the teacher runs microbatch by microbatch: one microbatch's outputs at a time
    flat = dataclasses.replace(cfg, parallel=ParallelConfig(pp=1))
    teacher_all = sum(stage_params(teacher, plan(flat, 1).layout, 0)[:1])
    assert plan(flat, 1, teacher=teacher).stages[0].companion_bytes == teacher_all * 4 + 1 * 128 * 512 * 4


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "24", "--test", "4"]) == 0
    return out / "sft_train.jsonl"


@pytest.mark.parametrize("layout,world", [({"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}, 4),
                                          ({"posttrain.rollout.micro_batch": 2}, 2), ({"parallel.cp": 2}, 2)],
                         ids=["tp2pp2", "dp2-sampling-2-rows-per-pass", "cp2"])
def test_on_policy_distillation_matches_single_process(tmp_path, tokenizer_dir, dataset_prefix, teacher_run, chat_file,
                                                       layout, world):
    """The student samples its own completions (the same ones at every layout) and the teacher scores them:
    losses, KL and completion lengths equal the single process (float64)."""
    options = {"posttrain.distill.on_policy": True, "posttrain.distill.loss": "reverse_kl",
               "posttrain.chat.train_data": f'["{chat_file}"]', "posttrain.rollout.max_new_tokens": 8,
               "posttrain.rollout.temperature": 1.0, "train.steps": 2, "train.seq_length": 160}
    a, b = run_single_and_parallel(lambda par: (tmp_path / str(par), _distill_args(
        tmp_path / str(par), tokenizer_dir, dataset_prefix, teacher_run / "hf", **options,
        **(layout if par else {}))), world)
    assert len(a) == 2
    assert_same_steps(a, b, 1e-10)
    for x, y in zip(a, b):
        assert x["completion_tokens"] == y["completion_tokens"] and 1 <= x["completion_tokens"] <= 8
        assert x["loss_tokens"] == y["loss_tokens"] and abs(x["kd"] - y["kd"]) <= 1e-10 * x["kd"]
    assert a[0]["loss_tokens"] != a[1]["loss_tokens"] or a[0]["kd"] != a[1]["kd"]  # fresh samples each step
