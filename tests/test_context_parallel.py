"""Context parallelism: the load-balanced split and its masks by hand; blockwise attention (and the
fused CUDA path's call) equal to SDPA in values and gradients; training at cp2 (alone, with tp2+SP and
full recomputation, dp2+ZeRO-1, pp2, and SFT packing) equal to the single process in float64 through
the real entry point; a cp2 run resumes at cp1; activation memory per rank halves as the planner says;
bad cp layouts exit 2 before anything is built."""

from __future__ import annotations

import pytest
import torch

from scaletrain.cli import main
from scaletrain.data.packing import block_causal_mask
from scaletrain.parallel.context_parallel import attention_mask, gathered_order, local_indices

from conftest import TINY, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.parity

F64 = {"precision.dtype": "float64", "train.steps": 4}


def test_split_is_a_load_balanced_partition():
    s, cp = 24, 3
    parts = [local_indices(s, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(s))
    assert parts[0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]  # chunks 0 and 5 of 6
    # Under the causal mask every rank scores the same number of (query, key) pairs.
    work = [int(attention_mask(s, cp, r).sum()) for r in range(cp)]
    assert len(set(work)) == 1 and sum(work) == s * (s + 1) // 2
    with pytest.raises(ValueError, match="2·cp"):
        local_indices(10, 3, 0)


def test_masks_are_the_full_masks_rows_and_gathered_columns():
    s, cp = 16, 2
    docs = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4, [3] * 16])
    full = block_causal_mask(docs)  # [b, 1, s, s] in sequence order
    order = gathered_order(s, cp)
    for r in range(cp):
        rows = local_indices(s, cp, r)
        assert torch.equal(attention_mask(s, cp, r, docs), full[:, :, rows][:, :, :, order])
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        assert torch.equal(attention_mask(s, cp, r)[0, 0], causal[rows][:, order])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("block", [3, 4, 64])
def test_blockwise_attention_equals_sdpa_values_and_grads(packed, block):
    """This rank's two chunks of queries against all keys, walked in blocks (3: blocks straddle the
    diagonal and the chunks' ends), equal the dense-mask SDPA rows — outputs and q/k/v gradients, GQA."""
    import torch.nn.functional as F

    from scaletrain.nn.blockwise_attention import QuerySegment, blockwise_attention

    g = torch.Generator().manual_seed(0)
    b, s, heads, kv, d, cp, rank = 2, 24, 4, 2, 8, 3, 1
    q = torch.randn(b, s, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, kv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s, kv, d, generator=g, dtype=torch.float64, requires_grad=True)
    docs = torch.tensor([[0] * 7 + [1] * 11 + [-1] * 6, [5] * 3 + [6] * 21]) if packed else None
    rows = local_indices(s, cp, rank)
    full = block_causal_mask(docs) if packed else torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    ref = F.scaled_dot_product_attention(q[:, rows].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=full[:, :, rows], enable_gqa=True).transpose(1, 2).reshape(b, 8, -1)
    chunk = s // (2 * cp)
    segments = (QuerySegment(0, rank * chunk, chunk), QuerySegment(chunk, (2 * cp - 1 - rank) * chunk, chunk))
    out = blockwise_attention(q[:, rows], k, v, segments, docs[:, rows] if packed else None, docs, block=block)
    assert (out - ref).abs().max() < 1e-12
    weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for a, r in zip(grads, grads_ref):
        assert (a - r).abs().max() < 1e-12
    if not packed:  # the CUDA path (fused SDPA with a lower-right causal bias) computes the same rows
        from scaletrain.nn.blockwise_attention import prefix_attention

        fused = prefix_attention(q[:, rows], k, v, segments)
        assert (fused - ref).abs().max() < 1e-12
        for a, r in zip(torch.autograd.grad((fused * weights).sum(), (q, k, v)), grads_ref):
            assert (a - r).abs().max() < 1e-12


def _rollout_fields_rank(rank: int, world: int) -> dict:
    """A rollout microbatch (whole rows, the same on every cp rank) split for the step, and per-token
    values of this rank's share gathered back; a split sampling job gathered in item order."""
    from scaletrain.config.schema import ParallelConfig
    from scaletrain.distributed import ParallelDims
    from scaletrain.generation.batching import split_over_cp
    from scaletrain.parallel.context_parallel import gather_sequence, shard_microbatch

    dims = ParallelDims.from_config(ParallelConfig(cp=world), world, rank)
    cp = dims.comm("cp")
    b, s = 3, 16
    full = torch.arange(b * s, dtype=torch.float64).reshape(b, s)
    batch = {"tokens": full.long(), "labels": full.long(), "ref_logps": full, "returns": full + 1,
             "advantages": torch.tensor([1.0, 2.0, 3.0])}
    part = shard_microbatch(batch, cp)
    per_token = shard_microbatch({**batch, "advantages": full}, cp)["advantages"]
    calls: list[list[int]] = []

    def work(items: list[int]) -> list[int]:
        calls.append(items)
        return [x for i in items for x in (10 * i, 10 * i + 1)]

    shared = split_over_cp(list(range(5)), dims, work, per_item=2, unit=4)
    return {"idx": part["tokens"][0].tolist(), "ref": part["ref_logps"].shape, "adv": part["advantages"].tolist(),
            "back": torch.equal(gather_sequence(part["ref_logps"], cp), full)
            and torch.equal(gather_sequence(part["returns"], cp), full + 1)
            and torch.equal(gather_sequence(per_token, cp), full),
            "shared": shared, "calls": calls}


