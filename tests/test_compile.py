"""parallel.compile: blocks really are compiled (dynamo traces them once, and `eager` passes of new
shapes do not recompile); compiled training at tp2+SP with full recomputation equals the eager single
process in float64 through the real entry point; a compiled GRPO run (rollouts eager) equals the eager
one step for step and samples the same completions."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.cli import main

from conftest import TINY, read_metrics, tiny_overrides
from parity import assert_same_steps

pytestmark = pytest.mark.parity


def _tiny_model():
    from scaletrain.config.schema import ModelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters

    m = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=128), tokenizer_vocab=None, tp=1, seq_length=16)
    model = build_model(m, tp_size=1, dtype=torch.float64)
    init_parameters(model, 7, tp_rank=0, tp_size=1)
    return model


def test_blocks_compile_once_and_eager_passes_do_not_recompile():
    from torch._dynamo.utils import counters

    from scaletrain.parallel.parallelize import compile_blocks, eager

    torch._dynamo.reset()
    counters.clear()
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model(ids)
    names = [n for n, _ in model.named_parameters()]
    compile_blocks(model)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and HF maps see the same names
    out = model(ids)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    traced = counters["stats"]["unique_graphs"]
    assert traced >= 1  # the blocks went through dynamo (both blocks share one compiled code object)
    model(ids)
    assert counters["stats"]["unique_graphs"] == traced  # same shape: the compiled code is reused
    with eager():
        for width in (3, 5, 9):  # what a decoding loop or evaluation rows would feed
            torch.testing.assert_close(model(ids[:, :width]), reference[:, :width], rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == traced


def test_recomputation_checkpoints_the_compiled_block():
    """compile, then recompute: the compiled forward runs inside the checkpoint, so the blocks keep only
    their inputs as under eager recomputation (a checkpoint traced by dynamo would instead fall back to
    eager at the first collective's graph break), with the same loss and gradients."""
    from scaletrain.nn.loss import cross_entropy_per_token
    from scaletrain.parallel.parallelize import apply_full_recompute, compile_blocks
    from scaletrain.profile.activations import saved_activation_bytes

    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        model = _tiny_model()
        if compiled:
            compile_blocks(model)
        apply_full_recompute(model)
        loss, saved = saved_activation_bytes(
            lambda model=model: cross_entropy_per_token(model(ids[:, :-1]), ids[:, 1:]).mean(), list(model.parameters()))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved))
    (l0, g0, s0), (l1, g1, s1) = results
    assert l1 == pytest.approx(l0, rel=1e-12) and s1 == s0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("split", [{"parallel.tp": 2, "parallel.sequence_parallel": True}, {"parallel.cp": 2}],
                         ids=["tp2sp", "cp2"])
def test_compiled_parallel_recompute_matches_eager_single_process(tmp_path, tokenizer_dir, dataset_prefix, split):
    """tp2+SP (all-gather / reduce-scatter inside every block, forward and backward) and cp2 (the
    k/v all-gather): compiled with full recomputation, equal to one eager process."""
    from dist_harness import compiled_cli_rank, run_ranks

    layout = {"parallel.compile": True, "parallel.recompute": "full", **split}

    def args_for(par: bool):
        run = tmp_path / str(par)
        args = ["train", "--config", TINY]
        for item in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
                "precision.dtype": "float64", "train.steps": 4, **(layout if par else {})}):
            args += ["--set", item]
        return run, args

    (single, a_args), (parallel, b_args) = args_for(False), args_for(True)
    assert main(a_args) == 0
    ranks = run_ranks(2, compiled_cli_rank, b_args, timeout=240)
    assert [rc for rc, _, _ in ranks] == [0, 0]
    # One graph per rank for every block, tp/SP collectives included (functional collectives): no
    # graph breaks, and not a silent fallback to eager.
    assert all(graphs == 1 and breaks == {} for _, graphs, breaks in ranks), ranks
    a, b = read_metrics(single), read_metrics(parallel)
    assert len(a) == 4
    assert_same_steps(a, b, 1e-10)


def test_compiled_grpo_matches_eager(tmp_path, tokenizer_dir, dataset_prefix):
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--output", str(synth), "--train", "16", "--test", "2"]) == 0
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        args = ["grpo", "--config", TINY]
        for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
                "posttrain.chat.train_data": f'["{synth / "sft_train.jsonl"}"]', "train.seq_length": 96,
                "train.global_batch_size": 4, "train.steps": 2, "precision.dtype": "float64",
                "posttrain.grpo.group_size": 2, "posttrain.rollout.max_new_tokens": 4,
                "posttrain.rewards.functions": '["grpo_rewards:digits"]', "posttrain.grpo.beta": 0.1,
                "optim.warmup_steps": 1, "parallel.compile": compiled}):
            args += ["--set", s]
        torch._dynamo.reset()
        counters.clear()
        assert main(args) == 0
        graphs[compiled] = counters["stats"]["unique_graphs"]
        runs[compiled] = read_metrics(run), [json.loads(x)["completions"]
                                             for x in (run / "rollouts.jsonl").read_text().splitlines()]
    (a, ca), (b, cb) = runs[False], runs[True]
    assert_same_steps(a, b, 1e-10, loss_abs=1e-12)
    assert ca == cb and len(ca) == 2
    # Training rows compile (a second time once dynamo marks the width dynamic); decoding, a new width
    # every token, stays eager — without `eager` this run compiles 8 graphs and takes 4× as long.
    assert graphs[False] == 0 and 1 <= graphs[True] <= 3, graphs


def test_compile_on_the_te_backend_is_refused_before_anything_is_built(tmp_path, tokenizer_dir, dataset_prefix,
                                                                     capsys, monkeypatch):
    # No CUDA here, so te itself would be refused first: pretend it was selected to reach the compile check.
    monkeypatch.setattr("scaletrain.prepare.select_backend", lambda backend, kernels: ("te", None))
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{"parallel.compile": True}):
        args += ["--set", item]
    assert main(args) == 2
    assert "parallel.compile on the te backend" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
