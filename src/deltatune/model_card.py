"""The ``README.md`` model card ``save_pretrained`` writes beside the adapter files, by PEFT's rules.

Metadata (the YAML front matter the Hub reads) is PEFT's: ``library_name: peft``, ``base_model``, ``tags`` and,
for a causal LM, ``pipeline_tag: text-generation``. ``library_name`` stays ``peft`` on purpose: the files are
PEFT's format and load with ``peft.PeftModel``, so the Hub's PEFT integration (the "Use this model" snippet,
the adapter's link to its base model) works for them; the ``deltatune`` tag and the body say which library
trained them. An existing card is updated as PEFT updates it: those metadata keys are set (user tags are kept
beside ours, ``pipeline_tag`` only when there is none), a ``- deltatune <version>`` line goes under
``### Framework versions`` once, and the rest of the user's text is left as it is.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import yaml

from deltatune.config import PeftWarning
from deltatune.core.io import atomic_write_text

README = "README.md"
FRAMEWORK_HEADING = "### Framework versions"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)", re.DOTALL)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def hub_base_model(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id. A local path is no use to a reader of the card, and the Hub refuses
    ``base_model`` metadata that names no model, so a path is left out of the metadata."""
    if not name or os.path.isabs(name) or os.path.exists(name) or not _HUB_ID.match(name):
        return None
    return name


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """``(metadata, body)`` of a card; a card without front matter (or with unreadable YAML) has no metadata."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}, text  # not ours to repair: keep the user's text whole, and put ours before it
    return (data, text[match.end():]) if isinstance(data, dict) else ({}, text)


def _new_body(base_model: str | None, peft_types: list[str], causal_lm: bool, version: str) -> str:
    kinds = "/".join(dict.fromkeys(peft_types)) or "PEFT"
    on = f" for [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    auto = "AutoModelForCausalLM" if causal_lm else "AutoModel"
    base_arg = f'"{base_model}"' if base_model else '"<base model>"'
    return (
        f"\n# {kinds} adapter{on}\n\n"
        f"A {kinds} adapter{on}, trained with [deltatune](https://pypi.org/project/deltatune/) and saved in Hugging "
        "Face PEFT's file format (`adapter_config.json` + `adapter_model.safetensors`): it loads with deltatune "
        "or with PEFT.\n\n"
        "## How to use\n\n"
        "```python\n"
        f"from transformers import {auto}\n"
        "from deltatune import PeftModel  # or: from peft import PeftModel\n\n"
        f"base = {auto}.from_pretrained({base_arg})\n"
        'model = PeftModel.from_pretrained(base, "<this repository or directory>")\n'
        "```\n\n"
        f"{FRAMEWORK_HEADING}\n\n"
        f"- deltatune {version}\n"
    )


def _write(path: str, meta: dict[str, Any], body: str) -> None:
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    atomic_write_text(path, f"---\n{front}---\n{body if body.startswith(chr(10)) else chr(10) + body}")


def add_card_tags(directory: str | os.PathLike, tags: list[str]) -> None:
    """Add ``tags`` to the metadata of ``directory/README.md`` (written by :func:`update_model_card`)."""
    path = os.path.join(directory, README)
    with open(path, encoding="utf-8") as fh:
        meta, body = split_card(fh.read())
    meta["tags"] = sorted({*map(str, meta.get("tags") or []), *tags})
    _write(path, meta, body)


def update_model_card(directory: str | os.PathLike, *, base_model: str | None, tags: list[str],
                      peft_types: list[str], causal_lm: bool, version: str) -> None:
    """Create ``directory/README.md``, or update the one there by PEFT's rules (see the module docstring)."""
    path = os.path.join(directory, README)
    existing = None
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                existing = fh.read()
        except UnicodeDecodeError:  # rewriting it would replace the user's characters: leave it as it is
            warnings.warn(f"{path} is not UTF-8; the model card was not updated", PeftWarning, stacklevel=3)
            return
    meta, body = split_card(existing) if existing is not None else ({}, _new_body(base_model, peft_types,
                                                                                  causal_lm, version))
    meta["library_name"] = "peft"
    if base_model:
        meta["base_model"] = base_model
    user_tags = meta.get("tags") or []
    user_tags = [user_tags] if isinstance(user_tags, str) else list(user_tags)
    all_tags = sorted({*map(str, user_tags), *tags})
    if all_tags:
        meta["tags"] = all_tags
    if causal_lm and not meta.get("pipeline_tag"):
        meta["pipeline_tag"] = "text-generation"
    line = f"- deltatune {version}"
    lines = body.splitlines()
    if line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, line)
        else:
            lines += ["", FRAMEWORK_HEADING, "", line]
        body = "\n".join(lines) + "\n"
    _write(path, meta, body)