def test_rollout_fields_split_and_gather_back_over_cp():
    r0, r1 = run_ranks(2, _rollout_fields_rank, timeout=60)
    assert r0["idx"] == local_indices(16, 2, 0).tolist() and r1["idx"] == local_indices(16, 2, 1).tolist()
    assert r0["ref"] == (3, 8) and r0["adv"] == [1.0, 2.0, 3.0]  # per-row advantages stay whole
    assert r0["back"] and r1["back"]
    assert r0["shared"] == r1["shared"] == [x for i in range(5) for x in (10 * i, 10 * i + 1)]
    assert r0["calls"] == [[0, 1, 2, 2]] and r1["calls"] == [[3, 4]]  # rank 0 padded to whole units of 4


def _pretrain(run_dir, tokenizer_dir, prefix, parallel: dict):
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **{**F64, **parallel}):
        args += ["--set", item]
    return run_dir, args


@pytest.mark.parametrize("layout,world", [
    ({"parallel.cp": 2}, 2),
    ({"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.recompute": "full"}, 4),
    ({"parallel.cp": 2, "optim.distributed": True}, 4),  # dp2 × cp2, ZeRO-1 over the four ranks
    ({"parallel.cp": 2, "parallel.pp": 2}, 4),
], ids=["cp2", "cp2-tp2-sp-recompute", "cp2-dp2-zero", "cp2-pp2"])
def test_pretraining_matches_single_process(tmp_path, tokenizer_dir, dataset_prefix, layout, world, monkeypatch):
    monkeypatch.setattr("scaletrain.nn.blockwise_attention.BLOCK", 5)  # several blocks per chunk (forked ranks inherit it)
    a, b = run_single_and_parallel(
        lambda par: _pretrain(tmp_path / str(par), tokenizer_dir, dataset_prefix, layout if par else {}), world)
    assert len(a) == 4
    assert_same_steps(a, b, 1e-10)


def test_sft_packing_matches_single_process(tmp_path, tokenizer_dir, dataset_prefix, monkeypatch):
    """Packed conversations (block-diagonal mask, restarting positions) split over cp2 · dp2."""
    monkeypatch.setattr("scaletrain.nn.blockwise_attention.BLOCK", 16)
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--output", str(synth), "--train", "40", "--test", "5"]) == 0

    def args_for(par: bool):
        run = tmp_path / str(par)
        args = ["sft", "--config", TINY]
        for item in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
                **F64, "posttrain.chat.train_data": f'["{synth / "sft_train.jsonl"}"]', "train.seq_length": 160,
                "train.steps": 3, **({"parallel.cp": 2} if par else {})}):
            args += ["--set", item]
        return run, args

    a, b = run_single_and_parallel(args_for, 4)
    assert len(a) == 3 and a[0]["loss_tokens"] > 0
    assert [x["loss_tokens"] for x in a] == [y["loss_tokens"] for y in b]
    assert_same_steps(a, b, 1e-10)


def test_cp2_run_resumes_at_cp1(tmp_path, tokenizer_dir, dataset_prefix):
    """Parameters are replicated over cp, so a checkpoint does not know cp: stop at cp2, go on at cp1."""
    straight, args = _pretrain(tmp_path / "straight", tokenizer_dir, dataset_prefix, {"train.steps": 6})
    assert main(args) == 0
    run, args = _pretrain(tmp_path / "run", tokenizer_dir, dataset_prefix,
                          {"train.steps": 6, "parallel.cp": 2, "train.exit_interval": 3})
    assert run_ranks(2, cli_rank, args, timeout=240) == [0, 0]
    assert len(read_metrics(run)) == 3
    assert main(_pretrain(run, tokenizer_dir, dataset_prefix, {"train.steps": 6})[1]) == 0
    assert_same_steps(read_metrics(straight), read_metrics(run), 1e-10)


