"""Run under ``torchrun --nproc-per-node 2`` by test_distributed.py (gloo, CPU).

Usage: worker.py LLAMA_DIR OUT_ROOT. Writes, under OUT_ROOT: ``ddp/``, ``fsdp/`` (finished runs and their
adapters), ``fsdp_killed/`` (a run stopped at step STOP_AT), resumes ``single_killed/`` (stopped by a
one-process run) with 2 ranks, checks DDP and ``fully_shard`` applied by hand, and writes
``writes_rank1.txt``: every file rank 1 opened for writing under OUT_ROOT.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

import common  # noqa: E402

from deltatune import distributed  # noqa: E402
from deltatune.training.trainer import Trainer, TrainingInterrupted  # noqa: E402


def main(llama_dir: str, root: str) -> None:
    if os.environ.get("DT_DEBUG_HANG"):  # debugging aid: print every stack after N seconds
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["DT_DEBUG_HANG"]), exit=True)
    info = distributed.init_from_env("cpu")
    assert info.world_size == common.WORLD and info.backend == "gloo", info
    writes: list[str] = []
    if not info.is_main:
        def audit(event, args):  # every open-for-write by rank 1 inside the test's directory
            if event == "open" and isinstance(args[0], str) and args[0].startswith(root):
                mode, flags = args[1], args[2]
                if (mode and any(c in mode for c in "wax+")) or \
                        (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                    writes.append(args[0])
            if event == "os.rename" and str(args[1]).startswith(root):
                writes.append(str(args[1]))
        sys.addaudithook(audit)
    data = common.examples(llama_dir)
    batch = common.GLOBAL_BATCH // info.world_size
    for parallel in ("ddp", "fsdp"):
        out = os.path.join(root, parallel)
        model = common.peft_model(llama_dir)
        trainer = Trainer(model, data, common.config(out, batch), pad_id=0, parallel=parallel)
        trainer.train()
        model.save_pretrained(out, is_main_process=info.is_main)  # FSDP: every rank gathers, rank 0 writes
        if parallel == "fsdp":
            assert all(distributed.is_dtensor(p) for p in model.parameters()), "fsdp did not shard"
    user_code_wrappers(llama_dir)
    # A run stopped at STOP_AT (what SIGTERM does), checkpoint written for a later resume elsewhere.
    out = os.path.join(root, "fsdp_killed")
    trainer = Trainer(common.peft_model(llama_dir), data, common.config(out, batch), pad_id=0, parallel="fsdp")
    trainer.config.save_steps = 100
    trainer.on_step_end = lambda step: trainer.request_stop() if step == common.STOP_AT else None
    try:
        trainer.train()
        raise AssertionError("the run was not interrupted")
    except TrainingInterrupted as exc:
        assert exc.step == common.STOP_AT
    # Resume, with 2 ranks and DDP, a run a single process stopped.
    out = os.path.join(root, "single_killed")
    model = common.peft_model(llama_dir)
    Trainer(model, data, common.config(out, batch), pad_id=0, parallel="ddp").train(resume=True)
    model.save_pretrained(out, is_main_process=info.is_main)
    distributed.barrier()
    if not info.is_main:
        with open(os.path.join(os.path.dirname(root), "writes_rank1.txt"), "w") as fh:
            fh.write("\n".join(writes))
    torch.distributed.destroy_process_group()


def user_code_wrappers(llama_dir: str) -> None:
    """DDP and a single root ``fully_shard`` unit (frozen base and trainable adapters mixed in one unit)
    applied by hand: gradients equal those of the unwrapped model on the same batch (all ranks get one batch)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 8, 11], [1, 6, 12, 30, 44, 9, 3, 2]])
    local = common.peft_model(llama_dir)
    local(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad for n, p in local.named_parameters() if p.requires_grad}
    for wrap in ("ddp", "fully_shard"):
        model = common.peft_model(llama_dir)
        wrapped = DistributedDataParallel(model) if wrap == "ddp" else fully_shard(model)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        got = {n: distributed.full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys() and len(got) == 28, wrap
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads, (wrap, frozen_grads)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=f"{wrap} {n}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
