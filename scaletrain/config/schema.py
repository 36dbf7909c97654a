"""Typed, frozen run configuration: one dataclass per section, one docstring line per field.

Every field is documented by the string literal that follows it; `scaletrain.config.load` reads
these to explain an unknown or mistyped key. World size never appears here: `dp` is inferred
from it at start-up and checked (DESIGN rule 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaletrain.config.moe import MoEConfig
from scaletrain.config.posttrain import PostTrainConfig


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
    """Activation recomputation: 'none', 'selective' (rerun only parallel.recompute_modules in backward, Megatron's
    selective granularity) or 'full' (keep only each block's input; rerun the block in backward)."""
    recompute_modules: tuple[str, ...] = ("core_attn",)
    """recompute = 'selective': what is rerun — 'core_attn' (the attention core: softmax(q kᵀ) v, and under cp its
    key/value all-gather), 'mlp_act' (the MLP activation silu(gate)·up) and/or 'norm' (the RMSNorms)."""
    overlap_grad_reduce: bool = True
    """Data parallelism: start each gradient bucket's all-reduce / reduce-scatter as soon as its last gradient of the
    step lands (during the last microbatch's backward on each pipeline stage), instead of after the schedule."""
    bucket_mb: float = 25.0
    """Data parallelism: gradient bucket size in MiB (of main-grad bytes); each bucket is reduced — and under ZeRO-1
    gathered — as one collective (Megatron's --ddp-bucket-size)."""
    overlap_param_gather: bool = True
    """ZeRO-1: all-gather the updated parameters bucket by bucket under the next forward (posted at its start in
    forward order, each bucket waited for where its first layer runs) instead of right after the optimizer step."""
    compile: bool = False
    """torch.compile each transformer block (inductor: fused elementwise kernels, fewer launches; the first step
    pays the compile). Torch backend; rollouts and evaluation passes, whose shapes change per call, run eager."""
    timeout_s: float = 600.0
    """Collective timeout: a rank that waits longer for a dead or hung peer stops with an error naming the operation."""


@dataclass(frozen=True)
class PrecisionConfig:
    """Numerics of parameters and compute."""

    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float64'."""
    params: str = "auto"
    """Weight layout of bfloat16 runs: 'auto' (= 'bf16'), 'bf16' (bf16 weights and activations; gradients accumulated
    into fp32 main-grad buckets; fp32 master weights and AdamW state in the optimizer, sharded by ZeRO-1) or 'fp32'
    (fp32 weights under bf16 autocast). float32 / float64 runs keep their dtype everywhere ('auto' or that dtype's)."""
    fp8: bool = False
    """FP8 compute: Transformer Engine's (precision.fp8_backend = 'te', parallel.backend = 'te') or torchao's float8
    training ('torchao', parallel.backend = 'torch')."""
    fp8_backend: str = "te"
    """Who runs FP8: 'te' (Transformer Engine) or 'torchao' (torchao.float8 on the torch backend, torchtitan's path)."""
    fp8_recipe: str = "current"
    """te: 'current' (per-tensor current scaling), 'delayed' (amax history) or 'blockwise' (where the installed TE
    offers it). torchao: 'tensorwise' (= 'current': dynamic per-tensor scales) or 'rowwise' (per-row scales)."""
    fp8_emulate: bool = False
    """torchao: emulate the FP8 matmuls in high precision (CPU tests; the casts and scales are the real ones)."""
    fp8_skip_small: bool = True
    """torchao: leave out linears whose GEMM is too small to gain from FP8 (torchao's size heuristics per recipe).
    The output head and layers with a dimension not divisible by 16 are always left out."""
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
