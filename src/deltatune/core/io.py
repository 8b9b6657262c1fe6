"""Adapter files on disk: atomic writes, safe reads, and locating an adapter directory.

File names are Hugging Face PEFT's, so either library reads the other's output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from deltatune.errors import AdapterFileNotFoundError, AdapterLoadError, DiskFullError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

TEMP_PREFIX = ".tmp-"  # atomic_write's temporary files: .tmp-<random><final name>
JOURNAL_NAME = ".deltatune-save.json"  # an adapter save's list of renames, present only while one is unfinished
# safetensors metadata keys: the config the weights were saved with (canonical JSON) and its sha256.
CONFIG_SHA_KEY = "deltatune_config_sha256"
CONFIG_JSON_KEY = "deltatune_config"
# adapter_config.json fields that describe the adapter without changing what its weights compute: editing them
# by hand (or PEFT rewriting them) must not make a pair look mixed.
DESCRIPTIVE_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version",
                                "auto_mapping", "task_type"})
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
    tmp = _write_temp(os.path.dirname(os.path.abspath(path)), os.path.basename(path), write)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    tensors = _contiguous_copies(tensors)
    if safe_serialization:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def _contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory or are non-contiguous views; PEFT writes copies too.
    return {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
            for k, v in tensors.items()}


def _shares_storage(t: torch.Tensor, all_tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in all_tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


def resolve_adapter_dir(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """Return a local directory holding an adapter; download from the hub only for a hub id, if online."""
    path = os.fspath(path)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        finish_interrupted_save(local)  # an interrupted save is completed before anything reads the pair
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
    """Read ``adapter_model.safetensors``, or else ``adapter_model.bin`` (weights only, no pickled code).

    An interrupted save is completed first (:func:`finish_interrupted_save`). Whether the weights belong to the
    ``adapter_config.json`` beside them is :func:`check_adapter_pair`'s question: ``PeftModel`` asks it after
    loading, so that a config that does not fit the tensors gets the shape checks' more specific message.
    """
    finish_interrupted_save(directory)
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
        except pickle.UnpicklingError as exc:
            # Never torch's text: it advises weights_only=False, exactly what must never happen to a foreign file.
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
            if found:  # the pickle names a function or class: it would build objects or run code
                raise AdapterLoadError(
                    f"{bin_path} holds pickled code or objects (it calls {found.group(1)}), not only tensors; "
                    "deltatune will not run them: convert the adapter to safetensors "
                    "(save_pretrained(..., safe_serialization=True) where it was made)"
                ) from None
            raise AdapterLoadError(f"{bin_path} is not a readable torch file (not a pickle of tensors): it is "
                                   "corrupt; re-save or re-download it, as safetensors") from None
        except Exception as exc:  # not a torch file at all, or cut short
            raise AdapterLoadError(
                f"{bin_path} is not a readable torch file ({type(exc).__name__}): it is truncated or corrupt; "
                "re-save or re-download it, as safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterLoadError(f"{bin_path} does not hold a flat dict of tensors")
        return state
    raise AdapterFileNotFoundError(
        f"{directory} has neither {SAFETENSORS_NAME} nor {BIN_NAME}; is it an adapter directory?"
    )


# ---- the adapter pair: weights + config replaced together --------------------------------------------------
#
# A reader must see the old (weights, config) pair or the new one, never new weights with an old config (a
# different lora_alpha would load silently with the wrong scaling). The directory may hold other files (a
# training run's metrics and checkpoints), and PEFT reads the two files by name, so the pair cannot be swapped as
# a directory. Instead:
#   1. both new files are written in full as temporaries (fsynced);
#   2. a journal (JOURNAL_NAME, written atomically) names the renames temp -> final: from here the save counts;
#   3. the renames happen and the journal is removed.
# Every deltatune reader first rolls an unfinished journal forward (finish_interrupted_save): a kill before step 2
# leaves the old pair (and temporaries for sweep_stale_temp_files), a kill after it the new pair. The weights also
# record the config they were saved with, so a pair mixed any other way (a copy of one file, a hand edit) is
# refused on load (check_adapter_pair).

def config_json_text(data: dict) -> str:
    """``adapter_config.json``'s text for ``data``: PEFT's layout (indented, sorted keys, final newline)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def config_fingerprint(data: dict) -> tuple[str, str]:
    """``(canonical JSON, its sha256)`` of a parsed ``adapter_config.json`` without its descriptive fields."""
    core = {k: v for k, v in data.items() if k not in DESCRIPTIVE_FIELDS}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return canonical, hashlib.sha256(canonical.encode()).hexdigest()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the renames are still atomic
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: str, final_name: str, write: Callable[[str], None]) -> str:
    """Write a complete, fsynced temporary file for ``final_name`` in ``directory``; return its path. On failure
    it is removed (a full disk becomes :class:`DiskFullError` naming the final path)."""
    final = os.path.join(directory, final_name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=final_name, dir=directory)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(final, exc.errno) from exc
        raise
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and writers may recreate the file); give it the mode open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise DiskFullError(final, getattr(exc, "errno", None)) from exc
        raise
    return tmp


