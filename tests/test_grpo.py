"""GRPO: advantages and loss against hand computations, the verifiable rewards, layout-independent
rollouts, the whole step at tp2·pp2 and dp2 equal to the single process (float64), exact resume with
the saved reference policy, the up-front errors, and a run that raises its reward."""

from __future__ import annotations

import json
import os

import pytest
import torch

from scaletrain.cli import main
from scaletrain.distributed import ParallelDims

from conftest import TINY, grpo_args, read_metrics, tiny_overrides
from parity import assert_same_steps, run_single_and_parallel
from rollout_probe import record_kv_caches

pytestmark = pytest.mark.e2e


# ---------------------------------------------------------------------------------------- maths

def test_group_advantages_by_hand():
    from scaletrain.stages.rl.grpo import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0])
    a = group_advantages(r, 4)
    std1 = (4 * 0.25 / 3) ** 0.5  # unbiased std of (1, 0, 0, 1)
    std3 = ((3 * 0.75**2 + 2.25**2) / 3) ** 0.5
    expect = [0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4), 0, 0, 0, 0,
              *(-0.75 / (std3 + 1e-4),) * 3, 2.25 / (std3 + 1e-4)]
    assert a.tolist() == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert group_advantages(r, 4, scale=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25], abs=1e-15)


def _tiny_model(init_std: float = 0.02, num_layers: int = 2):
    from scaletrain.config.schema import ModelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters

    m = resolve_model(ModelConfig(hidden_size=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=64, init_std=init_std), tokenizer_vocab=None, tp=1, seq_length=16)
    model = build_model(m, dtype=torch.float64)
    init_parameters(model, 3, tp_rank=0, tp_size=1)
    return model


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_loss_value_and_gradient_by_hand(norm):
    from scaletrain.generation.batching import training_rows
    from scaletrain.stages.rl.grpo import GRPOObjective

    model = _tiny_model()
    rows = [training_rows([1, 2, 3], [4, 5, 6, 7], 12, 0), training_rows([8, 9], [10, 11], 12, 0)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["advantages"] = torch.tensor([0.7, -1.3], dtype=torch.float64)
    batch["ref_logps"] = -torch.rand(2, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 3
    beta, temp = 0.2, 0.8
    obj = GRPOObjective(None, kl_beta=beta, temperature=temp, loss_norm=norm)
    out, loss_fn = obj.forward_step(batch, model)
    loss, metrics = loss_fn(out)
    loss.backward()
    loss = loss.detach()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Independently: log-softmax at temperature, the policy-gradient surrogate −A·log π and the k3 KL.
    logits = model(batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
                   & (batch["document_ids"][:, None, :, None] == batch["document_ids"][:, None, None, :]))
    logp = torch.log_softmax(logits / temp, -1).gather(-1, batch["labels"][..., None])[..., 0]
    m = batch["loss_mask"].double()
    d = batch["ref_logps"] - logp
    kl = torch.exp(d) - d - 1
    surrogate = -batch["advantages"][:, None] * logp + beta * kl
    value = (-batch["advantages"][:, None] + beta * kl).detach()  # the ratio is 1 in value
    if norm == "token":
        reduce = lambda t: (t * m).sum()  # noqa: E731
    else:
        reduce = lambda t: ((t * m).sum(-1) / m.sum(-1)).sum()  # noqa: E731
    assert m.sum(-1).tolist() == [4.0, 2.0]  # the completion tokens are the targets
    assert float(loss) == pytest.approx(float(reduce(value)), rel=1e-12)
    assert float(metrics["kl"]) == pytest.approx(float(reduce(kl).detach()), rel=1e-12)
    assert int(obj.count(batch)) == (6 if norm == "token" else 2)
    reduce(surrogate).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-10, atol=1e-14), n


def test_clipped_surrogate_by_hand():
    """grpo_iterations > 1: −min(ρA, clip(ρ, 1−ε, 1+ε_high)A) against the sampling-time log-probs; tokens
    on the clipped branch contribute no gradient."""
    from scaletrain.generation.batching import training_rows
    from scaletrain.stages.rl.grpo import GRPOObjective

    model = _tiny_model()
    rows = [training_rows([1, 2, 3], [4, 5, 6, 7], 12, 0), training_rows([8, 9], [10, 11], 12, 0)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["advantages"] = torch.tensor([0.7, -1.3], dtype=torch.float64)
    with torch.no_grad():  # sampling-time log-probs, moved so that some ratios leave the clip range
        logits = model(batch["tokens"], position_ids=batch["position_ids"])
        now = torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None])[..., 0]
    shift = torch.linspace(-0.5, 0.5, 12, dtype=torch.float64)
    batch["old_logps"] = now + shift
    obj = GRPOObjective(None, clipped=True, clip_eps=0.2, clip_eps_high=0.28)
    assert obj.metrics == ("clip_fraction",)
    out, loss_fn = obj.forward_step(batch, model)
    loss, metrics = loss_fn(out)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
                   & (batch["document_ids"][:, None, :, None] == batch["document_ids"][:, None, None, :]))
    logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None])[..., 0]
    m = batch["loss_mask"].double()
    a = batch["advantages"][:, None]
    ratio = torch.exp(logp - batch["old_logps"])
    surrogate = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    assert float(loss.detach()) == pytest.approx(float((surrogate * m).sum().detach()), rel=1e-12)
    active = ((ratio.clamp(0.8, 1.28) * a < ratio * a).double() * m).sum()
    assert 0 < float(active) < 6 and float(metrics["clip_fraction"]) == float(active)
    (surrogate * m).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-10, atol=1e-14), n