@pytest.mark.parametrize("extra,message", [
    ({"parallel.cp": 3, "train.seq_length": 32}, "not divisible by 2·parallel.cp = 6"),
    ({"parallel.cp": 2, "parallel.tp": 4, "parallel.sequence_parallel": True, "model.num_kv_heads": 4,
      "train.seq_length": 20},
     "tokens per cp rank are not divisible by parallel.tp"),
])
def test_bad_cp_layouts_exit_before_training(tmp_path, tokenizer_dir, dataset_prefix, capsys, extra, message):
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **extra):
        args += ["--set", item]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _saved_bytes_rank(rank: int, world: int, cp: int) -> int:
    """One microbatch's forward on this rank's share of the sequence: bytes saved for backward."""
    import dataclasses

    from scaletrain.config.schema import ParallelConfig
    from scaletrain.distributed.dims import ParallelDims
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.parallel.context_parallel import shard_microbatch
    from scaletrain.parallel.parallelize import parallelize
    from scaletrain.profile.activations import saved_activation_bytes
    from scaletrain.stages.pretrain.objective import LanguageModelingObjective

    cfg, _ = _memory_config(cp)
    dims = ParallelDims.from_config(dataclasses.replace(ParallelConfig(), cp=cp), world, rank)
    model = parallelize(build_model(cfg.model, tp_size=1, dtype=torch.float32), dims, cfg.parallel)
    init_parameters(model, 3, tp_rank=0, tp_size=1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_length + 1), generator=torch.Generator().manual_seed(0))
    batch = shard_microbatch({"tokens": ids[:, :-1], "labels": ids[:, 1:],
                              "loss_mask": torch.ones(2, cfg.train.seq_length)}, dims.comm("cp"))
    objective = LanguageModelingObjective(dims.tp_comm)

    def forward():
        out, loss_fn = objective.forward_step(batch, model)
        return loss_fn(out)[0]

    dims.comm("cp").stats.reset()
    loss, saved = saved_activation_bytes(forward, list(model.parameters()))
    loss.backward()
    stats = dims.comm("cp").stats.bytes
    return saved, stats.get("all_gather", 0) + stats.get("reduce_scatter", 0)


def _memory_config(cp: int):
    import dataclasses

    from scaletrain.config.schema import ModelConfig, RunConfig
    from scaletrain.config.validate import resolve_model

    seq = 256
    m = resolve_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                                  vocab_size=128), tokenizer_vocab=None, tp=1, seq_length=seq)
    cfg = dataclasses.replace(RunConfig(), model=m)
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="float32"),
                              parallel=dataclasses.replace(cfg.parallel, cp=cp),
                              train=dataclasses.replace(cfg.train, micro_batch_size=2, global_batch_size=2, seq_length=seq))
    return cfg, seq


def test_activation_memory_per_rank_falls_with_cp_as_the_planner_says():
    """Saved-for-backward bytes per rank within 10% of the plan (and about half of cp1's); the cp
    traffic — keys/values all-gathered forward, their gradients reduce-scattered back — exactly the
    planner's payload."""
    from scaletrain.profile.planner import plan

    (single, _), ranks = _saved_bytes_rank(0, 1, 1), run_ranks(2, _saved_bytes_rank, 2, timeout=120)
    assert ranks[0] == ranks[1]  # load-balanced: both ranks hold and send the same
    for cp, saved in ((1, single), (2, ranks[0][0])):
        cfg, _ = _memory_config(cp)
        planned = plan(cfg, cp, compute_dtype="float32")
        assert saved == pytest.approx(planned.stages[0].activation_bytes_per_microbatch, rel=0.10), (cp, saved)
    assert ranks[0][0] < 0.6 * single
    wire = plan(_memory_config(2)[0], 2, compute_dtype="float32").comm_bytes_per_step["cp"]
    assert ranks[0][1] == pytest.approx(wire / (1 / 2), rel=1e-6)  # ring: (cp-1)/cp of the payload on the wire


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
def test_cuda_cp_attention_paths_equal_sdpa():
    """On a GPU: the fused lower-right path and the blockwise path (packed rows) against dense SDPA,
    values and gradients, fp32, at a size where blocks and GQA matter."""
    import torch.nn.functional as F

    from scaletrain.nn.blockwise_attention import QuerySegment, blockwise_attention, prefix_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    b, s, heads, kv, d, cp, rank = 2, 2048, 8, 2, 64, 4, 1
    q, k, v = (torch.randn(b, s, n, d, generator=g, device="cuda", requires_grad=True) for n in (heads, kv, kv))
    rows = local_indices(s, cp, rank).cuda()
    chunk = s // (2 * cp)
    segments = (QuerySegment(0, rank * chunk, chunk), QuerySegment(chunk, (2 * cp - 1 - rank) * chunk, chunk))
    docs = (torch.arange(s, device="cuda") // 300)[None].expand(b, s).contiguous()
    for packed in (False, True):
        full = block_causal_mask(docs) if packed else torch.ones(s, s, dtype=torch.bool, device="cuda").tril()[None, None]
        ref = F.scaled_dot_product_attention(q[:, rows].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=full[:, :, rows], enable_gqa=True).transpose(1, 2).reshape(b, 2 * chunk, -1)
        out = (blockwise_attention(q[:, rows], k, v, segments, docs[:, rows], docs) if packed
               else prefix_attention(q[:, rows], k, v, segments))
        assert (out - ref).abs().max() < 2e-3
        w = torch.randn(ref.shape, generator=g, device="cuda")
        for a, r in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
            assert (a - r).abs().max() < 2e-3 * r.abs().max()