def save_adapter_files(directory: str, tensors: dict[str, torch.Tensor], config: dict,
                       safe_serialization: bool = True) -> None:
    """Write an adapter's weights and ``adapter_config.json`` into ``directory`` so that a reader (after
    :func:`finish_interrupted_save`) sees the old pair or the new pair, never one file of each.

    With ``safe_serialization`` the weights' metadata records ``config``'s fingerprint (:func:`config_fingerprint`)
    for :func:`check_adapter_pair`. Writing ``adapter_model.bin`` removes a stale ``adapter_model.safetensors``,
    which readers would otherwise prefer to the new file.

    Raises:
        DiskFullError: no space for the new files; the old pair is unchanged and no temporary file is left.
    """
    directory = os.fspath(directory)
    finish_interrupted_save(directory)  # an older save's journal must not roll forward over this one later
    text = config_json_text(config)
    canonical, sha = config_fingerprint(json.loads(text))
    tensors = _contiguous_copies(tensors)
    weights_name = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    if safe_serialization:
        metadata = {"format": "pt", CONFIG_SHA_KEY: sha, CONFIG_JSON_KEY: canonical}
        write_weights: Callable[[str], None] = lambda tmp: save_file(tensors, tmp, metadata=metadata)  # noqa: E731
    else:
        write_weights = lambda tmp: torch.save(tensors, tmp)  # noqa: E731

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    temps: list[str] = []
    try:
        temps.append(_write_temp(directory, weights_name, write_weights))
        temps.append(_write_temp(directory, CONFIG_NAME, write_config))
        stale = [SAFETENSORS_NAME] if not safe_serialization and os.path.exists(
            os.path.join(directory, SAFETENSORS_NAME)) else []
        journal = {"deltatune_save": 1, "delete": stale, "renames": [
            [os.path.basename(tmp), final, os.path.getsize(tmp)]
            for tmp, final in zip(temps, (weights_name, CONFIG_NAME))]}
        atomic_write_text(os.path.join(directory, JOURNAL_NAME), json.dumps(journal))
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    # The save is decided: from here an interruption is completed by the next reader, not undone.
    _roll_forward(directory, journal)


def _read_journal(directory: str) -> dict | None:
    path = os.path.join(directory, JOURNAL_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            journal = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path} (an unfinished save's journal) is unreadable ({exc}); remove it and re-save "
                               "the adapter") from None
    allowed = {CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME}
    renames, delete = journal.get("renames"), journal.get("delete", [])
    ok = (isinstance(journal, dict) and isinstance(renames, list) and isinstance(delete, list)
          and all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and r[0].startswith(TEMP_PREFIX)
                  and os.path.basename(r[0]) == r[0] and r[1] in allowed and isinstance(r[2], int) for r in renames)
          and all(d in allowed for d in delete))
    if not ok:
        raise AdapterLoadError(f"{path} is not a deltatune save journal; remove it and re-save the adapter")
    return journal