def test_training_rows_mask_the_completion():
    from scaletrain.generation.batching import training_rows

    r = training_rows([5, 6, 7], [8, 9], 8, 0)
    assert r["tokens"].tolist() == [5, 6, 7, 8, 0, 0, 0, 0]
    assert r["labels"].tolist() == [6, 7, 8, 9, 0, 0, 0, 0]
    assert r["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # labels 8 and 9: the completion
    assert r["position_ids"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    assert r["document_ids"].tolist() == [0, 0, 0, 0, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="seq_length"):
        training_rows([1] * 6, [2] * 4, 8, 0)


def test_left_padding_does_not_change_what_a_prompt_samples():
    from scaletrain.generation.sampler import sample_completions, sampling_generator
    from scaletrain.trainer.precision import Precision

    model = _tiny_model()
    kw = dict(group_size=3, max_new_tokens=5, temperature=1.0, stop_ids={63}, pad_id=0, vocab_limit=60,
              micro_batch=3, precision=Precision(torch.float64, None, "cpu", "test"), device=torch.device("cpu"))
    short, long = [4, 5], [7, 8, 9, 10, 11, 12]
    alone, _ = sample_completions(model, ParallelDims.single(), [short], [sampling_generator(1, 0)], **kw)
    both, stopped = sample_completions(model, ParallelDims.single(), [long, short], [sampling_generator(1, 5), sampling_generator(1, 0)],
                                       **kw)
    assert both[3:] == alone  # the short prompt, left-padded beside a longer one, samples the same tokens
    assert all(len(c) == 5 for c in alone) and all(t < 60 for c in both for t in c)  # vocab limit respected
    assert len(set(map(tuple, alone))) > 1  # a group's samples differ
    assert stopped == [False] * 6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_decodes_what_recomputation_does(temperature):
    from scaletrain.generation.decoding import can_use_kv_cache
    from scaletrain.generation.sampler import sample_completions, sampling_generator
    from scaletrain.trainer.precision import Precision

    model = _tiny_model(init_std=0.5)  # sharp attention: a wrong position or mask changes the tokens
    assert can_use_kv_cache(model) and not can_use_kv_cache(model, width_multiple=2)
    kw = dict(group_size=4, max_new_tokens=8, temperature=temperature, stop_ids=set(range(1, 16)), pad_id=0,
              vocab_limit=60, micro_batch=4, precision=Precision(torch.float64, None, "cpu", "test"),
              device=torch.device("cpu"))
    prompts = [[4, 5], [7, 8, 9, 10, 11, 12], [20, 21, 22]]

    def gens():
        return [sampling_generator(2, i) for i in range(3)] if temperature else None

    cached = sample_completions(model, ParallelDims.single(), prompts, gens(), **kw)
    recomputed = sample_completions(model, ParallelDims.single(), prompts, gens(), kv_cache=False, **kw)
    padded = sample_completions(model, ParallelDims.single(), prompts, gens(), width_multiple=2, **kw)  # wider rows: no cache
    assert cached == recomputed == padded
    lengths = {len(c) for c in cached[0]}
    assert len(lengths) > 1  # rows finished at different steps: the cache kept finished rows aligned


def _decoding_rank(rank: int, world: int, layout: dict, num_layers: int) -> tuple:
    import scaletrain.generation.sampler as rollout
    from scaletrain.config.schema import ModelConfig, ParallelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.distributed import ParallelDims
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.parallel.parallelize import parallelize, sp_bound
    from scaletrain.trainer.precision import Precision

    par = ParallelConfig(**layout)
    dims = ParallelDims.from_config(par, world, rank)
    m = resolve_model(ModelConfig(hidden_size=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=64, init_std=0.5), tokenizer_vocab=None, tp=par.tp, seq_length=16)
    model = parallelize(build_model(m, tp_size=par.tp, dtype=torch.float64), dims, par)
    init_parameters(model, 3, tp_rank=dims.tp_rank, tp_size=par.tp)
    caches = record_kv_caches()  # (a forked rank: the patch dies with it)
    kw = dict(group_size=4, max_new_tokens=8, temperature=1.0, stop_ids=set(range(1, 16)), pad_id=0, vocab_limit=60,
              micro_batch=2, precision=Precision(torch.float64, None, "cpu", "test"), device=torch.device("cpu"),
              width_multiple=par.tp if par.sequence_parallel else 1)  # 6 microbatches: whole groups at pp2 vpp2
    prompts = [[4, 5], [7, 8, 9, 10, 11, 12], [20, 21, 22]]
    cached = rollout.sample_completions(model, dims, prompts, [rollout.sampling_generator(2, i) for i in range(3)], **kw)
    used_cache, restored = len(caches) > 0, sp_bound(model) == par.sequence_parallel
    rows_left = sum(next(iter(c._kv.values()))[0].shape[0] for c in caches)  # rows the caches still hold
    recomputed = rollout.sample_completions(model, dims, prompts, [rollout.sampling_generator(2, i) for i in range(3)],
                                            kv_cache=False, **kw)
    return cached, recomputed, used_cache, restored, rows_left


@pytest.mark.parametrize("layout,world,num_layers", [
    ({"tp": 2, "sequence_parallel": True}, 2, 2), ({"pp": 2}, 2, 2),
    ({"tp": 2, "pp": 2, "sequence_parallel": True}, 4, 2), ({"pp": 2, "vpp": 2}, 2, 4)],
    ids=["tp2sp", "pp2", "tp2pp2sp", "pp2vpp2"])
def test_parallel_layouts_decode_with_the_kv_cache(layout, world, num_layers):
    """Every torch-backend layout decodes incrementally: pipeline stages cache their own layers and pass
    [b, 1, h] activations; SP is lifted for decoding (one new token cannot be split over tp) and bound
    again afterwards. The tokens equal the layout's own recomputation and the single process's.
    Finished rows leave the caches (the last token ran for the longest completions only; under
    interleaving, whose schedule needs whole groups of microbatches, one row per emptied microbatch)."""
    from scaletrain.generation.sampler import sample_completions, sampling_generator
    from scaletrain.trainer.precision import Precision

    from dist_harness import run_ranks

    single = sample_completions(_tiny_model(0.5, num_layers), ParallelDims.single(), [[4, 5], [7, 8, 9, 10, 11, 12], [20, 21, 22]],
                                [sampling_generator(2, i) for i in range(3)], group_size=4, max_new_tokens=8,
                                temperature=1.0, stop_ids=set(range(1, 16)), pad_id=0, vocab_limit=60, micro_batch=4,
                                precision=Precision(torch.float64, None, "cpu", "test"), device=torch.device("cpu"))
    longest = max(len(c) for c in single[0])
    ran_last = [len(c) == longest for c in single[0]]
    # Interleaved: each of the 6 microbatches (2 rows) keeps its place, with one finished row if need be.
    running_at_the_end = sum(max(1, sum(ran_last[2 * m:2 * m + 2])) for m in range(6)) if layout.get("vpp", 1) > 1 \
        else sum(ran_last)
    for cached, recomputed, used_cache, restored, rows_left in run_ranks(world, _decoding_rank, layout, num_layers,
                                                                         timeout=60):
        assert used_cache and restored
        assert cached == recomputed == single
        assert rows_left == running_at_the_end
    assert len({len(c) for c in single[0]}) > 1 and running_at_the_end < 12


# ---------------------------------------------------------------------------------------- rewards

def test_math_answer_reward():
    from scaletrain.stages.rl.rewards import math_answer

    assert math_answer("The answer is 12.", {"answer": 12}) == 1.0
    assert math_answer("The answer is 13.", {"answer": 12}) == 0.0
    assert math_answer("so \\boxed{3/4}", {"answer": "0.75"}) == 1.0
    assert math_answer("work... #### 1,200", {"answer": 1200}) == 1.0
    assert math_answer("The answer is -3 and not \\boxed{4}", {"answer": 4}) == 1.0  # boxed wins
    assert math_answer("twelve", {"answer": 12}) == 0.0
    with pytest.raises(KeyError, match="answer"):
        math_answer("The answer is 1", {})
    from scaletrain.stages.rl.rewards import answer_format

    assert [answer_format(t, {}) for t in ("The answer is 12.", "The answer is 40 or so", "T1|im_end|>", "\\boxed{x}")] \
        == [1.0, 1.0, 0.0, 0.0]


def test_python_tests_reward_runs_code_apart_and_bounded():
    from scaletrain.stages.rl.rewards import python_tests, run_python_tests
    from scaletrain.stages.rl.sandbox.runner import SandboxSettings, sandbox_problem

    if sandbox_problem(SandboxSettings()) and not os.environ.get("SCALETRAIN_REQUIRE_SANDBOX"):
        pytest.skip("no bubblewrap sandbox here (tests/test_sandbox.py has the attacks)")
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert python_tests(good, {"tests": tests}) == 1.0
    assert python_tests("```python\ndef add(a, b):\n    return a - b\n```", {"tests": tests}) == 0.0
    assert python_tests("def add(a, b) return", {"tests": tests}) == 0.0  # a syntax error fails, nothing raises
    assert not run_python_tests("while True:\n    pass", "", SandboxSettings(timeout_s=1.0))  # killed at the timeout
    assert not run_python_tests("x = bytearray(4 << 30)", "", SandboxSettings(memory_mb=256))  # the memory limit holds


def test_custom_rewards_resolve_or_fail_clearly():
    from scaletrain.stages.rl.rewards import resolve_reward, reward_problem

    assert resolve_reward("grpo_rewards:digits")("a1b2", {}) == 0.5
    assert "bundled ones are math_answer, python_tests" in reward_problem("answer")
    assert "cannot be imported" in reward_problem("no_such_module_xyz:f")


# ---------------------------------------------------------------------------------------- through the CLI

@pytest.mark.parametrize("layout,world", [
    ({"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}, 4),
    ({"posttrain.grpo.iterations": 2}, 2),
    # cp2: each cp rank samples half the prompts on whole sequences, the step trains on split rows;
    # per-sequence normalisation sums each row's parts over cp. 5 held-out prompts: 3 + 2 over cp.
    ({"parallel.cp": 2, "posttrain.grpo.loss_norm": "sequence", "posttrain.grpo.iterations": 2}, 2),
    # interleaved: decoding keeps whole groups of microbatches (2 sampling passes of 4 rows here)
    ({"parallel.pp": 2, "parallel.vpp": 2, "posttrain.rollout.micro_batch": 4}, 2),
], ids=["tp2pp2sp", "dp2", "cp2", "pp2vpp2"])
def test_grpo_steps_match_single_process_across_layouts(tmp_path, tokenizer_dir, dataset_prefix, prompts,
                                                        layout, world):
    single, parallel = tmp_path / "False", tmp_path / "True"
    # 5 held-out prompts: uneven over dp2, padded to whole microbatches — the padding must not count.
    valid = {"posttrain.chat.valid_data": f'["{prompts.with_name("sft_test.jsonl")}"]', "train.eval_interval": 3}
    a, b = run_single_and_parallel(
        lambda par: (tmp_path / str(par), grpo_args(tmp_path / str(par), tokenizer_dir, dataset_prefix, prompts, **valid,
                                                **{k: v for k, v in layout.items() if par or k.startswith("posttrain")})),
        world)
    iterations = layout.get("posttrain.grpo.iterations", 1)
    assert len(a) == 3
    assert a[0]["kl"] == 0.0 and a[1]["kl"] > 0  # the policy starts as the reference, then moves away
    assert all(x["grad_norm"] > 0 for x in a)  # graded rewards: real advantages, a real gradient
    assert_same_steps(a, b, 1e-10)
    for x, y in zip(a, b):
        for k in ("kl", "reward", "reward_digits", "reward_std", "zero_std_groups", "completion_tokens", "truncated"):
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)
    assert "val_loss" not in a[2] and a[2]["val_completion_tokens"] > 0  # held-out rewards, no loss
    for k in ("val_reward", "val_reward_digits", "val_completion_tokens"):
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-12, abs=1e-15), k
    # The layouts sampled the same completions (the main rank logs its first group per step).
    logs = [[json.loads(line) for line in (d / "rollouts.jsonl").read_text().splitlines()] for d in (single, parallel)]
    assert [r["completions"] for r in logs[0]] == [r["completions"] for r in logs[1]]
    assert len(logs[0]) == (3 if iterations == 1 else 2)  # rollouts at steps 1, 2, 3 — or 1 and 3
    if iterations > 1:  # step 2 reuses step 1's batch: the same rewards, a second (clipped-ratio) update
        assert a[1]["reward"] == a[0]["reward"] and a[1]["rollout_s"] == 0.0 and a[1]["loss"] != a[0]["loss"]
        assert all(x["clip_fraction"] == pytest.approx(y["clip_fraction"], abs=1e-12) for x, y in zip(a, b))


def test_resume_is_exact_and_keeps_the_starting_reference(tmp_path, tokenizer_dir, dataset_prefix, prompts, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(grpo_args(straight, tokenizer_dir, dataset_prefix, prompts, **{"train.steps": 4})) == 0
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **{"train.steps": 4, "train.exit_interval": 2})) == 0
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **{"train.steps": 4})) == 0
    assert "reference policy: loaded from" in capsys.readouterr().out
    keys = ("loss", "grad_norm", "kl", "reward")
    assert [[m[k] for k in keys] for m in read_metrics(stopped)] == [[m[k] for k in keys] for m in read_metrics(straight)]
    import shutil

    shutil.rmtree(stopped / "reference")
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **{"train.steps": 6})) == 2
    assert "needs the reference policy saved at its first start" in capsys.readouterr().err


