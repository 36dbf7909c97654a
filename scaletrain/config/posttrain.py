"""The `[posttrain]` section: the objective, then one typed, frozen sub-section per stage and per shared concern.

A stage reads only the sub-sections it declares (`Stage.sections`, scaletrain/stages/stage.py): SFT reads
`chat` and `sft`, DPO `chat` and `dpo`, GRPO `chat`, `rollout`, `rewards`, `sandbox` and `grpo`, and so on.
The flat keys these replaced still load, with a notice naming the new key: scaletrain/config/renamed.py is the
one table of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatConfig:
    """Chat rows and how they are rendered: every stage that trains on conversations, prompts or pairs."""

    train_data: tuple[str, ...] = ()
    """sft: jsonl/parquet files with a `messages` list per row; dpo/reward: rows with prompt, chosen, rejected;
    grpo/ppo: rows with `messages` (a trailing assistant turn is dropped) or `prompt`, plus the fields the rewards
    read (`answer`); distill: `messages` rows (empty: data.prefixes)."""
    valid_data: tuple[str, ...] = ()
    """Held-out rows of the same kind, for validation (optional)."""
    template: str = "auto"
    """'auto' (the tokenizer's chat template wherever HF keeps it, chosen as transformers does; else ChatML),
    'chatml', 'llama3', one of the tokenizer's named templates (e.g. 'tool_use'), or a Jinja string."""
    tools: tuple[str, ...] = ()
    """Bundled tools (e.g. ["calculator"]) listed to the model in every conversation through the chat template's `tools`."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on chat rows (also distillation on chat rows, rendered the same way)."""

    loss_on: str = "assistant"
    """'assistant': loss only on assistant turns (content and end-of-turn); 'all': every token."""
    packing: bool = True
    """Pack several conversations per sequence (block-diagonal attention, positions restart)."""
    over_length: str = "drop"
    """A conversation longer than train.seq_length + 1 tokens: 'drop' it or 'truncate' it (both counted)."""


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation on (prompt, chosen, rejected) rows."""

    loss_type: str = "sigmoid"
    """'sigmoid' (DPO), 'ipo', 'hinge' or 'simpo' (reference-free)."""
    beta: float = 0.1
    """β, the strength of the implicit KL regularisation (SimPO: the reward scale)."""
    label_smoothing: float = 0.0
    """sigmoid loss: probability that a preference label is flipped (cDPO)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin γ."""
    nll_weight: float = 0.0
    """Add this × the chosen response's mean token NLL to each pair's loss (RPO; keeps the chosen likely)."""


@dataclass(frozen=True)
class RewardConfig:
    """Training a reward model (a score head) on preference pairs."""

    margin: float = 0.0
    """Required score gap, loss −log σ(r_chosen − r_rejected − margin) (Llama 2's margin term)."""
    center_coefficient: float = 0.0
    """+ this × (r_chosen + r_rejected)² per pair, keeping rewards centred at 0 (TRL's center_rewards_coefficient;
    1e-2 is typical)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling completions on the training layout: GRPO, PPO and on-policy distillation."""

    max_new_tokens: int = 32
    """Longest completion; prompt + completion must fit in train.seq_length + 1 tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs in the loss use the same temperature)."""
    micro_batch: int = 0
    """Rows per forward when sampling (0: train.micro_batch_size). Decoding is memory-bound and its KV cache holds
    every row whatever this is, so larger batches per forward cost only one pass's logits and run far faster; must
    divide train.global_batch_size / dp (under interleaved pipelining, into a multiple of parallel.pp passes)."""


@dataclass(frozen=True)
class RewardsConfig:
    """The rewards of sampled completions: GRPO and PPO."""

    functions: tuple[str, ...] = ("math_answer",)
    """Reward functions summed per completion: bundled 'math_answer' (the row's `answer`), 'python_tests' (the row's
    `tests` run against the completion's code in posttrain.sandbox), 'answer_format' (a numeric answer is stated at
    all), 'package.module:function', or 'reward_model' (the score of posttrain.rewards.model: RLHF)."""
    weights: tuple[float, ...] = ()
    """One weight per reward function (empty: all 1)."""
    model: str = ""
    """With the 'reward_model' function: a trained reward model (an HF *ForSequenceClassification directory, or a
    scaletrain checkpoint / checkpoints folder) sharing the policy's tokenizer; run in the policy's layout."""
    missing_stop_penalty: float = 0.0
    """Subtracted from the reward of a completion that does not end with the chat template's end-of-turn marker (it
    ran out of posttrain.rollout.max_new_tokens, or stopped at a bare eos) — TRL's missing_eos_penalty for chat
    turns; 0 = off."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment — a completion longer than max_new_tokens − this many tokens loses reward
    linearly, down to −posttrain.rewards.overlong_penalty at max_new_tokens (0: off)."""
    overlong_penalty: float = 1.0
    """With overlong_buffer: the punishment at max_new_tokens."""


@dataclass(frozen=True)
class SandboxConfig:
    """Where the 'python_tests' reward runs model-written code."""

    backend: str = "bwrap"
    """How completions' code is isolated — 'bwrap' (bubblewrap: own user/pid/net/mount namespaces, read-only
    standard library, one small tmpfs, limits; stages/rl/sandbox/runner.py) or 'none' (UNSANDBOXED: trusted code
    only; warned at start)."""
    timeout_s: float = 5.0
    """Wall-clock seconds per program (its code and the tests); then every process it started is killed."""
    memory_mb: int = 1024
    """Memory per program: for the whole program where cgroups can be created (as root), else per process."""
    processes: int = 32
    """Processes per sandbox (with cgroups, for the whole program too)."""
    disk_mb: int = 64
    """Size of the sandbox's only writable directory (a tmpfs; also the per-file size limit)."""
    workers: int = 0
    """Programs judged at a time on the rank that scores (0: two per CPU it may use, at most 16)."""
    python: str = ""
    """The interpreter in the sandbox ('': the trainer's, or /usr/bin/python3 where the sandbox user uid 65534 of a
    root trainer cannot read it); its standard library only, never site-packages."""


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO (RL on verifiable rewards: group-relative advantages) and DAPO's options."""

    group_size: int = 8
    """Completions sampled per prompt (the group whose rewards are compared); train.global_batch_size counts
    completions."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the frozen starting policy in the loss (0: no reference model is built)."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by its standard deviation (False: Dr. GRPO's plain centring)."""
    iterations: int = 1
    """Policy updates per rollout batch (μ; > 1 uses PPO's clipped ratio against the sampling-time log-probs)."""
    clip_eps: float = 0.2
    """(iterations > 1) the ratio's clip range below 1 (and above, unless clip_eps_high)."""
    clip_eps_high: float = 0.0
    """The clip range above 1 (0: clip_eps; larger: DAPO's clip-higher)."""
    loss_norm: str = "token"
    """'token' (sum over all completion tokens / their global count, DAPO) or 'sequence' (mean per completion, then
    over completions: the original GRPO)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling — drop groups whose rewards are all equal (zero advantage, no gradient) and sample
    more prompts until the batch is all informative groups, at most max_sampling_rounds rounds of a full batch each;
    a batch still short is filled with dropped groups (metrics: sampling_rounds, filtered_groups, filled_groups).
    The choice is global: the same groups at any dp size."""
    max_sampling_rounds: int = 3
    """With dynamic_sampling: most sampling rounds per rollout batch (verl's max_num_gen_batches)."""
    mask_truncated: bool = False
    """DAPO's overlong filtering — no loss on completions cut off at max_new_tokens (their reward judges an unfinished
    answer); they still count in the group's advantages."""


@dataclass(frozen=True)
class PPOConfig:
    """PPO (RLHF with a learned critic: per-token KL-penalised rewards, GAE, the clipped surrogate)."""

    group_size: int = 8
    """Completions sampled per prompt; train.global_batch_size counts completions."""
    kl_coef: float = 0.0
    """β of the per-token KL penalty to the frozen starting policy in the reward (0: no reference model is built)."""
    iterations: int = 1
    """Policy and critic updates per rollout batch (TRL's num_ppo_epochs)."""
    clip_eps: float = 0.2
    """The ratio's clip range below 1 (and above, unless clip_eps_high)."""
    clip_eps_high: float = 0.0
    """The clip range above 1 (0: clip_eps)."""
    critic: str = ""
    """The critic's starting weights — a reward model (HF *ForSequenceClassification or a `scaletrain reward` run) or
    a causal LM's HF export (its body, with a fresh score head); empty: posttrain.rewards.model."""
    critic_lr: float = 0.0
    """The critic's AdamW learning rate, constant (0: optim.lr)."""
    gae_gamma: float = 1.0
    """Discount γ of generalised advantage estimation."""
    gae_lambda: float = 0.95
    """λ of generalised advantage estimation (1: Monte-Carlo returns, 0: one-step TD)."""
    value_clip: float = 0.2
    """The critic's values may move at most this far from their sampling-time values per update (0: no clip)."""
    whiten_advantages: bool = True
    """Shift and scale the advantages to mean 0, std 1 over the global batch's completion tokens."""


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: match a frozen teacher's token distributions."""

    teacher: str = ""
    """The teacher, a causal LM sharing the student's tokenizer and vocabulary size (an HF directory, or a scaletrain
    checkpoint / checkpoints folder / run directory); frozen and run in the student's layout."""
    loss: str = "forward_kl"
    """'forward_kl' (KL(teacher ‖ student), Hinton's; mass-covering) or 'reverse_kl' (KL(student ‖ teacher),
    mode-seeking, MiniLLM's)."""
    temperature: float = 1.0
    """τ, dividing both logits before the softmaxes; the KL term is scaled by τ² (Hinton)."""
    alpha: float = 1.0
    """Weight α of the KL term; 1 − α weighs the cross-entropy on the data's own next tokens."""
    top_k: int = 0
    """0 = the teacher's whole distribution; k > 0 = only its k most likely tokens per position, renormalised (sparse
    distillation: k stored values per token instead of the vocabulary; forward KL only)."""
    on_policy: bool = False
    """The student samples its own completions of posttrain.chat.train_data's prompts (posttrain.rollout) and learns
    the teacher's distribution on them (on-policy distillation, GKD; reverse KL is the usual choice); false: on the
    data's own tokens. posttrain.chat.valid_data stays teacher-forced chat rows."""


@dataclass(frozen=True)
class PostTrainConfig:
    """The training objective; its settings are in the sub-sections below (a stage reads only its own)."""

    objective: str = "pretrain"
    """'pretrain' (next-token on data.prefixes), 'sft' (chat data, loss on assistant turns), 'dpo' (preference
    pairs), 'grpo' (RL on verifiable rewards), 'ppo' (RLHF with a learned critic: per-token KL-penalised rewards,
    GAE, clipped surrogate), 'reward' (a reward model on preference pairs) or 'distill' (match
    posttrain.distill.teacher's token distributions, on data.prefixes or, given posttrain.chat.train_data, on chat
    rows)."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
