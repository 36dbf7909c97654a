"""The reference decoder: greedy / sampled decoding that recomputes every prefix (no KV cache).

This is what `generation/turn.py` did before every generation path went through the one KV-cache
engine (generation/sampler.py): simple and exact, O(length²) per completion. It stays here only as the
reference the engine is tested against (tests/test_decoding_engine.py) and benchmarked against
(benchmarks/bench_generate.py). One process, one model, no layout.
"""

from __future__ import annotations

import torch

from scaletrain.generation.turn import ContextFull


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_id: int | None = None) -> torch.Tensor:
    """input_ids [b, s] → [b, s + n]: argmax continuation, stopping early when every row hit eos."""
    was_training = model.training
    model.eval()
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = model(ids)[:, -1].argmax(dim=-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return ids


@torch.no_grad()
def generate_turn(model: torch.nn.Module, prompt_ids: list[int], tokenizer, *, max_new_tokens: int,
                  stop_text: str | None = None, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> str:
    """One assistant turn: decode from `prompt_ids` until eos, the end-of-turn marker `stop_text`
    (returned text excludes it) or `max_new_tokens`. temperature 0 is greedy; otherwise softmax
    sampling with `generator`. One sequence, no KV cache; stops at the model's
    max_position_embeddings (ContextFull when the prompt already reaches it)."""
    limit = getattr(getattr(model, "cfg", None), "max_position_embeddings", 0) or None
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise ContextFull(f"the conversation is {len(prompt_ids)} tokens; the model covers "
                              f"{limit} (model.max_position_embeddings)")
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    stop_ids = {tokenizer.eos_id}
    if stop_text:  # a template marker that is one (special) token may decode to nothing: stop on its id
        marker = tokenizer.encode(stop_text)
        if len(marker) == 1:
            stop_ids.add(marker[0])
    new: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        else:
            nxt = int(logits.argmax())
        if nxt in stop_ids:
            break
        new.append(nxt)
        text = tokenizer.decode(new)
        if stop_text and stop_text in text:
            text = text.split(stop_text, 1)[0]
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return text
