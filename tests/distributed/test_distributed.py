"""Two gloo processes (torchrun) train what one process trains; files are world-size free.

One torchrun launch (see worker.py) runs DDP and FSDP trainings, a stopped FSDP run and a resume
of a one-process run; this test compares everything with one-process runs on the same global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deltatune.training.trainer import CheckpointError, Trainer, TrainingInterrupted
from tests.distributed import common

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")


def torchrun(args: list[str], cwd: str, timeout: float = 400, launcher: tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as sock:  # a free port (torchrun's --master-port 0 hangs with the static rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(common.WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(port), *launcher, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_close_adapters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 28  # 7 projections x 2 layers x (lora_A, lora_B)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process references, then the torchrun worker. Returns the directory holding all runs."""
    base = tmp_path_factory.mktemp("dist")
    llama_dir = common.tinymodels.make_llama(str(base / "llama"))
    root = base / "runs"
    data = common.examples(llama_dir)
    # Reference: one process, the whole global batch per micro-batch.
    ref = common.peft_model(llama_dir)
    Trainer(ref, data, common.config(str(root / "single"), common.GLOBAL_BATCH), pad_id=0).train()
    ref.save_pretrained(str(root / "single"))
    # A one-process run stopped at STOP_AT, for the 2-rank resume.
    stopped = Trainer(common.peft_model(llama_dir), data, common.config(str(root / "single_killed"),
                                                                         common.GLOBAL_BATCH), pad_id=0)
    stopped.on_step_end = lambda step: stopped.request_stop() if step == common.STOP_AT else None
    with pytest.raises(TrainingInterrupted):
        stopped.train()
    proc = torchrun([os.path.join(HERE, "worker.py"), llama_dir, str(root)], cwd=str(base))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "llama": llama_dir, "data": data, "base": base}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_the_adapter_one_process_trains(runs, parallel):
    got = adapter(runs["root"] / parallel)
    want = adapter(runs["root"] / "single")
    assert_close_adapters(got, want)
    # Not trivially equal: training moved the adapter away from its init (lora_B starts at zero).
    assert all(float(v.abs().max()) > 1e-4 for k, v in got.items() if "lora_B" in k)
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in (runs["root"] / parallel / "metrics.jsonl").read_text().splitlines()]
    ref = [float(line.split('"loss": ')[1].split(",")[0])
           for line in (runs["root"] / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses == pytest.approx(ref, rel=1e-4)


def test_rank0_alone_writes_files(runs):
    assert (runs["base"] / "writes_rank1.txt").read_text() == ""
    for parallel in ("ddp", "fsdp"):
        files = sorted(os.listdir(runs["root"] / parallel))
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"], files


def test_fsdp_adapter_loads_in_a_fresh_process_in_deltatune_and_peft(runs):
    """The file holds full tensors (not one rank's shard): both libraries load it and agree on logits."""
    import peft
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    state = adapter(runs["root"] / "fsdp")
    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 64)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["llama"]), str(runs["root"] / "fsdp"))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["llama"]),
                                            str(runs["root"] / "fsdp"))
    base = AutoModelForCausalLM.from_pretrained(runs["llama"])
    with torch.no_grad():
        a, b, c = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4  # the adapter is not a no-op


def test_fsdp_checkpoint_resumes_in_one_process(runs):
    """Stopped with 2 FSDP ranks (batch 2 each), resumed by one process with batch 4: the uninterrupted result."""
    out = str(runs["root"] / "fsdp_killed")
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert state["step"] == common.STOP_AT and state["world_size"] == 2
    assert all(not hasattr(v, "device_mesh") for v in state["trainable"].values())
    wrong = Trainer(common.peft_model(runs["llama"]), runs["data"], common.config(out, 2), pad_id=0)
    with pytest.raises(CheckpointError, match="global_batch_size 4 -> 2"):
        wrong.train(resume=True)
    model = common.peft_model(runs["llama"])
    Trainer(model, runs["data"], common.config(out, common.GLOBAL_BATCH), pad_id=0).train(resume=True)
    model.save_pretrained(out)
    assert_close_adapters(adapter(out), adapter(runs["root"] / "single"))


def test_one_process_checkpoint_resumes_with_two_ranks(runs):
    assert_close_adapters(adapter(runs["root"] / "single_killed"), adapter(runs["root"] / "single"))
