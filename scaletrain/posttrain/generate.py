"""Greedy decoding on the (single-process) model: the reference for generation parity checks.

Full recomputation per new token (no KV cache): simple and exact; rollouts for RL will need a
cached, batched generator.
"""

from __future__ import annotations

import torch


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
