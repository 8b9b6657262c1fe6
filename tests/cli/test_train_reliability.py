"""``deltatune train`` is safe by default: resume runs no code, bad states end in one line, output stays valid."""

import os
import pathlib

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
