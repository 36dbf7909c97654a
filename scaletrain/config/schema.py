"""Typed, frozen run configuration: one dataclass per section, one docstring line per field.

Every field is documented by the string literal that follows it; `scaletrain.config.load` reads
these to explain an unknown or mistyped key. World size never appears here: `dp` is inferred
from it at start-up and checked (DESIGN rule 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaletrain.config.moe import MoEConfig


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Qwen2-style qkv bias, Mistral, Qwen3 q/k norms)."""

    family: str = "llama"
    """Model family, a folder under scaletrain/models."""
    hf_architecture: str = ""
    """Hugging Face class to export as ('': LlamaForCausalLM, Qwen2ForCausalLM with qkv_bias, Qwen3ForCausalLM
    with qk_norm)."""
    vocab_size: int = 0
    """Embedding rows. 0: the tokenizer's vocabulary padded up to `vocab_multiple`, derived at the run's first
    start, recorded in its checkpoints and config.toml, and kept on every resume whatever the layout."""
    vocab_multiple: int = 128
    """With vocab_size = 0, pad the tokenizer's size to a multiple of this (not times tp: the size must not depend
    on the layout; every tp that divides the result can load the run)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 0
    """Key/value heads (GQA). 0: equal to num_heads (plain multi-head attention)."""
    head_dim: int = 0
    """Per-head width. 0: hidden_size // num_heads."""
    ffn_hidden_size: int = 0
    """SwiGLU inner width. 0: Llama's rule, 8/3·hidden rounded up to a multiple of 256."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama 3: 500000)."""
    rope_scaling: str = "none"
    """'none' or 'llama3' (the frequency-dependent scaling of Llama 3.1)."""
    rope_scaling_factor: float = 8.0
    """llama3 rope scaling: factor."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope scaling: low_freq_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope scaling: high_freq_factor."""
    rope_original_max_position: int = 8192
    """llama3 rope scaling: original_max_position_embeddings."""
    max_position_embeddings: int = 0
    """Longest sequence the RoPE tables cover. 0: train.seq_length."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE, one weight of head_dim shared by all heads (Qwen3)."""
    num_labels: int = 0
    """0: the language-model head. N > 0: a sequence-classification head of N scores per position instead
    (HF `score`, exported as *ForSequenceClassification); the reward objective sets 1 when left at 0."""
    init_std: float = 0.02
    """Std of the normal initialisation; output projections use init_std / sqrt(2·num_layers)."""
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:  # a checkpoint's model_config (dataclasses.asdict) holds the section as a dict
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. dp is never set: it is world_size / (tp·pp·cp)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B)."""
    cp: int = 1
    """Context-parallel size."""
    ep: int = 1
    """Expert-parallel size: the routed experts are sharded over ep ranks taken from dp·cp (tokens travel by
    all-to-all); must divide dp·cp and model.moe.num_experts."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in norm/dropout regions (needs tp > 1)."""
    backend: str = "auto"
    """Layer backend: 'auto' (te where CUDA and transformer_engine import), 'torch' or 'te'."""
    kernels: tuple[str, ...] = ()
    """Fused Triton kernels to use: any of rmsnorm, rope, swiglu, cross_entropy, or ["all"] (CUDA; TRITON_INTERPRET=1 on CPU)."""
    recompute: str = "none"
    """Activation recomputation: 'none', or 'full' (keep only each block's input; rerun the block in backward)."""
    compile: bool = False
    """torch.compile each transformer block (inductor: fused elementwise kernels, fewer launches; the first step
    pays the compile). Torch backend; rollouts and evaluation passes, whose shapes change per call, run eager."""
    timeout_s: float = 600.0
    """Collective timeout: a rank that waits longer for a dead or hung peer stops with an error naming the operation."""


