"""``deltatune serve``: serve a base model and every adapter under ``--adapters`` roots over an OpenAI-compatible
HTTP API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``), batching requests to different adapters
together."""

from __future__ import annotations

import argparse
import os

from deltatune.cli import common, loading
from deltatune.cli import options as options_mod
from deltatune.cli import settings as settings_mod
from deltatune.cli.common import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model and its adapters over an OpenAI-compatible API",
                              description="Serve --model and every adapter under the --adapters roots (each "
                                          "sub-folder is one adapter, named by its folder); a request's `model` "
                                          "names the adapter, or the base model's name for none.")
    p.add_argument("--model", default=None, help="base model: a built-in name or a directory (default smollm2-135m)")
    p.add_argument("--adapters", action="append", default=[], metavar="DIR",
                   help="a directory of adapter folders (or one adapter directory); repeat for more roots")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--quantize", choices=[*options_mod.QUANTIZE_CHOICES, "none"], default=None,
                   help="hold the base in nf4/fp4/int8 via bitsandbytes (default: none)")
    p.add_argument("--max-loaded", type=int, default=8, help="adapters kept in memory at once (LRU; default 8)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together at most (default 32)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting to join the batch before new ones get 429 (default 256)")
    p.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    p.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"),
                   help="require `Authorization: Bearer <key>` (default: $DELTATUNE_API_KEY, else none)")
    p.add_argument("--allow-runtime-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths under the roots only)")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=main)


def build_server(model: str | None, adapters: list[str], *, quantize: str | None = None, max_loaded: int = 8,
                 max_batch: int = 32, max_queue: int = 256, max_tokens: int = 512, api_key: str | None = None,
                 allow_runtime_loading: bool = False, device: str = "auto"):
    """``(app, engine, registry)``: the FastAPI app over a loaded base model; the engine starts with the app."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("deltatune serve needs fastapi and uvicorn: pip install 'deltatune[serve]'") from None
    from deltatune.serve.adapters import AdapterRegistry, ServeError
    from deltatune.serve.app import ServeSettings, create_app
    from deltatune.serve.engine import Engine

    for flag, value in (("--max-loaded", max_loaded), ("--max-batch", max_batch), ("--max-queue", max_queue),
                        ("--max-tokens", max_tokens)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; pass a key or leave the option out")
    try:
        registry = AdapterRegistry(adapters)
    except ServeError as exc:
        raise UsageError(str(exc)) from None
    for line in registry.skipped:
        common.err(f"note: not an adapter, skipped: {line}")
    name = model or settings_mod.DEFAULTS["model"]
    spec = loading.resolve_model(name)
    if spec.kind != "causal":
        raise UsageError(f"--model {name} is an encoder with a classification head; it cannot generate text")
    torch_device = loading.pick_device(device)
    base, tokenizer = loading.load_model(spec, device=torch_device)
    base = loading.quantize_base(base, quantize if quantize != "none" else None)
    try:
        engine = Engine(base, tokenizer, registry, max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue,
                        device=torch_device)
    except ServeError as exc:
        raise UsageError(f"--model {name}: {exc}") from None
    base_name = name if name in common.BUILTIN_MODELS else os.path.basename(os.path.normpath(name))
    settings = ServeSettings(base_name=base_name, max_tokens=max_tokens, api_key=api_key,
                             allow_runtime_loading=allow_runtime_loading)
    return create_app(engine, registry, settings), engine, registry


def main(args: argparse.Namespace) -> int:
    import uvicorn

    if not args.adapters:
        common.err("note: no --adapters given: serving the base model alone")
    app, _engine, registry = build_server(
        args.model, args.adapters, quantize=args.quantize, max_loaded=args.max_loaded, max_batch=args.max_batch,
        max_queue=args.max_queue, max_tokens=args.max_tokens, api_key=args.api_key,
        allow_runtime_loading=args.allow_runtime_loading, device=args.device)
    common.err(f"deltatune serve: {len(registry.names())} adapters ({', '.join(registry.names()[:8])}"
               f"{', ...' if len(registry.names()) > 8 else ''}) on http://{args.host}:{args.port}/v1")
    # uvicorn handles SIGTERM/SIGINT: it stops accepting connections, waits for requests in flight (streams
    # included) to finish, then runs the app's shutdown, which stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
