"""``deltatune train --init-lora-weights loftq`` (issue 19): LoftQ runs on the float model (PEFT's LoftQConfig
defaults when no ``--loftq-config`` is given, said in one line), ``--quantize nf4`` quantises LoftQ's base after it
(NF4 of Q is Q), and the saved adapter is one that ``eval --adapter`` (on the original model: the load rebuilds Q)
and peft both use with the trained model's numbers. What cannot be exact is one line, exit 2, no output."""

import importlib.machinery
import importlib.util
import json
import os

import bitsandbytes as bnb
import pytest
import torch

from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--no-eval-before"]
LOFTQ = ["--init-lora-weights", "loftq", "--target-modules", "all-linear", "--r", "4", "--lora-alpha", "4",
         "--lr", "1e-2", "--max-steps", "2"]
IDS = torch.tensor([[1, 5, 9, 14, 3, 7]])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def peft_on_cpu(monkeypatch):
    """PEFT's LoftQ computes on "cuda" and asks for scipy: run it on the CPU (as tests/lora/test_loftq.py does)."""
    def on_cpu(device):
        is_cuda = isinstance(device, str) and device.startswith("cuda") or \
            isinstance(device, torch.device) and device.type == "cuda"
        return "cpu" if is_cuda else device

    for cls in (torch.Tensor, bnb.nn.Params4bit, bnb.nn.Int8Params):
        def to(self, *args, _original=cls.to, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = on_cpu(kwargs["device"])
            return _original(self, *(on_cpu(a) for a in args), **kwargs)

        monkeypatch.setattr(cls, "to", to)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: importlib.machinery.ModuleSpec(name, None)
                        if name == "scipy" else find_spec(name, *a, **k))


def _eval_loss(capsys, out, *extra) -> float:
    code, stdout, err = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4,
                            *extra)
    assert code == 0, err
    return json.loads(stdout)["loss"]


def test_train_loftq_with_defaults_then_eval_and_peft_use_it(capsys, peft_on_cpu, llama_dir, data_dir, tmp_path):
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    out = tmp_path / "loftq"
    code, stdout, err = run(capsys, "train", "--method", "lora", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, *LOFTQ, *FAST)
    assert code == 0, err
    assert "--init-lora-weights loftq without --loftq-config: PEFT's defaults loftq_bits=4, loftq_iter=1" in err
    assert "loftq: quantising the base and fitting the adapter to the error" in stdout
    assert "loftq: 14 layers initialised" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    summary = json.loads((out / "summary.json").read_text())
    # eval loads the original model; the LoftQ base is rebuilt on load: the trained loss comes back
    assert _eval_loss(capsys, out) == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)

    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=IDS).logits
    assert (plain - expected).abs().max() > 1e-3  # the adapter and the LoftQ base changed the model


def test_train_loftq_then_quantize_nf4_reproduces_in_eval(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "qloftq"
    code, stdout, err = run(capsys, "train", "--method", "lora", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, *LOFTQ, "--quantize", "nf4",
                            "--loftq-config", '{"loftq_iter": 2}', *FAST)
    assert code == 0, err
    assert "without --loftq-config" not in err
    assert json.loads((out / "adapter_config.json").read_text())["loftq_config"] == \
        {"loftq_bits": 4, "loftq_iter": 2}  # completed with PEFT's defaults: a file PEFT can load
    summary = json.loads((out / "summary.json").read_text())
    trained = summary["eval_after"]["loss"]
    assert _eval_loss(capsys, out) == pytest.approx(trained, rel=1e-5)  # float load, rebuild, then NF4
    # NF4 of Q is Q: the same model with the base kept in float
    assert _eval_loss(capsys, out, "--quantize", "none") == pytest.approx(trained, rel=1e-4)
    # the base is reported as it trained: NF4 (1/8 of fp32 plus a fp32 scale per 64 values) in its linear layers
    from transformers import AutoModelForCausalLM

    from deltatune.quantization import weight_bytes

    float_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    linears = [m for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    linear = sum(m.weight.numel() * 4 for m in linears)
    code_tables = 16 * 4 * len(linears)  # each layer's 16 NF4 levels, fp32
    assert summary["base_weight_bytes"] == weight_bytes(float_model) - linear + linear // 8 + linear // 64 + \
        code_tables


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int8"], "LoftQ's quantised base is exact only as NF4 of a 4-bit LoftQ base"),
    (["--quantize", "nf4", "--loftq-config", '{"loftq_bits": 8}'], "use --quantize nf4 with loftq_bits 4"),
    (["--loftq-config", '{"loftq_bits": 2}'], "loftq_bits=2 is not supported"),
])
def test_what_cannot_be_exact_is_one_line_and_no_output(capsys, llama_dir, data_dir, tmp_path, extra, message):
    out = tmp_path / "refused"
    code, _, err = run(capsys, "train", "--method", "lora", "--model", llama_dir, "--data", data_dir / "pc.jsonl",
                       "--output-dir", out, *LOFTQ, *extra, *FAST)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)
