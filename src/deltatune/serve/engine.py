"""Continuous batching over many adapters on one base model.

One scheduler thread owns the model. Between two decoding steps it drops rows that finished (or whose client left),
admits waiting requests (loading their adapter first, evicting the least recently used idle one when
``max_loaded`` adapters are already loaded), prefills the newcomers in one left-padded forward and merges their
key/value cache into the running batch's. A decoding step is then one forward for every running row, whatever its
adapter: the rows' adapters go to the model as ``adapter_names=[...]`` (deltatune's mixed-adapter batches).

Adapters of different methods cannot share layers (a LoRA layer is not re-wrapped by IA3), so each method gets a
*lane*: its own copy of the model's module tree that shares every weight tensor with the base (no extra weight
memory), with one forward per lane per step. Rows without an adapter ride in a lane already running, else in the
plain base model's lane.

The cache is transformers' ``DynamicCache`` per lane, rebuilt when rows join (left-padding the shorter side) and
sliced when they leave; positions come from the attention mask, as in ``generate`` with left padding. A lane whose
adapters route by task (Poly) also passes each row's ``task_ids``.

Which methods are served is the registry's word: prompt learning and methods with ``Hooks.serve_refusal`` are
refused at load (a 4xx naming why). An unexpected exception while loading an adapter refuses that adapter; one
while running a lane's prefill or decoding step fails only the rows it ran (and the lane's batch once they joined
it) with a 500: the other lanes and the waiting requests are served on.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.serve.adapters import AdapterEntry, AdapterRegistry, ServeError

BASE = "__base__"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Request:
    """One API request: ``n`` rows sharing a prompt, an adapter and sampling settings.

    ``emit(event)`` is called from the scheduler thread with ``("delta", index, text)``,
    ``("done", index, finish_reason, text, n_tokens)`` or ``("error", ServeError)``.
    """

    adapter: str | None  # served name; None: the base model
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    emit: Callable[[tuple], None]
    stream: bool = False
    task_id: int | None = None  # adapters that route by task (Poly): which task; None: task 0, as `generate`
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)


class Row:
    """One sequence being generated: a request's choice ``index``."""

    def __init__(self, request: Request, index: int, internal: str, eos: set[int]) -> None:
        self.request = request
        self.index = index
        self.internal = internal  # the adapter's name inside the lane's model, or BASE
        self.task_id = request.task_id or 0  # ignored by every adapter that does not route by task
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already emitted (streaming)
        self.eos = eos
        self.done = False
        seed = request.params.seed
        self.generator: torch.Generator | None = None
        if request.params.temperature > 0:
            self.generator = torch.Generator()
            # Choice i samples as `deltatune generate --seed <seed+i>` would (its one row).
            self.generator.manual_seed((seed if seed is not None else torch.seed() % 2**63) + index)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token of one row, as transformers' generate picks it (greedy; or temperature, then top-p, then
    multinomial on the row's generator)."""
    if params.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    scores = logits.float()[None] / params.temperature
    if params.top_p < 1.0:  # TopPLogitsWarper
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the original tensors."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Lane:
    """Rows of one method family, their model, and their key/value cache."""

    def __init__(self, key: str, model: nn.Module) -> None:
        self.key = key  # the method (peft_type), or "" for the plain base model
        self.model = model
        self.by_task = False  # its adapters route by task (Poly): every forward passes the rows' task_ids
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns); 4.x knows only the old one.
        forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.rows: list[Row] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cache: Any = None  # a DynamicCache holding ``kv``; None when ``kv`` changed outside a step
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 0 on left padding

    @property
    def is_peft(self) -> bool:
        return self.key != ""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any, rows: list[Row]) -> Any:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        kwargs: dict[str, Any] = {"adapter_names": [r.internal for r in rows]} if self.is_peft else {}
        if self.by_task:  # one task id per row, as `deltatune generate --task-id` passes its row's
            kwargs["task_ids"] = torch.tensor([r.task_id for r in rows], device=ids.device)
        kwargs[self.cache_arg] = cache
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)


