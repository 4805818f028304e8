"""Chat data: messages, alpaca and sharegpt rows through a chat template, the loss on exactly the assistant turns
and their end-of-turn tokens, format detection, bad conversations named by file and row, and a cache key
that changes with everything that changes the tokens."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import PreflightError
from orchestrator.spec import DataSpec
from orchestrator.train.data import IGNORE_INDEX, check_rows, read_rows, tokenize_records

# Real template shapes, written out here: Meta's Llama-3 template (trimmed content, <|eot_id|> closes every
# turn, BOS first) and Qwen2's ChatML (a default system prompt, <|im_end|> then a newline after every turn).
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
          "}}{% endif %}")
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}

CONVERSATION = [{"role": "system", "content": "You add."}, {"role": "user", "content": "12+7?"},
                {"role": "assistant", "content": " 19 "}, {"role": "user", "content": "and 3+4?"},
                {"role": "assistant", "content": "It is 7."}]


@pytest.fixture(scope="module")
def tokenizer():
    from orchestrator.builtin.models import build_tokenizer

    built = build_tokenizer()
    built.add_tokens(SPECIALS, special_tokens=True)
    return built


def _trained_runs(example) -> list[list[int]]:
    """The labelled tokens, as maximal runs of consecutive positions."""
    runs, previous = [], None
    for position, label in enumerate(example["labels"]):
        if label == IGNORE_INDEX:
            continue
        if previous != position - 1:
            runs.append([])
        runs[-1].append(label)
        previous = position
    return runs


def _spec(**fields) -> DataSpec:
    return DataSpec(path="x", max_length=512, **fields)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
def test_the_mask_covers_exactly_the_assistant_content_and_its_end_of_turn_token(style, train_on, tokenizer):
    template = {"llama3": LLAMA3, "chatml": CHATML}[style]
    (example,) = tokenize_records([{"messages": CONVERSATION}], tokenizer, _spec(chat_template=template, train_on=train_on))
    # Written from the templates above, not from the code under test: Llama-3 trims the content.
    replies = [m["content"].strip() if style == "llama3" else m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [reply + END_OF_TURN[style] for reply in replies][-1 if train_on == "last_assistant" else 0:]
    assert [tokenizer.decode(run) for run in _trained_runs(example)] == expected
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, chat_template=template,
                                                                                   tokenize=False)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example["labels"], example["input_ids"]))


def test_tool_turns_are_context_not_targets(tokenizer):
    conversation = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "get_weather(Oslo)"},
                    {"role": "tool", "content": "-3 C"}, {"role": "assistant", "content": "It is -3 C."}]
    (example,) = tokenize_records([{"messages": conversation}], tokenizer, _spec(chat_template=CHATML))
    assert [tokenizer.decode(run) for run in _trained_runs(example)] == ["get_weather(Oslo)<|im_end|>", "It is -3 C.<|im_end|>"]


def test_train_on_all_trains_every_token(tokenizer):
    (example,) = tokenize_records([{"messages": CONVERSATION}], tokenizer, _spec(chat_template=CHATML, train_on="all"))
    assert example["labels"] == example["input_ids"]


def test_the_builtin_tokenizer_has_a_chat_template_whose_turns_end_with_eos():
    from orchestrator.builtin.models import build_tokenizer

    builtin = build_tokenizer()
    (example,) = tokenize_records([{"messages": CONVERSATION}], builtin, _spec())
    assert [builtin.decode(run) for run in _trained_runs(example)] == [" 19 </s>", "It is 7.</s>"]
    assert example["input_ids"][0] == builtin.bos_token_id


def _write(tmp_path, rows, name="train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_sharegpt_and_alpaca_rows_read_as_the_same_conversation(tmp_path, tokenizer):
    sharegpt = {"conversations": [{"from": "human", "value": "Add 2 and 3.\n\n2 3"}, {"from": "gpt", "value": "5"}]}
    alpaca = {"instruction": "Add 2 and 3.", "input": "2 3", "output": "5"}
    messages = {"messages": [{"role": "user", "content": "Add 2 and 3.\n\n2 3"}, {"role": "assistant", "content": "5"}]}
    tokenized = []
    for name, row in (("sharegpt", sharegpt), ("alpaca", alpaca), ("messages", messages)):
        path = _write(tmp_path, [row], f"{name}.jsonl")
        spec = _spec(chat_template=CHATML)
        records = read_rows(path, spec, "data.path", tokenizer)  # the format is detected from the columns
        tokenized.append(tokenize_records(records, tokenizer, spec)[0])
    assert tokenized[0] == tokenized[1] == tokenized[2]


@pytest.mark.parametrize("row, spec, detected", [
    ({"messages": [], "prompt": "p"}, {}, "messages"),
    ({"conversations": []}, {}, "sharegpt"),
    ({"instruction": "i", "output": "o"}, {}, "alpaca"),
    ({"prompt": "p", "completion": "c", "messages": []}, {}, "prompt_completion"),  # today's specs read as before
    ({"prompt": "p", "completion": "c", "messages": []}, {"format": "messages"}, "messages"),  # the spec wins
    ({"chat": []}, {"messages_field": "chat"}, "messages"),
    ({"text": "t", "id": 3}, {}, "text"),  # a text column alone is unambiguous
])
def test_the_format_is_detected_from_the_columns_unless_the_spec_names_it(row, spec, detected):
    from orchestrator.train.formats import detect_layout

    assert detect_layout(_spec(**spec), list(row), "data.path", "f.jsonl").format == detected


def test_data_that_fits_two_formats_asks_for_one():
    from orchestrator.train.formats import detect_layout

    with pytest.raises(PreflightError, match=r"^data.format: f.jsonl could be messages or sharegpt \(columns: messages, "
                                             r"conversations\); set data.format$"):
        detect_layout(_spec(), ["messages", "conversations"], "data.path", "f.jsonl")


ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
               "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
USER, REPLY = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("row, spec, problem", [
    ({"messages": [USER, {"role": "bot", "content": "x"}]}, {}, "message 2: unknown role 'bot' (known: system, user, "
                                                                "assistant, tool)"),
    ({"messages": [USER, USER]}, {}, "no assistant message to train on (data.train_on: assistant)"),
    ({"messages": "hi"}, {}, "'messages' holds a str, not a list of messages"),
    ({"messages": None}, {}, "'messages' is null"),
    ({"prompt": "x"}, {"format": "messages"}, "has no 'messages'"),
    ({"messages": [USER, {"role": "assistant"}]}, {}, "message 2 (assistant) has no content"),
    ({"messages": [USER, "hello"]}, {}, "message 2 holds a str, not an object with role and content"),
    ({"messages": [USER, USER, REPLY]}, {"chat_template": ALTERNATING}, "the chat template fails on a conversation of "
     "user, user, assistant: TemplateError: Conversation roles must alternate user/assistant/user/assistant/..."),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bard?", "value": "x"}]}, {}, "message 2: unknown from "
     "'bard?' (known: system, human, user, gpt, assistant, chatgpt, function_call, observation, tool)"),
    ({"instruction": "i", "output": None}, {}, "'output' is null"),
])
def test_a_bad_conversation_is_one_line_naming_the_file_and_the_row(row, spec, problem, tmp_path, tokenizer):
    good = ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]} if "conversations" in row
            else {"instruction": "i", "output": "o"} if "instruction" in row else {"messages": [USER, REPLY]})
    path = _write(tmp_path, [good] * 6 + [row] + [good])
    with pytest.raises(PreflightError) as refused:
        check_rows(path, _spec(**{"chat_template": CHATML, **spec}), "data.path", lambda: tokenizer)
    assert str(refused.value) == f"data.path: {path} row 7: {problem}"


def test_a_conversation_without_assistant_trains_with_train_on_all(tmp_path, tokenizer):
    path = _write(tmp_path, [{"messages": [USER, USER]}])
    assert check_rows(path, _spec(chat_template=CHATML, train_on="all"), "data.path", lambda: tokenizer).rows == 1


def test_a_template_that_does_not_render_prefix_by_prefix_is_refused_unless_training_on_all(tmp_path, tokenizer):
    counting = "{{ messages | length }} turns\n{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    path = _write(tmp_path, [{"messages": [USER, REPLY]}])
    with pytest.raises(PreflightError, match="row 1: the chat template fails on a conversation of user, assistant: it does "
                                             "not render the conversation up to message 2 as the start of the whole"):
        check_rows(path, _spec(chat_template=counting), "data.path", lambda: tokenizer)
    assert check_rows(path, _spec(chat_template=counting, train_on="all"), "data.path", lambda: tokenizer).rows == 1


def test_a_tokenizer_without_a_template_needs_data_chat_template(tmp_path, tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    path = _write(tmp_path, [{"messages": [USER, REPLY]}])
    with pytest.raises(PreflightError, match="^data.chat_template: the tokenizer of .* has no chat template; set "
                                             "data.chat_template to a Jinja template or a file holding one$"):
        check_rows(path, _spec(), "data.path", lambda: bare)
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML)
    assert check_rows(path, _spec(chat_template=str(template_file)), "data.path", lambda: bare).rows == 1
    with pytest.raises(PreflightError, match="data.chat_template: 'nope.jinja' is neither a Jinja template nor an existing file"):
        check_rows(path, _spec(chat_template="nope.jinja"), "data.path", lambda: bare)


@pytest.mark.parametrize("change", [
    {"chat_template": LLAMA3}, {"train_on": "last_assistant"}, {"train_on": "all"}, {"max_length": 90},
    {"packing": True}, {"bad_rows": "skip"}, {"format": "messages", "messages_field": "other"},
])
def test_the_cache_key_changes_with_every_field_that_changes_the_data(change, tmp_path, tokenizer, monkeypatch):
    import datasets

    from orchestrator.train.data import prepare_data
    from tests.helpers import make_spec

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"messages": [USER, REPLY, {"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"{i}!"}],
             "other": [USER, {"role": "assistant", "content": "other"}]} for i in range(40)]
    path = _write(tmp_path, rows)
    base = {"path": path, "chat_template": CHATML, "eval_fraction": 0.1, "max_length": 512}

    def prepared(fields: dict):
        return prepare_data(make_spec(data={**base, **fields}), path, None, tokenizer).train

    before, after = prepared({}), prepared(change)
    assert before._fingerprint != after._fingerprint
    assert prepared({})._fingerprint == before._fingerprint, "the same spec must read its cache back"
    if "bad_rows" not in change:  # the others change the tokens themselves
        assert before[:]["input_ids"] != after[:]["input_ids"] or before[:]["labels"] != after[:]["labels"]
