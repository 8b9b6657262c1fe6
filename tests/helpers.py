"""Old import path of :mod:`support.models` (``from helpers import tiny_llama``), kept for tests written
before ``tests/support``; new tests import from ``support.models``."""

from support.models import *  # noqa: F401,F403
