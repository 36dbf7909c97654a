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

from scaletrain.chat.tools import BUNDLED_TOOLS, Tool, bundled_tools


def add_chat_args(p: argparse.ArgumentParser) -> None:
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
                        "posttrain.tools; off for a Hugging Face directory)")
    p.add_argument("--template", default=None,
                   help="chat template: auto, chatml, llama3 or a Jinja string (default: the run's posttrain.chat_template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-tool-rounds", type=int, default=4, help="tool calls per user turn before the model must answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--json", action="store_true", help="print the whole conversation as JSON messages at the end")


def resolve_checkpoint(path: Path) -> Path:
    """A step_* folder from a run directory, its checkpoints/ folder or the step folder itself."""
    from scaletrain.checkpoint.io import STATE_FILE, latest_checkpoint

    if (path / STATE_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (config.json) nor a scaletrain run, "
                            "checkpoints/ folder or step_* checkpoint")


def _refuse_reward_model(num_labels: int, path: Path) -> None:
    if num_labels:
        raise ValueError(f"{path} is a reward model (a score head, model.num_labels = {num_labels}): it scores "
                         "conversations and cannot write one; chat with a policy (sft, dpo or grpo run) instead")


def load_chat_model(path: str | Path) -> tuple[torch.nn.Module, object, str, tuple[str, ...]]:
    """(model on CPU, tokenizer, chat template setting, tools listed in training) for `path`."""
    from scaletrain.checkpoint.hf import load_full_model, read_hf_dir
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.models import build_model

    p = Path(path)
    if (p / "config.json").is_file():
        cfg, state = read_hf_dir(p)
        _refuse_reward_model(cfg.num_labels, p)
        model = build_model(cfg, dtype=torch.float32)
        model.load_state_dict(state)
        return model, load_tokenizer(str(p)), "auto", ()
    step = resolve_checkpoint(p)
    cfg, model = load_full_model(step)
    _refuse_reward_model(cfg.num_labels, step)
    template = "auto"
    tools: tuple[str, ...] = ()
    run_config = step.parent.parent / "config.toml"
    if run_config.is_file():
        from scaletrain.config.load import load_config

        pt = load_config(run_config).posttrain
        template, tools = pt.chat_template, tuple(pt.tools)
    if not (step / "tokenizer").is_dir():
        raise FileNotFoundError(f"{step} holds no tokenizer/ folder; chat needs the tokenizer the run trained with")
    return model, load_tokenizer(str(step / "tokenizer")), template, tools


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


def chat_command(args: argparse.Namespace) -> int:
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.chat.tool_loop import respond
    from scaletrain.generation.turn import ContextFull

    names = [] if args.tools.strip() == "none" else [n.strip() for n in args.tools.split(",") if n.strip()]
    executable: list[Tool] = bundled_tools(names)
    model, tokenizer, template, trained_tools = load_chat_model(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
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
