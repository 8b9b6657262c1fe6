"""``deltatune train`` is safe by default: resume runs no code, bad states end in one line, output stays valid."""

import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--no-eval-before",
        "--forgetting-tokens", "0"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    """The error is the last line of stderr, on one line (notes printed earlier may precede it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("deltatune: error: "), err
    assert sum("error" in line for line in lines) == 1, err
    return lines[-1]


def train_args(llama_dir, data_dir, out, *extra):
    return ["train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out, *FAST, *extra]


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling calls Path(path).touch()
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_resume_refuses_a_checkpoint_that_would_run_code(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 1))[0] == 0
    os.unlink(out / "summary.json")  # make it look unfinished, with a crafted checkpoint
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "step": 0, "extra": _WritesAFile(str(marker))}, out / "checkpoint.pt")
    code, _, err = run(capsys, "train", "--output-dir", out, "--resume", "--no-progress")
    assert code == 2, err
    line = one_error_line(err)
    assert "checkpoint.pt is refused" in line and "never runs code" in line and "weights_only" not in line
    assert not marker.exists()


def _hold_lock_in_another_process(directory):
    """A live process holding ``directory``'s run lock, as a running ``deltatune train`` does."""
    code = ("import sys, time; from deltatune.training.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_live_runs_directory_fails_at_once_naming_it(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(llama_dir, data_dir, out, "--max-steps", 1)
    assert run(capsys, *args)[0] == 0
    adapter_time = os.path.getmtime(out / "adapter_model.safetensors")
    holder = _hold_lock_in_another_process(out)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, _, err = run(capsys, *args, *extra)
            line = one_error_line(err)
            assert code == 2 and f"is in use by a running deltatune train (pid {holder.pid})" in line, (extra, line)
            assert "finished run" not in line and "choose another --output-dir" in line
    finally:
        holder.kill()
        holder.wait()
    assert os.path.getmtime(out / "adapter_model.safetensors") == adapter_time  # the live run's files untouched
    # The holder died: the OS dropped its lock, and the directory is again what its files say.
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds a finished run" in one_error_line(err)


def test_the_lock_is_held_for_the_whole_run_including_the_final_save(capsys, llama_dir, data_dir, tmp_path,
                                                                     monkeypatch):
    from deltatune.cli import train as train_cli
    from deltatune.training import runlock
    from deltatune.training import trainer as trainer_mod

    out = tmp_path / "run"
    seen = []
    original = trainer_mod.Trainer.train

    def train(self, *a, **kw):
        self.on_step_end = lambda step: seen.append(("step", runlock.holder(str(out))))
        return original(self, *a, **kw)

    summary = train_cli.print_summary  # runs after the adapter, summary.json and the checkpoint's removal
    monkeypatch.setattr(trainer_mod.Trainer, "train", train)
    monkeypatch.setattr(train_cli, "print_summary", lambda s, o: (seen.append(("end", runlock.holder(o))),
                                                                  summary(s, o)))
    assert run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 2))[0] == 0
    assert seen == [("step", os.getpid()), ("step", os.getpid()), ("end", os.getpid())]
    assert runlock.holder(str(out)) is None  # released when the command returns


def test_stale_temporary_files_of_killed_saves_are_swept_at_the_start(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    (out / "initial_adapter").mkdir(parents=True)
    stale = [out / ".tmp-a1b2checkpoint.pt", out / ".tmp-x9adapter_model.safetensors",
             out / "initial_adapter" / ".tmp-q7adapter_config.json"]
    for path in stale:
        path.write_bytes(b"half a file")
    (out / "notes.txt").write_text("mine")
    assert run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 1))[0] == 0
    assert not any(path.exists() for path in stale)
    assert (out / "notes.txt").read_text() == "mine"  # only .tmp-* files are swept


def test_a_run_killed_before_its_first_checkpoint_is_not_called_finished(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": str(llama_dir)}))
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 1))
    line = one_error_line(err)
    assert code == 2 and "finished" not in line and "stopped before its first checkpoint" in line, line


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("lr", [["--lr", "nan"], ["--lr", "inf"], ["--lr", "-inf"], ["--lr", "-1e-3"], ["--lr", "-1"],
                                ["--lr", "0"], ["--lr=-1e-3"], ["--lr", "fast"]])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused_at_parsing(capsys, llama_dir, data_dir, tmp_path,
                                                                               lr):
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 1, *lr))
    line = one_error_line(err)
    assert code == 2 and line.startswith("deltatune: error: argument --lr: "), line
    assert "positive finite number" in line or "invalid float value: 'fast'" in line, line
    assert "expected one argument" not in line
    assert not out.exists()


@pytest.mark.parametrize("value", [".nan", "-0.001", "'-1e-3'"])
def test_a_config_file_learning_rate_that_is_not_positive_and_finite_is_refused(capsys, llama_dir, data_dir,
                                                                               tmp_path, value):
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: {value}\n")
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, tmp_path / "run", "--config", config))
    line = one_error_line(err)
    assert code == 2 and f"--config {config}: lr: " in line and "positive finite number" in line, line


def test_training_that_diverges_stops_with_one_line_and_saves_no_adapter(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 4, "--save-steps", 1,
                                           "--lr", "1e10"))
    line = one_error_line(err)
    assert code == 2 and "training diverged at step" in line and "stopped without saving the adapter" in line, line
    assert "lower --lr (now 1e+10)" in line and "is kept in" in line
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 1  # the last finite state, resumable
    with open(out / "metrics.jsonl") as fh:
        records = [_strict_json(line) for line in fh]
    assert records and all(r["loss"] is not None and r["loss"] == r["loss"] for r in records if "loss" in r)


