"""The ``deltatune`` command: train, eval, generate, merge, inspect, compare.

Every error a user can cause ends as one line, ``deltatune: error: ...``, and exit code 2; Ctrl-C during
training ends with a resumable checkpoint and exit code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from deltatune.errors import DeltatuneError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the CLI's rule) instead of usage text plus a line, and no
    abbreviated flags (``--rank`` must not silently mean ``--rank-pattern``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        from deltatune.cli.common import UsageError

        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from deltatune.cli import compare, evaluate, export, generate, inspect, merge, serve, train

    parser = _Parser(prog="deltatune", description="Parameter-efficient fine-tuning: train an adapter, measure it, "
                                                   "use it. `deltatune train` with no options runs the demo job.")
    from deltatune import __version__

    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (train, evaluate, generate, merge, export, inspect, compare, serve):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from deltatune.training.trainer import TrainingInterrupted

    try:
        parser = build_parser()
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if not getattr(args, "handler", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args.handler(args) or 0)
    except TrainingInterrupted as exc:
        out = os.path.dirname(exc.checkpoint)
        print(f"\ndeltatune: {exc.note}" if exc.note else  # after training: its own account of what is kept
              f"\ndeltatune: interrupted at step {exc.step}; checkpoint saved. Continue with: "
              f"deltatune train --output-dir {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ndeltatune: interrupted (before training started, nothing to resume from)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DeltatuneError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        print(f"deltatune: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE


__all__ = ["main", "build_parser", "EXIT_USAGE", "EXIT_INTERRUPTED"]
