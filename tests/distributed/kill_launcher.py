"""``deltatune train`` under torchrun whose rank 0 sends SIGTERM to the torchrun launcher after step 2.

torchrun forwards the signal to every rank, as it does when a job scheduler kills the job; the ranks agree
on a stopping point, write one checkpoint and exit. Run by test_cli_torchrun.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from deltatune.cli import main
from deltatune.training import trainer as trainer_mod

_train = trainer_mod.Trainer.train


def _train_then_kill(self, *args, **kwargs):
    def kill_launcher(step: int) -> None:
        if step != 2:
            return
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 120
        while not self._stop_requested and time.monotonic() < deadline:  # until torchrun's SIGTERM reaches us,
            time.sleep(0.01)  # or a fast run would finish first (the other rank waits in the next collective)

    if self.dist.is_main:
        self.on_step_end = kill_launcher
    return _train(self, *args, **kwargs)


if __name__ == "__main__":
    trainer_mod.Trainer.train = _train_then_kill
    sys.exit(main(sys.argv[1:]))
