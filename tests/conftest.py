"""Suite-wide settings: nothing may reach a model hub, and the ``slow`` marker is known.

The environment variables are set at import, before any test module imports ``transformers``
(which reads them once).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model (seconds to a minute); still runs in CI")
