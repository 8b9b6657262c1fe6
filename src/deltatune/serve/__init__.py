"""``deltatune serve``: an OpenAI-compatible server for many adapters over one base model, with continuous
batching across adapters (see :mod:`deltatune.serve.engine`). Needs the ``serve`` extra (fastapi, uvicorn)."""

from deltatune.serve.adapters import AdapterRegistry, ServeError
from deltatune.serve.engine import Engine, Request, SamplingParams

__all__ = ["AdapterRegistry", "Engine", "Request", "SamplingParams", "ServeError", "build_server"]


def build_server(*args, **kwargs):
    from deltatune.cli.serve import build_server as build

    return build(*args, **kwargs)