def test_resume_between_updates_of_one_rollout_batch(tmp_path, tokenizer_dir, dataset_prefix, prompts, capsys):
    """grpo_iterations 2, stopped after step 3 (step 4 trains on step 3's rollouts): the batch comes back
    from run_dir/rollout_buffer and the run equals the uninterrupted one."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = {"train.steps": 4, "posttrain.grpo.iterations": 2}
    assert main(grpo_args(straight, tokenizer_dir, dataset_prefix, prompts, **extra)) == 0
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **extra, **{"train.exit_interval": 3})) == 0
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **extra)) == 0
    keys = ("loss", "grad_norm", "kl", "reward", "clip_fraction")
    assert [[m[k] for k in keys] for m in read_metrics(stopped)] == [[m[k] for k in keys] for m in read_metrics(straight)]
    # Pruned to what the latest checkpoint (step 4: the next batch starts fresh) can need.
    assert sorted(f.name for f in (stopped / "rollout_buffer").iterdir()) == ["step_0000002.rank_0.safetensors"]
    import shutil

    shutil.rmtree(stopped / "checkpoints" / "step_0000004")
    (stopped / "checkpoints" / "latest").write_text("step_0000003")
    for f in (stopped / "rollout_buffer").iterdir():
        f.unlink()
    capsys.readouterr()
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **extra)) == 2
    assert "rollout_buffer" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    ({"posttrain.grpo.group_size": 1}, "needs at least 2"),
    ({"posttrain.grpo.group_size": 3}, "multiple of posttrain.grpo.group_size = 3"),
    ({"posttrain.rollout.temperature": 0.0}, "must be positive"),
    ({"posttrain.rewards.functions": '["answer"]'}, "bundled ones are math_answer"),
    ({"posttrain.rewards.weights": "[1.0, 2.0]"}, "one weight per reward"),
    ({"posttrain.rollout.max_new_tokens": 96}, "posttrain.rollout.max_new_tokens = 96"),
    ({"posttrain.rewards.functions": '["python_tests"]'}, "reads the `tests` field, which 64 of 64"),
    ({"posttrain.grpo.loss_norm": "seq"}, "posttrain.grpo.loss_norm"),
    ({"posttrain.grpo.iterations": 0}, "must be at least 1"),
    ({"posttrain.grpo.clip_eps": 1.5}, "posttrain.grpo.clip_eps = 1.5"),
    ({"posttrain.rollout.micro_batch": 3}, "posttrain.rollout.micro_batch = 3 must divide"),
])
def test_bad_grpo_configs_fail_before_training(tmp_path, tokenizer_dir, dataset_prefix, prompts, capsys, extra, message):
    assert main(grpo_args(tmp_path / "r", tokenizer_dir, dataset_prefix, prompts, **extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_groups_must_stay_on_one_dp_rank(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    from scaletrain.config import ConfigError, load_config
    from scaletrain.prepare import check_config

    cfg = load_config(TINY, tiny_overrides(tmp_path, tokenizer_dir, dataset_prefix, **{
        "posttrain.objective": "grpo", "posttrain.chat.train_data": f'["{prompts}"]', "posttrain.grpo.group_size": 4,
        "train.global_batch_size": 8, "train.micro_batch_size": 1, "train.seq_length": 96,
        "posttrain.rollout.max_new_tokens": 6}))
    assert check_config(cfg, 2) == 2
    with pytest.raises(ConfigError, match="each dp rank samples whole groups"):
        check_config(cfg, 4)


@pytest.mark.slow
def test_grpo_raises_its_reward(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    """From a random policy, 40 GRPO steps on the graded digit reward: the mean reward of the last
    steps is far above the first steps' (float32, the plain-CPU setting a user runs)."""
    run = tmp_path / "r"
    assert main(grpo_args(run, tokenizer_dir, dataset_prefix, prompts, **{
        "precision.dtype": "float32", "train.steps": 40, "optim.lr": 1e-2, "train.global_batch_size": 32,
        "train.micro_batch_size": 16, "posttrain.grpo.group_size": 8, "posttrain.grpo.beta": 0.0, "optim.weight_decay": 0.0,
        "model.num_layers": 2})) == 0
    rewards = [m["reward"] for m in read_metrics(run)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_rollout_micro_batch_changes_speed_not_results(tmp_path, tokenizer_dir, dataset_prefix, prompts, monkeypatch):
    """Sampling 8 rows per forward instead of the training microbatch's 2: one KV cache (one pass per
    token) per step instead of 4, the same completions and the same steps (float64; a row's logits do
    not depend on its neighbours')."""
    import scaletrain.generation.decoding as decoding

    caches: list = []

    class Counted(decoding.KVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(decoding, "KVCache", Counted)
    runs, passes = {}, {}
    for rm in (0, 8):
        runs[rm] = tmp_path / str(rm)
        caches.clear()
        assert main(grpo_args(runs[rm], tokenizer_dir, dataset_prefix, prompts, **{"posttrain.rollout.micro_batch": rm})) == 0
        passes[rm] = len(caches)
    assert passes == {0: 3 * 4, 8: 3 * 1}  # 3 steps × microbatches of 8 completions
    a, b = read_metrics(runs[0]), read_metrics(runs[8])
    assert_same_steps(a, b, 1e-10)
    assert (runs[0] / "rollouts.jsonl").read_text() == (runs[8] / "rollouts.jsonl").read_text()


def test_missing_stop_penalty_is_subtracted_per_completion(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    """Completions that do not end with the end-of-turn marker (here: cut at 6 tokens) lose the penalty."""
    run = tmp_path / "run"
    assert main(grpo_args(run, tokenizer_dir, dataset_prefix, prompts, **{
        "train.steps": 2, "posttrain.grpo.beta": 0.0, "posttrain.rewards.missing_stop_penalty": 2.5})) == 0
    for r in read_metrics(run):
        assert r["missing_stop"] >= r["truncated"] > 0  # a cut completion never ended its turn
        assert r["reward"] == pytest.approx(r["reward_digits"] - 2.5 * r["missing_stop"], abs=1e-12)
