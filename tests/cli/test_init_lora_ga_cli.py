"""``deltatune train --init-lora-weights lora_ga``: the adapter is created from the gradients of the first training
batches (LoRA-GA), trained, and saved as a plain LoRA for the original base model, which PEFT loads."""

import json
import warnings

import torch
from safetensors.torch import load_file

from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "3",
        "--lr", "1e-2", "--target-modules", "q_proj,v_proj", "--r", "4", "--lora-alpha", "8"]


def _train(capsys, llama_dir, data, out, init):
    code = main(["train", "--method", "lora", "--model", str(llama_dir), "--data", str(data), "--output-dir",
                 str(out), "--init-lora-weights", init, *FAST])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    with open(out / "summary.json") as fh:
        return stdout, json.load(fh)


def test_train_with_lora_ga_saves_plain_lora_that_peft_loads(capsys, llama_dir, data_dir, tmp_path):
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    out = tmp_path / "ga"
    stdout, summary = _train(capsys, llama_dir, data_dir / "pc.jsonl", out, "lora_ga")
    assert "lora_ga: initialising the adapter from" in stdout
    # created from gradients: B is not zero, unlike the default init
    initial = load_file(out / "initial_adapter" / "adapter_model.safetensors")
    b = [v for k, v in initial.items() if "lora_B" in k]
    assert len(b) == 4 and all(v.abs().max() > 0 for v in b)
    # the untrained adapter on the residual base is the base model: the "before" loss is the base's
    _, plain = _train(capsys, llama_dir, data_dir / "pc.jsonl", tmp_path / "plain", "true")
    assert abs(summary["eval_before"]["loss"] - plain["eval_before"]["loss"]) < 1e-4
    assert summary["eval_after"]["loss"] != summary["eval_before"]["loss"]

    with open(out / "adapter_config.json") as fh:
        config = json.load(fh)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)  # [A; A0], [B, -B0]
    assert config["lora_ga_config"] == {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        torch.testing.assert_close(got, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert (got - base(input_ids=ids).logits).abs().max() > 1e-4  # the trained change is in the file
