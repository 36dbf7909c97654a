"""Evaluation on the synthetic task: exact match of greedy answers, preference accuracy on held-out
(correct, near-miss) pairs, and tool use (calls made, their results, the final answers)."""

from __future__ import annotations

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.tool_loop import respond
from scaletrain.chat.tools import Tool
from scaletrain.data.synth import Problem, check_answer
from scaletrain.generation.sampler import sample_completions, sampling_generator, stop_ids_for
from scaletrain.generation.scoring import sequence_logprobs
from scaletrain.generation.turn import ONE_PROCESS
from scaletrain.nn import cross_entropy_per_token
from scaletrain.trainer.precision import Precision


@torch.no_grad()
def exact_match(model: torch.nn.Module, renderer: ChatRenderer, problems: list[Problem], *,
                max_new_tokens: int = 16, prompt_format: str = "chat", micro_batch: int = 64) -> float:
    """Fraction of problems whose greedy answer contains 'The answer is <right number>'.

    prompt_format 'chat': the renderer's generation prompt after the user turn; 'text': the
    pretraining format ('Question: …\\nAnswer:'). Answers run to eos or max_new_tokens, decoded
    `micro_batch` problems at a time on the KV-cache engine (generation/sampler.py)."""
    tok = renderer.tokenizer
    if prompt_format == "chat":
        prompts = [renderer.prompt_ids([{"role": "user", "content": p.question}]) for p in problems]
    else:
        prompts = [tok.encode(f"Question: {p.question}\nAnswer:") for p in problems]
    if not prompts:
        return 0.0
    param = next(model.parameters())
    completions, _ = sample_completions(
        model, ONE_PROCESS, prompts, None, group_size=1, max_new_tokens=max_new_tokens, temperature=0.0,
        stop_ids={tok.eos_id}, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id,
        vocab_limit=tok.vocab_size, micro_batch=micro_batch,
        precision=Precision(param.dtype, None, param.device.type, "eval"), device=param.device)
    correct = sum(check_answer(tok.decode(c), p.answer) for c, p in zip(completions, problems))
    return correct / len(problems)


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, dataset, batch_size: int = 32) -> torch.Tensor:
    """[n, 2] sequence log-probs (chosen, rejected) of a PreferenceDataset's response tokens."""
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        cols = []
        for side in ("chosen", "rejected"):
            tokens = torch.stack([it[f"{side}_tokens"] for it in items])
            labels = torch.stack([it[f"{side}_labels"] for it in items])
            mask = torch.stack([it[f"{side}_mask"] for it in items])
            cols.append(sequence_logprobs(cross_entropy_per_token(model(tokens), labels), mask, False))
        out.append(torch.stack(cols, dim=1))
    return torch.cat(out)


def preference_accuracy(policy: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """Share of pairs the model prefers correctly: log p(chosen) > log p(rejected), or with a reference,
    DPO's implicit reward (π − ref) higher for chosen than for rejected."""
    margin = policy[:, 0] - policy[:, 1]
    if reference is not None:
        margin = margin - (reference[:, 0] - reference[:, 1])
    return float((margin > 0).double().mean())


@torch.no_grad()
def tool_use(model: torch.nn.Module, renderer: ChatRenderer, problems: list[Problem], tools: list[Tool], *,
             max_new_tokens: int = 128, max_rounds: int = 2) -> dict[str, float]:
    """Run the tool loop on each problem's question and score it:

    called: the first turn is a well-formed call to a known tool; right_call: that call's result
    is the right answer; exact_match: the final answer states the right number;
    answer_given_right_call: exact match among problems whose call returned the right answer."""
    called = right = exact = exact_after_right = 0
    names = {t.name for t in tools}
    for p in problems:
        added = respond(model, renderer, [{"role": "user", "content": p.question}], tools,
                        max_new_tokens=max_new_tokens, max_rounds=max_rounds)
        first_calls = added[0].get("tool_calls") or []
        ok_call = bool(first_calls) and all(c["function"]["name"] in names for c in first_calls)
        results = [m["content"] for m in added if m["role"] == "tool"]
        right_call = ok_call and bool(results) and results[0] == str(p.answer)
        final = added[-1]
        em = final["role"] == "assistant" and not final.get("tool_calls") and check_answer(final["content"] or "", p.answer)
        called += ok_call
        right += right_call
        exact += em
        exact_after_right += em and right_call
    n = max(len(problems), 1)
    return {"called": called / n, "right_call": right / n, "exact_match": exact / n,
            "answer_given_right_call": exact_after_right / max(right, 1)}


@torch.no_grad()
def sampled_accuracy(model: torch.nn.Module, renderer: ChatRenderer, problems: list[Problem], *, samples: int = 1,
                     temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 24,
                     micro_batch: int = 64) -> float:
    """Share of (problem, sample) pairs whose answer is right, batched with the rollout sampler (KV
    cache): `samples` completions per problem at `temperature` (0: one greedy completion each)."""
    tok = renderer.tokenizer
    param = next(model.parameters())
    prompts = [renderer.prompt_ids([{"role": "user", "content": p.question}]) for p in problems]
    group = samples if temperature > 0 else 1
    generators = [sampling_generator(seed, i) for i in range(len(prompts))] if temperature > 0 else None
    marker = renderer.end_of_turn()
    completions, _ = sample_completions(
        model, ONE_PROCESS, prompts, generators, group_size=group, max_new_tokens=max_new_tokens, temperature=temperature,
        stop_ids=stop_ids_for(tok, marker), stop_text=marker, decode=tok.decode,
        pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id, vocab_limit=tok.vocab_size,
        micro_batch=micro_batch, precision=Precision(param.dtype, None, param.device.type, "eval"),
        device=param.device)
    right = 0
    for i, c in enumerate(completions):
        text = tok.decode(c)
        right += check_answer(text.split(marker, 1)[0] if marker else text, problems[i // group].answer)
    return right / max(len(completions), 1)
