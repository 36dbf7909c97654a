"""Chat rendering with loss masks: messages → token ids + 1 on the tokens the model should learn.

A conversation is rendered with the tokenizer's own chat template — read from every place Hugging Face
keeps one, in transformers' order of precedence, chosen and rendered as `apply_chat_template` does
(chat/templates.py) — or a bundled one (ChatML; Llama 3) when the tokenizer has none or the run
names it. Masks come from rendering prefixes: for each assistant turn, the text the template adds for the
generation prompt (the assistant header) is context, and the rest of the turn (content, tool calls,
end-of-turn marker) is target — so the model learns to stop. Segments are tokenised one by one and
concatenated, the usual practice, so masks never straddle a token; special tokens the template writes
(`bos_token`, …) are encoded as their ids, as transformers encodes them.

End of a training conversation (`close`): eos follows the rendered conversation, except where the
template's end-of-turn marker is the eos token itself (ChatML models such as SmolLM2 and Qwen, whose eos is
`<|im_end|>`) or the rendering already ends in eos (templates that write `eos_token`): no second eos.

Rows that cannot be rendered are reported by reason, never silently repaired: unknown roles, no
assistant turn, an empty assistant turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scaletrain.chat.templates import (
    BadConversation,
    choose_template,
    compile_template,
    find_templates,
    select,
    template_variables,
)
from scaletrain.chat.tools import Tool, ToolCallError, bundled_tools, normalise_call
from scaletrain.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# Tool calls render as {"name": ..., "arguments": ...}. Our renderer normalises messages to the OpenAI
# form first (tools.normalise_call); the templates also take the flat form and string arguments, as
# transformers' apply_chat_template passes messages unchanged. `tools` become a system block, Qwen-style.
_CALL = ("{% set f = c['function'] if c['function'] is defined else c %}{\"name\": {{ f['name'] | tojson }}, "
         "\"arguments\": {% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}"
         "{% endif %}}")
CHATML = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t['function'] | tojson }}\n{% endfor %}"
    "Call one with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('content') %}{{ m['content'] }}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>" + _CALL + "</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "{% for t in tools %}{{ t['function'] | tojson }}\n{% endfor %}"
    "Call one by replying with {\"name\": ..., \"arguments\": {...}} only.<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m.get('content') %}{{ m['content'] }}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}" + _CALL + "{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
BUNDLED = {"chatml": CHATML, "llama3": LLAMA3}


def tokenizer_chat_template(tokenizer: Tokenizer, tools: bool = False) -> str | None:
    """The tokenizer's own template as transformers would choose it (None: it has none)."""
    found = find_templates(Path(tokenizer.path).parent)
    return None if found is None else found.templates[select(found, tools)]


def chat_template_origin(posttrain, tokenizer: Tokenizer) -> str:
    """Which template a run with this [posttrain] section renders with, and where it came from (for the log)."""
    return ChatRenderer(tokenizer, posttrain.chat.template, tools=bundled_tools(posttrain.chat.tools)).origin


class ChatRenderer:
    """Renders conversations for one tokenizer. template: 'auto' (the tokenizer's, else ChatML), 'chatml',
    'llama3', a named template of the tokenizer ('tool_use'), or a Jinja string; tools: listed to the model
    in every conversation (and, as in transformers, they pick the tokenizer's `tool_use` template). `origin`
    says which template renders and where it came from (logged by the runs)."""

    def __init__(self, tokenizer: Tokenizer, template: str = "auto", loss_on: str = "assistant",
                 tools: Sequence[Tool] = ()) -> None:
        if loss_on not in ("assistant", "all"):
            raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
        folder = Path(tokenizer.path).parent
        chosen = choose_template(template, folder, tools=bool(tools), bundled=BUNDLED)
        self.source, self.origin = chosen.source, chosen.origin
        self.template = compile_template(chosen.source)
        self.tokenizer, self.loss_on = tokenizer, loss_on
        self.tools = list(tools)
        self._schemas = [t.schema() for t in self.tools] or None
        self.variables = template_variables(folder)  # bos_token, eos_token, … as transformers passes them
        # Special tokens written by the template are encoded as their ids (tokenizer.json tokenizers do
        # that themselves; a SentencePiece model would spell '<s>' out in characters).
        self._specials = tuple(v for v in self.variables.values() if tokenizer.token_id(v) is not None)
        self._end: tuple[str | None] | None = None

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(**self.variables, messages=normalise_messages(messages), tools=self._schemas,
                                    documents=None, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, special tokens as their ids (as `apply_chat_template` tokenises)."""
        return self.tokenizer.encode_with_specials(text, self._specials)

    def close(self, ids: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """A rendered training conversation with its end of document: eos appended (a target where the
        last token is), unless the template's end-of-turn marker is eos or the rendering ends in eos."""
        eos = self.tokenizer.eos_id
        marker = self.end_of_turn()
        if (ids and ids[-1] == eos) or (marker is not None and self.encode(marker) == [eos]):
            return ids, target
        return ids + [eos], target + [target[-1]]

    def end_of_turn(self) -> str | None:
        """The marker the template closes an assistant turn with ('<|im_end|>', '<|eot_id|>'), which
        generation stops at; None when the template has none (generation then stops at eos)."""
        if self._end is None:  # rendered once per renderer
            probe = "\u2063probe\u2063"
            user = [{"role": "user", "content": "hi"}]
            head = self.text(user, add_generation_prompt=True)
            full = self.text(user + [{"role": "assistant", "content": probe}])
            ok = full.startswith(head) and probe in full
            self._end = (full[len(head):].split(probe, 1)[1].strip() or None if ok else None,)
        return self._end[0]

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation ending in a generation prompt (for generation / evaluation)."""
        return self.encode(self.text(messages, add_generation_prompt=True))

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of a whole conversation; raises BadConversation."""
        check_messages(messages)
        ids: list[int] = []
        mask: list[int] = []
        done = ""
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                with_header = self.text(messages[:k], add_generation_prompt=True)
                if not with_header.startswith(done):
                    raise BadConversation("the chat template does not render prefixes consistently")
                header = with_header[len(done):]
                seg_ids = self.encode(header)
                ids += seg_ids
                mask += [1 if self.loss_on == "all" else 0] * len(seg_ids)
                done = with_header
            full = self.text(messages[:k + 1])
            if not full.startswith(done):
                raise BadConversation("the chat template does not render prefixes consistently")
            seg_ids = self.encode(full[len(done):])
            target = message["role"] == "assistant" or self.loss_on == "all"
            ids += seg_ids
            mask += [1 if target else 0] * len(seg_ids)
            done = full
        return ids, mask


def normalise_messages(messages: Sequence[dict]) -> list[dict]:
    """Copies with null fields dropped (Arrow fills a struct column's absent keys with null) and tool
    calls in the OpenAI form templates read; raises BadConversation for a malformed tool call."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
        if isinstance(m, dict) and m.get("tool_calls"):
            try:
                m["tool_calls"] = [normalise_call(c) for c in m["tool_calls"]]
            except ToolCallError as e:
                raise BadConversation(f"bad tool call: {e}") from None
        out.append(m)
    return out


def check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadConversation("no messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadConversation(f"unknown role {m.get('role') if isinstance(m, dict) else m!r}")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadConversation("no assistant turn")
    if any(not (m.get("content") or "").strip() and not m.get("tool_calls") for m in assistants):
        raise BadConversation("empty assistant turn")
