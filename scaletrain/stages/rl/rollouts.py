"""GRPO's batches: per step, fresh rollouts of the current policy on this dp rank's prompts, scored by
the verifiable rewards, as microbatches for the shared train step (the Trainer's `train_batches`).

Rollout batch k draws prompts k·P … k·P+P−1 of a seeded per-epoch permutation (P = global batch /
group size; one batch per posttrain.grpo.iterations (or ppo.iterations) steps, kept on disk between its updates); dp
rank r takes the r-th contiguous P/dp of them, so a group never spans dp ranks and its advantages
need no communication. The step's rollout metrics (means over the global batch's
completions, reduced over dp; `reward_errors` a count: completions whose reward could not be computed,
scored 0 and logged with the cause) are left in `last_metrics` for the step's metrics record. Rewards are
computed once per replica (its first tp and cp rank on the last stage: a timed-out unit test must
not score differently on two ranks) and broadcast to the replica's other ranks; a reward model
scores on all of the replica's ranks together, in the policy's layout (RLHF). Under context
parallelism the replica's cp ranks sample shares of its prompts and then hold the same rollouts
(generation/sampler.py); the training step splits the rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from scaletrain.data.loader import collate
from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.batching import contiguous_share, pass_unit, training_rows
from scaletrain.generation.ep_lockstep import lockstep_group
from scaletrain.generation.sampler import (
    completion_text,
    sample_completions,
    sampling_generator,
    stop_ids_for,
)
from scaletrain.generation.scoring import token_logprobs
from scaletrain.stages.rl.dynamic_sampling import Groups, choose_groups, gather_groups, informative_groups
from scaletrain.stages.rl.grpo import group_advantages, overlong_penalty
from scaletrain.stages.rl.prompts import PromptDataset, PromptOrder
from scaletrain.stages.rl.reward_model_scorer import RewardModelScorer
from scaletrain.stages.rl.rewards import RewardFn, report_errors, reward_label, score_rewards
from scaletrain.stages.rl.rollout_buffer import RolloutBuffer
from scaletrain.trainer.contracts import BatchSource, Validator

ROLLOUT_LOG = "rollouts.jsonl"
# Sampling-generator keys of dynamic sampling's extra rounds: round r, position k → r·ROUND_KEY + k,
# disjoint from the first round's (the draw index itself) for any run shorter than 10¹² draws.
ROUND_KEY = 10**12


class RolloutBatches(BatchSource):
    def __init__(self, prompts: PromptDataset, *, model: torch.nn.Module, reference: torch.nn.Module | None,
                 dims: ParallelDims,
                 rewards: dict[str, RewardFn | RewardModelScorer], reward_weights: tuple[float, ...], group_size: int,
                 max_new_tokens: int, temperature: float, scale_rewards: bool, global_batch: int, micro_batch: int,
                 seq_length: int, seed: int, consumed_samples: int, tokenizer, stop_text: str | None,
                 precision, device: torch.device, fused_cross_entropy: bool = False,
                 run_dir: Path | None = None, width_multiple: int = 1, iterations: int = 1,
                 missing_stop_penalty: float = 0.0, overlong_buffer: int = 0, overlong_penalty: float = 1.0,
                 mask_truncated: bool = False, dynamic_sampling: bool = False, max_sampling_rounds: int = 1,
                 rollout_micro_batch: int = 0) -> None:
        self.prompts, self.model, self.reference, self.dims = prompts, model, reference, dims
        self.rewards = rewards
        self.weights = torch.tensor(reward_weights or [1.0] * len(rewards), dtype=torch.float64)
        self.group_size, self.max_new_tokens, self.temperature = group_size, max_new_tokens, temperature
        self.scale_rewards, self.global_batch, self.micro_batch = scale_rewards, global_batch, micro_batch
        self.rollout_micro = rollout_micro_batch or micro_batch  # rows per sampling forward
        self.seq_length, self.seed, self.consumed_samples = seq_length, seed, consumed_samples
        self.tokenizer, self.stop_text = tokenizer, stop_text
        self.stop_ids = stop_ids_for(tokenizer, stop_text)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.precision, self.device, self.fused = precision, device, fused_cross_entropy
        self.width_multiple = width_multiple  # rollout rows' width: tp under sequence parallelism
        self.log_path = run_dir / ROLLOUT_LOG if run_dir is not None and dims.is_main else None
        self.iterations = iterations  # updates per rollout batch (posttrain.grpo.iterations, posttrain.ppo.iterations)
        self.missing_stop_penalty = missing_stop_penalty
        self.overlong_buffer, self.overlong_factor = overlong_buffer, overlong_penalty
        self.mask_truncated = mask_truncated  # DAPO's overlong filtering: no loss on cut-off completions
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, max_sampling_rounds
        self.buffer = RolloutBuffer(run_dir, dims.rank, iterations) \
            if iterations > 1 and run_dir is not None else None
        self._current: tuple[int, list[dict[str, torch.Tensor]], dict[str, float]] | None = None
        self.last_metrics: dict[str, float] = {}
        self._reward_errors = 0  # completions of this step's sampling rounds whose reward could not be computed
        self.console_keys: tuple[str, ...] = ("reward",)
        self._prompt_index = PromptOrder(len(prompts), seed)
        self._round_orders: dict[int, PromptOrder] = {0: self._prompt_index}

    needs_old_logps = False  # PPO: the KL reward reads the sampling policy's log-probs even at one update

    def __iter__(self) -> RolloutBatches:
        return self

    def metrics(self) -> dict[str, float]:
        return self.last_metrics

    def _sequence_advantages(self, total: torch.Tensor) -> torch.Tensor:
        """[completions] advantages from the total rewards: GRPO's group-relative ones."""
        return group_advantages(total, self.group_size, self.scale_rewards)

    def _finish(self, mbs: list[dict[str, torch.Tensor]], total: torch.Tensor) -> None:
        """After the log-prob passes, before the batch is kept: PPO's values, advantages and critic update."""

    def _text(self, completion: list[int]) -> str:
        """What the rewards read: the completion's text before its stop token or end-of-turn marker."""
        return completion_text(completion, self.tokenizer.decode, self.stop_ids, self.stop_text)

    def _missing_stop(self, completions: list[list[int]]) -> torch.Tensor:
        """[completions] 1.0 where a completion does not end with the end-of-turn marker (as a token or as
        text), else 0.0; without a marker (no template) only eos ends a turn."""
        def ended(c: list[int]) -> bool:
            if not c:
                return False
            if self.stop_text is None:
                return c[-1] in self.stop_ids
            marker_ids = self.stop_ids - {self.tokenizer.eos_id}
            return c[-1] in marker_ids or self.tokenizer.decode(c).endswith(self.stop_text)
        return torch.tensor([0.0 if ended(c) else 1.0 for c in completions], dtype=torch.float64)

    def _total(self, scores: torch.Tensor, missing: torch.Tensor, completions: list[list[int]]) -> torch.Tensor:
        """[completions] the reward the advantages see: weighted rewards, minus the missing-stop penalty,
        plus the overlong punishment (≤ 0)."""
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        return (scores @ self.weights - self.missing_stop_penalty * missing
                + overlong_penalty(lengths, self.max_new_tokens, self.overlong_buffer, self.overlong_factor))

    def _replica_broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """This replica's lead rank's values (tp and cp rank 0 of the last stage) on all of its ranks."""
        d = self.dims
        t = d.tp_comm.broadcast(t.to(self.device), src_group_rank=0)
        if d.cp > 1:
            t = d.comm("cp").broadcast(t, src_group_rank=0)
        if d.pp > 1:
            t = d.comm("pp").broadcast(t, src_group_rank=d.pp - 1)
        return t.cpu()

    def _score(self, rows: list[dict], texts: list[str], prompts: list[list[int]],
               completions: list[list[int]]) -> tuple[torch.Tensor, int]:
        """[completions, rewards] reward values, and how many completions a reward could not be computed for
        (scored 0): functions of (text, row) on the replica's lead rank, then broadcast; a reward model
        (stages/rl/reward_model_scorer.py) by every rank of the replica together."""
        d = self.dims
        scores = torch.zeros(len(texts), len(self.rewards) + 1, dtype=torch.float64)  # + a column of error flags
        if d.tp_rank == 0 and d.cp_rank == 0 and d.pp_rank == d.pp - 1:
            for j, (name, fn) in enumerate(self.rewards.items()):
                if not isinstance(fn, RewardModelScorer):
                    values, causes = score_rewards(fn, texts, rows)
                    scores[:, j] = torch.tensor(values, dtype=torch.float64)
                    scores[:, -1] += torch.tensor([float(bool(c)) for c in causes], dtype=torch.float64)
                    report_errors(reward_label(name), causes)
        scores = self._replica_broadcast(scores)
        errors = int((scores[:, -1] > 0).sum())
        scores = scores[:, :-1].contiguous()
        for j, fn in enumerate(self.rewards.values()):
            if isinstance(fn, RewardModelScorer) and texts:
                scores[:, j] = fn(prompts, completions)
        return scores, errors

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        step = self.consumed_samples // self.global_batch
        self.consumed_samples += self.global_batch
        generation = step - step % self.iterations  # the step whose rollouts this one trains on
        if generation != step:  # a later update on the same batch (posttrain.grpo.iterations > 1)
            if self._current is None or self._current[0] != generation:  # resumed between updates
                assert self.buffer is not None
                self._current = (generation, *self.buffer.load(generation))
            self.last_metrics = {**self._current[2], "rollout_s": 0.0}
            return [dict(mb) for mb in self._current[1]]
        mbs = self._rollouts(step)
        if self.buffer is not None:
            self._current = (step, mbs, dict(self.last_metrics))
            self.buffer.save(step, mbs, self.last_metrics)
        return mbs

    def _shares(self) -> tuple[int, range]:
        """(groups per step, this dp rank's contiguous share of them): each dp rank samples its share."""
        per_step = self.global_batch // self.group_size
        return per_step, contiguous_share(per_step, self.dims.dp, self.dims.dp_rank)

    def _sample_round(self, generation: int, rnd: int) -> Groups:
        """Sample and score this dp rank's share of sampling round `rnd` of rollout batch `generation`.
        Round 0 takes the run's prompt order (every prompt once per epoch); dynamic sampling's later
        rounds take their own seeded orders at the same positions, so every round is a function of
        (seed, step) alone and a resumed run samples what the uninterrupted one did."""
        d, g = self.dims, self.group_size
        per_step, mine = self._shares()
        if rnd not in self._round_orders:
            self._round_orders[rnd] = PromptOrder(len(self.prompts), self.seed + 104_729 * rnd)
        order = self._round_orders[rnd]
        draws = [generation * per_step + j for j in mine]
        index = [order[k] for k in draws]
        prompts = [self.prompts.prompts[i] for i in index]
        completions, stopped = sample_completions(
            self.model, d, prompts, [sampling_generator(self.seed, rnd * ROUND_KEY + k) for k in draws], group_size=g,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, stop_ids=self.stop_ids,
            stop_text=self.stop_text, decode=self.tokenizer.decode,
            pad_id=self.pad_id, vocab_limit=self.tokenizer.vocab_size, micro_batch=self.rollout_micro,
            precision=self.precision, device=self.device, width_multiple=self.width_multiple)
        texts = [self._text(c) for c in completions]
        rows = [self.prompts.rows[i] for i in index for _ in range(g)]
        scores, errors = self._score(rows, texts, [prompts[i // g] for i in range(len(completions))], completions)
        self._reward_errors += errors
        return Groups(index, completions, stopped, scores, self._missing_stop(completions))

    def _dynamic_sample(self, generation: int) -> tuple[Groups, dict[str, float]]:
        """posttrain.grpo.dynamic_sampling: rounds until the global batch holds only informative groups (or
        posttrain.grpo.max_sampling_rounds ran out), then this dp rank's share of the chosen groups
        (stages/rl/dynamic_sampling.py). The same choice on every rank of every replica."""
        d, g = self.dims, self.group_size
        per_step, mine = self._shares()
        dp_comm = d.comm("dp")
        pool: Groups | None = None
        for rnd in range(self.max_sampling_rounds):
            new = gather_groups(self._sample_round(generation, rnd), dp_comm, self.max_new_tokens, self.device)
            pool = new if pool is None else pool.cat(new)
            informative = informative_groups(self._total(pool.scores, pool.missing, pool.completions), g)
            if int(informative.sum()) >= per_step:
                break
        assert pool is not None
        chosen, filled = choose_groups(informative, per_step)
        sampled = len(pool.index)
        return pool.take(chosen[mine.start:mine.stop], g), {
            "sampling_rounds": float(rnd + 1), "filtered_groups": 1.0 - float(informative.sum()) / sampled,
            "filled_groups": filled / per_step}

    def _rollouts(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Sample, score and lay out the rollout batch of step index `step` (this dp rank's share)."""
        d, g = self.dims, self.group_size
        generation = step // self.iterations  # prompts advance once per rollout batch
        t0 = time.perf_counter()
        self._reward_errors = 0
        if self.dynamic_sampling:
            mine, sampling = self._dynamic_sample(generation)
        else:
            mine, sampling = self._sample_round(generation, 0), {}
        prompts = [self.prompts.prompts[i] for i in mine.index]
        completions, stopped, scores, missing = mine.completions, mine.stopped, mine.scores, mine.missing
        total = self._total(scores, missing, completions)
        advantages = self._sequence_advantages(total)
        items = [training_rows(prompts[i // g], c, self.seq_length, self.pad_id) for i, c in enumerate(completions)]
        for item, a, done in zip(items, advantages, stopped):
            item["advantages"] = a.float()
            if self.mask_truncated and not done:  # DAPO's overlong filtering: a cut-off answer is not judged
                item["loss_mask"].zero_()
        mbs = [collate(items[s:s + self.micro_batch]) for s in range(0, len(items), self.micro_batch)]
        # Log-probs the loss needs besides the policy's own: the frozen reference's (KL) and, when the
        # batch serves several updates, the sampling policy's (the clipped ratio's denominator).
        models = {"ref_logps": self.reference,
                  "old_logps": self.model if self.iterations > 1 or self.needs_old_logps else None}
        on_device = [{k: v.to(self.device) for k, v in mb.items()} for mb in mbs] if any(models.values()) else []
        for key, model in models.items():
            if model is not None:
                values = token_logprobs(model, d, on_device, temperature=self.temperature, precision=self.precision,
                                        fused_cross_entropy=self.fused)
                for mb, v in zip(mbs, values):
                    mb[key] = v.cpu()
        self._record_metrics(scores, total, completions, stopped, missing)
        self.last_metrics.update(sampling)  # already global: every rank chose from the same pool
        self._finish(mbs, total)
        self.last_metrics["rollout_s"] = time.perf_counter() - t0  # sampling, rewards, log-prob passes
        self._log_rollouts(step + 1, prompts[0], [self._text(c) for c in completions[:g]], total[:g].tolist())
        return mbs

    def evaluate(self, prompts: PromptDataset) -> dict[str, float]:
        """Held-out rewards: one greedy completion per prompt of `prompts` (the policy's mode, so
        validations compare across steps), prompts split over dp ranks; means over all prompts."""
        d = self.dims
        mine = list(contiguous_share(len(prompts), d.dp, d.dp_rank))
        # Every pass needs whole microbatches (and, interleaved, whole pipeline groups): pad with
        # repeats of the last prompt, not scored.
        completions: list[list[int]] = []
        # A replica without prompts skips the passes (its ranks agree on that) — except under expert
        # parallelism, where its MoE layers must join the ep group's: it decodes a repeat of prompt 0, unscored.
        share = mine or ([0] if len(prompts.prompts) and lockstep_group(self.model, d) is not None else [])
        if share:
            unit = pass_unit(d, self.rollout_micro)
            padded = share + [share[-1]] * (-len(share) % unit)
            completions, _ = sample_completions(
                self.model, d, [prompts.prompts[i] for i in padded], None, group_size=1,
                max_new_tokens=self.max_new_tokens, temperature=0.0, stop_ids=self.stop_ids,
                stop_text=self.stop_text, decode=self.tokenizer.decode, pad_id=self.pad_id,
                vocab_limit=self.tokenizer.vocab_size, micro_batch=self.rollout_micro, precision=self.precision,
                device=self.device, width_multiple=self.width_multiple)
        n = len(mine)
        scores, errors = self._score([prompts.rows[i] for i in mine], [self._text(c) for c in completions[:n]],
                                     [prompts.prompts[i] for i in mine], completions[:n]) if mine \
            else (torch.zeros(0, len(self.rewards), dtype=torch.float64), 0)
        # The held-out reward is defined as the training one (penalties included).
        total = self._total(scores, self._missing_stop(completions[:n]), completions[:n])
        sums = torch.cat([total.sum().reshape(1), scores.sum(dim=0),
                          torch.tensor([float(sum(len(c) for c in completions[:n])), float(errors), float(n)],
                                       dtype=torch.float64)])
        if d.dp > 1:
            sums = d.comm("dp").all_reduce(sums.to(self.device)).cpu()
        names = ["reward", *(f"reward_{reward_label(k)}" for k in self.rewards), "completion_tokens"]
        means = {k: float(v) / max(float(sums[-1]), 1.0) for k, v in zip(names, sums[:-2].tolist())}
        return {**means, "reward_errors": float(sums[-2])}  # a count, not a mean

    def _record_metrics(self, scores: torch.Tensor, total: torch.Tensor, completions: list[list[int]],
                        stopped: list[bool], missing: torch.Tensor) -> None:
        g = self.group_size
        groups = total.reshape(-1, g)
        sums = torch.cat([
            total.sum().reshape(1), scores.sum(dim=0),
            groups.std(dim=1).sum().reshape(1) * g,  # weighted per completion, like the other means
            (groups.max(dim=1).values == groups.min(dim=1).values).double().sum().reshape(1) * g,
            torch.tensor([float(sum(len(c) for c in completions)), float(sum(not s for s in stopped)),
                          float(missing.sum()), float(self._reward_errors), float(len(completions))],
                         dtype=torch.float64)])
        if self.dims.dp > 1:
            sums = self.dims.comm("dp").all_reduce(sums.to(self.device)).cpu()
        n = float(sums[-1])
        names = ["reward", *(f"reward_{reward_label(k)}" for k in self.rewards), "reward_std", "zero_std_groups",
                 "completion_tokens", "truncated", "missing_stop"]
        self.last_metrics = {k: float(v) / n for k, v in zip(names, sums[:-2].tolist())}
        self.last_metrics["reward_errors"] = float(sums[-2])  # a count over the step's scored completions

    def _log_rollouts(self, step: int, prompt: list[int], texts: list[str], rewards: list[float]) -> None:
        """One group per step into run_dir/rollouts.jsonl (main rank): what the policy writes, as it learns."""
        if self.log_path is None:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, "prompt": self.tokenizer.decode(prompt), "completions": texts,
                                "rewards": rewards}) + "\n")


class HeldOutRewards(Validator):
    """GRPO/PPO validation: the held-out rewards of greedy completions of posttrain.chat.valid_data's prompts
    (`RolloutBatches.evaluate`); there is no validation loss."""

    def __init__(self, batches: RolloutBatches, prompts: PromptDataset) -> None:
        self.batches, self.prompts = batches, prompts

    def __call__(self) -> tuple[float | None, dict[str, float]]:
        return None, self.batches.evaluate(self.prompts)
