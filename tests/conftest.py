"""Suite-wide settings: nothing may reach a model hub, and the ``slow`` marker is known.

The environment variables are set at import, before any test module imports ``transformers``
(which reads them once) or ``torch`` (which reads ``OMP_NUM_THREADS`` once).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets one thread, so N workers on N cores do not oversubscribe them
# (subprocesses the tests start inherit the setting).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model (seconds to a minute); still runs in CI")
