"""File formats, format detection, tokenisation with loss masks, and batching."""

import json

import pytest
import torch
from support import tinymodels

from deltatune.errors import DeltatuneError
from deltatune.training.data import (
    IGNORE_INDEX,
    DataError,
    Encoder,
    collate,
    count_targets,
    detect_format,
    load_dataset,
    read_records,
    split_off,
)


@pytest.fixture(scope="module")
def tok():
    return tinymodels.make_tokenizer()


def test_read_jsonl_csv_txt_give_the_same_records(tmp_path):
    records = tinymodels.classification_records(10)
    a = read_records(tinymodels.write_jsonl(str(tmp_path / "a.jsonl"), records))
    b = read_records(tinymodels.write_csv(str(tmp_path / "b.csv"), records))
    assert a == records and b == records
    t = read_records(tinymodels.write_text(str(tmp_path / "c.txt"), ["first para\nline two", "second"]))
    assert t == [{"text": "first para\nline two"}, {"text": "second"}]


@pytest.mark.parametrize("name, content", [
    ("bom.csv", "\ufefftext,label\na,x\nb,y\n"),                   # Excel's UTF-8 CSV
    ("semicolon.csv", "text;label\na;x\nb;y\n"),                   # spreadsheets in many locales
    ("pipe.csv", "text|label\na, with a comma|x\nb|y\n"),
    ("bom.jsonl", '\ufeff{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'),
    ("array.json", '[\n  {"text": "a", "label": "x"},\n  {"text": "b", "label": "y"}\n]\n'),
])
def test_files_as_other_tools_write_them(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    records = read_records(str(path))
    assert [set(r) for r in records] == [{"text", "label"}] * 2
    assert records[0]["text"].startswith("a") and records[1]["label"] == "y"


def test_a_record_without_a_column_names_its_line(tmp_path):
    path = tmp_path / "gap.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"gap.jsonl:3 has no column 'label'; its columns are: text"):
        load_dataset(str(path))
    csv_path = tmp_path / "gap.csv"
    csv_path.write_text('text,label\n"two\nlines",x\nb,\n')
    with pytest.raises(DataError, match=r"gap.csv:4 has an empty label"):
        load_dataset(str(csv_path))
    array = tmp_path / "bad.json"
    array.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match=r"item 2 of the array is a int"):
        read_records(str(array))


def test_bad_json_line_names_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "also ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: not valid JSON"):
        read_records(str(path))