@dataclass(frozen=True)
class PrecisionConfig:
    """Numerics of parameters and compute."""

    dtype: str = "auto"
    """'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float64'."""
    fp8: bool = False
    """FP8 compute through Transformer Engine (needs backend te)."""
    fp8_recipe: str = "current"
    """'current' (per-tensor current scaling), 'delayed' (amax history) or 'blockwise' (where the installed TE offers it)."""
    fp8_format: str = "hybrid"
    """'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3' (both)."""
    fp8_amax_history: int = 1024
    """delayed recipe: amax history length."""
    fp8_margin: int = 0
    """delayed recipe: scaling-factor margin (powers of two)."""
    fp8_bf16_layers: int = 0
    """Keep this many first and as many last transformer layers out of FP8 (bf16), as Megatron/NeMo recipes do."""


@dataclass(frozen=True)
class DataConfig:
    """Megatron-format (.bin/.idx) training data."""

    prefixes: tuple[str, ...] = ()
    """Dataset path prefixes (without .bin/.idx)."""
    weights: tuple[float, ...] = ()
    """Blend weights, one per prefix; empty: proportional to size (one prefix: [1.0])."""
    split: str = "98,2,0"
    """Train,valid,test split of the documents, Megatron style."""
    tokenizer: str = ""
    """Tokenizer: a directory with tokenizer.model or tokenizer.json, or one of those files."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms and biases (1-D parameters)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping, the norm is still logged)."""
    schedule: str = "cosine"
    """'cosine' (warmup + cosine), 'wsd' (warmup-stable-decay) or 'constant' (warmup + constant)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    decay_fraction: float = 0.2
    """wsd: fraction of train.steps spent in the final decay."""
    wsd_decay_shape: str = "linear"
    """wsd: shape of the final decay, 'linear', 'cosine' or '1-sqrt'."""
    distributed: bool = False
    """ZeRO-1: shard optimizer state over dp."""
    impl: str = "torch"
    """AdamW kernel: 'torch' (fused on CUDA, foreach elsewhere), 'te' (Transformer Engine FusedAdam) or 'apex' (if importable)."""


@dataclass(frozen=True)
class TrainConfig:
    """The run: where it lives, how long, how big each step is."""

    run_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints; an existing one resumes."""
    steps: int = 100
    """Optimizer steps of the whole run (the schedule's length)."""
    seed: int = 1234
    """Seed of initialisation, data order and dropout."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all dp ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward; microbatches per step = global / (micro·dp)."""
    seq_length: int = 128
    """Tokens per sequence."""
    eval_interval: int = 0
    """Validation every N steps and at the end (0: never)."""
    eval_iters: int = 4
    """Validation batches (of global_batch_size sequences) per validation."""
    eval_tasks: tuple[str, ...] = ()
    """Downstream tasks run at every validation, on the training model in its layout: `scaletrain eval`'s
    KIND:FILE specs (perplexity, choice, answer, refusal, preference); logged as eval_<kind>_<file>_<metric>."""
    eval_task_limit: int = 0
    """First N rows of each eval task only (0: all)."""
    eval_max_new_tokens: int = 32
    """Longest completion of generation eval tasks (answer, refusal)."""
    exit_interval: int = 0
    """Save and exit cleanly at the first step that is a multiple of this (0: off); the schedule is unchanged."""
    deterministic: bool = False
    """Deterministic algorithms and a fixed thread count, for bit-exact resume."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default; deterministic mode pins 1)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    stop_signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")
    """Signals that make the run checkpoint at the next step boundary and exit with code 75 (requeue me).
    SIGTERM is what Slurm sends at preemption, `scancel` and the time limit. SIGINT (Ctrl-C), unless listed
    here, also checkpoints at the next step boundary but exits 130 (no requeue); a second SIGINT stops at once."""
    max_nonfinite_steps: int = 3
    """Stop the run (exit code 3) after this many consecutive steps with a non-finite loss or gradient norm
    (their updates are skipped meanwhile); 0: never stop."""
    loss_spike_factor: float = 0.0
    """Flag a step whose loss exceeds this many times the mean of the previous loss_spike_window finite,
    unflagged losses (0: off; e.g. 3.0). Not for grpo/ppo, whose loss changes sign."""
    loss_spike_window: int = 50
    """Steps in the running mean of the spike check (it starts once the window is full)."""
    loss_spike_action: str = "warn"
    """On a loss spike: 'warn' (log it), 'stop' (exit code 3, no checkpoint of the spike) or 'rollback'
    (reload weights and optimizer from the newest good checkpoint before the spike, go on with the next
    batches; at most 3 rollbacks per launch, then stop)."""
    memory_check: bool = True
    """Refuse to start when the planner's per-rank memory estimate exceeds the device's memory (CPU: the RAM
    available) by more than 25% (profile/memory_check.py); false starts anyway."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving and resuming."""

    interval: int = 0
    """Save every N steps (0: only at the end and at exit_interval)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (0: keep all)."""
    load: str = ""
    """Start from this checkpoint directory instead of the run directory's latest."""
    save_at_end: bool = True
    """Save when the last step is done."""
    async_save: bool = False
    """Write checkpoints in a background thread from an in-memory copy (latest moves when complete)."""
    init_from_hf: str = ""
    """Start a fresh run from a local Hugging Face model directory (its config replaces [model])."""
    export_hf: str = ""
    """When the run completes, export its final checkpoint to this Hugging Face directory ('' off; relative: under run_dir)."""