def test_finite_weights_that_evaluate_to_nan_are_not_saved(capsys, llama_dir, data_dir, tmp_path, monkeypatch):
    """A huge learning rate on the last step can leave finite weights whose outputs overflow: no adapter."""
    from deltatune.training import trainer as trainer_mod

    original = trainer_mod.Trainer.train

    def train_then_blow_up(self, *a, **kw):
        result = original(self, *a, **kw)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora" in name:
                    p.fill_(1e30)
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "train", train_then_blow_up)
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 1))
    line = one_error_line(err)
    assert code == 2 and "the trained adapter's test loss" in line and "is not finite" in line, line
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()


def test_summary_and_metrics_writers_write_null_for_nan(tmp_path):
    from deltatune.cli import train as train_cli

    text = train_cli._json({"final_train_loss": float("nan"), "eval_after": {"loss": float("inf")}, "steps": 3})
    assert _strict_json(text) == {"final_train_loss": None, "eval_after": {"loss": None}, "steps": 3}
    train_cli._log(str(tmp_path), {"step": 1, "loss": float("-inf")})
    assert _strict_json((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None}


def test_disk_full_during_the_final_save_keeps_the_finished_training_and_resume_saves_it(capsys, llama_dir, data_dir,
                                                                                         tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from deltatune.core import io

    args = ["--max-steps", 2, "--save-steps", 1, "--lora-dropout", 0.1]
    ref = tmp_path / "ref"
    assert run(capsys, *train_args(llama_dir, data_dir, ref, *args))[0] == 0

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(io, "save_file", no_space)  # the adapter's safetensors file
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, out, *args))
    monkeypatch.undo()
    line = one_error_line(err)
    assert code == 2 and f"no space left on device writing {out / 'adapter_model.safetensors'}" in line, line
    assert (f"training finished and its checkpoint (step 2) is kept; save the result with deltatune train "
            f"--output-dir {out} --resume") in line
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]

    code, _, err = run(capsys, "train", "--output-dir", out, "--resume", "--no-progress")
    assert code == 0, err
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("save_steps, expected", [
    (1, "training finished and its checkpoint (step 2) is kept; save the result with deltatune train --output-dir "
        "{out} --resume"),
    (0, "no checkpoint is kept (--save-steps 0); train again with --overwrite"),
])
def test_ctrl_c_while_saving_the_result_says_what_is_kept(capsys, llama_dir, data_dir, tmp_path, monkeypatch,
                                                          save_steps, expected):
    from deltatune.cli import train as train_cli

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(train_cli.plots, "plot_loss_curve", ctrl_c)  # after the adapter, before summary.json
    code, _, err = run(capsys, *train_args(llama_dir, data_dir, out, "--max-steps", 2, "--save-steps", save_steps))
    monkeypatch.undo()
    assert code == 130, err
    assert "before training started" not in err and "nothing to resume from" not in err
    assert ("deltatune: interrupted after training (step 2), while evaluating or saving the result; "
            + expected.format(out=out)) in err, err
    if save_steps:
        code, _, err = run(capsys, "train", "--output-dir", out, "--resume", "--no-progress")
        assert code == 0, err
        assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_resume_works_from_another_directory_when_the_run_named_relative_paths(capsys, llama_dir, data_dir, tmp_path,
                                                                               monkeypatch):
    from deltatune.training import trainer as trainer_mod

    work = tmp_path / "work"
    work.mkdir()
    (work / "pc.jsonl").write_bytes((data_dir / "pc.jsonl").read_bytes())
    os.symlink(llama_dir, work / "llama")
    monkeypatch.chdir(work)
    original = trainer_mod.Trainer.train

    def stop_after_step_1(self, *a, **kw):
        self.on_step_end = lambda step: self.request_stop() if step == 1 else None
        return original(self, *a, **kw)

    monkeypatch.setattr(trainer_mod.Trainer, "train", stop_after_step_1)
    code, _, err = run(capsys, "train", "--model", "llama", "--data", "pc.jsonl", "--output-dir", "run",
                       "--max-steps", 3, "--save-steps", 1, *FAST)
    assert code == 130, err
    monkeypatch.setattr(trainer_mod.Trainer, "train", original)
    saved = json.loads((work / "run" / "run_config.json").read_text())
    assert saved["data"] == str(work / "pc.jsonl") and saved["model"] == str(work / "llama")
    assert saved["method"] == "lora"  # names that are not files stay names

    # The same flag, relative, is the same setting.
    code, _, err = run(capsys, "train", "--output-dir", "run", "--resume", "--data", "pc.jsonl", "--lr", "1")
    assert code == 2 and "--lr 1.0 differs" in one_error_line(err) and "--data" not in err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run(capsys, "train", "--output-dir", work / "run", "--resume", "--no-progress")
    assert code == 0, err
    assert json.loads((work / "run" / "summary.json").read_text())["steps"] == 3


def test_train_refuses_data_that_is_not_utf8_before_writing_anything(capsys, llama_dir, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data, "--output-dir", out, *FAST)
    line = one_error_line(err)
    assert code == 2 and f"{data}:2: byte 0xe9 is not UTF-8" in line, line
    assert not out.exists()