def test_a_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, found list"):
        read_records(str(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown file type '.parquet'"):
        read_records(str(tmp_path / "x.parquet"))
    assert issubclass(DataError, DeltatuneError)


@pytest.mark.parametrize("record, fmt", [
    ({"text": "a"}, "text"),
    ({"prompt": "a", "completion": "b"}, "prompt"),
    ({"messages": []}, "chat"),
    ({"text": "a", "label": "x"}, "classification"),
])
def test_detect_format(record, fmt):
    assert detect_format(record, {}) == fmt


def test_alpaca_file_reads_instruction_and_input_as_the_prompt(tmp_path):
    records = [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"in {i}", "output": f"{i}"} for i in range(20)]
    data = load_dataset(tinymodels.write_jsonl(str(tmp_path / "a.jsonl"), records))
    assert data.format == "prompt" and data.columns_read == {"prompt": "instruction", "completion": "output"}
    by_completion = {r["completion"]: r["prompt"] for r in data.train + data.test}
    assert by_completion == {f"{i}": f"Say {i}." if i % 2 else f"Say {i}.\n\nin {i}" for i in range(20)}


@pytest.mark.parametrize("record, fmt, read", [
    ({"question": "q", "answer": "a"}, "prompt", {"prompt": "question", "completion": "answer"}),
    ({"query": "q", "response": "a"}, "prompt", {"prompt": "query", "completion": "response"}),
    ({"input": "q", "output": "a"}, "prompt", {"prompt": "input", "completion": "output"}),
    ({"sentence": "s", "label": "x"}, "classification", {"text": "sentence"}),
    ({"content": "s", "category": "x"}, "classification", {"text": "content", "label": "category"}),
    ({"prompt": "p", "completion": "c", "question": "q"}, "prompt", {}),  # canonical names win
])
def test_usual_column_names_of_shared_data_sets(tmp_path, record, fmt, read):
    records = [dict(record, **{k: f"{v}{i % 2}" for k, v in record.items() if k in ("label", "category")})
               for i in range(10)]
    data = load_dataset(tinymodels.write_jsonl(str(tmp_path / "d.jsonl"), records))
    assert data.format == fmt and data.columns_read == read


def test_named_columns_win_over_the_usual_names(tmp_path):
    records = [{"question": f"q{i}", "instruction": f"i{i}", "answer": f"a{i}"} for i in range(10)]
    data = load_dataset(tinymodels.write_jsonl(str(tmp_path / "d.jsonl"), records), columns={"prompt": "question"})
    assert {r["prompt"] for r in data.train + data.test} == {f"q{i}" for i in range(10)}
    assert data.columns_read == {"prompt": "question", "completion": "answer"}
    with pytest.raises(DataError, match="cannot tell the data format"):  # nothing usual to go on
        load_dataset(tinymodels.write_jsonl(str(tmp_path / "e.jsonl"), [{"foo": "a", "bar": "b"}] * 3))


def test_missing_named_column_lists_the_columns(tmp_path):
    path = tinymodels.write_jsonl(str(tmp_path / "d.jsonl"), tinymodels.classification_records(6))
    with pytest.raises(DataError, match=r"no column 'topic'; its columns are: text, label"):
        load_dataset(path, columns={"label": "topic"})


def test_label_never_seen_in_training_is_refused(tmp_path):
    records = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    train = tinymodels.write_jsonl(str(tmp_path / "t.jsonl"), records)
    held = tinymodels.write_jsonl(str(tmp_path / "e.jsonl"), [{"text": "c", "label": "z"}])
    with pytest.raises(DataError, match=r"label\(s\) \['z'\] that the training data never shows"):
        load_dataset(train, eval_data=held)


def test_split_off_is_seeded_and_disjoint():
    records = [{"text": str(i)} for i in range(50)]
    kept, held = split_off(records, 0.1, seed=3)
    assert len(held) == 5 and len(kept) == 45
    assert {r["text"] for r in kept}.isdisjoint({r["text"] for r in held})
    assert split_off(records, 0.1, seed=3) == (kept, held)
    assert split_off(records, 0.1, seed=4)[1] != held


def test_prompt_completion_loss_only_on_completion(tok):
    enc = Encoder(tok, "prompt", max_length=64)
    (ex,) = enc.encode({"prompt": "what is your name?", "completion": " my name is bot."})
    prompt_ids = tok("what is your name?", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" my name is bot.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + completion_ids
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert ex["prompt_len"] == len(prompt_ids)


def test_overlong_prompt_loses_its_start_not_the_completion(tok):
    enc = Encoder(tok, "prompt", max_length=10)
    (ex,) = enc.encode({"prompt": "the team won the match " * 5, "completion": " fine"})
    completion = tok(" fine", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ex["input_ids"]) == 10
    assert ex["input_ids"][-len(completion):] == completion
    assert ex["labels"][-len(completion):] == completion


def test_text_is_split_into_blocks_with_loss_everywhere(tok):
    enc = Encoder(tok, "text", max_length=8)
    text = "the team won the match and the coach praised the players"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = enc.encode({"text": text})
    assert [t for b in blocks for t in b["input_ids"]] == [t for t in ids][: sum(len(b["input_ids"]) for b in blocks)]
    assert all(b["labels"] == b["input_ids"] and len(b["input_ids"]) <= 8 for b in blocks)


def test_chat_loss_only_on_assistant_turns(tok):
    enc = Encoder(tok, "chat", max_length=128)
    messages = tinymodels.chat_records(1)[0]["messages"]
    (ex,) = enc.encode({"messages": messages})
    learned = tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    # Exactly the two assistant replies with their end markers; no user text, no role tags.
    assert learned == "hi there</s>i am fine</s>"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)


def test_classification_prompt_lists_labels_and_completion_is_the_label(tok):
    labels = ["politics", "sport", "tech"]
    enc = Encoder(tok, "classification", 96, labels=labels, template="{text}\nTopic ({labels}):")
    (ex,) = enc.encode({"text": "the team won the match", "label": "sport"})
    prompt = tok.decode(ex["input_ids"][: ex["prompt_len"]])
    assert prompt == "the team won the match\nTopic (politics, sport or tech):"
    target = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert target == enc.label_ids[1] == tok(" sport", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["label"] == 1


def test_classification_truncates_the_text_not_the_instruction(tok):
    labels = ["politics", "sport", "tech"]
    enc = Encoder(tok, "classification", 40, labels=labels, template="{text}\nTopic ({labels}):")
    (ex,) = enc.encode({"text": "the team won the match " * 20, "label": "tech"})
    assert len(ex["input_ids"]) <= 40
    assert tok.decode(ex["input_ids"][: ex["prompt_len"]]).endswith("\nTopic (politics, sport or tech):")


def test_sequence_classifier_examples_hold_class_ids(tok):
    enc = Encoder(tok, "classification", 16, labels=["a", "b"], sequence_classifier=True)
    (ex,) = enc.encode({"text": "the team won the match and more and more", "label": "b"})
    assert ex["label"] == 1 and "labels" not in ex and len(ex["input_ids"]) <= 16


def test_collate_left_pads_with_positions_that_ignore_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    right = collate([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}], pad_id=0, left_pad=False)
    assert right["input_ids"].tolist() == [[1, 2], [3, 0]] and right["labels"].tolist() == [1, 0]
    assert right["labels"].dtype == torch.long


def test_count_targets_counts_shifted_labels():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [1, 2], "labels": [IGNORE_INDEX, 2]}]
    assert count_targets(examples) == 2 + 1  # the first token of each sequence is never predicted
    assert count_targets([{"input_ids": [1], "label": 0}] * 3) == 3


def test_messages_field_as_json_string_in_csv(tmp_path):
    messages = tinymodels.chat_records(1)[0]["messages"]
    path = tinymodels.write_csv(str(tmp_path / "chat.csv"), [{"messages": json.dumps(messages)}] * 3)
    ds = load_dataset(path)
    assert ds.format == "chat" and ds.train[0]["messages"] == messages
