"""Which adapters ``deltatune serve`` offers, and where each one lives on disk.

An adapter root is a directory whose sub-folders are adapters (each named by its folder), or an adapter directory
itself (named by its folder). Nothing a request sends is ever joined to a path without the checks here: a served
name must match :data:`NAME_RE`, and a path given at run time must resolve (symlinks followed) inside a root.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from dataclasses import dataclass

from deltatune.errors import DeltatuneError

# A served name: what `model` in a request names. Letters, digits, `.`, `_`, `-` (no separators, no `..`).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_NAME = "adapter_config.json"


class ServeError(DeltatuneError, ValueError):
    """A request or an adapter the server refuses; ``status`` is the HTTP status, ``code`` OpenAI's error code."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after = retry_after


@dataclass
class AdapterEntry:
    """One servable adapter: its served name, its directory (resolved), and its method (``peft_type``)."""

    name: str
    path: str
    peft_type: str


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ServeError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                         "(at most 128, no '..')", code="invalid_adapter_name", param="lora_name")
    return name


def _peft_type(directory: str) -> str | None:
    from deltatune.cli.common import read_json

    try:
        config = read_json(os.path.join(directory, CONFIG_NAME))
    except DeltatuneError:
        return None
    value = config.get("peft_type")
    return str(value) if value else None


class AdapterRegistry:
    """The adapters found under the roots (plus any loaded at run time), by served name. Thread-safe."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = [os.path.realpath(r) for r in roots]
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()
        self.skipped: list[str] = []  # "<dir>: why" for sub-folders that are not adapters
        for root in self.roots:
            self._scan(root)

    def _scan(self, root: str) -> None:
        if not os.path.isdir(root):
            raise ServeError(f"--adapters {root}: not a directory; pass a directory of adapter folders (or one "
                             "adapter directory)")
        if os.path.exists(os.path.join(root, CONFIG_NAME)):  # the root is itself an adapter
            candidates = [root]
        else:
            candidates = [os.path.join(root, d) for d in sorted(os.listdir(root))
                          if os.path.isdir(os.path.join(root, d))]
        for directory in candidates:
            name = os.path.basename(directory)
            peft_type = _peft_type(directory)
            if peft_type is None:
                self.skipped.append(f"{directory}: no readable {CONFIG_NAME} with a peft_type")
                continue
            if not NAME_RE.match(name):
                self.skipped.append(f"{directory}: folder name {name!r} is not a servable name "
                                    "(letters, digits, '.', '_', '-')")
                continue
            if name in self._entries:
                raise ServeError(f"two adapters are named {name!r}: {self._entries[name].path} and {directory}; "
                                 "rename one folder")
            self._entries[name] = AdapterEntry(name, os.path.realpath(directory), peft_type)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get(name)

    def close_names(self, name: str) -> list[str]:
        return difflib.get_close_matches(str(name), self.names(), n=3, cutoff=0.5)

    def contained_path(self, path: object) -> str:
        """``path`` resolved (symlinks followed), once it is known to lie inside one of the roots."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ServeError("lora_path must be a non-empty string", param="lora_path")
        resolved = os.path.realpath(path)
        for root in self.roots:
            if os.path.commonpath([root, resolved]) == root:
                return resolved
        raise ServeError("lora_path is outside the adapter roots this server was started with; put the adapter "
                         "under one of them", status=403, code="path_not_allowed", param="lora_path")

    def add(self, name: str, path: str) -> AdapterEntry:
        check_name(name)
        resolved = self.contained_path(path)
        if not os.path.isdir(resolved):
            raise ServeError(f"lora_path {path!r} is not a directory under the adapter roots", status=404,
                             code="adapter_not_found", param="lora_path")
        peft_type = _peft_type(resolved)
        if peft_type is None:
            raise ServeError(f"lora_path {path!r} holds no readable {CONFIG_NAME} with a peft_type; is it an "
                             "adapter directory?", param="lora_path")
        with self._lock:
            if name in self._entries:
                raise ServeError(f"an adapter named {name!r} is already served; unload it first or pick another "
                                 "name", code="adapter_exists", param="lora_name")
            entry = AdapterEntry(name, resolved, peft_type)
            self._entries[name] = entry
        return entry

    def remove(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise ServeError(f"no adapter named {name!r} is served", status=404, code="adapter_not_found",
                             param="lora_name")
        return entry
