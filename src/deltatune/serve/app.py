"""The HTTP side of ``deltatune serve``: OpenAI's completions, chat completions and models routes (as vLLM and
LoRAX serve them: a request's ``model`` names the adapter), vLLM's runtime load/unload routes, health and metrics.

Every refusal is OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from deltatune.serve.adapters import AdapterRegistry, ServeError
from deltatune.serve.engine import BATCH_BUCKETS, Engine, Request, SamplingParams


@dataclass
class ServeSettings:
    base_name: str  # what `model` names for the base model alone
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    max_n: int = 16
    api_key: str | None = None
    allow_runtime_loading: bool = False


def _error(exc: ServeError):
    from fastapi.responses import JSONResponse

    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error"}.get(exc.status, "server_error")
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse({"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}},
                        status_code=exc.status, headers=headers)


def _number(body: dict, name: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        value = default
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise ServeError(f"{name} must be a number ({kind.__name__}), got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ServeError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return kind(value)


class Handlers:
    """Request parsing and response shaping, around one :class:`Engine`."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, settings: ServeSettings) -> None:
        self.engine = engine
        self.registry = registry
        self.settings = settings
        self.created = int(time.time())

    # ---- parsing ---------------------------------------------------------------------------------------------
    def adapter_of(self, body: dict) -> str | None:
        name = body.get("model")
        if name is None:
            raise ServeError("the request has no `model`: name an adapter, or the base model "
                             f"({self.settings.base_name})", param="model", code="missing_field")
        if not isinstance(name, str):
            raise ServeError(f"model must be a string, got {name!r}", param="model")
        if name == self.settings.base_name:
            return None
        if self.registry.get(name) is None:
            close = self.registry.close_names(name)
            hint = f"; close names: {', '.join(close)}" if close else ""
            served = [self.settings.base_name, *self.registry.names()]
            raise ServeError(f"the model {name!r} does not exist{hint} (served: {', '.join(served[:20])}"
                             f"{', ...' if len(served) > 20 else ''}; GET /v1/models lists them)", status=404,
                             code="model_not_found", param="model")
        return name

    def sampling(self, body: dict, prompt_len: int, default_max: int | None) -> tuple[SamplingParams, int]:
        limit = self.settings.max_tokens
        context = self.engine.context
        if context and prompt_len >= context:
            raise ServeError(f"the prompt is {prompt_len} tokens; this model's context is {context} tokens, so "
                             "there is no room to generate: shorten it", param="prompt", code="context_length_exceeded")
        room = (context - prompt_len) if context else limit
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        fallback = min(limit, room) if default_max is None else min(default_max, limit, room)
        max_tokens = _number(body, key, fallback, int, 1, None)
        if max_tokens > limit:
            raise ServeError(f"{key} {max_tokens} is above this server's limit of {limit} (--max-tokens)",
                             param=key, code="max_tokens_exceeded")
        if max_tokens > room:
            raise ServeError(f"the prompt ({prompt_len} tokens) plus {key} {max_tokens} exceeds this model's "
                             f"context of {context} tokens: ask for at most {room}", param=key,
                             code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, float, 0, 2)
        top_p = _number(body, "top_p", 1.0, float, 0, 1)
        if top_p <= 0:
            raise ServeError("top_p must be > 0", param="top_p")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ServeError(f"seed must be a non-negative integer, got {seed!r}", param="seed")
        n = _number(body, "n", 1, int, 1, self.settings.max_n)
        if n > 1 and temperature == 0:
            pass  # n identical greedy answers: allowed, as OpenAI does
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ServeError("stop must be a string or a list of up to 4 non-empty strings", param="stop")
        for name in ("logprobs", "echo", "best_of", "suffix", "tools", "logit_bias"):
            value = body.get(name)
            if value not in (None, False, 0, 1, [], {}) or (name == "best_of" and value not in (None, 1)):
                raise ServeError(f"{name} is not supported by deltatune serve", param=name, code="unsupported")
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise ServeError(f"{name} is not supported by deltatune serve (use 0)", param=name,
                                 code="unsupported")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=stops), n

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise ServeError("the request has no `prompt`", param="prompt", code="missing_field")
        if not isinstance(prompt, str):
            raise ServeError("prompt must be a string (one prompt per request)", param="prompt")
        if not prompt:
            raise ServeError("the prompt is empty", param="prompt")
        # As `deltatune generate --raw` tokenizes it (special tokens such as BOS as the tokenizer adds them).
        return list(self.engine.tokenizer(prompt)["input_ids"])

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if messages is None:
            raise ServeError("the request has no `messages`", param="messages", code="missing_field")
        if not isinstance(messages, list) or not messages:
            raise ServeError("messages must be a non-empty list of {role, content}", param="messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ServeError("every message needs a `role` and a `content`", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ServeError("only text content parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ServeError("every message needs a string `content`", param="messages")
            clean.append({"role": m["role"], "content": content})
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ServeError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        # As `deltatune generate --chat` does.
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- running -----------------------------------------------------------------------------------------------
    async def run(self, http_request: Any, body: dict, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        adapter = self.adapter_of(body)
        prompt_ids = self.chat_prompt(body) if chat else self.completion_prompt(body)
        params, n = self.sampling(body, len(prompt_ids), None if chat else 16)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ServeError("stream must be true or false", param="stream")
        # Not OpenAI's: the task of an adapter that routes by task (Poly), as `deltatune generate --task-id`; the
        # openai client sends it with extra_body={"task_id": k}. Left out: task 0.
        task_id = body.get("task_id")
        if task_id is not None:
            task_id = _number(body, "task_id", 0, int, 0, None)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request = Request(adapter=adapter, prompt_ids=prompt_ids, params=params, n=n, stream=stream, task_id=task_id,
                          emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        self.engine.submit(request)  # raises 429 when the queue is full
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        model = body["model"]
        created = int(time.time())
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            gen = self._stream(http_request, request, queue, rid, model, created, chat, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream")
        choices: dict[int, tuple[str, str, int]] = {}
        try:
            while len(choices) < n:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        request.cancelled = True
                        self.engine.wake()
                        self.engine.metrics.count_request("cancelled")
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "error":
                    raise event[1]
                if event[0] == "done":
                    choices[event[1]] = (event[3], event[2], event[4])
        except BaseException:
            request.cancelled = True
            self.engine.wake()
            raise
        self.engine.metrics.count_request("ok")
        out_tokens = sum(c[2] for c in choices.values())
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": out_tokens,
                 "total_tokens": len(prompt_ids) + out_tokens}
        if chat:
            items = [{"index": i, "message": {"role": "assistant", "content": choices[i][0]},
                      "finish_reason": choices[i][1], "logprobs": None} for i in range(n)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": items,
                    "usage": usage}
        items = [{"index": i, "text": choices[i][0], "finish_reason": choices[i][1], "logprobs": None}
                 for i in range(n)]
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": items,
                "usage": usage}

    async def _stream(self, http_request: Any, request: Request, queue: asyncio.Queue, rid: str, model: str,
                      created: int, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        finished = 0
        out_tokens = 0
        ok = False
        try:
            if chat:
                for i in range(request.n):
                    yield chunk(i, None, None, first=True)
            while finished < request.n:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        return
                    continue
                if event[0] == "delta":
                    yield chunk(event[1], event[2], None)
                elif event[0] == "done":
                    finished += 1
                    out_tokens += event[4]
                    yield chunk(event[1], None if chat else "", event[2])
                elif event[0] == "error":
                    exc: ServeError = event[1]
                    yield f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.code}})}\n\n"
                    return
            if include_usage:
                usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": out_tokens,
                         "total_tokens": len(request.prompt_ids) + out_tokens}
                payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                           "usage": usage}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
            ok = True
        finally:  # the client left (the generator is closed or cancelled): free the rows at the next step
            if not ok:
                request.cancelled = True
                self.engine.wake()
            self.engine.metrics.count_request("ok" if ok else "cancelled")

    # ---- the rest ----------------------------------------------------------------------------------------------
    def models(self) -> dict:
        base = {"id": self.settings.base_name, "object": "model", "created": self.created, "owned_by": "deltatune",
                "root": self.settings.base_name, "parent": None}
        items = [base] + [{"id": n, "object": "model", "created": self.created, "owned_by": "deltatune",
                           "root": n, "parent": self.settings.base_name} for n in self.registry.names()]
        return {"object": "list", "data": items}

    def metrics_text(self) -> str:
        m = self.engine.metrics
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP deltatune_{name} {help_}", f"# TYPE deltatune_{name} {kind}"])
            lines.extend(f"deltatune_{name}{labels} {value}" for labels, value in samples)

        with m.lock:
            requests = sorted(m.requests.items())
            metric("requests_total", "counter", "Finished requests by outcome.",
                   [(f'{{status="{k}"}}', v) for k, v in requests] or [('{status="ok"}', 0)])
            metric("prompt_tokens_total", "counter", "Prompt tokens admitted (times n).", [("", m.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
            metric("adapter_loads_total", "counter", "Adapters loaded.", [("", m.adapter_loads)])
            metric("adapter_evictions_total", "counter", "Adapters evicted (LRU or unload).",
                   [("", m.adapter_evictions)])
            cumulative, buckets = 0, []
            for bound, count in zip(BATCH_BUCKETS, m.batch_hist):
                cumulative += count
                buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
            buckets.append(('_bucket{le="+Inf"}', m.batch_count))
            lines.extend(["# HELP deltatune_batch_size Rows per forward pass.",
                          "# TYPE deltatune_batch_size histogram"])
            lines.extend(f"deltatune_batch_size{labels} {value}" for labels, value in buckets)
            lines += [f"deltatune_batch_size_sum {m.batch_sum}", f"deltatune_batch_size_count {m.batch_count}"]
        metric("running_rows", "gauge", "Rows in the running batch.", [("", self.engine.active_rows())])
        metric("queued_rows", "gauge", "Rows waiting to join.", [("", self.engine.queued_rows())])
        metric("adapters_loaded", "gauge", "Adapters in memory.", [("", len(self.engine.loaded))])
        return "\n".join(lines) + "\n"

    def load_adapter(self, body: dict) -> str:
        from deltatune.serve.adapters import check_name

        name = check_name(body.get("lora_name"))
        if name == self.settings.base_name:
            raise ServeError(f"{name!r} is the base model's name", param="lora_name")
        entry = self.registry.add(name, body.get("lora_path"))
        try:
            self.engine.load_now(entry)  # refused here, with the reason, rather than on first use
        except ServeError:
            self.registry.remove(name)
            self.engine.request_unload(name)
            raise
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict) -> str:
        from deltatune.serve.adapters import check_name

        name = check_name(body.get("lora_name"))
        self.registry.remove(name)  # new requests get 404 from now on
        self.engine.request_unload(name)  # rows in flight finish on it; then it is evicted
        return f"Success: LoRA adapter '{name}' removed successfully."


def create_app(engine: Engine, registry: AdapterRegistry, settings: ServeSettings):
    """The FastAPI app; starts the engine's thread on startup and stops it after the server drained."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse

    handlers = Handlers(engine, registry, settings)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.state.handlers = handlers

    def check_auth(request: HttpRequest) -> None:
        # Checked per route, not in a BaseHTTPMiddleware: that wraps `receive` and would hide client disconnects.
        if settings.api_key:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                raise ServeError("missing or wrong API key: send `Authorization: Bearer <key>`", status=401,
                                 code="invalid_api_key")

    async def body_of(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(f"the request body is not valid JSON ({getattr(exc, 'msg', 'not UTF-8')})",
                             code="invalid_json") from None
        if not isinstance(body, dict):
            raise ServeError("the request body must be a JSON object", code="invalid_json")
        return body

    def route(fn):
        async def wrapper(request: HttpRequest):
            try:
                check_auth(request)
                return await fn(request)
            except ServeError as exc:
                if exc.status >= 400 and request.url.path.endswith("completions"):
                    engine.metrics.count_request(f"error_{exc.status}")
                return _error(exc)
        wrapper.__name__ = fn.__name__
        # FastAPI reads the annotation to inject the request; under `from __future__ import annotations` it is
        # the string "HttpRequest", which FastAPI cannot resolve in this local scope.
        wrapper.__annotations__ = {"request": HttpRequest}
        return wrapper

    @app.post("/v1/completions")
    @route
    async def completions(request: HttpRequest):
        return await handlers.run(request, await body_of(request), chat=False)

    @app.post("/v1/chat/completions")
    @route
    async def chat_completions(request: HttpRequest):
        return await handlers.run(request, await body_of(request), chat=True)

    @app.get("/v1/models")
    @route
    async def models(_request: HttpRequest):
        return handlers.models()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    @route
    async def metrics(_request: HttpRequest):
        return PlainTextResponse(handlers.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/load_lora_adapter")
    @route
    async def load_lora_adapter(request: HttpRequest):
        if not settings.allow_runtime_loading:
            raise ServeError("runtime loading is off; start the server with --allow-runtime-loading", status=403,
                             code="runtime_loading_disabled")
        body = await body_of(request)
        return PlainTextResponse(await asyncio.to_thread(handlers.load_adapter, body))

    @app.post("/v1/unload_lora_adapter")
    @route
    async def unload_lora_adapter(request: HttpRequest):
        if not settings.allow_runtime_loading:
            raise ServeError("runtime loading is off; start the server with --allow-runtime-loading", status=403,
                             code="runtime_loading_disabled")
        return PlainTextResponse(handlers.unload_adapter(await body_of(request)))

    @app.exception_handler(404)
    async def not_found(_request, _exc):
        return JSONResponse({"error": {"message": "no such route", "type": "not_found_error", "param": None,
                                       "code": "not_found"}}, status_code=404)

    return app
