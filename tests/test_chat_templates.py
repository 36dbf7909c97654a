"""Chat templates wherever Hugging Face keeps them, chosen and rendered token for token as transformers'
`apply_chat_template`; one template in an export (the one the run trained with); no second eos after an
eos end-of-turn marker."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping

import pytest

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.tools import CALCULATOR, bundled_tools
from scaletrain.data.tokenizer import load_tokenizer

from chat_fixtures import DEFAULT, QWEN, SYSTEM, TOOL_USE, build_chatml_tokenizer, to_old_layout

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

USER = [{"role": "user", "content": "Ada has 6 bags of 7 coins. How many coins?"}]
PLAIN = USER + [{"role": "assistant", "content": "The answer is 42."}]
MULTI = [{"role": "system", "content": "Answer briefly."}, *PLAIN, {"role": "user", "content": "And 6 plus 7?"},
         {"role": "assistant", "content": "13."}]
CALLS = USER + [
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                                           "arguments": {"expression": "6*7"}}}]},
    {"role": "tool", "name": "calculator", "content": "42"}, {"role": "assistant", "content": "The answer is 42."}]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same tokenizer saved by transformers 5 (chat_template.jinja) and in the older layouts
    (tokenizer_config.json: named default / tool_use templates, or one string)."""
    tmp = tmp_path_factory.mktemp("chat_tokenizers")
    new = build_chatml_tokenizer(tmp / "jinja")
    return {"jinja": new, "named": to_old_layout(new, tmp / "named"),
            "config": to_old_layout(new, tmp / "config", named=False)}


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.parametrize("layout", ["jinja", "named", "config"])
def test_renders_are_token_identical_to_apply_chat_template(layouts, layout):
    hf = transformers.AutoTokenizer.from_pretrained(str(layouts[layout]))
    tok = load_tokenizer(layouts[layout])
    compared = 0
    for conv in (PLAIN, MULTI, CALLS):
        for tools in (False, True):
            ours = ChatRenderer(tok, "auto", tools=bundled_tools(["calculator"]) if tools else ())
            schemas = [CALCULATOR.schema()] if tools else None
            for prompt in (False, True):  # the whole conversation; the prompt before the last reply
                msgs = conv[:-1] if prompt else conv
                text = hf.apply_chat_template(msgs, tools=schemas, tokenize=False, add_generation_prompt=prompt)
                ids = _ids(hf.apply_chat_template(msgs, tools=schemas, add_generation_prompt=prompt))
                assert ours.text(msgs, add_generation_prompt=prompt) == text
                assert (ours.prompt_ids(msgs) if prompt else ours.render(msgs)[0]) == ids, (layout, conv, tools)
                compared += 1
            assert (SYSTEM in text) is (conv is not MULTI)  # the default system prompt, unless one is given
    assert compared == 12
    assert "<|im_start|>system\n" + SYSTEM in ChatRenderer(tok).text(USER)  # not the bundled ChatML


def test_templates_are_found_in_transformers_order_of_precedence(layouts, tmp_path):
    from scaletrain.chat.templates import find_templates

    def both(folder):
        hf = transformers.AutoTokenizer.from_pretrained(str(folder)).chat_template
        found = find_templates(folder)
        return ({"default": hf} if isinstance(hf, str) else hf), (found.templates if found else None), found

    hf, ours, found = both(layouts["jinja"])
    assert hf == ours == {"default": QWEN} and found.origin == "chat_template.jinja"
    hf, ours, found = both(layouts["named"])
    assert hf == ours == {"default": DEFAULT, "tool_use": TOOL_USE}
    assert found.origin == "tokenizer_config.json (named: default, tool_use)"
    # Files beat tokenizer_config.json; named .jinja files join the default one.
    both_places = shutil.copytree(layouts["named"], tmp_path / "both")
    (both_places / "chat_template.jinja").write_text(QWEN)
    (both_places / "additional_chat_templates").mkdir()
    (both_places / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_USE)
    hf, ours, found = both(both_places)
    assert hf == ours == {"default": QWEN, "tool_use": TOOL_USE}
    assert found.origin == "chat_template.jinja + additional_chat_templates/tool_use.jinja"
    # Only a processor's legacy chat_template.json: a text tokenizer ignores it; used here as the last resort.
    proc = shutil.copytree(layouts["jinja"], tmp_path / "proc")
    (proc / "chat_template.jinja").unlink()
    (proc / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT}))
    assert transformers.AutoTokenizer.from_pretrained(str(proc)).chat_template is None
    assert find_templates(proc).templates == {"default": DEFAULT}
    assert ChatRenderer(load_tokenizer(proc)).origin == f"the tokenizer's chat_template.json in {proc}"


