"""The planner against hand-computed values for published shapes and against measured per-rank memory
on CPU runs; `scaletrain profile --plan` and measured mode through the CLI."""

from __future__ import annotations

import json

import pytest

from scaletrain.cli import main
from scaletrain.commands.profile import resolved_config
from scaletrain.profile.planner import peak_in_flight, plan

from conftest import REPO, TINY, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks
from rollout_probe import record_kv_caches

pytestmark = pytest.mark.e2e

GiB = 2**30


def _plan(config: str, world: int, *sets: str, **kw):
    return plan(resolved_config(str(REPO / "configs" / config), list(sets), world), world, **kw)


def test_llama3_8b_flops_and_parameters_by_hand():
    p = _plan("llama3_8b.toml", 1)
    # Llama-3.1-8B: h 4096, 32 layers, 32 heads × 128, 8 kv heads, ffn 14336, vocab 128256, untied.
    h, L, f, V = 4096, 32, 14336, 128256
    per_layer = h * (32 + 2 * 8) * 128 + 32 * 128 * h + 3 * h * f
    matmul = L * per_layer + V * h  # the head is a matmul; the input embedding is not
    assert p.params_total == matmul + V * h + (2 * L + 1) * h == 8_030_261_248  # published: 8.03 B
    attn = 12 * L * 32 * 128 * 8192
    assert p.flops_per_token_palm == 6 * matmul + attn
    assert round(p.flops_per_token_palm / 1e9, 1) == 57.9 and round(p.flops_per_token_causal / 1e9, 1) == 51.5


def test_llama32_1b_tied_flops_by_hand():
    p = _plan("llama3_1b.toml", 1, "train.seq_length=8192")
    h, L, f, V = 2048, 16, 8192, 128256
    per_layer = h * (32 + 2 * 8) * 64 + 32 * 64 * h + 3 * h * f
    assert p.params_total == L * per_layer + V * h + (2 * L + 1) * h  # tied: the table once; 1.24 B published
    assert round(p.params_total / 1e9, 2) == 1.24
    assert p.flops_per_token_palm == 6 * (L * per_layer + V * h) + 12 * L * 32 * 64 * 8192  # tied head counted


def test_llama3_8b_tp4_pp2_per_rank_memory_by_hand():
    p = _plan("llama3_8b.toml", 64, "parallel.tp=4", "parallel.pp=2", "optim.distributed=true",
              gpu_memory_gb=80)
    h, V = 4096, 128256
    per_layer = (h * 48 * 128 + 32 * 128 * h + 3 * h * 14336) // 4 + 2 * h
    stage0 = 16 * per_layer + V * h // 4
    stage1 = 16 * per_layer + h + V * h // 4
    assert [s.params for s in p.stages] == [stage0, stage1]
    # bf16 weights (precision.params = 'auto' in a bf16 run), fp32 main grads.
    assert p.stages[0].weights_bytes == 2 * stage0 and p.stages[0].grads_bytes == 4 * stage0
    assert p.stages[0].optimizer_bytes == 3 * 4 * stage0 // 8  # ZeRO-1 over dp 8: two moments + fp32 master
    # 1F1B: stage 0 keeps pp = 2 microbatches in flight, the last stage one.
    assert [s.microbatches_in_flight for s in p.stages] == [2, 1]
    assert p.bubble_fraction == pytest.approx(1 / (64 + 1))
    assert p.fits
    # dp traffic under ZeRO-1: ring reduce-scatter of the stage's fp32 gradients + all-gather of its bf16 weights.
    assert p.comm_bytes_per_step["dp"] == int(7 / 8 * stage1 * (4 + 2))
    assert not _plan("llama3_8b.toml", 8, gpu_memory_gb=80).fits  # 8 B params in fp32 + Adam on one GPU