def _roll_forward(directory: str, journal: dict) -> None:
    for tmp, final, size in journal["renames"]:
        src, dst = os.path.join(directory, tmp), os.path.join(directory, final)
        try:
            os.replace(src, dst)
        except FileNotFoundError:  # renamed before an interruption, or by a concurrent reader
            if not os.path.exists(dst) or os.path.getsize(dst) != size:
                raise AdapterLoadError(
                    f"{directory}: an interrupted save's {final} is missing (its temporary file {tmp} was deleted "
                    "before the save could be completed); re-save the adapter") from None
    for name in journal["delete"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    _fsync_dir(directory)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, JOURNAL_NAME))
    _fsync_dir(directory)


def finish_interrupted_save(directory: str | os.PathLike) -> bool:
    """Complete an adapter save that was interrupted after it was decided (its journal exists); every deltatune
    reader of an adapter directory calls this first. Returns whether there was one.

    Raises:
        AdapterLoadError: the journal is unreadable, a file it needs is gone, or the directory is read-only.
    """
    directory = os.fspath(directory)
    journal = _read_journal(directory)
    if journal is None:
        return False
    try:
        _roll_forward(directory, journal)
    except PermissionError as exc:
        raise AdapterLoadError(
            f"{directory} holds an interrupted adapter save ({JOURNAL_NAME}) that could not be completed "
            f"({exc.strerror}); open the directory once with write access, or re-save the adapter") from None
    return True


def sweep_stale_temp_files(directory: str | os.PathLike, min_age_s: float = 3600.0) -> list[str]:
    """Remove the temporary files (``.tmp-*``) that killed atomic writes left in ``directory`` (not below it);
    return their paths.

    An interrupted save's journal is completed first, so its temporaries are used, not deleted. Only files
    untouched for ``min_age_s`` seconds go (a live writer's temporary is younger); a caller that holds the
    directory's lock (the trainer's run lock) may pass 0.
    """
    directory = os.fspath(directory)
    finish_interrupted_save(directory)
    removed: list[str] = []
    now = time.time()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.startswith(TEMP_PREFIX) or os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            if now - os.path.getmtime(path) >= min_age_s:
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:  # a concurrent sweep took it
            continue
    return removed


def check_adapter_pair(directory: str) -> None:
    """Refuse a ``adapter_model.safetensors`` whose recorded config differs from ``adapter_config.json`` beside it.

    Files without the record (PEFT's, older deltatune's, ``.bin``) are not checked; descriptive fields
    (:data:`DESCRIPTIVE_FIELDS`) are ignored.

    Raises:
        AdapterLoadError: the two files come from different saves (one line naming the fields that differ).
    """
    st_path, cfg_path = os.path.join(directory, SAFETENSORS_NAME), os.path.join(directory, CONFIG_NAME)
    try:
        with safe_open(st_path, framework="pt") as fh:
            metadata = fh.metadata() or {}
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError, SafetensorError):
        return  # missing or unreadable: the readers of each file say so in their own words
    recorded = metadata.get(CONFIG_SHA_KEY)
    if recorded is None or not isinstance(config, dict):
        return
    canonical, sha = config_fingerprint(config)
    if sha == recorded:
        return
    try:
        saved = json.loads(metadata.get(CONFIG_JSON_KEY, ""))
    except ValueError:
        saved = {}
    now = json.loads(canonical)
    diffs = [f"{k} is {json.dumps(now.get(k))} in {CONFIG_NAME} but {json.dumps(saved.get(k))} in the weights' save"
             for k in sorted(set(now) | set(saved)) if now.get(k) != saved.get(k)][:3]
    raise AdapterLoadError(
        f"{directory}: {CONFIG_NAME} does not belong to {SAFETENSORS_NAME} ({'; '.join(diffs) or 'config differs'}); "
        "the two files come from different saves (a partial copy or a hand edit): restore the config they were "
        "saved with, or re-save the adapter")


def infer_device() -> str:
    """The accelerator torch sees (``"cuda"``, ``"xpu"``, ``"mps"``...), else ``"cpu"``: PEFT's default device."""
    if torch.cuda.is_available():
        return "cuda"
    for name in ("xpu", "mps", "npu", "mlu"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return name
    return "cpu"
