"""The tool-use loop: generate an assistant turn, execute its tool calls, feed the results back as
`tool` messages, and generate again until the model answers without a call (or `max_rounds` calls).

Used by `scaletrain chat` and by the tool-use evaluation; the prompt is rendered by the same
ChatRenderer (template, tool list) the model was fine-tuned with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.tools import Tool, ToolCallError, execute, parse_tool_calls
from scaletrain.generation.turn import generate_turn


def respond(model: torch.nn.Module, renderer: ChatRenderer, messages: Sequence[dict], tools: Sequence[Tool], *,
            max_new_tokens: int = 128, max_rounds: int = 4, temperature: float = 0.0,
            generator: torch.Generator | None = None,
            on_message: Callable[[dict], None] | None = None) -> list[dict]:
    """The messages the model adds after `messages`: assistant turns (with `tool_calls` where it called
    a tool), the `tool` results in between, and a final assistant turn. A malformed call is kept as
    the turn's text and ends the loop (`malformed_tool_call` marks it); `on_message` sees each
    message as it is produced."""
    by_name = {t.name: t for t in tools}
    end = renderer.end_of_turn()
    history, added = list(messages), []

    def add(message: dict) -> None:
        history.append(message)
        added.append(message)
        if on_message is not None:
            on_message(message)

    for round_ in range(max_rounds + 1):
        text = generate_turn(model, renderer.prompt_ids(history), renderer.tokenizer, max_new_tokens=max_new_tokens,
                             stop_text=end, temperature=temperature, generator=generator)
        try:
            content, calls = parse_tool_calls(text)
        except ToolCallError as e:
            add({"role": "assistant", "content": text, "malformed_tool_call": str(e)})
            break
        if not calls or round_ == max_rounds:
            add({"role": "assistant", "content": text if not calls else content})
            break
        add({"role": "assistant", "content": content, "tool_calls": calls})
        for call in calls:
            add({"role": "tool", "name": call["function"]["name"], "content": execute(call, by_name)})
    return added
