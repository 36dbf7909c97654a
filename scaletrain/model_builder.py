"""The one model-building path: every model of a run — the policy, a reference copy, a reward model, a
critic, a teacher, the models `eval` / `generate` / `rlaif` load — is built here, in the run's layout.

    build_model (on the meta device under pp, so each rank materialises only its stage; else on the
    device) → frozen: no gradients (no dp buckets) → parallelize(model, dims, parallel) → weights

Companions (everything but the policy) never recompute activations and never shard an optimizer; their
architecture is their own (a teacher is usually larger than its student), so `check_companion` lists,
before anything is allocated, every reason one cannot serve this run in its role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from scaletrain.checkpoint import load_checkpoint
from scaletrain.checkpoint.files import stored_param_dtype
from scaletrain.checkpoint.hf import load_hf_weights
from scaletrain.checkpoint.locate import locate_model
from scaletrain.config.load import ConfigError
from scaletrain.config.schema import ModelConfig, RunConfig
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.nn.moe import bind_grouped_gemm
from scaletrain.parallel.parallelize import parallelize
from scaletrain.runtime import Runtime


def check_companion(cfg: RunConfig, key: str, path_text: str, *, role: str, tokenizer_vocab: int) -> ModelConfig:
    """Every reason the model cannot serve as `role` ('reward', 'critic' or 'teacher') of this run, at once."""
    _kind, path, m = locate_model(key, path_text)
    p, problems = cfg.parallel, []
    if role == "reward" and m.num_labels != 1:
        problems.append(f"it has {'no score head (a language model)' if not m.num_labels else f'{m.num_labels} labels'}; "
                        "train one with `scaletrain reward` (model.num_labels = 1)")
    if role == "critic" and m.num_labels not in (0, 1):
        problems.append(f"it has {m.num_labels} labels; a critic starts from a reward model (1) or a causal LM")
    if role == "teacher" and m.num_labels:
        problems.append("it is a reward model (a score head, no token logits); a teacher must be a causal LM")
    if m.num_heads % p.tp or m.num_kv_heads % p.tp:
        problems.append(f"its {m.num_heads} heads / {m.num_kv_heads} kv heads do not divide over parallel.tp = {p.tp}")
    if m.num_layers % (p.pp * p.vpp):
        problems.append(f"its {m.num_layers} layers do not divide over parallel.pp·vpp = {p.pp * p.vpp}")
    if m.vocab_size < tokenizer_vocab:
        problems.append(f"its vocabulary ({m.vocab_size}) is smaller than the tokenizer's ({tokenizer_vocab}): "
                        f"it must share the {'policy' if role == 'reward' else 'student'}'s tokenizer")
    elif role == "teacher" and m.vocab_size != cfg.model.vocab_size:
        # Both logit tensors are sharded over tp the same way only when the (padded) sizes agree.
        problems.append(f"its vocabulary has {m.vocab_size} rows and the student's {cfg.model.vocab_size}; set "
                        f"model.vocab_size = {m.vocab_size} (or 0, which takes the teacher's)")
    elif m.vocab_size % p.tp:
        problems.append(f"its vocabulary ({m.vocab_size}) does not divide over parallel.tp = {p.tp}")
    if m.max_position_embeddings and m.max_position_embeddings < cfg.train.seq_length:
        problems.append(f"it reads at most {m.max_position_embeddings} positions < train.seq_length = {cfg.train.seq_length}")
    if problems:
        raise ConfigError(f"{key} = {path}: " + "; ".join(problems) + ".")
    return m


class ModelBuilder:
    """Builds the models of one run in its layout (`Runtime`: dims, precision, device, backend)."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, log: Callable[[str], None] = print) -> None:
        self.cfg, self.runtime, self.log = cfg, runtime, log

    def build(self, model: ModelConfig, *, trainable: bool, dtype: torch.dtype | None = None,
              policy: bool = False) -> torch.nn.Module:
        """An uninitialised model of `model`'s architecture, parallelised in the run's layout. Only the
        policy recomputes activations, shards its optimizer over dp and runs in FP8 (parallel.recompute,
        optim.distributed, precision.fp8: parallelize applies them)."""
        rt, cfg = self.runtime, self.cfg
        with torch.device("meta") if rt.dims.pp > 1 or rt.dims.ep > 1 else torch.device(rt.device):
            module = build_model(model, tp_size=rt.dims.tp, dtype=dtype or rt.precision.param_dtype, backend=rt.backend)
        if not trainable:
            module.requires_grad_(False)  # no gradient buffers, no dp buckets
        parallel = cfg.parallel if policy else dataclasses.replace(cfg.parallel, recompute="none")
        module = parallelize(module, rt.dims, parallel, rt.device, shard_optimizer=policy and cfg.optim.distributed,
                             precision=cfg.precision if policy else None, log=self.log)
        gemm = bind_grouped_gemm(module, rt.device, rt.precision.autocast_dtype or rt.precision.param_dtype)
        if gemm is not None and policy:
            self.log(gemm)
        return module

    def policy(self, *, resumed: bool) -> torch.nn.Module:
        """The trained model: seeded init (a layout-independent function of train.seed), FP8 where asked (in parallelize),
        and on a first start checkpoint.init_from_hf's weights."""
        cfg, dims = self.cfg, self.runtime.dims
        model = self.build(cfg.model, trainable=True, policy=True)
        init_parameters(model, cfg.train.seed, tp_rank=dims.tp_rank, tp_size=dims.tp)
        if not resumed and cfg.checkpoint.init_from_hf:
            fresh = load_hf_weights(model, cfg.checkpoint.init_from_hf, tp_rank=dims.tp_rank, tp_size=dims.tp)
            self.log(f"initialised from Hugging Face weights in {cfg.checkpoint.init_from_hf}"
                     + (f" ({', '.join(fresh)} newly initialised: the HF model is a causal LM)" if fresh else ""))
        return model

    def frozen(self, key: str, path_text: str) -> tuple[torch.nn.Module, str]:
        """A companion named by config key `key`, loaded, frozen and in eval mode; and a line for the log.
        A checkpoint loads in the dtype it was saved in (checked strictly), then runs in the run's."""
        kind, path, m = locate_model(key, path_text)
        rt = self.runtime
        model = self.build(m, trainable=False, dtype=rt.precision.param_dtype if kind == "hf" else stored_param_dtype(path))
        if kind == "hf":
            load_hf_weights(model, path, tp_rank=rt.dims.tp_rank, tp_size=rt.dims.tp)
        else:
            load_checkpoint(path, model, None, dims=rt.dims)
            model.to(rt.precision.param_dtype)
        model.eval()
        return model, f"{m.num_layers}L h{m.hidden_size} from {path} ({kind}), frozen, in the run's layout"

    def score_model(self, key: str, path_text: str, *, seed: int, load: bool) -> tuple[torch.nn.Module, ModelConfig, str]:
        """A trainable score-head model (PPO's critic) of the architecture `key` names: seeded (a causal LM's
        export gets a fresh score head), then, with `load`, its weights (a checkpoint's must be stored in the
        run's parameter dtype). Returns (model, its config, a line for the log)."""
        kind, path, m = locate_model(key, path_text)
        m = dataclasses.replace(m, num_labels=1)
        rt = self.runtime
        model = self.build(m, trainable=True)
        init_parameters(model, seed, tp_rank=rt.dims.tp_rank, tp_size=rt.dims.tp)
        line = f"{m.num_layers}L h{m.hidden_size} from {path}"
        if load and kind == "hf":
            fresh = load_hf_weights(model, path, tp_rank=rt.dims.tp_rank, tp_size=rt.dims.tp)
            line += " (a causal LM: fresh score head)" if fresh else ""
        elif load:
            if stored_param_dtype(path) != rt.precision.param_dtype:
                raise ConfigError(f"{key} = {path} was saved in {stored_param_dtype(path)}, the run trains in "
                                  f"{rt.precision.param_dtype}: export it (`scaletrain convert to-hf`) or match "
                                  "precision.dtype")
            load_checkpoint(path, model, None, dims=rt.dims)
        return model, m, line

    def copy_of_policy(self) -> torch.nn.Module:
        """A frozen model of the policy's architecture (a reference policy), weights still to be filled."""
        return self.build(self.cfg.model, trainable=False)

