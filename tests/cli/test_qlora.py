"""QLoRA from the command line on a tiny random Llama: train/eval/generate/merge/compare with --quantize."""

import json
import sys
import warnings

import pytest
import torch

from .reliability import read_json, run

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-length", "64",
        "--eval-samples", "8", "--forgetting-tokens", "0"]


def train(capsys, llama_dir, data_dir, out, method, quant_type, *extra):
    code, stdout, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir",
                            out, "--max-steps", 3, "--method", method, "--quantize", quant_type, "--lr", 1e-2,
                            "--no-eval-before", *FAST, *extra)
    assert code == 0, err
    return stdout


@pytest.mark.parametrize("method, quant_type", [("lora", "nf4"), ("adalora", "int8"), ("ia3", "fp4")])
def test_train_quantized_then_eval_reproduces_and_differs_from_full_precision(capsys, llama_dir, data_dir, tmp_path,
                                                                            method, quant_type):
    out = tmp_path / "run"
    stdout = train(capsys, llama_dir, data_dir, out, method, quant_type)
    assert f"in {quant_type}" in stdout and f"({quant_type}, frozen)" in stdout
    summary = read_json(out / "summary.json")
    assert summary["quantize"] == quant_type and read_json(out / "run_config.json")["quantize"] == quant_type
    assert summary["steps"] == 3
    # `eval` quantises the base as the run did (run_config.json), so it reproduces the number training reported.
    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4)
    report = json.loads(stdout)
    assert code == 0 and report["quantize"] == quant_type
    assert report["loss"] == pytest.approx(summary["eval_after"]["loss"], abs=1e-6)
    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4,
                          "--quantize", "none")
    full = json.loads(stdout)
    assert code == 0 and full["quantize"] is None
    assert abs(full["loss"] - report["loss"]) > 1e-5  # the base really was quantised (int8 is close)


def test_cli_adapter_loads_in_peft_on_the_same_quantized_base(capsys, llama_dir, data_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel
    from deltatune.quantization import quantize

    out = tmp_path / "run"
    train(capsys, llama_dir, data_dir, out, "lora", "nf4", "--r", 4)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))

    def base():
        return quantize(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), "nf4")

    ours, theirs = PeftModel.from_pretrained(base(), out), peft.PeftModel.from_pretrained(base(), out)
    ours.train()
    theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-6, rtol=0)


def test_merge_quantized_adapter_dense_and_requantized(capsys, llama_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.cli import loading
    from deltatune.cli.merge import probe_inputs

    out = tmp_path / "run"
    train(capsys, llama_dir, data_dir, out, "lora", "nf4", "--r", 4)
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--output-dir", tmp_path / "dense")
    assert code == 0, err
    assert "nf4 base, dequantised" in stdout and "merge error vs the unmerged model" in stdout
    max_diff = float(stdout.split("max |logit diff| ")[1].split(",")[0])
    assert max_diff < 1e-4  # folding into the dequantised weights is exact
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any("bitsandbytes" in type(m).__module__ for m in dense.modules())
    model, tokenizer, *_ = loading.load_with_adapter(str(out), None, torch.device("cpu"))
    ids = probe_inputs(tokenizer)
    model.train()
    dense.eval()
    with torch.no_grad():
        assert (dense(ids).logits - model(ids).logits).abs().max().item() < 1e-4

    code, stdout, err = run(capsys, "merge", "--adapter", out, "--output-dir", tmp_path / "q", "--requantize", "nf4")
    assert code == 0, err
    assert "nf4-quantised" in stdout
    requant_diff = float(stdout.split("max |logit diff| ")[1].split(",")[0])
    assert max_diff < requant_diff < 1.0  # NF4 rounding of the merged weights, reported
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(back.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_combined_qlora_adapters_fold_into_the_quantized_base(capsys, llama_dir, data_dir, tmp_path):
    """``merge --adapters ... --merge-into-base`` folds into the base the adapters were trained on (NF4,
    dequantised), as ``--adapter`` does; ``--requantize`` without ``--merge-into-base`` is refused."""
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel
    from deltatune.cli import loading
    from deltatune.cli.merge import probe_inputs

    out = tmp_path / "run"
    train(capsys, llama_dir, data_dir, out, "lora", "nf4", "--r", 4)
    # cat with weights 0.5 + 0.5 of one adapter is that adapter exactly: Σ w_i ΔW_i = ΔW.
    code, stdout, err = run(capsys, "merge", "--adapters", out, out, "--weights", 0.5, 0.5, "--how", "cat",
                            "--merge-into-base", "--output-dir", tmp_path / "dense")
    assert code == 0, err
    assert "nf4 base, dequantised" in stdout and "merge error vs the unmerged model" in stdout
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    model, tokenizer, *_ = loading.load_with_adapter(str(out), None, torch.device("cpu"))
    model.train()
    ids = probe_inputs(tokenizer)
    with torch.no_grad():
        assert (dense(ids).logits - model(ids).logits).abs().max().item() < 1e-4
        # Folding into the fp32 base instead (what the adapters were not trained on) is measurably different.
        on_fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
        assert (on_fp32(ids).logits - dense(ids).logits).abs().max().item() > 1e-3

    code, _, err = run(capsys, "merge", "--adapters", out, out, "--requantize", "nf4", "--output-dir", tmp_path / "x")
    assert code == 2 and "--merge-into-base" in err and not (tmp_path / "x").exists()


def test_generate_with_quantized_adapter(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    train(capsys, llama_dir, data_dir, out, "lora", "int8", "--r", 4)
    code, text, err = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 4, "hello")
    assert code == 0, err
    code, same, _ = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 4, "--quantize", "int8", "hello")
    assert code == 0 and same == text


@pytest.mark.parametrize("command", ["train", "eval", "merge"])
def test_missing_bitsandbytes_says_how_to_install(capsys, monkeypatch, llama_dir, data_dir, tmp_path, command):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    out = tmp_path / "out"
    argv = {"train": ["train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
                      "--quantize", "nf4", *FAST],
            "eval": ["eval", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--quantize", "nf4"],
            "merge": ["merge", "--adapter", tmp_path, "--output-dir", out, "--requantize", "nf4"]}[command]
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "bitsandbytes" in lines[0] and "pip install 'deltatune[qlora]'" in lines[0]
    assert not out.exists()


def test_compare_has_a_qlora_row(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run(capsys, "compare", "--methods", "qlora", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 2, "--r", 4, *FAST)
    assert code == 0, err
    assert "--method lora --quantize nf4" in stdout
    assert "| qlora |" in (out / "compare.md").read_text()
    assert read_json(out / "qlora" / "summary.json")["quantize"] == "nf4"
    code, _, err = run(capsys, "compare", "--methods", "qlora", "--quantize", "int8", "--model", llama_dir,
                       "--output-dir", tmp_path / "x")
    assert code == 2 and "separate qlora row" in err
