"""Exact-match evaluation on the synthetic task: greedy answers to held-out chat prompts, checked."""

from __future__ import annotations

import torch

from scaletrain.data.synth import Problem, check_answer
from scaletrain.posttrain.chat import ChatRenderer
from scaletrain.posttrain.generate import greedy_generate


@torch.no_grad()
def exact_match(model: torch.nn.Module, renderer: ChatRenderer, problems: list[Problem], *,
                max_new_tokens: int = 16, prompt_format: str = "chat") -> float:
    """Fraction of problems whose greedy answer contains 'The answer is <right number>'.

    prompt_format 'chat': the renderer's generation prompt after the user turn; 'text': the
    pretraining format ('Question: …\\nAnswer:')."""
    tok = renderer.tokenizer
    correct = 0
    for p in problems:
        if prompt_format == "chat":
            ids = renderer.prompt_ids([{"role": "user", "content": p.question}])
        else:
            ids = tok.encode(f"Question: {p.question}\nAnswer:")
        out = greedy_generate(model, torch.tensor([ids]), max_new_tokens, eos_id=tok.eos_id)
        correct += check_answer(tok.decode(out[0, len(ids):].tolist()), p.answer)
    return correct / max(len(problems), 1)
