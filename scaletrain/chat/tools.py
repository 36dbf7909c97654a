"""Tools a chat model may call: the bundled calculator, tool-call parsing and execution.

A tool call is `{"name": ..., "arguments": {...}}`; messages may also carry the OpenAI form
`{"type": "function", "function": {"name": ..., "arguments": "<json>" | {...}}}`. `normalise_call`
turns either into the OpenAI form with `arguments` as a dict, which is what Hugging Face chat templates
(Qwen2.5, Llama 3.1, SmolLM) read and what the bundled templates render as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`.

Tool results are strings fed back as `{"role": "tool", "name": ..., "content": ...}`. A failing call
(unknown tool, bad arguments, an expression the calculator refuses) yields an `error: ...` result
rather than an exception: the model sees what went wrong, as it would from a real tool.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass


class ToolCallError(ValueError):
    """A tool call that cannot be parsed or executed; the message is fed back to the model."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., str]

    def schema(self) -> dict:
        """The OpenAI / Hugging Face `tools=` entry for chat templates."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, arguments: dict) -> str:
        required = self.parameters.get("required", [])
        missing = [k for k in required if k not in arguments]
        if missing:
            raise ToolCallError(f"{self.name}: missing argument(s) {', '.join(missing)}")
        unknown = set(arguments) - set(self.parameters.get("properties", {}))
        if unknown:
            raise ToolCallError(f"{self.name}: unknown argument(s) {', '.join(sorted(unknown))}")
        return self.fn(**arguments)


# --- the calculator: arithmetic on an AST whitelist, never eval() ---------------------------------

_BINOPS: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                 ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                                 ast.Pow: operator.pow}
_UNARY: dict[type, Callable] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10 ** 30  # bounds every intermediate so `9**9**9` cannot hang the loop


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value  # type: ignore[return-value]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > MAX_MAGNITUDE):
            raise ToolCallError("exponent too large")
        try:
            value = _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolCallError("division by zero") from None
        if isinstance(value, complex):
            raise ToolCallError("result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolCallError("result out of range")
        return value
    raise ToolCallError(f"unsupported expression element {type(node).__name__} (numbers, + - * / // % ** and "
                        "parentheses only)")


def format_number(value: int | float) -> str:
    """Integers exactly; floats with up to 10 significant digits, integral floats as integers."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallError("result is not finite")
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, unary minus, parentheses."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolCallError("calculator: expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolCallError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolCallError(f"calculator: cannot parse {expression!r}") from None
    return format_number(_eval(tree))


CALCULATOR = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    fn=calculate,
)
BUNDLED_TOOLS: dict[str, Tool] = {t.name: t for t in (CALCULATOR,)}


def bundled_tools(names: tuple[str, ...] | list[str]) -> list[Tool]:
    """The bundled tools named; a clear error for an unknown name."""
    unknown = [n for n in names if n not in BUNDLED_TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; bundled tools: {', '.join(BUNDLED_TOOLS)}")
    return [BUNDLED_TOOLS[n] for n in names]


# --- calls: normalise, parse from generated text, execute ----------------------------------------

def normalise_call(call: dict) -> dict:
    """A tool call in OpenAI form with dict arguments. Accepts the flat {"name", "arguments"} form and
    arguments as a JSON string; drops null-valued argument keys (Arrow fills a struct column's absent
    keys with null when rows call different tools)."""
    if not isinstance(call, dict):
        raise ToolCallError(f"a tool call must be an object, got {type(call).__name__}")
    fn = call.get("function") or call
    name, args = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not name:
        raise ToolCallError("a tool call needs a 'name'")
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ToolCallError(f"arguments of {name} are not valid JSON: {args!r}") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"arguments of {name} must be an object")
    return {"type": "function", "function": {"name": name, "arguments": {k: v for k, v in args.items() if v is not None}}}


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, tool calls) of a generated assistant turn.

    Calls are `<tool_call>{json}</tool_call>` blocks (the bundled ChatML form, also Qwen's and Hermes'),
    or, without tags, a turn that is one JSON object with a "name" (the bundled Llama 3 form). The
    content is the text outside the calls. Raises ToolCallError for a tagged call that is not JSON."""
    blocks = _TAGGED.findall(text)
    if blocks:
        calls = []
        for b in blocks:
            try:
                calls.append(normalise_call(json.loads(b)))
            except json.JSONDecodeError:
                raise ToolCallError(f"tool call is not valid JSON: {b!r}") from None
        return _TAGGED.sub("", text).strip(), calls
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            return text, []
        if isinstance(obj, dict) and "name" in obj:
            return "", [normalise_call(obj)]
    return text, []


def execute(call: dict, tools: dict[str, Tool]) -> str:
    """Run one normalised call; failures come back as an 'error: …' result for the model to read."""
    name, args = call["function"]["name"], call["function"]["arguments"]
    tool = tools.get(name)
    if tool is None:
        return f"error: unknown tool {name!r} (available: {', '.join(tools) or 'none'})"
    try:
        return tool(args)
    except (ToolCallError, TypeError) as e:
        return f"error: {e}"
