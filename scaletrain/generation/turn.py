"""Generation for one caller at a time — a chat turn, greedy answers — on the one decoding engine.

Every generation path (chat, the tool loop, evaluation answers, rollouts) decodes through
generation/sampler.py's `sample_completions`: a KV cache per microbatch on the torch backend (each new
token runs one position), in whatever layout the model is parallelised in (tp, pp; cp and dp callers
split their prompts as `sample_share` does). These are thin adapters to it: `generate_turn` (one
assistant turn, text in and out, stopping at eos or the end-of-turn marker) and `greedy_generate`
(token ids in, token ids out). In a parallel layout (`dims`; default: one process) they are collective over the
model's tp and pp ranks,
which all return the same result.

The old decoder that recomputed every prefix lives on only as the test reference
(tests/reference_generate.py); the engine decodes the same tokens (tests/test_decoding_engine.py).
"""

from __future__ import annotations

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.sampler import completion_text, sample_completions, stop_ids_for
from scaletrain.trainer.precision import Precision

ONE_PROCESS = ParallelDims.single()


class ContextFull(ValueError):
    """The prompt already fills the model's positions."""


def _precision_of(model: torch.nn.Module) -> Precision:
    param = next(model.parameters())
    return Precision(param.dtype, None, param.device.type, "the model's own dtype")


def _room(model: torch.nn.Module, prompt_length: int, max_new_tokens: int) -> int:
    """max_new_tokens, capped at the model's positions (ContextFull when the prompt already fills them)."""
    limit = getattr(getattr(model, "cfg", None), "max_position_embeddings", 0) or None
    if limit is None:
        return max_new_tokens
    if prompt_length >= limit:
        raise ContextFull(f"the conversation is {prompt_length} tokens; the model covers "
                          f"{limit} (model.max_position_embeddings)")
    return min(max_new_tokens, limit - prompt_length)


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_id: int | None = None, *, dims: ParallelDims = ONE_PROCESS,
                    precision: Precision | None = None) -> torch.Tensor:
    """input_ids [b, s] → [b, s + n]: argmax continuation over the model's whole vocabulary, rows that
    hit eos filled with eos, n the longest completion (≤ max_new_tokens). All rows in one batch."""
    rows = input_ids.tolist()
    cfg = getattr(model, "cfg", None)
    completions, _ = sample_completions(
        model, dims, rows, None, group_size=1, max_new_tokens=max_new_tokens, temperature=0.0,
        stop_ids=set() if eos_id is None else {eos_id}, pad_id=0 if eos_id is None else eos_id,
        vocab_limit=int(cfg.vocab_size) if cfg is not None else 2**62, micro_batch=max(len(rows), 1),
        precision=precision or _precision_of(model), device=input_ids.device)
    n = max((len(c) for c in completions), default=0)
    fill = 0 if eos_id is None else eos_id
    new = torch.tensor([c + [fill] * (n - len(c)) for c in completions], dtype=input_ids.dtype).reshape(len(rows), n)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


@torch.no_grad()
def generate_turn(model: torch.nn.Module, prompt_ids: list[int], tokenizer, *, max_new_tokens: int,
                  stop_text: str | None = None, temperature: float = 0.0,
                  generator: torch.Generator | None = None, dims: ParallelDims = ONE_PROCESS,
                  precision: Precision | None = None) -> str:
    """One assistant turn: decode from `prompt_ids` until eos, the end-of-turn marker `stop_text`
    (returned text excludes it) or `max_new_tokens`. temperature 0 is greedy; otherwise softmax
    sampling drawing from `generator` (a fresh one seeded from torch's global RNG when None). Tokens
    come from the tokenizer's vocabulary. Stops at the model's max_position_embeddings (ContextFull
    when the prompt already reaches it). Runs on the model's device."""
    max_new_tokens = _room(model, len(prompt_ids), max_new_tokens)
    generators = None
    if temperature > 0:
        generators = [generator if generator is not None else
                      torch.Generator().manual_seed(int(torch.randint(2**62, ())))]
    stop_ids = stop_ids_for(tokenizer, stop_text)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    completions, _ = sample_completions(
        model, dims, [list(prompt_ids)], generators, group_size=1,
        max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stop_ids, stop_text=stop_text or None,
        decode=tokenizer.decode, pad_id=pad, vocab_limit=tokenizer.vocab_size, micro_batch=1,
        precision=precision or _precision_of(model), device=next(model.parameters()).device)
    return completion_text(completions[0], tokenizer.decode, stop_ids, stop_text or None)
