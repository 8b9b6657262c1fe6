"""A new user's first run: their own model directory and data, with only `pip install deltatune`.

The forgetting measure reads held-out general text, by default the ChatterBot answers of the optional
package ``chatterbot-corpus``. Without it, training must still work and say that forgetting was not
measured and how to measure it; ``--forgetting-data FILE`` measures it on text of the user's choosing.
"""

import json
import math
import sys

import pytest

from deltatune.builtin import datasets as builtin_datasets
from deltatune.cli import common, main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "2",
        "--max-length", "96"]


@pytest.fixture
def no_chatterbot(monkeypatch):
    """As if ``chatterbot-corpus`` were not installed: ``importlib.util.find_spec`` returns None for a name that
    ``sys.modules`` maps to None, so ``deltatune.builtin.package_dir`` raises BuiltinNotInstalledError."""
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)
    builtin_datasets._chatterbot_all.cache_clear()  # a corpus read by an earlier test must not be reused
    yield
    builtin_datasets._chatterbot_all.cache_clear()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def test_the_corpus_is_hidden(no_chatterbot):
    from deltatune.builtin import BuiltinNotInstalledError

    with pytest.raises(BuiltinNotInstalledError, match="chatterbot-corpus"):
        builtin_datasets.general_text()


def test_own_model_and_data_train_without_the_general_text_corpus(capsys, no_chatterbot, llama_dir, data_dir,
                                                                  tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "cls.jsonl",
                            "--output-dir", out, *FAST)
    assert code == 0, err
    summary = summary_of(out)
    assert summary["steps"] == 2 and summary["metric"] == "accuracy"
    assert summary["forgetting"] is None and summary["general_loss_base"] is None
    reason = summary["forgetting_reason"]
    assert reason.startswith("not measured") and "chatterbot-corpus" in reason and "--forgetting-data" in reason
    line = next(x for x in stdout.splitlines() if x.strip().startswith("forgetting"))
    assert "not measured" in line and "--forgetting-data FILE" in line


@pytest.mark.parametrize("name", ["general.txt", "general.jsonl"])
def test_forgetting_data_measures_forgetting_without_the_corpus(capsys, no_chatterbot, llama_dir, data_dir,
                                                                tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.training.metrics import evaluate_loss, general_text_blocks

    texts = ["the weather was mild and the river ran slow past the old mill.",
             "she bought bread, cheese and apples at the market on saturday.",
             "what is your name? my name is bot. how are you? i am fine, thank you."] * 4
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("\n\n".join(texts) + "\n")
    else:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "cls.jsonl", "--output-dir",
                            out, "--forgetting-data", path, "--lr", "5e-2", *FAST)
    assert code == 0, err
    summary = summary_of(out)
    assert summary["forgetting_reason"] is None and summary["forgetting_data"] == str(path)
    # The base loss is the untouched model's loss on exactly this file's text, in 256-token blocks.
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    blocks = general_text_blocks(tokenizer, texts, 256, 4096 // 256)
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    expected = evaluate_loss(base, blocks, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert summary["general_loss_base"] == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(summary["general_loss_adapted"])
    assert summary["general_loss_adapted"] != summary["general_loss_base"]  # the adapter changed the model
    assert summary["forgetting"] == pytest.approx(summary["general_loss_adapted"] - summary["general_loss_base"])
    assert f"nats/token on {path}" in stdout


def test_forgetting_data_that_is_missing_is_one_line_and_writes_nothing(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "cls.jsonl", "--output-dir", out,
                       "--forgetting-data", tmp_path / "nope.txt", *FAST)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("deltatune: error: --forgetting-data") and "nope.txt' does not exist" in lines[0]
    assert not out.exists()


def test_forgetting_off_says_so(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "cls.jsonl", "--output-dir",
                            out, "--forgetting-tokens", "0", *FAST)
    assert code == 0, err
    assert summary_of(out)["forgetting"] is None
    assert summary_of(out)["forgetting_reason"] == "off (--forgetting-tokens 0)"
    assert "forgetting        n/a (off (--forgetting-tokens 0))" in stdout


def test_forgetting_texts_read_each_format(tmp_path):
    prompt = tmp_path / "pc.jsonl"
    prompt.write_text(json.dumps({"question": "why?", "answer": "because."}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("one paragraph.\n\nanother one.\n")
    assert common.forgetting_texts(str(prompt)) == ["why?\nbecause."]
    assert common.forgetting_texts(str(chat)) == ["hi\nhello"]
    assert common.forgetting_texts(str(text)) == ["one paragraph.", "another one."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(common.data_mod.DataError, match="--forgetting-data: cannot tell the data format"):
        common.forgetting_texts(str(bad))
