"""``torchrun -m deltatune train --fsdp`` resumes a one-process run's checkpoint with 2 ranks and ends where an
uninterrupted one-process run ends; and no train flag is taken by torchrun's own parser."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from tests.distributed import common
from tests.distributed.test_distributed import torchrun


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_torchrun_fsdp_resumes_a_one_process_run(tmp_path, monkeypatch, capsys):
    from deltatune.training import trainer as trainer_mod

    llama = common.tinymodels.make_llama(str(tmp_path / "llama"))
    data = common.tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), common.tinymodels.prompt_records(24))
    args = ["train", "--model", llama, "--data", data, "--max-steps", "4", "--grad-accum", "2", "--lr", "1e-2",
            "--target-modules", "all-linear", "--save-steps", "2", "--no-eval-before", "--forgetting-tokens", "0",
            "--eval-samples", "4", "--precision", "fp32", "--no-progress", "--eval-batch-size", "4", "--device", "cpu"]
    ref = tmp_path / "ref"
    assert main([*args, "--adapter-rank", "4", "--batch-size", "4", "--output-dir", str(ref)]) == 0
    original = trainer_mod.Trainer.train

    def train_with_ctrl_c(self, *a, **kw):  # Ctrl-C after step 2
        self.on_step_end = lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
        return original(self, *a, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_mod.Trainer, "train", train_with_ctrl_c)
    assert main([*args, "--r", "4", "--batch-size", "4", "--output-dir", str(out)]) == 130
    monkeypatch.setattr(trainer_mod.Trainer, "train", original)
    capsys.readouterr()
    # Two ranks, FSDP, 2 examples each: the same global batch of 4. --adapter-rank is --r (torchrun eats `--r`).
    proc = torchrun(["-m", "deltatune", "train", "--output-dir", str(out), "--resume", "--fsdp", "--batch-size", "2",
                     "--adapter-rank", "4", "--no-progress"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("deltatune train: lora") == 1  # rank 0 alone prints
    assert "2 processes (fsdp, gloo)" in proc.stdout
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # checkpoint removed, summary written once
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    losses = lambda d: [r["loss"] for r in _metrics(d) if "loss" in r and "split" not in r]  # noqa: E731
    assert losses(out) == pytest.approx(losses(ref), rel=1e-4) and len(losses(out)) == 4


def test_no_train_flag_is_swallowed_by_torchruns_parser():
    """torchrun parses every ``--x`` on its command line, abbreviations included, even after the module:
    `--r 8` is taken as `--rdzv-*`/`--role`. Every other train flag is safe; `--adapter-rank` replaces `--r`."""
    from torch.distributed.run import get_args_parser

    from deltatune.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = [s for a in train._actions for s in a.option_strings if s.startswith("--")]
    assert "--adapter-rank" in flags
    theirs = get_args_parser()
    taken = []
    for flag in flags:
        try:
            ns = theirs.parse_args(["-m", "deltatune", "train", flag, "1"])
        except SystemExit:
            taken.append(flag)
            continue
        if ns.training_script_args != ["train", flag, "1"]:
            taken.append(flag)
    assert taken == ["--r"]
