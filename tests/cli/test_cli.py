"""The CLI end to end on a tiny random Llama / BERT and a few lines of data (in-process, fast)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from deltatune.cli import main
from deltatune.cli.common import UsageError

from .reliability import read_json, run

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4"]


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("data, metric", [
    ("cls.jsonl", "accuracy"), ("cls.csv", "accuracy"), ("pc.jsonl", "loss"), ("chat.jsonl", "loss"),
    ("text.txt", "loss"),
])
def test_train_each_format_then_eval_reproduces_the_numbers(capsys, llama_dir, data_dir, tmp_path, data, metric):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / data, "--output-dir", out,
                            "--max-steps", 4, "--max-length", 96, *FAST)
    assert code == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "summary.json",
            "run_config.json"} <= set(os.listdir(out))
    assert "checkpoint.pt" not in os.listdir(out)  # a finished run has nothing to resume
    summary = read_json(out / "summary.json")
    assert summary["metric"] == metric and summary["steps"] == 4
    assert summary["adapter_bytes"] == os.path.getsize(out / "adapter_model.safetensors")
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert f"test {metric}" in stdout and "trainable params" in stdout and "peak memory" in stdout
    n_eval = summary["eval_records"]
    assert n_eval < 20 and f"note: only {n_eval} held-out record" in err  # tiny files: told so
    steps = [r["step"] for r in metrics(out) if "loss" in r and "split" not in r]
    assert steps == [1, 2, 3, 4]
    # `eval` on the saved adapter gives exactly the number training reported.
    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4)
    assert code == 0
    assert json.loads(stdout)[metric] == pytest.approx(summary["metric_after"], abs=1e-6)
    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--model", llama_dir, "--precision", "fp32", "--json")
    assert json.loads(stdout)["loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)


def test_training_lowers_the_loss(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "cls.jsonl", "--output-dir", out,
                       "--max-steps", 40, "--lr", 3e-2, "--target-modules", "all-linear", "--r", 8, *FAST)
    assert code == 0, err
    losses = [r["loss"] for r in metrics(out) if "loss" in r and "split" not in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    summary = read_json(out / "summary.json")
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.1


def test_adapter_loads_in_peft_with_the_same_logits(capsys, llama_dir, data_dir, tmp_path):
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
                       "--max-steps", 5, "--lr", 5e-2, "--target-modules", "q_proj,v_proj,down_proj", *FAST)
    assert code == 0, err
    cfg = read_json(out / "adapter_config.json")
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    x = torch.tensor([[5, 17, 42, 9, 100, 3]])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        a, b, c = ours(input_ids=x).logits, theirs(input_ids=x).logits, base(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (a - c).abs().max() > 1e-4  # the adapter is not a no-op


def test_encoder_with_classification_head(capsys, bert_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", bert_dir, "--data", data_dir / "cls.jsonl", "--output-dir",
                            out, "--max-steps", 6, "--lr", 1e-2, *FAST)
    assert code == 0, err
    cfg = read_json(out / "adapter_config.json")
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    summary = read_json(out / "summary.json")
    assert summary["forgetting"] is None and "forgetting        n/a" in stdout
    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4)
    assert code == 0 and json.loads(stdout)["accuracy"] == pytest.approx(summary["metric_after"])
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert info["task_type"] == "SEQ_CLS" and info["parameters_in_modules_to_save"] == 32 * 3 + 3  # head W and b


@pytest.mark.parametrize("method, flag", [("dora", "use_dora"), ("rslora", "use_rslora")])
def test_method_variants_and_options(capsys, llama_dir, data_dir, tmp_path, method, flag):
    out = tmp_path / method
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
                       "--method", method, "--r", 4, "--lora-alpha", 12, "--lora-dropout", 0.1, "--max-steps", 2,
                       *FAST)
    assert code == 0, err
    cfg = read_json(out / "adapter_config.json")
    assert cfg[flag] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["lora_dropout"] == 0.1


def test_multitask_prompt_tuning_trains_evaluates_and_generates_with_task_ids(capsys, llama_dir, data_dir, tmp_path):
    """MPT needs ``task_ids`` in every forward: train, eval and generate pass them (task 0, or ``--task-id``)."""
    out = tmp_path / "mpt"
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
                       "--method", "multitask_prompt_tuning", "--num-tasks", 2, "--num-virtual-tokens", 4,
                       "--max-steps", 2, *FAST)
    assert code == 0, err
    assert read_json(out / "adapter_config.json")["num_tasks"] == 2
    code, _, err = run(capsys, "eval", "--adapter", out, "--json")
    assert code == 0, err
    for task in (0, 1):
        code, _, err = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 5, "--raw",
                                       "--task-id", task, "hello")
        assert code == 0, err
        code, _, err = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 3, "--raw", "--num-beams", 2,
                           "--task-id", task, "hello")  # generate expands the rows; task_ids must follow them
        assert code == 0, err
    code, _, err = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 2, "--task-id", 2, "hello")
    assert code == 2 and "task_ids [2] out of range" in err


def test_config_file_and_flags_layer(capsys, llama_dir, data_dir, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {llama_dir}\ndata: {data_dir / 'pc.jsonl'}\nmax-steps: 3\nr: 2\n"
                      "target_modules: q_proj,k_proj\nlr: 0.001\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--config", config, "--output-dir", out, "--lr", 0.002, *FAST)
    assert code == 0, err
    cfg = read_json(out / "adapter_config.json")
    assert cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["k_proj", "q_proj"]
    run_cfg = read_json(out / "run_config.json")
    assert run_cfg["lr"] == 0.002 and run_cfg["max_steps"] == 3  # the flag beats the file


def test_output_dir_in_use_needs_overwrite(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 1,
            *FAST]
    assert run(capsys, *args)[0] == 0
    first = os.path.getmtime(out / "adapter_model.safetensors")
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert os.path.getmtime(out / "adapter_model.safetensors") == first
    (out / "notes.txt").write_text("mine")
    assert run(capsys, *args, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only the files a run writes


def test_ctrl_c_leaves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_ends(capsys, llama_dir, data_dir,
                                                                                     tmp_path, monkeypatch):
    """SIGINT in the middle of training: exit 130 with a checkpoint; ``--resume`` finishes the same run."""
    from deltatune.training import trainer as trainer_mod

    common = ["--model", llama_dir, "--data", data_dir / "cls.jsonl", "--max-steps", 12, "--grad-accum", 2,
              "--lora-dropout", 0.1, "--save-steps", 4, "--no-eval-before", *FAST]
    ref = tmp_path / "ref"
    assert run(capsys, "train", *common, "--output-dir", ref)[0] == 0

    original = trainer_mod.Trainer.train

    def train_with_ctrl_c(self, *a, **kw):  # a Ctrl-C arrives during step 7
        self.on_step_end = lambda step: os.kill(os.getpid(), __import__("signal").SIGINT) if step == 6 else None
        return original(self, *a, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_mod.Trainer, "train", train_with_ctrl_c)
    code, _, err = run(capsys, "train", *common, "--output-dir", out)
    monkeypatch.setattr(trainer_mod.Trainer, "train", original)
    assert code == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    assert "checkpoint.pt" in os.listdir(out) and "adapter_model.safetensors" not in os.listdir(out)

    code, stdout, err = run(capsys, "train", "--output-dir", out, "--resume", "--no-progress")
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [(r["step"], r["loss"]) for r in metrics(d) if "loss" in r and "split" not in r]  # noqa: E731
    assert losses(out) == losses(ref)
    # Resuming a finished run, or with a changed schedule, is refused.
    code, _, err = run(capsys, "train", "--output-dir", out, "--resume")
    assert code == 2 and "finished run" in err


def test_resume_refuses_changed_settings(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "run_config.json").write_text(json.dumps({"lr": 0.001, "model": llama_dir}))
    (out / "checkpoint.pt").write_bytes(b"")
    code, _, err = run(capsys, "train", "--output-dir", out, "--resume", "--lr", 0.01)
    assert code == 2 and "--lr 0.01 differs from the run's 0.001" in err


def test_inspect_reads_an_adapter_written_by_peft(capsys, llama_dir, tmp_path):
    from peft import LoraConfig as HFLoraConfig
    from peft import get_peft_model as hf_get_peft_model
    from transformers import AutoModelForCausalLM

    model = hf_get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                              HFLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.save_pretrained(str(tmp_path / "peft"))
    code, stdout, _ = run(capsys, "inspect", tmp_path / "peft", "--json")
    assert code == 0
    info = json.loads(stdout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["parameters"] == trainable
    assert info["ranks_in_file"] == {"4": 4} or info["ranks_in_file"] == {4: 4}
    assert info["method"] == "LORA (DoRA)" and info["adapted_modules"] == 4
    assert info["module_suffixes"] == ["q_proj", "v_proj"] and info["written_by"].startswith("peft")
    code, stdout, _ = run(capsys, "inspect", tmp_path / "peft")
    assert "LORA (DoRA)" in stdout and "r=4 x4" in stdout


def test_adapter_naming_a_builtins_hub_id_runs_on_the_builtin(capsys, tmp_path):
    """A peft adapter trained on the hub copy of a built-in (all-MiniLM-L6-v2) runs on the built-in offline."""
    from safetensors.torch import save_file

    from deltatune.cli import loading

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "r": 4,
         "lora_alpha": 8, "target_modules": ["query"]}))
    layer = "base_model.model.encoder.layer.0.attention.self.query"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, 384), f"{layer}.lora_B.weight": torch.zeros(384, 4)},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    spec, _, _ = loading.adapter_base_and_labels(str(tmp_path / "a"), None)
    assert spec.name == "minilm-l6" and spec.kind == "encoder"
    assert "names base sentence-transformers/all-MiniLM-L6-v2; using the built-in minilm-l6" in capsys.readouterr().err
    code, stdout, err = run(capsys, "inspect", tmp_path / "a")
    assert code == 0 and "sentence-transformers/all-MiniLM-L6-v2 (the built-in minilm-l6)" in stdout, err


def test_merge_writes_a_plain_model_with_the_adapters_outputs(capsys, llama_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    out = tmp_path / "run"
    assert run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
               "--max-steps", 3, "--lr", 5e-2, *FAST)[0] == 0
    merged_dir = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--output-dir", merged_dir)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    x = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    code, _, err = run(capsys, "merge", "--adapter", out, "--output-dir", merged_dir)
    assert code == 2 and "not empty" in err


def test_generate_from_argument_and_stdin(capsys, llama_dir, data_dir, tmp_path, monkeypatch):
    import io

    out = tmp_path / "run"
    assert run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
               "--max-steps", 3, "--lr", 5e-2, "--template", "Q: {prompt} A:", *FAST)[0] == 0
    code, from_arg, err = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 6, "what is your name?")
    assert code == 0, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is your name?"))
    code, from_stdin, _ = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 6)
    assert code == 0 and from_stdin == from_arg  # greedy: the same text
    # The prompt is put in the template the adapter was trained with, as --raw shows.
    code, raw, _ = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 6, "--raw", "Q: what is your name? A:")
    assert code == 0 and raw == from_arg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune import PeftModel

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    ids = tok("Q: what is your name? A:", return_tensors="pt")["input_ids"]
    expected = tok.decode(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                         do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:],
                          skip_special_tokens=True)
    assert from_arg == expected + "\n"
    code, chat, _ = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 4, "--chat", "hello")
    assert code == 0
    # Beam search, several answers: transformers' generate on the same adapted model, each printed in turn.
    code, beams, err = run(capsys, "generate", "--adapter", out, "--max-new-tokens", 5, "--raw", "--num-beams", 3,
                           "--num-return-sequences", 2, "--repetition-penalty", 1.2, "Q: what is your name? A:")
    assert code == 0, err
    rows = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3,
                          num_return_sequences=2, repetition_penalty=1.2, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    texts = [tok.decode(r[ids.shape[1]:], skip_special_tokens=True) for r in rows]
    assert beams == f"--- 1\n{texts[0]}\n--- 2\n{texts[1]}\n"
    for bad, message in ((["--num-beams", 0], "--num-beams must be at least 1"),
                         (["--num-return-sequences", 2], "needs sampling (--temperature > 0) or at least as many"),
                         (["--top-p", 0], "--top-p must be in (0, 1]")):
        code, _, err = run(capsys, "generate", "--adapter", out, *bad, "hello")
        assert code == 2 and message in err, err


def test_compare_writes_table_csv_and_plot(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run(capsys, "compare", "--methods", "lora,dora", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 2, "--r", 4, *FAST)
    assert code == 0, err
    assert {"compare.md", "compare.csv", "compare.png", "lora", "dora"} <= set(os.listdir(out))
    import csv

    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["lora", "dora"]
    lora, dora = (read_json(out / m / "summary.json") for m in ("lora", "dora"))
    assert int(rows[0]["trainable_params"]) == lora["trainable_params"]
    assert dora["trainable_params"] > lora["trainable_params"]  # DoRA adds a magnitude vector per layer
    assert int(rows[1]["adapter_bytes"]) == os.path.getsize(out / "dora" / "adapter_model.safetensors")
    table = (out / "compare.md").read_text()
    assert "| lora |" in table and "| dora |" in table and "forgetting" in table
    assert "## Trade-offs" in table and "- Pareto front, loss against trainable parameters" in table
    # --resume keeps finished methods.
    code, stdout, _ = run(capsys, "compare", "--methods", "lora,dora", "--model", llama_dir, "--data",
                          data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 2, "--r", 4, "--resume", *FAST)
    assert code == 0 and stdout.count("finished earlier, kept") == 2


def test_trade_offs_pick_the_best_per_column_and_the_pareto_front():
    from deltatune.cli.compare import trade_offs

    def row(method, params, acc, mem, step, forget):
        return {"method": method, "trainable_params": params, "adapter_bytes": 4 * params, "peak_memory_bytes": mem,
                "time_per_step_s": step, "metric_after": acc, "forgetting": forget}

    rows = [row("lora", 1000, 0.80, 3e9, 1.0, 0.02), row("ia3", 100, 0.70, 2e9, 0.8, -0.01),
            row("prompt", 10, 0.30, 2.5e9, 0.5, 0.10), row("loha", 5000, 0.75, 4e9, 1.5, 0.00),
            row("dora", 1100, 0.85, 3.5e9, 1.2, 0.03),
            {"method": "vera (failed)", "trainable_params": None, "metric_after": None}]
    text = trade_offs(rows, "accuracy")
    assert "- best accuracy after training: dora (0.8500)" in text
    assert "- fewest trainable parameters: prompt (10)" in text and "- smallest adapter file: prompt (40 B)" in text
    assert "- least peak memory: ia3 (2.0 GB)" in text and "- fastest step: prompt (0.50 s)" in text
    assert "- least forgetting: ia3 (-0.0100 nats/token)" in text
    # loha (more parameters than lora, lower accuracy) is dominated; the front climbs in both.
    assert text.endswith("prompt (10, 0.3000), ia3 (100, 0.7000), lora (1,000, 0.8000), dora (1,100, 0.8500)")
    for r in rows[:5]:  # a loss: lower is better, so the front is read the other way
        r["metric_after"] = 1 - r["metric_after"]
    assert trade_offs(rows, "loss").endswith("prompt (10, 0.7000), ia3 (100, 0.3000), lora (1,000, 0.2000), "
                                             "dora (1,100, 0.1500)")
    assert trade_offs(rows[5:], "loss") == ""


def test_python_dash_m_and_help():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "deltatune", "train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--data", "--method", "--output-dir", "--max-steps", "--epochs", "--batch-size",
                 "--grad-accum", "--lr", "--seed", "--resume", "--eval-steps", "--r", "--lora-alpha",
                 "--target-modules"):
        assert flag in proc.stdout, flag
    assert main(["--version"]) == 0


def test_gradient_checkpointing_gives_the_same_training_and_eval_steps_log(capsys, llama_dir, data_dir, tmp_path):
    """Recomputing activations in the backward pass changes memory, not the numbers (fp32, no dropout)."""
    common = ["train", "--model", llama_dir, "--data", data_dir / "cls.jsonl", "--max-steps", 5, "--eval-steps", 2,
              "--lr", 1e-2, "--no-eval-before", *FAST]
    assert run(capsys, *common, "--output-dir", tmp_path / "plain")[0] == 0
    code, _, err = run(capsys, *common, "--output-dir", tmp_path / "ckpt", "--gradient-checkpointing")
    assert code == 0, err
    plain, ckpt = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    train_losses = [[r["loss"] for r in m if "loss" in r and "split" not in r] for m in (plain, ckpt)]
    assert len(train_losses[0]) == 5
    assert train_losses[0] == pytest.approx(train_losses[1], rel=1e-5)
    assert [r["step"] for r in plain if r.get("split") == "validation"] == [2, 4]
    assert {"accuracy", "loss"} <= set(next(r for r in plain if r.get("split") == "validation"))


def test_compare_table_marks_a_failed_method():
    from deltatune.cli.compare import COLUMNS, markdown_table

    ok = {"method": "lora", "trainable_params": 1000, "total_params": 100000, "adapter_bytes": 4096,
          "peak_memory_bytes": 2e9, "time_per_step_s": 1.5, "metric_before": 0.25, "metric_after": 0.9,
          "forgetting": 0.1, "train_time_s": 10.0, "steps": 5}
    failed = {k: None for k in COLUMNS} | {"method": "dora (failed)"}
    table = markdown_table([ok, failed], "accuracy").splitlines()
    assert table[2] == ("| lora | 1,000 (1.00%) | 4.1 KB | 2.0 GB | 1.50 s | 0.2500 | 0.9000 | +0.1000 |")
    assert table[3] == "| dora (failed) | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"


def test_compile_and_no_chunked_loss_train_to_the_same_losses(capsys, llama_dir, data_dir, tmp_path):
    """``--compile aot_eager`` and ``--no-chunked-loss`` change speed and memory, not the training losses."""
    common = ["train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--max-steps", 2, "--no-eval-before",
              "--lr", 1e-2, *FAST]
    losses = []
    for name, extra in (("default", []), ("compiled", ["--compile", "aot_eager"]), ("plain", ["--no-chunked-loss"])):
        code, _, err = run(capsys, *common, "--output-dir", tmp_path / name, *extra)
        assert code == 0, err
        losses.append([r["loss"] for r in metrics(tmp_path / name) if "loss" in r and "split" not in r])
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
    code, _, err = run(capsys, *common, "--output-dir", tmp_path / "bad", "--compile", "no-such-backend")
    assert code == 2 and "not a torch.compile backend" in err


def test_resume_takes_quantize_none_as_the_default(tmp_path):
    from deltatune.cli.train import _apply_resume

    (tmp_path / "run_config.json").write_text(json.dumps({"lr": 0.001, "quantize": None}))
    settings = {"output_dir": str(tmp_path), "explicit": {"quantize": "none"}}
    assert _apply_resume(settings)["quantize"] is None
    settings = {"output_dir": str(tmp_path), "explicit": {"quantize": "nf4"}}
    with pytest.raises(UsageError, match="--quantize 'nf4' differs from the run's None"):
        _apply_resume(settings)


def test_inspect_summarises_a_long_target_list(capsys, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(str(tmp_path / "a"))
    n = len(model.peft_config["default"].target_modules)
    assert n > 8  # all-linear is saved as every full module name
    code, stdout, _ = run(capsys, "inspect", tmp_path / "a")
    assert code == 0
    line = next(x for x in stdout.splitlines() if x.startswith("targets"))
    assert f"{n} module names ({n} layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in line


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_runs_save_a_lora_for_the_original_base(capsys, llama_dir, data_dir, tmp_path, init):
    """PiSSA/OLoRA rewrite the base into a residual: "before" is still the original model, and the saved adapter
    is converted to plain LoRA (rank 2r), so eval on the original base reproduces the number training reported."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
                       "--max-steps", 3, "--lr", 1e-2, "--r", 4, "--init-lora-weights", init, *FAST)
    assert code == 0, err
    summary = read_json(out / "summary.json")
    config = read_json(out / "adapter_config.json")
    assert config["init_lora_weights"] is True and config["r"] == 8
    assert (out / "initial_adapter" / "adapter_model.safetensors").exists()
    code, stdout, err = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4)
    assert code == 0 and "residual" not in err, err
    assert json.loads(stdout)["loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)
    code, stdout, _ = run(capsys, "eval", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--precision",
                          "fp32", "--json", "--batch-size", 4, "--eval-samples", 8)
    assert json.loads(stdout)["loss"] == pytest.approx(summary["eval_before"]["loss"], rel=1e-4)
