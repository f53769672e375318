"""A model without a chat template: its family's turn tokens or eos end every trained turn; bos where it belongs."""

from __future__ import annotations

import pytest
import yaml

from alignkit.data.formats import Example, Message
from alignkit.data.templates import built_in, choose_template, end_of_turn_ids
from alignkit.data.tokenize import tokenize_examples
from tests import family_tokenizers as families
from tests.conftest import build_model, write_jsonl

CONVERSATION = [("system", "Be brief."), ("user", "Hello"), ("assistant", "hello there"),
                ("user", "What is the capital of France?"), ("assistant", "Paris.")]


def tokenized(tokenizer, template: str):
    messages = [Message(role, text, train=role == "assistant") for role, text in CONVERSATION]
    rows, _ = tokenize_examples(tokenizer, template, [Example("rows.jsonl:1", messages=messages)], 512)
    return rows[0]


@pytest.mark.parametrize(("family", "name", "end", "bos"), [
    (families.GEMMA, "gemma", "<end_of_turn>", "<bos>"),
    (families.LLAMA3, "llama3", "<|eot_id|>", "<|begin_of_text|>"),
    (families.QWEN, "chatml", "<|im_end|>", None),
    (families.BARE, "chatml-eos", "</s>", "<s>"),
    (families.PHI3, "chatml-eos", "<|endoftext|>", "<s>"),
])
def test_a_model_without_a_template_trains_each_reply_and_one_end_of_turn_token(family, name, end, bos):
    tokenizer = families.build(family)
    choice = choose_template(tokenizer, None)
    assert choice.name == name
    row = tokenized(tokenizer, choice.source)
    end_id = tokenizer.convert_tokens_to_ids(end)
    runs = families.trained_runs([row])
    assert [tokenizer.decode(r[:-1]) for r in runs] == ["hello there", "Paris."]
    assert [r[-1] for r in runs] == [end_id, end_id]  # one token the model can learn to stop on
    if bos is None:
        assert tokenizer.bos_token_id not in row.input_ids
    else:  # exactly once, first, as the tokenizer's own encoding has it
        assert row.input_ids[0] == tokenizer.convert_tokens_to_ids(bos)
        assert row.input_ids.count(row.input_ids[0]) == 1
        assert tokenizer("x")["input_ids"][0] == row.input_ids[0]


def test_the_reason_names_the_markers_and_the_bos_token():
    choice = choose_template(families.build(families.GEMMA), None)
    assert choice.reason == "the tokenizer has no chat template; its vocabulary has <start_of_turn>/<end_of_turn>"
    bare = choose_template(families.build(families.BARE), None)
    assert "turns end with its eos token </s>" in bare.reason and "<s> first, as the tokenizer adds it" in bare.reason


def test_a_template_without_bos_gets_it_only_where_the_tokenizer_adds_it(tokenizer):
    chatml = built_in("chatml")
    gemma = families.build(families.GEMMA)
    gemma.chat_template = chatml  # a template of the tokenizer's own that forgot bos
    assert choose_template(gemma, None).source == "{{ bos_token }}" + chatml
    assert choose_template(gemma, "gemma").source == built_in("gemma")  # renders bos itself: not twice
    assert choose_template(tokenizer, "chatml").source == chatml  # a tokenizer that adds no bos


def test_generation_stops_on_the_templates_end_of_turn_token(tokenizer):
    from alignkit.generation import stop_ids

    gemma = families.build(families.GEMMA)
    gemma.chat_template = choose_template(gemma, None).source
    model = build_model(gemma)
    model.generation_config.eos_token_id = gemma.eos_token_id
    assert end_of_turn_ids(gemma) == [gemma.convert_tokens_to_ids("<end_of_turn>")]
    assert stop_ids(model, gemma) == [gemma.eos_token_id, gemma.convert_tokens_to_ids("<end_of_turn>")]
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_the_start_up_log_and_config_yaml_name_the_chosen_template(tmp_path, capsys):
    import alignkit

    gemma = families.build(families.GEMMA)
    folder = tmp_path / "tiny-gemma-vocab"
    build_model(gemma).save_pretrained(folder)
    gemma.save_pretrained(folder)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hello", "completion": "hello there"}] * 2)
    alignkit.sft(model=str(folder), data=[str(data)], output_dir=str(tmp_path / "out"), max_steps=1,
                 batch_size=2, dtype="fp32", save_steps=0, compile="off")
    err = capsys.readouterr().err
    assert "chat template: gemma (the tokenizer has no chat template; its vocabulary has " in err
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["chat_template"] == "gemma"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "final").chat_template == built_in("gemma")
