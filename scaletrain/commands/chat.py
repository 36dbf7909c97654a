"""`scaletrain chat`: talk to a fine-tuned model, executing the tools it calls.

    scaletrain chat runs/tools_sft                  # a run directory, its checkpoints/, or a step_* folder
    scaletrain chat runs/tools_hf --message "Ada has 57 marbles and gives away 8. How many are left?"
    echo "What is 37 times 8?" | scaletrain chat runs/tools_sft --json

The prompt is rendered as the model was fine-tuned: a scaletrain run's chat template and tool list
come from its config.toml; a Hugging Face directory uses its tokenizer's chat template (ChatML when it
has none). Tool calls to the bundled tools are executed and their results fed back (`--tools none`
turns that off). One process, on CUDA when visible, else CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.tool_loop import respond
from scaletrain.chat.tools import BUNDLED_TOOLS, Tool, bundled_tools
from scaletrain.checkpoint.files import STATE_FILE
from scaletrain.checkpoint.locate import model_files
from scaletrain.checkpoint.select import latest_checkpoint
from scaletrain.config.load import load_config
from scaletrain.config.schema import RunConfig
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer
from scaletrain.distributed import ParallelDims
from scaletrain.generation.turn import ContextFull
from scaletrain.model_builder import ModelBuilder
from scaletrain.runtime import Runtime
from scaletrain.trainer.precision import Precision


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, its checkpoints/ folder, a step_* checkpoint, or a Hugging Face "
                                 "model directory")
    p.add_argument("--message", action="append", default=[],
                   help="a user turn (repeatable: successive turns of one conversation); without it, turns are "
                        "read from standard input, one per line")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--tools", default=",".join(BUNDLED_TOOLS),
                   help=f"bundled tools to execute when called, comma-separated, or 'none' (default: "
                        f"{','.join(BUNDLED_TOOLS)})")
    p.add_argument("--list-tools", action=argparse.BooleanOptionalAction, default=None,
                   help="list the tools to the model in the prompt (default: as the run was trained, "
                        "posttrain.chat.tools; off for a Hugging Face directory)")
    p.add_argument("--template", default=None,
                   help="chat template: auto, chatml, llama3 or a Jinja string (default: the run's posttrain.chat.template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-tool-rounds", type=int, default=4, help="tool calls per user turn before the model must answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--json", action="store_true", help="print the whole conversation as JSON messages at the end")


def resolve_checkpoint(path: Path) -> Path:
    """A step_* folder from a run directory, its checkpoints/ folder or the step folder itself."""
    if (path / STATE_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (config.json) nor a scaletrain run, "
                            "checkpoints/ folder or step_* checkpoint")


def load_chat_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Tokenizer, str, tuple[str, ...]]:
    """(model in float32 on `device`, tokenizer, chat template setting, tools listed in training) for `path`:
    built by the one model-building path at the single-process layout."""
    p = Path(path)
    if not (p / "config.json").is_file():
        p = resolve_checkpoint(p)
    _kind, m, tok_dir, template = model_files(str(p))
    if m.num_labels:
        raise ValueError(f"{p} is a reward model (a score head, model.num_labels = {m.num_labels}): it scores "
                         "conversations and cannot write one; chat with a policy (sft, dpo or grpo run) instead")
    tools: tuple[str, ...] = ()
    run_config = p.parent.parent / "config.toml"
    if not (p / "config.json").is_file() and run_config.is_file():
        tools = tuple(load_config(run_config).posttrain.chat.tools)
    single = ParallelDims.single()
    runtime = Runtime(single, Precision(torch.float32, None, device.type, "chat: float32"), device, "torch")
    model, _ = ModelBuilder(RunConfig(model=m), runtime).frozen("model", str(p))
    return model, load_tokenizer(str(tok_dir)), template, tools


def _print_message(m: dict, out) -> None:
    if m["role"] == "tool":
        print(f"  [{m.get('name', 'tool')} → {m['content']}]", file=out, flush=True)
    elif m.get("tool_calls"):
        for c in m["tool_calls"]:
            print(f"  [calls {c['function']['name']}({json.dumps(c['function']['arguments'])})]", file=out, flush=True)
        if m.get("content"):
            print(f"assistant> {m['content']}", file=out, flush=True)
    else:
        note = f"  [malformed tool call: {m['malformed_tool_call']}]" if m.get("malformed_tool_call") else ""
        print(f"assistant> {m['content']}{note}", file=out, flush=True)


def command(args: argparse.Namespace) -> int:
    names = [] if args.tools.strip() == "none" else [n.strip() for n in args.tools.split(",") if n.strip()]
    executable: list[Tool] = bundled_tools(names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, template, trained_tools = load_chat_model(args.model, device)
    listed = bundled_tools(trained_tools) if args.list_tools is None else (executable if args.list_tools else [])
    renderer = ChatRenderer(tokenizer, args.template or template, tools=listed)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(args.seed)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = not args.message and sys.stdin.isatty()
    out = sys.stderr if args.json else sys.stdout
    turns = iter(args.message) if args.message else sys.stdin
    if interactive:
        print("scaletrain chat: one line per turn; /reset starts over, /exit or Ctrl-D ends", file=out)
    while True:
        if interactive:
            print("you> ", end="", file=out, flush=True)
        line = next(turns, None)
        if line is None or line.strip() == "/exit":
            break
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not interactive:
            print(f"you> {line}", file=out, flush=True)
        try:
            messages += [{"role": "user", "content": line}]
            messages += respond(model, renderer, messages, executable, max_new_tokens=args.max_new_tokens,
                                max_rounds=args.max_tool_rounds, temperature=args.temperature, generator=generator,
                                on_message=lambda m: _print_message(m, out))
        except ContextFull as e:
            print(f"  [{e}: /reset to start over]", file=out, flush=True)
            if not interactive:
                break
    if args.json:
        print(json.dumps(messages, indent=1))
    return 0
