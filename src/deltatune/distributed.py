"""Data-parallel training over processes: DDP, FSDP2 (``fully_shard``), and world-size-free checkpoints.

A run launched by ``torchrun --nproc-per-node N`` has ``N`` ranks. Each holds the model (DDP) or a
``1/N`` shard of every parameter (FSDP), computes the loss of its own slice of the global batch,
and the gradients are averaged across ranks. With a loss normalised by the token count of the
whole global batch (scaled by ``N`` to undo the averaging), the update is the one a single process
computes on that global batch.

Everything that leaves the run is world-size free: the adapter file and the checkpoint hold full
(unsharded) tensors keyed by parameter name, so a run saved with ``N`` ranks resumes with ``M``
ranks or in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deltatune.errors import DeltatuneError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...).

    NCCL when CUDA is used, gloo on CPU. Without those variables (a plain ``python`` run) nothing
    happens and a single-process :class:`DistInfo` comes back. Idempotent.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``; ``None`` picks CUDA when available.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if not launched_distributed():
        return DistInfo()
    if not dist.is_available():
        raise DeltatuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DeltatuneError(f"WORLD_SIZE is set but {key} is not; launch with `torchrun --nproc-per-node N "
                                 "-m deltatune ...` (it sets all of them)")
    use_cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return info()


def info() -> DistInfo:
    """This process's :class:`DistInfo` (single-process when no group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=dist.get_backend())


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return info().is_main


def barrier() -> None:
    if info().world_size > 1:
        dist.barrier()


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:<LOCAL_RANK>`` in a distributed run (one GPU per process)."""
    if device.type == "cuda" and device.index is None and info().world_size > 1:
        return torch.device("cuda", info().local_rank)
    return device


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few floats over ranks (identity in a single process)."""
    if info().world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- wrapping --------------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """``DistributedDataParallel`` around an adapted model: only trainable (adapter) gradients are all-reduced.

    DDP skips parameters with ``requires_grad=False`` when it builds its buckets, so the frozen base
    costs nothing in communication. ``find_unused_parameters=False``: every adapter takes part in
    every forward pass.
    """
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def fsdp_unit_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: the transformers model's ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def wrap_fsdp(model: nn.Module, unit_classes: Iterable[str] | None = None, mesh: Any = None,
              reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each decoder block, then on the root.

    Each block is one communication unit (its parameters are all-gathered for its forward and
    backward, then freed), the root unit holds the rest (embeddings, head). A unit holds the frozen
    base weights and the trainable adapter weights of its block together: FSDP2 keeps per-parameter
    ``DTensor`` shards, so frozen and trainable parameters may share a unit; only the trainable ones get
    gradients reduce-scattered. Wraps in place (parameter names do not change) and returns ``model``.

    All parameters of one unit must have one dtype (FSDP2 all-gathers them in one buffer): keep the
    adapter in the base's dtype, or pass a ``MixedPrecisionPolicy`` through your own ``fully_shard`` calls.

    Args:
        unit_classes: Class names to shard individually; default :func:`fsdp_unit_classes`.
        mesh: A ``DeviceMesh``; default all ranks on this process's device type.
    """
    from torch.distributed.fsdp import fully_shard

    from deltatune.quantization import is_quantized_layer

    quantized = next((n for n, m in model.named_modules() if is_quantized_layer(m)), None)
    if quantized is not None:
        # A shard of a packed 4-/8-bit weight is not a weight: bitsandbytes keeps the block scales beside the
        # tensor (quant_state), which FSDP neither shards nor gathers, so the forward fails.
        raise DeltatuneError(f"FSDP cannot shard a bitsandbytes-quantised base ({quantized} is quantised); "
                             "train it data-parallel instead (drop --fsdp: DDP replicates the already small "
                             "quantised base), or shard a full-precision base")
    if info().world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        raise DeltatuneError("wrap_fsdp needs an initialised process group; launch with torchrun "
                             "(deltatune.distributed.init_from_env() joins it)")
    classes = set(unit_classes) if unit_classes is not None else fsdp_unit_classes(model)
    kw: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kw["mesh"] = mesh
    units = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    for unit in units:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or ``torch.compile``) wrapper; an FSDP2 model is its own module."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---- full tensors out of shards, shards out of full tensors ---------------------------------------------
def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for an FSDP ``DTensor``: every rank must call it, in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def full_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every ``DTensor`` gathered into a plain tensor (collective; same key order on all ranks)."""
    return {k: full_tensor(v).detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``like`` (a ``DTensor`` parameter) is cut, without communication; else ``full`` as is."""
    if not is_dtensor(like) or tuple(full.shape) != tuple(like.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    # Every rank holds ``full`` (read from the same file), so each takes its own slice: no scatter needed.
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


# ---- optimizer state by parameter name ------------------------------------------------------------------
def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` keyed by parameter name, with full (gathered) tensors.

    ``torch`` keys optimizer state by position and FSDP stores shards; neither survives a change of
    world size or of parameter order. A collective under FSDP: call on every rank.

    Args:
        names: ``id(parameter) -> name``.
    """
    state = optimizer.state_dict()
    out_state: dict[str, dict[str, Any]] = {}
    groups = []
    for saved_group, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        params = []
        for index, p in zip(saved_group["params"], group["params"], strict=True):
            name = names[id(p)]
            params.append(name)
            if index in state["state"]:
                out_state[name] = {k: full_tensor(v).detach().cpu() if isinstance(v, torch.Tensor) else v
                                   for k, v in state["state"][index].items()}
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": params})
    return {"state": out_state, "param_groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                                 names: dict[int, str]) -> None:
    """Inverse of :func:`optimizer_state_by_name`: full tensors are cut to this rank's shards."""
    current = optimizer.state_dict()
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise DeltatuneError("the checkpoint's optimizer has other parameter groups than this run's "
                             "(different --loraplus-lr-ratio?); resume with the same options")
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for saved_group, cur_group, group in zip(saved["param_groups"], current["param_groups"],
                                             optimizer.param_groups, strict=True):
        mine = [names[id(p)] for p in group["params"]]
        if sorted(mine) != sorted(saved_group["params"]):
            raise DeltatuneError("the checkpoint's optimizer holds other parameters than this model trains; "
                                 "resume with the same method and targets")
        for index, p in zip(cur_group["params"], group["params"], strict=True):
            entry = saved["state"].get(names[id(p)])
            if entry is not None:
                state[index] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                                for k, v in entry.items()}
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": cur_group["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one in a single process)."""
    if info().world_size == 1:
        return [obj]
    out: list[Any] = [None] * info().world_size
    dist.all_gather_object(out, obj)
    return out


__all__ = ["DistInfo", "init_from_env", "info", "is_main_process", "barrier", "wrap_ddp", "wrap_fsdp", "unwrap",
           "full_tensor", "full_state", "shard_like", "optimizer_state_by_name", "load_optimizer_state_by_name",
           "launched_distributed", "device_for_rank", "all_reduce_sum", "gather_objects", "fsdp_unit_classes"]
