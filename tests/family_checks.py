"""Old import path of :mod:`support.family_checks`, kept for tests written before ``tests/support``; new tests
import from ``support``."""

from support.family_checks import ATOL, check_model_contract, check_two_adapters, weights_of  # noqa: F401
