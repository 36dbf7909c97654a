"""A small byte-level BPE tokenizer with ChatML special tokens (eos = <|im_end|>, as SmolLM2 and Qwen
instruct models have it), saved by transformers itself, and a Qwen2.5-style chat template with a default
system prompt and tool calls — the shape of real chat checkpoints, built in a second from the corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import corpus_texts

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_TURNS = (
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SYSTEM_BLOCK = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
)
_TOOLS_BLOCK = (
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- '" + SYSTEM + "' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.'"
    " + '<|im_end|>\\n' }}"
)
# One template for both (tools decide), as Qwen2.5 ships it; and the pair of named templates of older
# checkpoints (tokenizer_config.json: [{"name": "default"}, {"name": "tool_use"}]).
QWEN = "{%- if tools %}" + _TOOLS_BLOCK + "{%- else %}" + _SYSTEM_BLOCK + "{%- endif %}" + _TURNS
DEFAULT = _SYSTEM_BLOCK + _TURNS
TOOL_USE = _TOOLS_BLOCK + _TURNS


def build_bpe_tokenizer(out: Path, specials: list[str], template: str | None, **named_tokens: str) -> Path:
    """A byte-level BPE of 512 tokens (trained on the corpus) with `specials` first, saved by transformers
    with `template` (current transformers writes it to chat_template.jinja) and the named special tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts(200), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named_tokens)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    return out


def build_chatml_tokenizer(out: Path) -> Path:
    """ChatML specials with eos = <|im_end|> (ids 0-2: <|endoftext|>, <|im_start|>, <|im_end|>) and QWEN."""
    return build_bpe_tokenizer(out, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def to_old_layout(new: Path, old: Path, named: bool = True) -> Path:
    """The same tokenizer in the layout older transformers wrote: the template(s) inside tokenizer_config.json
    (named: a list of {"name", "template"} — default and tool_use), no chat_template.jinja."""
    shutil.copytree(new, old)
    (old / "chat_template.jinja").unlink()
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ([{"name": "default", "template": DEFAULT}, {"name": "tool_use", "template": TOOL_USE}]
                            if named else QWEN)
    (old / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return old
