"""``torchrun -m deltatune train --fsdp`` killed mid-run resumes in one process and ends where an uninterrupted
one-process run ends; and no train flag is taken by torchrun's own parser."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from tests.distributed import common
from tests.distributed.test_distributed import HERE, torchrun


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_killed_torchrun_fsdp_run_resumes_in_one_process(tmp_path, capsys):
    """SIGTERM to torchrun mid-run (2 FSDP ranks, 2 examples each): one checkpoint; ``--resume`` in one process
    with ``--batch-size 4`` (the same global batch) ends where an uninterrupted one-process run ends."""
    llama = common.tinymodels.make_llama(str(tmp_path / "llama"))
    data = common.tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), common.tinymodels.prompt_records(24))
    args = ["train", "--model", llama, "--data", data, "--max-steps", "12", "--grad-accum", "2", "--lr", "1e-2",
            "--target-modules", "all-linear", "--save-steps", "100", "--no-eval-before", "--forgetting-tokens", "0",
            "--eval-samples", "4", "--precision", "fp32", "--no-progress", "--eval-batch-size", "4", "--device", "cpu",
            "--adapter-rank", "4"]  # --adapter-rank is --r, which torchrun would take for one of its own flags
    ref = tmp_path / "ref"
    assert main([*args, "--batch-size", "4", "--output-dir", str(ref)]) == 0
    out = tmp_path / "run"
    proc = torchrun([os.path.join(HERE, "kill_launcher.py"), *args, "--fsdp", "--batch-size", "2",
                     "--output-dir", str(out)], cwd=str(tmp_path),
                    launcher=("--shutdown-timeout", "300"))  # torchrun's default 30 s, then SIGKILL: too short here
    assert proc.returncode != 0  # torchrun reports the signal it got
    assert proc.stdout.count("deltatune train: lora") == 1, proc.stdout  # rank 0 alone prints
    assert "2 processes (fsdp, gloo)" in proc.stdout
    assert "checkpoint.pt" in os.listdir(out) and "adapter_model.safetensors" not in os.listdir(out), \
        proc.stdout[-2000:] + proc.stderr[-4000:]
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert state["step"] in (2, 3) and state["world_size"] == 2
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--batch-size", "4", "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # checkpoint removed, summary written
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    losses = lambda d: [r["loss"] for r in _metrics(d) if "loss" in r and "split" not in r]  # noqa: E731
    assert losses(out) == pytest.approx(losses(ref), rel=1e-4) and len(losses(out)) == 12


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
