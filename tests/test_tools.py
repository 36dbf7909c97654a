"""Tool use: the bundled calculator, tool-call parsing and rendering, the tool loop (calls executed and
results fed back into the next prompt), the synthetic tool-use data, and `scaletrain chat` on a real
run directory and its Hugging Face export."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.tool_loop import respond
from scaletrain.chat.tools import (
    CALCULATOR,
    ToolCallError,
    bundled_tools,
    calculate,
    execute,
    normalise_call,
    parse_tool_calls,
)
from scaletrain.cli import main
from scaletrain.data.synth import check_answer, tool_problems
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.stages.sft.data import SFTDataset, read_conversations

from conftest import TINY, tiny_overrides

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("expr,value", [("37*8", "296"), ("(2+3)**2", "25"), ("7/2", "3.5"), ("-4 + 1", "-3"),
                                        ("10 // 3", "3"), ("10 % 4", "2"), ("1/3", "0.3333333333"), ("6/3", "2")])
def test_calculator_evaluates_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr,reason", [("__import__('os').system('true')", "unsupported"), ("9**9**9", "exponent"),
                                         ("1/0", "division by zero"), ("", "non-empty"), ("2+", "cannot parse"),
                                         ("1" * 300, "longer than"), ("x + 1", "unsupported"), ("'a' * 3", "unsupported")])
def test_calculator_refuses_anything_but_arithmetic(expr, reason):
    with pytest.raises(ToolCallError, match=reason):
        calculate(expr)


def test_tool_calls_parse_from_either_bundled_form_and_execute():
    content, calls = parse_tool_calls('Let me compute. <tool_call>{"name": "calculator", "arguments": '
                                      '{"expression": "2*21"}}</tool_call>')
    assert content == "Let me compute." and calls == [normalise_call({"name": "calculator",
                                                                      "arguments": {"expression": "2*21"}})]
    assert execute(calls[0], {"calculator": CALCULATOR}) == "42"
    assert parse_tool_calls('{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}')[1][0] == \
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+1"}}}
    assert parse_tool_calls("The answer is 4.") == ("The answer is 4.", [])
    with pytest.raises(ToolCallError, match="not valid JSON"):
        parse_tool_calls("<tool_call>{oops</tool_call>")
    # Failures reach the model as results, not exceptions.
    assert execute(normalise_call({"name": "search", "arguments": {}}), {"calculator": CALCULATOR}).startswith(
        "error: unknown tool 'search'")
    assert "missing argument" in execute(normalise_call({"name": "calculator", "arguments": {}}),
                                         {"calculator": CALCULATOR})
    assert "division by zero" in execute(normalise_call({"name": "calculator", "arguments": {"expression": "1/0"}}),
                                         {"calculator": CALCULATOR})
    with pytest.raises(ValueError, match="unknown tool"):
        bundled_tools(["calculator", "browser"])


@pytest.mark.parametrize("template,marker", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_rendered_calls_parse_back_and_tools_are_listed(tokenizer_dir, template, marker):
    tok = load_tokenizer(str(tokenizer_dir))
    plain = ChatRenderer(tok, template)
    listed = ChatRenderer(tok, template, tools=bundled_tools(["calculator"]))
    assert plain.end_of_turn() == listed.end_of_turn() == marker
    flat = [{"role": "user", "content": "6 times 7?"},
            {"role": "assistant", "tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]}]
    openai = [flat[0], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]}]
    assert plain.text(flat) == plain.text(openai)  # both message forms render the same
    turn = plain.text(flat)[len(plain.text(flat[:1], add_generation_prompt=True)):].split(marker)[0]
    assert parse_tool_calls(turn)[1] == [normalise_call(flat[1]["tool_calls"][0])]
    text = listed.text(flat)
    assert '"name": "calculator", "description"' in text and '"required": ["expression"]' in text
    bos = plain.variables.get("bos_token", "") if template == "llama3" else ""  # Llama 3 opens with bos_token
    assert text.startswith(bos) and text.endswith(plain.text(flat)[len(bos):])  # the tool list: a block before
    with pytest.raises(BadConversation, match="bad tool call"):
        plain.render([flat[0], {"role": "assistant", "tool_calls": [{"arguments": {}}]}])


class ScriptedPolicy(torch.nn.Module):
    """A stand-in policy over real token ids for testing the loop's plumbing: its first turn calls the
    calculator on the question's two numbers; once a tool result is in its prompt, it answers with
    that result — so a right final answer proves the result was executed and fed back."""

    def __init__(self, tokenizer, renderer: ChatRenderer) -> None:
        super().__init__()
        self.tok, self.renderer = tokenizer, renderer
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.turn_start = 0
        self.last: list[int] = []

    def reply(self, prompt: str) -> str:
        end = self.renderer.end_of_turn()
        if "<|im_start|>tool\n" in prompt:
            result = prompt.rsplit("<|im_start|>tool\n", 1)[1].split(end)[0]
            return f"The answer is {result}.{end}"
        a, b = [int(w) for w in prompt.replace("?", " ").split() if w.isdigit()][-2:]
        op = "-" if "gives away" in prompt else "+"
        return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a}{op}{b}"}}}}</tool_call>{end}'

    def forward(self, ids: torch.Tensor, **_) -> torch.Tensor:  # (no KV cache: the engine recomputes for it)
        seq = ids[0].tolist()
        if not (len(seq) == len(self.last) + 1 and seq[:-1] == self.last):
            self.turn_start = len(seq)  # a new prompt: the turn starts after it
        self.last = seq
        target = self.tok.encode(self.reply(self.tok.decode(seq[:self.turn_start])))
        done = len(seq) - self.turn_start
        logits = torch.zeros(1, len(seq), self.tok.vocab_size)
        logits[0, -1, target[done] if done < len(target) else self.tok.eos_id] = 1.0
        return logits


def test_tool_loop_executes_calls_and_feeds_results_back(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    renderer = ChatRenderer(tok, "chatml")
    policy = ScriptedPolicy(tok, renderer)
    for p in tool_problems(5, seed=3, split="test", ops=("add", "sub")):
        seen = []
        added = respond(policy, renderer, [{"role": "user", "content": p.question}], bundled_tools(["calculator"]),
                        on_message=seen.append)
        assert seen == added and [m["role"] for m in added] == ["assistant", "tool", "assistant"]
        assert added[0]["tool_calls"][0]["function"]["arguments"] == {"expression": p.expression}
        assert added[1] == {"role": "tool", "name": "calculator", "content": str(p.answer)}
        assert check_answer(added[2]["content"], p.answer) and "<|im_end|>" not in added[2]["content"]
    # Without the tool, the result is an error the policy repeats: nothing is faked.
    added = respond(policy, renderer, [{"role": "user", "content": "Ada has 50 coins and gets 2 more."}], [])
    assert added[1]["content"].startswith("error: unknown tool") and not check_answer(added[2]["content"], 52)


def test_synthetic_tool_conversations_train_on_calls_and_answers_only(tmp_path, tokenizer_dir):
    assert main(["data", "synth", "--output", str(tmp_path), "--train", "20", "--test", "5", "--ops", "mul"]) == 0
    convs = read_conversations([str(tmp_path / "tools_train.jsonl")])
    assert len(convs) == 20 and all(json.loads(line)["text"].count("Call: ") == 1
                                    for line in (tmp_path / "tools_pretrain.jsonl").read_text().splitlines())
    row = json.loads((tmp_path / "tools_test.jsonl").read_text().splitlines()[0])
    expr = row["messages"][1]["tool_calls"][0]["arguments"]["expression"]
    assert calculate(expr) == row["messages"][2]["content"] == str(row["answer"])
    tok = load_tokenizer(str(tokenizer_dir))
    renderer = ChatRenderer(tok, "chatml")
    ids, mask = renderer.render(convs[0])
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target.startswith("<tool_call>") and target.endswith(f"The answer is {convs[0][2]['content']}.<|im_end|>\n")
    assert convs[0][0]["content"] not in target and f"tool\n{convs[0][2]['content']}" not in target
    ds = SFTDataset(convs, renderer, tok, 320)
    assert ds.report.used == 20 and not ds.report.dropped


def test_chat_command_on_a_run_directory_and_its_export(tmp_path, tokenizer_dir, dataset_prefix, capsys):
    assert main(["data", "synth", "--output", str(tmp_path / "d"), "--train", "16", "--test", "2"]) == 0
    run = tmp_path / "run"
    args = ["sft", "--config", TINY]
    for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
            "posttrain.chat.train_data": f'["{tmp_path / "d" / "tools_train.jsonl"}"]', "posttrain.chat.tools": '["calculator"]',
            "posttrain.chat.template": "llama3", "train.seq_length": 1024, "train.steps": 2, "checkpoint.export_hf": "hf",
            "train.global_batch_size": 2, "train.micro_batch_size": 1}):
        args += ["--set", s]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["chat", str(run), "--message", "Ada has 50 coins and gets 2 more. How many?", "--message", "And 3 more?",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = capsys.readouterr()
    transcript = json.loads(out.out)
    assert [m["role"] for m in transcript][:2] == ["user", "assistant"] and transcript.count(transcript[0]) == 1
    assert sum(m["role"] == "user" for m in transcript) == 2 and "you> And 3 more?" in out.err
    # The run's own export at the end (checkpoint.export_hf, under the run directory) carries its chat
    # template, so transformers renders prompts as the model was trained.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = run / "hf"
    assert AutoModelForCausalLM.from_pretrained(str(hf)).config.num_hidden_layers == 2
    hf_tok = AutoTokenizer.from_pretrained(str(hf))
    conv = read_conversations([str(tmp_path / "d" / "tools_train.jsonl")])[0]
    ours = ChatRenderer(load_tokenizer(str(hf)), "auto", tools=bundled_tools(["calculator"]))
    # The same text and ids as transformers (bos_token filled in, as apply_chat_template does).
    assert hf_tok.apply_chat_template(conv, tools=[CALCULATOR.schema()], tokenize=False) == ours.text(conv)
    assert hf_tok.apply_chat_template(conv, tools=[CALCULATOR.schema()])["input_ids"] == ours.render(conv)[0]
    assert "<|start_header_id|>" in ours.text(conv)
    capsys.readouterr()
    assert main(["chat", str(hf), "--max-new-tokens", "3", "--message", "hi"]) == 0
    assert "assistant>" in capsys.readouterr().out
    assert main(["chat", str(tmp_path / "nothing-here")]) == 2
    assert "neither a Hugging Face model directory" in capsys.readouterr().err