@dataclass(frozen=True)
class LoggingConfig:
    """Metric sinks: console, metrics.jsonl (always), TensorBoard, wandb."""

    interval: int = 10
    """Console line every N steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tensorboard."""
    wandb: bool = False
    """Log to wandb (WANDB_MODE=offline works without network)."""
    wandb_project: str = "scaletrain"
    """wandb project name."""
    wandb_mode: str = ""
    """wandb mode: '' (WANDB_MODE or online), 'offline' or 'disabled'."""


@dataclass(frozen=True)
class PostTrainConfig:
    """The training objective and, for post-training stages, their data and loss settings."""

    objective: str = "pretrain"
    """'pretrain' (next-token on data.prefixes), 'sft' (chat data, loss on assistant turns), 'dpo' (preference
    pairs), 'grpo' (RL on verifiable rewards), 'ppo' (RLHF with a learned critic: per-token KL-penalised rewards,
    GAE, clipped surrogate), 'reward' (a reward model on preference pairs) or 'distill' (match
    posttrain.teacher's token distributions, on data.prefixes or, given posttrain.train_data, on chat rows)."""
    train_data: tuple[str, ...] = ()
    """sft: jsonl/parquet files with a `messages` list per row; dpo: rows with prompt, chosen, rejected; grpo: rows
    with `messages` (a trailing assistant turn is dropped) or `prompt`, plus the fields the rewards read (`answer`)."""
    valid_data: tuple[str, ...] = ()
    """Held-out rows of the same kind, for validation (optional)."""
    chat_template: str = "auto"
    """'auto' (the tokenizer's chat template wherever HF keeps it, chosen as transformers does; else ChatML),
    'chatml', 'llama3', one of the tokenizer's named templates (e.g. 'tool_use'), or a Jinja string."""
    tools: tuple[str, ...] = ()
    """Bundled tools (e.g. ["calculator"]) listed to the model in every conversation through the chat template's `tools`."""
    loss_on: str = "assistant"
    """'assistant': loss only on assistant turns (content and end-of-turn); 'all': every token."""
    packing: bool = True
    """Pack several conversations per sequence (block-diagonal attention, positions restart)."""
    over_length: str = "drop"
    """sft: a conversation longer than train.seq_length + 1 tokens: 'drop' it or 'truncate' it (both counted)."""
    dpo_loss: str = "sigmoid"
    """dpo: 'sigmoid' (DPO), 'ipo', 'hinge' or 'simpo' (reference-free)."""
    beta: float = 0.1
    """dpo: β, the strength of the implicit KL regularisation (SimPO: the reward scale)."""
    label_smoothing: float = 0.0
    """dpo sigmoid loss: probability that a preference label is flipped (cDPO)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin γ."""
    nll_weight: float = 0.0
    """dpo: add this × the chosen response's mean token NLL to each pair's loss (RPO; keeps the chosen likely)."""
    reward_margin: float = 0.0
    """reward: required score gap, loss −log σ(r_chosen − r_rejected − margin) (Llama 2's margin term)."""
    reward_center: float = 0.0
    """reward: + this × (r_chosen + r_rejected)² per pair, keeping rewards centred at 0 (TRL's
    center_rewards_coefficient; 1e-2 is typical)."""
    rewards: tuple[str, ...] = ("math_answer",)
    """grpo: reward functions summed per completion: bundled 'math_answer' (the row's `answer`),
    'python_tests' (the row's `tests` run against the completion's code), 'answer_format' (a numeric answer
    is stated at all), 'package.module:function', or 'reward_model' (the score of posttrain.reward_model: RLHF)."""
    reward_weights: tuple[float, ...] = ()
    """grpo: one weight per reward function (empty: all 1)."""
    sandbox: str = "bwrap"
    """python_tests: how completions' code is isolated — 'bwrap' (bubblewrap: own user/pid/net/mount namespaces,
    read-only standard library, one small tmpfs, limits; stages/rl/sandbox/runner.py) or 'none' (UNSANDBOXED: trusted
    code only; warned at start)."""
    sandbox_timeout_s: float = 5.0
    """python_tests: wall-clock seconds per program (its code and the tests); then every process it started is killed."""
    sandbox_memory_mb: int = 1024
    """python_tests: memory per program: for the whole program where cgroups can be created (as root), else per process."""
    sandbox_processes: int = 32
    """python_tests: processes per sandbox (with cgroups, for the whole program too)."""
    sandbox_disk_mb: int = 64
    """python_tests: size of the sandbox's only writable directory (a tmpfs; also the per-file size limit)."""
    sandbox_workers: int = 0
    """python_tests: programs judged at a time on the rank that scores (0: two per CPU it may use, at most 16)."""
    sandbox_python: str = ""
    """python_tests: the interpreter in the sandbox ('': the trainer's, or /usr/bin/python3 where the sandbox user
    uid 65534 of a root trainer cannot read it); its standard library only, never site-packages."""
    missing_stop_penalty: float = 0.0
    """grpo: subtracted from the reward of a completion that does not end with the chat template's end-of-turn
    marker (it ran out of posttrain.max_new_tokens, or stopped at a bare eos) — TRL's missing_eos_penalty for
    chat turns; 0 = off."""
    reward_model: str = ""
    """grpo with the 'reward_model' reward: a trained reward model (an HF *ForSequenceClassification directory,
    or a scaletrain checkpoint / checkpoints folder) sharing the policy's tokenizer; run in the policy's layout."""
    group_size: int = 8
    """grpo: completions sampled per prompt (the group whose rewards are compared); train.global_batch_size counts completions."""
    max_new_tokens: int = 32
    """grpo: longest completion; prompt + completion must fit in train.seq_length + 1 tokens."""
    rollout_micro_batch: int = 0
    """grpo/ppo/on-policy distill: rows per forward when sampling (0: train.micro_batch_size). Decoding is
    memory-bound and its KV cache holds every row whatever this is, so larger batches per forward cost
    only one pass's logits and run far faster; must divide train.global_batch_size / dp (under
    interleaved pipelining, into a multiple of parallel.pp passes)."""
    temperature: float = 1.0
    """grpo: sampling temperature of the rollouts (log-probs in the loss use the same temperature)."""
    kl_beta: float = 0.0
    """grpo: weight of the k3 KL penalty to the frozen starting policy in the loss; ppo: β of the per-token KL
    penalty in the reward (0: no reference model is built)."""
    scale_rewards: bool = True
    """grpo: divide each group's centred rewards by its standard deviation (False: Dr. GRPO's plain centring)."""
    grpo_iterations: int = 1
    """grpo: policy updates per rollout batch (μ; > 1 uses PPO's clipped ratio against the sampling-time log-probs)."""
    clip_eps: float = 0.2
    """grpo (grpo_iterations > 1): the ratio's clip range below 1 (and above, unless clip_eps_high)."""
    clip_eps_high: float = 0.0
    """grpo: the clip range above 1 (0: clip_eps; larger: DAPO's clip-higher)."""
    grpo_loss_norm: str = "token"
    """grpo: 'token' (sum over all completion tokens / their global count, DAPO) or 'sequence' (mean per completion, then over completions: the original GRPO)."""
    dynamic_sampling: bool = False
    """grpo: DAPO's dynamic sampling — drop groups whose rewards are all equal (zero advantage, no gradient) and
    sample more prompts until the batch is all informative groups, at most posttrain.max_sampling_rounds rounds
    of a full batch each; a batch still short is filled with dropped groups (metrics: sampling_rounds,
    filtered_groups, filled_groups). The choice is global: the same groups at any dp size."""
    max_sampling_rounds: int = 3
    """grpo with dynamic_sampling: most sampling rounds per rollout batch (verl's max_num_gen_batches)."""
    overlong_buffer: int = 0
    """grpo/ppo: DAPO's soft overlong punishment — a completion longer than max_new_tokens − this many tokens loses
    reward linearly, down to −posttrain.overlong_penalty at max_new_tokens (0: off)."""
    overlong_penalty: float = 1.0
    """grpo/ppo with overlong_buffer: the punishment at max_new_tokens."""
    mask_truncated: bool = False
    """grpo: DAPO's overlong filtering — no loss on completions cut off at max_new_tokens (their reward judges an
    unfinished answer); they still count in the group's advantages."""
    critic: str = ""
    """ppo: the critic's starting weights — a reward model (HF *ForSequenceClassification or a `scaletrain reward`
    run) or a causal LM's HF export (its body, with a fresh score head); empty: posttrain.reward_model."""
    critic_lr: float = 0.0
    """ppo: the critic's AdamW learning rate, constant (0: optim.lr)."""
    gae_gamma: float = 1.0
    """ppo: discount γ of generalised advantage estimation."""
    gae_lambda: float = 0.95
    """ppo: λ of generalised advantage estimation (1: Monte-Carlo returns, 0: one-step TD)."""
    value_clip: float = 0.2
    """ppo: the critic's values may move at most this far from their sampling-time values per update (0: no clip)."""
    whiten_advantages: bool = True
    """ppo: shift and scale the advantages to mean 0, std 1 over the global batch's completion tokens."""
    teacher: str = ""
    """distill: the teacher, a causal LM sharing the student's tokenizer and vocabulary size (an HF directory, or a
    scaletrain checkpoint / checkpoints folder / run directory); frozen and run in the student's layout."""
    distill_loss: str = "forward_kl"
    """distill: 'forward_kl' (KL(teacher ‖ student), Hinton's; mass-covering) or 'reverse_kl' (KL(student ‖ teacher),
    mode-seeking, MiniLLM's)."""
    distill_temperature: float = 1.0
    """distill: τ, dividing both logits before the softmaxes; the KL term is scaled by τ² (Hinton)."""
    distill_alpha: float = 1.0
    """distill: weight α of the KL term; 1 − α weighs the cross-entropy on the data's own next tokens."""
    distill_top_k: int = 0
    """distill: 0 = the teacher's whole distribution; k > 0 = only its k most likely tokens per position,
    renormalised (sparse distillation: k stored values per token instead of the vocabulary; forward KL only)."""
    distill_on_policy: bool = False
    """distill: the student samples its own completions of posttrain.train_data's prompts (posttrain.max_new_tokens,
    posttrain.temperature) and learns the teacher's distribution on them (on-policy distillation, GKD; reverse KL
    is the usual choice); false: on the data's own tokens. posttrain.valid_data stays teacher-forced chat rows."""


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one field per section; each component receives only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)