def test_in_flight_counts_follow_the_schedule():
    assert [peak_in_flight(4, 1, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert peak_in_flight(4, 1, 0, 2) == 2  # fewer microbatches than stages
    # Interleaved (vpp 2): stage 0 warms up 2·(pp-1) + (vpp-1)·pp chunk-forwards, plus the steady one.
    assert peak_in_flight(4, 2, 0, 8) == 2 * 3 + 4 + 1


def test_plan_command_prints_table_json_and_chart(tmp_path, capsys):
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["profile", "--config", str(REPO / "configs" / "llama3_8b.toml"), "--set", "parallel.tp=4",
                 "--set", "parallel.sequence_parallel=true", "--gpus", "32", "--plan",
                 "--json", str(out_json), "--png", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "layout: tp4·pp1·dp8 (32 GPUs) +SP" in out and "57.9 GFLOP (PaLM" in out and "51.5 GFLOP (causal" in out
    assert "communication per rank per step" in out and "— fits" in out
    data = json.loads(out_json.read_text())
    assert data["plan"]["layout"]["dp"] == 8 and data["plan"]["fits"] is True
    pytest.importorskip("matplotlib")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measured_mode_prints_measured_next_to_planned_within_10_percent(tmp_path, tokenizer_dir, dataset_prefix,
                                                                         capsys):
    sets = tiny_overrides(tmp_path / "unused", tokenizer_dir, dataset_prefix)
    args = ["profile", "--config", TINY, "--steps", "6", "--warmup", "2", "--phase-steps", "2",
            "--json", str(tmp_path / "m.json")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "planned" in out and "time per step by phase" in out
    data = json.loads((tmp_path / "m.json").read_text())
    m, stage = data["measured"], data["plan"]["stages"][0]
    for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes_per_microbatch"):
        assert m[key] == pytest.approx(stage[key], rel=0.10), key
    assert set(m["phases_s_per_step"]) >= {"forward", "backward", "optimizer"}


def test_measured_mode_runs_on_every_rank(tmp_path, tokenizer_dir, dataset_prefix):
    """Under torchrun every rank measures; only rank 0 writes (and reads) metrics.jsonl. Before: the other
    ranks read a metrics.jsonl that was never written and failed."""
    args = ["profile", "--config", TINY, "--steps", "3", "--warmup", "1", "--phase-steps", "1",
            "--json", str(tmp_path / "m.json")]
    for s in tiny_overrides(tmp_path / "unused", tokenizer_dir, dataset_prefix, **{"parallel.tp": 2}):
        args += ["--set", s]
    assert run_ranks(2, cli_rank, args, timeout=240) == [0, 0]
    assert json.loads((tmp_path / "m.json").read_text())["measured"]["world_size"] == 2


@pytest.mark.parametrize("layout,world", [({"parallel.pp": 2}, 2), ({"optim.distributed": True}, 2),
                                          ({"parallel.tp": 2}, 2)])
def test_planned_static_memory_matches_ranks_of_real_runs(tmp_path, tokenizer_dir, dataset_prefix, layout, world):
    run = tmp_path / "run"
    extra = {"train.steps": 2, "model.num_layers": 4, **layout}
    args = ["train", "--config", TINY]
    for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **extra):
        args += ["--set", s]
    assert run_ranks(world, cli_rank, args, timeout=240) == [0] * world
    first = read_metrics(run)[0]  # rank 0: pipeline stage 0, dp rank 0
    cfg = resolved_config(TINY, args[4::2], world)
    stage = plan(cfg, world, compute_dtype="float32").stages[0]  # precision 'auto' is float32 on a CPU
    assert first["mem_params_bytes"] == pytest.approx(stage.weights_bytes, rel=0.10)
    assert first["mem_grads_bytes"] == pytest.approx(stage.grads_bytes, rel=0.10)
    assert first["mem_optimizer_bytes"] == pytest.approx(stage.optimizer_bytes, rel=0.10)


def test_full_recompute_gives_the_same_gradients_and_saves_what_the_planner_says():
    import dataclasses

    import torch

    from scaletrain.config.schema import ModelConfig, RunConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.nn.loss import cross_entropy_per_token
    from scaletrain.parallel.parallelize import apply_full_recompute
    from scaletrain.profile.activations import saved_activation_bytes

    m = resolve_model(ModelConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=128), tokenizer_vocab=None, tp=1, seq_length=16)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        model = build_model(m, tp_size=1, dtype=torch.float64)
        init_parameters(model, 7, tp_rank=0, tp_size=1)
        if recompute:
            apply_full_recompute(model)
        def forward(model=model):
            logits = model(ids[:, :-1])
            return cross_entropy_per_token(logits, ids[:, 1:]).mean(), logits

        # The schedule holds the logits until backward, as this does.
        (loss, _), saved = saved_activation_bytes(forward, list(model.parameters()), held=lambda r: [r[1]])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved))
    (l0, g0, s0), (l1, g1, s1) = results
    assert l0 == l1 and all(torch.equal(g0[n], g1[n]) for n in g0)
    cfg = dataclasses.replace(RunConfig(), model=m)
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="float64"),
                              train=dataclasses.replace(cfg.train, micro_batch_size=2, global_batch_size=2,
                                                        seq_length=16))
    for saved, recompute in ((s0, "none"), (s1, "full")):
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, recompute=recompute))
        assert saved == pytest.approx(plan(c, 1).stages[0].activation_bytes_per_microbatch, rel=0.10), recompute
    assert s1 < s0 / 2