def _internal(exc: Exception) -> ServeError:
    return ServeError(f"internal error while generating: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                      status=500, code="internal_error")


def _kv_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Metrics:
    """Counters and gauges for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.batch_hist = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.batch_count = 0

    def count_request(self, status: str) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def observe_batch(self, size: int) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(BATCH_BUCKETS) if size <= b), len(BATCH_BUCKETS))
            self.batch_hist[i] += 1
            self.batch_sum += size
            self.batch_count += 1


class Engine:
    """The scheduler: ``submit`` from any thread; one thread runs the model."""

    def __init__(self, model: nn.Module, tokenizer: Any, registry: AdapterRegistry, *, max_loaded: int = 8,
                 max_batch: int = 32, max_queue: int = 256, device: torch.device | str = "cpu") -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ServeError(f"deltatune serve batches models whose cache is full attention in every layer; this "
                             f"model's cache has {kinds} layers (sliding-window or recurrent)")
        self.base = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_loaded = max_loaded
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = torch.device(device)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.lanes: dict[str, Lane] = {"": Lane("", self.base)}
        self.loaded: OrderedDict[str, tuple[str, str]] = OrderedDict()  # served -> (lane key, internal name)
        self.tasks: dict[str, int] = {}  # served name -> its number of tasks (Poly), for those that route by task
        self.failed: dict[str, ServeError] = {}  # served name -> why it cannot load (until unloaded)
        self.waiting: deque[Request] = deque()
        self.unload_requests: set[str] = set()  # served names to evict as soon as no row uses them
        self.metrics = Metrics()
        self._names = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- any thread --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="deltatune-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise ServeError(f"the server has {len(self.waiting)} requests queued (--max-queue "
                                 f"{self.max_queue}); retry shortly", status=429, code="queue_full", retry_after=1)
            self.waiting.append(request)
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def running_rows(self) -> int:
        """Rows held by the running batches, finished ones included until the next step drops them."""
        return sum(len(lane.rows) for lane in self.lanes.values())

    def active_rows(self) -> int:
        """Rows still generating (what /metrics reports): a finished row answered its client already, even if it
        stays in its batch until the next step drops it."""
        return sum(1 for lane in list(self.lanes.values()) for r in list(lane.rows)
                   if not r.done and not r.request.cancelled)

    def queued_rows(self) -> int:
        with self._cv:
            return sum(r.n for r in self.waiting)

    def request_unload(self, name: str) -> None:
        with self._cv:
            self.unload_requests.add(name)
            self.failed.pop(name, None)
            self._cv.notify_all()

    def load_now(self, entry: AdapterEntry, timeout: float = 120.0) -> None:
        """Load ``entry`` on the scheduler thread (between steps) and wait; raises its ServeError if refused."""
        done = threading.Event()
        result: list[ServeError] = []

        def emit(event: tuple) -> None:
            if event[0] == "error":
                result.append(event[1])
            done.set()

        self.submit(Request(adapter=entry.name, prompt_ids=[], params=SamplingParams(max_tokens=0), n=0, emit=emit))
        if not done.wait(timeout):
            raise ServeError("loading the adapter timed out", status=503)
        if result:
            raise result[0]

    # ---- the scheduler thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running_rows() and not self.unload_requests:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self._process_unloads()
                self._drop_finished()
                joiners = self._admit()
            except Exception as exc:  # never leave clients hanging: fail what is running, keep serving
                self._fail_all(_internal(exc))
                continue
            with torch.no_grad():
                for lane in list(self.lanes.values()):
                    if lane.rows:
                        self._guarded(lane, list(lane.rows), self._decode, lane)
                    rows = [r[1] for r in joiners if r[0] is lane]
                    if rows:
                        self._guarded(lane, rows, self._prefill, lane, rows)

    def _guarded(self, lane: Lane, rows: list[Row], step: Callable[..., None], *args: Any) -> None:
        """Run one lane's ``step`` (a prefill of joining ``rows``, or a decoding step of the lane's rows). An
        exception fails ``rows`` with a 500 naming it, and the lane's whole batch too once ``rows`` are part of it
        (its cache may be half-written); the other lanes, and the requests still waiting, are served on."""
        try:
            step(*args)
        except Exception as exc:
            error = _internal(exc)
            batch = lane.rows if any(r in lane.rows for r in rows) else []
            for row in [*rows, *batch]:
                if not row.done:
                    row.done = True
                    row.request.emit(("error", error))
            if batch:
                lane.rows, lane.kv, lane.mask, lane.cache = [], None, None, None

    def _fail_all(self, error: ServeError) -> None:
        for lane in self.lanes.values():
            for row in lane.rows:
                if not row.done:
                    row.done = True
                    row.request.emit(("error", error))
            lane.rows, lane.kv, lane.mask, lane.cache = [], None, None, None

    def _in_use(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lane in self.lanes.values():
            for row in lane.rows:
                if row.request.adapter is not None:
                    counts[row.request.adapter] = counts.get(row.request.adapter, 0) + 1
        return counts

    def _process_unloads(self) -> None:
        with self._cv:
            pending = set(self.unload_requests)
        in_use = self._in_use()
        for name in pending:
            if in_use.get(name):
                continue  # rows still run on it: evict once they finish
            self._evict(name)
            with self._cv:
                self.unload_requests.discard(name)

    def _evict(self, name: str) -> None:
        if name not in self.loaded:
            return
        key, internal = self.loaded.pop(name)
        self.tasks.pop(name, None)
        self.lanes[key].model.delete_adapter(internal)
        with self.metrics.lock:
            self.metrics.adapter_evictions += 1

    def _ensure_loaded(self, name: str, in_use: dict[str, int]) -> bool | ServeError:
        """True when ``name`` is loaded (loading it now if a slot is free or can be freed); False: wait."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return True
        if name in self.failed:
            return self.failed[name]
        entry = self.registry.get(name)
        if entry is None:
            return ServeError(f"the adapter {name!r} is no longer served", status=404, code="model_not_found")
        if len(self.loaded) >= self.max_loaded:
            idle = [n for n in self.loaded if not in_use.get(n)]  # least recently used first
            if not idle:
                return False
            self._evict(idle[0])
        try:
            self._load(entry)
        except ServeError as exc:
            self.failed[name] = exc
            return exc
        return True

    def _load(self, entry: AdapterEntry) -> None:
        from deltatune import PeftConfig, PeftModel
        from deltatune.cli.loading import check_adapter_dir, check_adapter_weights
        from deltatune.errors import DeltatuneError

        where = f"adapter {entry.name!r}"
        try:
            check_adapter_dir(entry.path, flag=None)
            check_adapter_weights(entry.path)
            config = PeftConfig.from_pretrained(entry.path)
        except DeltatuneError as exc:
            raise ServeError(f"{where} cannot be loaded: {exc}", code="adapter_load_failed") from None
        if config.is_prompt_learning:
            raise ServeError(f"{where} is {config.peft_type} (prompt learning): it adds virtual tokens rather than "
                             "changing weights, and deltatune serve does not batch those yet; use `deltatune "
                             "generate --adapter` for it", code="adapter_not_servable")
        from deltatune.registry import method_for, task_count

        method = method_for(config.peft_type)
        refusal = method.hooks.serve_refusal(config) if method.hooks.serve_refusal else ""
        if refusal:  # the registry knows which adapters cannot share a batch, and why
            raise ServeError(f"{where} is {config.peft_type}: {refusal}", code="adapter_not_servable")
        rewrites_base = method.hooks.rewrites_base_on_load  # LoRA: PiSSA, OLoRA, LoftQ...
        if rewrites_base is not None and rewrites_base(config):
            raise ServeError(f"{where} was initialised with init_lora_weights={config.init_lora_weights!r} and saved "
                             "as created, so it works on its own rewritten base weights only (loading it would "
                             "rewrite the base every other adapter shares); save it with "
                             "path_initial_model_for_weight_conversion (a plain LoRA for the original base) to serve "
                             "it", code="adapter_not_servable")
        if getattr(config, "modules_to_save", None):
            raise ServeError(f"{where} trains whole modules ({config.modules_to_save}, modules_to_save), which "
                             "mixed-adapter batches do not support yet", code="adapter_not_servable")
        key = str(config.peft_type)
        internal = f"a{next(self._names)}"
        lane = self.lanes.get(key)
        try:
            if lane is None:
                model = PeftModel.from_pretrained(share_weights_copy(self.base), entry.path, adapter_name=internal)
                lane = self.lanes[key] = Lane(key, model.eval())
            else:
                lane.model.load_adapter(entry.path, internal)
                lane.model.eval()
        except DeltatuneError as exc:
            self._discard(lane, internal)
            raise ServeError(f"{where} does not fit the base model: {' '.join(str(exc).split())}",
                             code="adapter_load_failed") from None
        except Exception as exc:  # a bug, not the adapter's fault: refuse this adapter, keep serving the others
            self._discard(lane, internal)
            raise ServeError(f"{where} could not be loaded: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                             status=500, code="adapter_load_failed") from None
        self.loaded[entry.name] = (key, internal)
        tasks = task_count([config])
        if tasks:
            self.tasks[entry.name] = tasks
            lane.by_task = True
        with self.metrics.lock:
            self.metrics.adapter_loads += 1

    @staticmethod
    def _discard(lane: Lane | None, internal: str) -> None:
        """Remove what a failed load left of adapter ``internal`` in an existing lane (nothing if it got no
        further than its config)."""
        if lane is not None and internal in getattr(lane.model, "peft_config", {}):
            with contextlib.suppress(Exception):
                lane.model.delete_adapter(internal)

    def _admit(self) -> list[tuple[Lane, Row]]:
        joiners: list[tuple[Lane, Row]] = []
        room = self.max_batch - self.running_rows()
        in_use = self._in_use()
        with self._cv:
            queue = list(self.waiting)
        taken: list[Request] = []
        for request in queue:
            if request.cancelled:
                taken.append(request)
                continue
            if request.n > room:
                if request.n > self.max_batch:  # would never fit; run it alone when the batch is empty
                    if self.running_rows() or joiners:
                        continue
                else:
                    continue
            lane_key, internal = "", BASE
            if request.adapter is not None:
                state = self._ensure_loaded(request.adapter, in_use)
                if state is False:
                    continue  # every loaded adapter is busy: wait for a slot
                if isinstance(state, ServeError):
                    taken.append(request)
                    request.emit(("error", state))
                    continue
                refusal = self._task_refusal(request)
                if refusal is not None:
                    taken.append(request)
                    request.emit(("error", refusal))
                    continue
                lane_key, internal = self.loaded[request.adapter]
                in_use[request.adapter] = in_use.get(request.adapter, 0) + request.n
            elif request.task_id is not None:
                taken.append(request)
                request.emit(("error", ServeError("task_id is for adapters that route by task (Poly); the base "
                                                  "model has no tasks", param="task_id")))
                continue
            else:  # no adapter: join the busiest lane (one forward fewer per step), else the plain base
                busiest = max(self.lanes.values(), key=lambda ln: len(ln.rows))
                lane_key = busiest.key if busiest.rows else ""
            taken.append(request)
            if request.n == 0:  # load_now: loading was the whole job
                request.emit(("loaded",))
                continue
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(request.prompt_ids) * request.n
            lane = self.lanes[lane_key]
            joiners += [(lane, Row(request, i, internal, self.eos)) for i in range(request.n)]
            room -= request.n
        with self._cv:
            for request in taken:
                with contextlib.suppress(ValueError):  # already gone
                    self.waiting.remove(request)
        return joiners

    def _task_refusal(self, request: Request) -> ServeError | None:
        """Why ``request``'s ``task_id`` does not fit its (loaded) adapter, as `deltatune generate --task-id`
        refuses it; ``None``: it fits (no ``task_id`` means task 0)."""
        tasks = self.tasks.get(request.adapter or "", 0)
        if request.task_id is None or (request.task_id < tasks):
            return None
        if not tasks:
            return ServeError(f"task_id is for adapters that route by task (Poly); the adapter {request.adapter!r} "
                              "has no tasks: leave task_id out", param="task_id")
        return ServeError(f"task_id {request.task_id} is out of range: the adapter {request.adapter!r} has {tasks} "
                          f"tasks (0 to {tasks - 1})", param="task_id")

    def _prefill(self, lane: Lane, rows: list[Row]) -> None:
        from transformers import DynamicCache

        length = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            p = row.request.prompt_ids
            ids[i, length - len(p):] = torch.tensor(p)
            mask[i, length - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        out = lane.forward(ids, mask, cache, rows)
        self.metrics.observe_batch(len(rows))
        kv = _kv_of(cache)
        lane.cache = None
        if lane.kv is None or not lane.rows:
            lane.kv, lane.mask, lane.rows, lane.cache = kv, mask, list(rows), cache
        else:  # merge: left-pad the shorter cache, then stack the rows
            total = max(lane.mask.shape[1], mask.shape[1])
            lane.kv = [(torch.cat([_left_pad(k0, total, 2), _left_pad(k1, total, 2)]),
                        torch.cat([_left_pad(v0, total, 2), _left_pad(v1, total, 2)]))
                       for (k0, v0), (k1, v1) in zip(lane.kv, kv)]
            lane.mask = torch.cat([_left_pad(lane.mask, total, 1), _left_pad(mask, total, 1)])
            lane.rows = lane.rows + list(rows)
        self._take(rows, out.logits[:, -1, :])

    def _decode(self, lane: Lane) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([[r.tokens[-1]] for r in lane.rows], device=self.device)
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones((len(lane.rows), 1))], dim=1)
        if lane.cache is None:  # rebuilt after rows joined or left; otherwise the step appends to it in place
            lane.cache = DynamicCache(ddp_cache_data=lane.kv)
        out = lane.forward(ids, lane.mask, lane.cache, lane.rows)
        self.metrics.observe_batch(len(lane.rows))
        lane.kv = _kv_of(lane.cache)
        self._take(lane.rows, out.logits[:, -1, :])

    def _take(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, emit its new text, and mark rows that finished."""
        for i, row in enumerate(rows):
            if row.done:
                continue
            params = row.request.params
            token = sample(logits[i], params, row.generator)
            row.tokens.append(token)
            with self.metrics.lock:
                self.metrics.generation_tokens += 1
            finish = None
            if token in self.eos:
                finish = "stop"
            elif len(row.tokens) >= params.max_tokens or (
                    self.context and len(row.request.prompt_ids) + len(row.tokens) >= self.context):
                finish = "length"
            text_tokens = row.tokens[:-1] if token in self.eos else row.tokens
            text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
            for stop in params.stop:
                at = text.find(stop)
                if at != -1:
                    text, finish = text[:at], "stop"
            if finish is not None:
                row.done = True
                if row.request.stream and len(text) > row.sent:
                    row.request.emit(("delta", row.index, text[row.sent:]))
                row.request.emit(("done", row.index, finish, text, len(row.tokens)))
                continue
            if row.request.stream:
                safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character: wait for the rest
                for stop in params.stop:  # hold back what may be the start of a stop string
                    for k in range(min(len(stop) - 1, safe), 0, -1):
                        if text[:safe].endswith(stop[:k]):
                            safe -= k
                            break
                if safe > row.sent:
                    row.request.emit(("delta", row.index, text[row.sent:safe]))
                    row.sent = safe

    def _drop_finished(self) -> None:
        """Remove finished or abandoned rows from their lane's batch, cache and mask (their slots free up)."""
        for lane in self.lanes.values():
            keep = [i for i, r in enumerate(lane.rows) if not r.done and not r.request.cancelled]
            if len(keep) == len(lane.rows):
                continue
            if not keep:
                lane.rows, lane.kv, lane.mask, lane.cache = [], None, None, None
                continue
            index = torch.tensor(keep, device=lane.mask.device)
            lane.rows = [lane.rows[i] for i in keep]
            mask = lane.mask.index_select(0, index)
            start = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every remaining row
            lane.mask = mask[:, start:]
            lane.kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                       for k, v in lane.kv]
            lane.cache = None
