"""Old import path of :mod:`support.family_checks`, kept for tests written before ``tests/support``; new tests
import from ``support.family_checks``."""

from support.family_checks import *  # noqa: F401,F403