def _rollout_kv_rank(rank: int, world: int, layout: dict) -> tuple[int, int, int]:
    """Sample a GRPO rollout batch that fills train.seq_length (no stop token) at `layout`: the bytes its
    KV caches hold at the end and the largest logits a sampling pass produced, next to the planner's
    rollout KV and logits bytes for this layout."""
    import dataclasses

    import torch

    import scaletrain.generation.decoding as decoding
    import scaletrain.generation.sampler as rollout
    from scaletrain.config.posttrain import GRPOConfig, PostTrainConfig, RolloutConfig
    from scaletrain.config.schema import ModelConfig, ParallelConfig, RunConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.distributed import ParallelDims
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.parallel.parallelize import parallelize
    from scaletrain.trainer.precision import Precision

    seq, new = 32, 8
    m = resolve_model(ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  ffn_hidden_size=64), tokenizer_vocab=None, tp=layout.get("tp", 1), seq_length=seq)
    cfg = RunConfig(model=m, parallel=ParallelConfig(backend="torch", **layout),
                    posttrain=PostTrainConfig(objective="grpo", grpo=GRPOConfig(group_size=4),
                                              rollout=RolloutConfig(max_new_tokens=new)))
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="float64"),
                              train=dataclasses.replace(cfg.train, seq_length=seq, global_batch_size=8,
                                                        micro_batch_size=2))
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    model = parallelize(build_model(m, tp_size=dims.tp, dtype=torch.float64), dims, cfg.parallel)
    init_parameters(model, 0, tp_rank=dims.tp_rank, tp_size=dims.tp)
    caches = record_kv_caches()  # (a forked rank: the patches die with it)
    logits_bytes = [0]
    read_last = decoding.gathered_last_logits

    def measured(output, tp):  # the logits each sampling pass produced, on the last stage
        logits_bytes[0] = max(logits_bytes[0], output.numel() * output.element_size())
        return read_last(output, tp)
    decoding.gathered_last_logits = measured
    prompts = [list(range(3 + i, 3 + i + seq - new + 1)) for i in range(2)]  # 2 prompts × 4 = the global batch
    rollout.sample_completions(model, dims, prompts, [rollout.sampling_generator(0, i) for i in range(2)],
                               group_size=4, max_new_tokens=new, temperature=1.0, stop_ids=set(), pad_id=0,
                               vocab_limit=96, micro_batch=2, precision=Precision(torch.float64, None, "cpu", "t"),
                               device=torch.device("cpu"), width_multiple=dims.tp if dims.tp > 1 else 1)
    held = sum(k.nbytes + v.nbytes for c in caches for k, v in c._kv.values())
    stage = plan(cfg, world, rollout_group=4).stages[dims.pp_rank]  # a GRPO stage: groups of 4
    return held, stage.rollout_kv_bytes, logits_bytes[0], stage.rollout_logits_bytes


@pytest.mark.parametrize("layout,world,rows,kv_heads", [({}, 1, 8, 2), ({"cp": 2}, 2, 4, 2),
                                                       ({"tp": 2, "sequence_parallel": True}, 2, 8, 1),
                                                       ({"pp": 2}, 2, 8, 2)],
                         ids=["single", "cp2", "tp2sp", "pp2"])
def test_planned_rollout_kv_cache_is_what_decoding_holds(layout, world, rows, kv_heads):
    """GRPO's rollout memory: the KV cache the sampler really holds at the last token (8 rows, 4 per cp rank
    at cp2; tp2+SP decodes with SP lifted, each tp rank caching its kv head; a pp2 stage its own layer) × 32
    positions × layers × k and v × 8 dims × 8 bytes equals the plan's, as do one microbatch's logits over
    the rank's vocabulary slice at the last position (last stage only)."""
    pp = layout.get("pp", 1)
    for rank, (held, planned, logits_held, logits) in enumerate(run_ranks(world, _rollout_kv_rank, layout,
                                                                          timeout=60)):
        assert held == planned == rows * 32 * (2 // pp) * 2 * kv_heads * 8 * 8
        last = pp == 1 or rank == world - 1
        assert logits_held == logits == (2 * 1 * (96 // layout.get("tp", 1)) * 8 if last else 0)  # last position
