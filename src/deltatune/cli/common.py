"""What every subcommand shares: the usage error, the names of a run's files, reading JSON, and printing.

The rest lives in modules named for what they do:
:mod:`~deltatune.cli.settings` (a run's settings and their layering), :mod:`~deltatune.cli.options` (flags from
config dataclasses), :mod:`~deltatune.cli.loading` (models, data, quantisation, devices, adapters) and
:mod:`~deltatune.cli.evaluation` (a task and its metric).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from deltatune.errors import DeltatuneError

BUILTIN_MODELS = ("smollm2-135m", "minilm-l6")
RUN_CONFIG_NAME = "run_config.json"
SUMMARY_NAME = "summary.json"


class UsageError(DeltatuneError, ValueError):
    """A command-line option or setting that cannot work."""

def read_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when there is no such file."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UsageError(f"{path} is not valid JSON ({reason}); re-save it") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} must hold a JSON object, found a {type(value).__name__}; re-save it")
    return value


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
