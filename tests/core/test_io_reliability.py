"""core/io.py's writes under failure: a full disk is one clear error and leaves the old file and no temporary."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from support.models import make_inputs, output, perturb_trainable, tiny_llama

import deltatune.core.io as io
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import DeltatuneError, DiskFullError


def _listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---- disk full -----------------------------------------------------------------------------------------

DISK_FULL = {
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    "edquot": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "torch_ios": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256; "
                              "basic_ios::clear: iostream error"),
    "torch_writer": RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


@pytest.mark.parametrize("exc", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_disk_full_is_one_error_and_the_old_file_stays(tmp_path, exc):
    path = tmp_path / "file.txt"
    path.write_text("old")

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise exc

    with pytest.raises(DiskFullError) as info:
        io.atomic_write(str(path), write)
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, DeltatuneError)
    assert err.errno in (errno.ENOSPC, errno.EDQUOT) and err.filename == str(path)
    assert str(err) == (f"no space left on device writing {path}; the previous file is unchanged; free space or "
                        "choose another directory")
    assert path.read_text() == "old" and _listing(tmp_path) == ["file.txt"]


def test_other_errors_pass_through_unchanged(tmp_path):
    def write(tmp: str) -> None:
        raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem") as info:
        io.atomic_write(str(tmp_path / "f"), write)
    assert not isinstance(info.value, DiskFullError) and _listing(tmp_path) == []


def test_no_room_for_the_temporary_file(tmp_path, monkeypatch):
    def mkstemp(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)
    with pytest.raises(DiskFullError):
        io.atomic_write_text(str(tmp_path / "f.json"), "{}")


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_on_a_full_disk_keeps_the_saved_adapter(tmp_path, monkeypatch, safe):
    """The real writers (safetensors' save_file, torch.save) failing as they do on a full disk."""
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path, safe_serialization=safe)
    before = {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)}
    perturb_trainable(pm)
    if safe:
        def fail(tensors, path, metadata=None):
            Path(path).write_bytes(b"\0" * 10)
            raise DISK_FULL["safetensors"]

        monkeypatch.setattr(io, "save_file", fail)
    else:
        def fail(obj, path, *args, **kwargs):
            Path(path).write_bytes(b"\0" * 10)
            raise DISK_FULL["torch_writer"]

        monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(DiskFullError, match="no space left on device writing"):
        pm.save_pretrained(tmp_path, safe_serialization=safe)
    assert {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)} == before  # no temporaries either
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    inputs = make_inputs("llama")
    assert not torch.equal(output(loaded, inputs), output(pm, inputs))  # the old adapter, not the new one