def test_named_templates_are_chosen_as_transformers_chooses_them(layouts, tmp_path):
    tok = load_tokenizer(layouts["named"])
    calc = bundled_tools(["calculator"])
    assert ChatRenderer(tok).source == DEFAULT and ChatRenderer(tok, tools=calc).source == TOOL_USE
    assert ChatRenderer(tok, "tool_use").source == TOOL_USE  # by name, as apply_chat_template(chat_template=…)
    assert ChatRenderer(tok, tools=calc).origin.startswith("the tokenizer's 'tool_use' of tokenizer_config.json")
    assert ChatRenderer(tok, "chatml").origin == "bundled chatml"
    bare = shutil.copytree(layouts["config"], tmp_path / "bare")
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatRenderer(load_tokenizer(bare)).origin.startswith("bundled chatml (the tokenizer in")
    only_tools = shutil.copytree(bare, tmp_path / "only_tools")
    cfg["chat_template"] = [{"name": "tool_use", "template": TOOL_USE}]
    (only_tools / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="have no 'default': name one of tool_use in posttrain.chat.template"):
        ChatRenderer(load_tokenizer(only_tools))
    with pytest.raises(BadConversation, match="only user"):  # raise_exception, as in transformers' environment
        ChatRenderer(tok, "{{ raise_exception('only user turns') }}").text(USER)


def test_no_second_eos_after_an_eos_end_of_turn_marker(layouts, tokenizer_dir):
    """ChatML with eos = <|im_end|> (SmolLM2, Qwen): a training conversation ends '<|im_end|>\\n', not
    '<|im_end|>\\n<|im_end|>'; where the marker is not eos, eos follows; a template that writes eos_token
    after a turn is not given another."""
    from scaletrain.stages.preference.data import PreferenceDataset
    from scaletrain.stages.sft.data import SFTDataset

    tok = load_tokenizer(layouts["jinja"])
    renderer = ChatRenderer(tok)
    assert renderer.end_of_turn() == "<|im_end|>" and tok.encode("<|im_end|>") == [tok.eos_id]
    ids, _ = renderer.render(PLAIN)
    row = SFTDataset([PLAIN], renderer, tok, 256, packing=False)[0]
    n = len(ids) - 1
    assert row["tokens"][:n].tolist() == ids[:-1] and row["labels"][:n].tolist() == ids[1:]
    assert row["loss_mask"][n:].sum() == 0  # nothing is learnt after '<|im_end|>\n'
    assert ids[-2:] == tok.encode("<|im_end|>\n") and ids.count(tok.eos_id) == 3
    pair = PreferenceDataset([{"prompt": USER[0]["content"], "chosen": "42.", "rejected": "41."}], renderer, tok, 256)[0]
    assert pair["chosen_labels"][pair["chosen_mask"].bool()].tolist() == tok.encode("42.<|im_end|>\n")
    reward = PreferenceDataset([{"prompt": USER[0]["content"], "chosen": "42.", "rejected": "41."}], renderer, tok,
                               256, always_eos=True)[0]
    assert reward["chosen_mask"].sum() == pair["chosen_mask"].sum() + 1  # a reward model's score anchor

    sp = load_tokenizer(str(tokenizer_dir))  # ChatML spelled out in text: its marker is not eos
    sp_renderer = ChatRenderer(sp, "chatml")
    ids, target = sp_renderer.render(PLAIN)
    assert sp_renderer.close(ids, target) == (ids + [sp.eos_id], target + [1])
    mistral = ChatRenderer(sp, "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                               "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
                               "{% endfor %}")
    ids, target = mistral.render(PLAIN)
    assert mistral.end_of_turn() == "</s>" and ids[0] == sp.bos_id and ids[-1] == sp.eos_id
    assert mistral.close(ids, target) == (ids, target)
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))  # '<s>' and '</s>' as their ids, as here
    hf.chat_template = mistral.source
    assert _ids(hf.apply_chat_template(PLAIN)) == ids


@pytest.mark.parametrize("layout,tools", [("named", True), ("jinja", False)])
def test_the_export_carries_exactly_the_template_the_run_trained_with(tmp_path, layouts, dataset_prefix, layout,
                                                                      tools, capsys):
    from scaletrain.cli import main
    from scaletrain.stages.sft.data import read_conversations

    from conftest import TINY, tiny_overrides

    assert main(["data", "synth", "--output", str(tmp_path / "d"), "--train", "4", "--test", "1"]) == 0
    data = tmp_path / "d" / ("tools_train.jsonl" if tools else "sft_train.jsonl")
    run = tmp_path / "run"
    args = ["sft", "--config", TINY]
    for s in tiny_overrides(run, layouts[layout], dataset_prefix, **{
            "posttrain.chat.train_data": f'["{data}"]', "posttrain.chat.tools": '["calculator"]' if tools else "[]",
            "train.seq_length": 1024, "train.steps": 1, "optim.warmup_steps": 0, "checkpoint.export_hf": "hf",
            "train.global_batch_size": 2, "train.micro_batch_size": 1}):
        args += ["--set", s]
    assert main(args) == 0
    trained = TOOL_USE if tools else QWEN
    origin = "'tool_use' of tokenizer_config.json (named: default, tool_use)" if tools else "chat_template.jinja"
    assert f"chat template: the tokenizer's {origin} in {layouts[layout]}" in capsys.readouterr().out
    hf_dir = run / "hf"
    assert not (hf_dir / "chat_template.jinja").exists() and not (hf_dir / "additional_chat_templates").exists()
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == trained
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert hf.chat_template == trained
    schemas = [CALCULATOR.schema()] if tools else None
    training = ChatRenderer(load_tokenizer(layouts[layout]), "auto", tools=bundled_tools(["calculator"]) if tools else ())
    for conv in read_conversations([str(data)]):
        assert _ids(hf.apply_chat_template(conv, tools=schemas)) == training.render(conv)[0]
