"""Suite-wide settings and fixtures: nothing may reach a model hub, the ``slow`` marker is known, and the
real SmolLM2-135M / BBC News fixtures (``smollm2``, ``bbc``; skipped where not installed) are shared.

Shared test code lives in the package ``tests/support`` (``from support.models import tiny_llama``): pyproject's
``pythonpath = ["tests"]`` puts ``tests/`` on ``sys.path``, so no folder needs a conftest.py of its own for it.

The environment variables are set at import, before any test module imports ``transformers``
(which reads them once) or ``torch`` (which reads ``OMP_NUM_THREADS`` once).
"""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets one thread, so N workers on N cores do not oversubscribe them
# (subprocesses the tests start inherit the setting).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _import_pandas_past_the_bottleneck_tests() -> None:
    """pandas (trl's ``datasets``, which ``transformers.Trainer`` imports when installed) imports the optional
    package ``bottleneck`` if it can, and with ``pythonpath = ["tests"]`` that name is ``tests/bottleneck``, which
    has no version: pandas' import then fails. Import it once with the tests directory out of the path."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (here, os.getcwd())]
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass  # not installed: nothing imports it then
    finally:
        sys.path[:] = saved


_import_pandas_past_the_bottleneck_tests()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model (seconds to a minute); still runs in CI")


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M, shared by a module's tests (restore what you change)."""
    from support.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def bbc():
    """BBC News ``(train, validation)``, each shuffled by a fixed seed."""
    from support.smollm2 import load_bbc

    return load_bbc()
