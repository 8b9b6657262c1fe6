"""Adapter files on disk: atomic writes, safe reads, and locating an adapter directory.

File names are Hugging Face PEFT's, so either library reads the other's output.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.errors import AdapterFileNotFoundError, AdapterLoadError, DiskFullError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

TEMP_PREFIX = ".tmp-"  # atomic_write's temporary files: .tmp-<random><final name>
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a writer's report of a full device (or exhausted quota).

    ``OSError`` carries ``ENOSPC``/``EDQUOT``; ``torch.save`` reports it as a ``RuntimeError`` from its C++ stream
    ("basic_ios::clear", "PytorchStreamWriter failed ..."), safetensors as a ``SafetensorError`` quoting the OS
    error ("No space left on device (os error 28)").
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("basic_ios::clear" in text or "PytorchStreamWriter failed" in text):
        return True
    return "os error 28" in text or "No space left on device" in text


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX, so a crash leaves either the old file or the new one, never half.

    Raises:
        DiskFullError: the device filled up (or a quota was hit) while writing; the temporary file is removed
            and ``path`` is unchanged.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=directory)
    except OSError as exc:  # no free inode/block even for an empty file
        if is_disk_full(exc):
            raise DiskFullError(path, exc.errno) from exc
        raise
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and writers may recreate the file); give it the mode open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise DiskFullError(path, getattr(exc, "errno", None)) from exc
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str, safe_serialization: bool = True) -> None:
    """Write a state dict as safetensors (or a torch ``.bin`` when ``safe_serialization=False``)."""
    # safetensors refuses tensors that share memory or are non-contiguous views; PEFT writes copies too.
    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
               for k, v in tensors.items()}
    if safe_serialization:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def _shares_storage(t: torch.Tensor, all_tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in all_tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


def resolve_adapter_dir(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """Return a local directory holding an adapter; download from the hub only for a hub id, if online."""
    path = os.fspath(path)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise AdapterFileNotFoundError(f"{local} is a file; pass the adapter directory that contains it")
    if _HUB_ID.match(path) and not os.path.isabs(path):
        try:
            from huggingface_hub import snapshot_download

            root = snapshot_download(path, allow_patterns=[f"{subfolder + '/' if subfolder else ''}adapter_*"])
            return os.path.join(root, subfolder) if subfolder else root
        except Exception as exc:  # offline, private, or not a repo: all the same to the user
            raise AdapterFileNotFoundError(
                f"adapter directory {local!r} does not exist locally and could not be fetched from the hub "
                f"({type(exc).__name__}); pass the directory that save_pretrained wrote"
            ) from None
    raise AdapterFileNotFoundError(
        f"adapter directory {local!r} does not exist; pass the directory that save_pretrained wrote"
    )


def load_adapter_weights(directory: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors``, or else ``adapter_model.bin`` (weights only, no pickled code)."""
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.exists(st_path):
        try:
            return load_file(st_path, device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(f"{st_path} is corrupt or truncated ({exc}); re-save or re-download it") from None
    if os.path.exists(bin_path):
        try:
            state = torch.load(bin_path, map_location=device, weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary pickles with various exception types
            raise AdapterLoadError(
                f"{bin_path} could not be read as plain tensors ({type(exc).__name__}: {exc}); "
                "deltatune never unpickles code, re-save the adapter with safe_serialization=True"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterLoadError(f"{bin_path} does not hold a flat dict of tensors")
        return state
    raise AdapterFileNotFoundError(
        f"{directory} has neither {SAFETENSORS_NAME} nor {BIN_NAME}; is it an adapter directory?"
    )
