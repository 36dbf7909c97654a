"""`scaletrain eval --samples FILE`: one jsonl row per scored item, token ids beside the text, so results
can be compared row by row with lm-evaluation-harness (its `--log_samples`) or recomputed elsewhere.

- choice: one row per question — every choice's log-likelihood (and per UTF-8 byte), its context and
  continuation token ids, the picked index (`acc`'s argmax), the per-byte pick (`acc_norm`'s), the gold index.
- perplexity: one row per document — the summed log-likelihood of its tokens (its end-of-document token
  included; the very first token of the file has no context and is not scored), their count, its UTF-8
  bytes and token ids. The task's loss is Σ loglik / Σ tokens over these rows.
- answer / refusal: one row per prompt — the rendered prompt and its ids, the completion and its ids.
Rows are appended (several tasks share one file), each with `task` and the row's `index` in its file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from scaletrain.evaluation.tasks import gold_of


def public(row: dict) -> dict:
    """A task row without the fields evaluation adds (shots, prompts): what the file held."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def choice_samples(task, rows: Sequence[tuple[list[int], int]], logps: torch.Tensor, tokenizer) -> list[dict]:
    """rows, logps: `choice_rows` and their scores, every choice of every question in order."""
    out, k = [], 0
    for q, row in enumerate(task.rows):
        n = len(row["choices"])
        scores = [float(v) for v in logps[k:k + n]]
        per_byte = [s / len(c.encode("utf-8")) for s, c in zip(scores, row["choices"])]
        choices = [{"text": c, "loglik": s, "loglik_per_byte": b, "context_ids": ids[:start],
                    "continuation_ids": ids[start:]}
                   for c, s, b, (ids, start) in zip(row["choices"], scores, per_byte, rows[k:k + n])]
        gold = gold_of(row)
        picked = max(range(n), key=scores.__getitem__)
        picked_norm = max(range(n), key=per_byte.__getitem__)
        out.append({"task": task.name, "index": q, "row": public(row),
                    "context": tokenizer.decode(rows[k][0][:rows[k][1]]), "choices": choices, "gold": gold,
                    "picked": picked, "picked_norm": picked_norm, "acc": picked == gold,
                    "acc_norm": picked_norm == gold})
        k += n
    return out


def perplexity_samples(task, documents: list[list[int]], sums: torch.Tensor, counts: torch.Tensor) -> list[dict]:
    return [{"task": task.name, "index": i, "row": public(row), "loglik": float(sums[i]), "tokens": int(counts[i]),
             "bytes": len(row["text"].encode("utf-8")), "ids": ids}
            for i, (row, ids) in enumerate(zip(task.rows, documents))]


def generation_samples(task, prompt_texts: list[str], generations: list[tuple[str, int, bool, list[int]]]) -> list[dict]:
    """generations: (completion text, its token count, truncated, its token ids) per prompt."""
    return [{"task": task.name, "index": i, "row": public(row), "prompt": text, "prompt_ids": list(prompt),
             "completion": completion, "completion_ids": list(ids), "tokens": n, "truncated": truncated}
            for i, (row, text, prompt, (completion, n, truncated, ids)) in
            enumerate(zip(task.rows, prompt_texts, task.prompts, generations))]


def append_samples(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
