"""Training data: read files, recognise the format, tokenise with loss masks, and batch.

Four formats, recognised from the fields of the first record (or named with ``columns``):

==================  ============================  ==========================================
format              fields                        what the loss is on
==================  ============================  ==========================================
``text``            ``text``                      every token (long texts split into blocks)
``prompt``          ``prompt``, ``completion``    the completion tokens only
``chat``            ``messages`` (role/content)   the assistant turns only (chat template)
``classification``  ``text``, ``label``           the label (a class id, or its words)
==================  ============================  ==========================================

Files are JSONL (``.jsonl``/``.json``, one object per line), CSV (header row), or plain text
(``.txt``: one ``text`` record per blank-line-separated paragraph).

A tokenised example is a dict: ``input_ids: list[int]`` and ``labels: list[int]`` (same length,
``-100`` where there is no loss) for a causal LM; ``input_ids`` and ``label: int`` for a sequence
classifier. Classification examples for a causal LM also keep ``prompt_len`` and ``label`` (the
class index) so accuracy can score each label's words after the prompt.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltatune.errors import DeltatuneError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
FORMATS = ("text", "prompt", "chat", "classification")
BUILTIN_DATASETS = ("bbc-news", "chatterbot")

# The instruction for classification with a causal LM; ``{text}`` is truncated to fit ``max_length``.
DEFAULT_CLASSIFY_TEMPLATE = "{text}\n\nQuestion: which of these labels fits the text above: {labels}?\nAnswer:"
BBC_TEMPLATE = (
    "Article: {text}\n\n"
    "Question: is this news article about {labels}?\nAnswer:"
)
# How a prompt is shown to the model in the ``prompt`` format; files use their prompts as they are.
DEFAULT_PROMPT_TEMPLATE = "{prompt}"
CHATTERBOT_TEMPLATE = "User: {prompt}\nBot:"


class DataError(DeltatuneError, ValueError):
    """A data file or data option that cannot be used (missing file, bad line, missing column...)."""


@dataclass
class Dataset:
    """Records of one format, split three ways.

    Attributes:
        name: The built-in name or the file path.
        format: One of :data:`FORMATS`.
        train, validation, test: Records with the canonical fields of ``format``.
        labels: Class names in index order (classification only).
        template: Prompt template: for classification with a causal LM (``{text}``, ``{labels}``), or
            around each prompt of the ``prompt`` format (``{prompt}``).
    """

    name: str
    format: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] | None = None
    template: str = DEFAULT_CLASSIFY_TEMPLATE
    columns_read: dict[str, str] = field(default_factory=dict)  # canonical field -> file column, where they differ


# ---- reading files ---------------------------------------------------------------------------------
def read_records(path: str) -> list[dict[str, Any]]:
    """Read a JSONL, CSV or plain-text file into a list of dicts.

    Raises:
        DataError: the file does not exist, is empty, is not UTF-8, or a JSON line does not parse (with its number).
    """
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; pass a .jsonl, .csv or .txt file or a built-in "
                        f"name ({', '.join(BUILTIN_DATASETS)})")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; pass a .jsonl, .csv or .txt file")
    ext = os.path.splitext(path)[1].lower()
    _check_utf8(path)
    # utf-8-sig: files saved by Excel and Notepad start with a byte-order mark, which is not part of the data.
    with open(path, encoding="utf-8-sig", newline="" if ext in (".csv", ".tsv") else None) as fh:
        if ext == ".json" and _starts_with(fh, "["):
            records = _read_json_array(fh, path)
        elif ext in (".jsonl", ".json", ".ndjson"):
            records = _read_jsonl(fh, path)
        elif ext in (".csv", ".tsv"):
            records = _read_csv(fh, path, "\t" if ext == ".tsv" else None)
        elif ext in (".txt", ".text", ".md", ""):
            paragraphs = [p.strip() for p in fh.read().split("\n\n")]
            records = [{"text": p} for p in paragraphs if p]
        else:
            raise DataError(f"{path}: unknown file type {ext!r}; use .jsonl, .csv or .txt")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _check_utf8(path: str) -> None:
    """Refuse a file that is not UTF-8, naming the line: decoding it anyway would train on U+FFFD in place of
    every accented letter (a Latin-1 or Windows-1252 file), silently.

    Raises:
        DataError: ``path:line``, the byte, and how to re-save the file.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[exc.start]:02x} is not UTF-8 (the file is in another encoding, "
                        "such as Latin-1 or Windows-1252); re-save it as UTF-8, e.g. iconv -f cp1252 -t utf-8") \
            from None


class Records(list):
    """Records read from a file, with each one's line number (a CSV row over several lines: its last line),
    for error messages."""

    def __init__(self, records: list[dict[str, Any]], lines: list[int]) -> None:
        super().__init__(records)
        self.lines = lines


def _starts_with(fh, char: str) -> bool:
    """Whether the file's first non-blank character is ``char`` (the position is kept)."""
    start = fh.tell()
    head = fh.read(4096).lstrip()
    fh.seek(start)
    return head.startswith(char)


def _read_json_array(fh, path: str) -> list[dict[str, Any]]:
    """A ``.json`` file holding one array of objects (the other common way to ship a data set)."""
    try:
        values = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    bad = next((i for i, v in enumerate(values, start=1) if not isinstance(v, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: item {bad} of the array is a {type(values[bad - 1]).__name__}; expected objects "
                        "with named fields")
    return values


def _read_jsonl(fh, path: str) -> list[dict[str, Any]]:
    records, lines = [], []
    for number, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        records.append(record)
        lines.append(number)
    return Records(records, lines)


def _read_csv(fh, path: str, delimiter: str | None) -> list[dict[str, Any]]:
    """A CSV file with a header row; ``delimiter=None`` takes the one its header uses most (``,`` ``;`` tab
    ``|``: spreadsheets in many locales write ``;``)."""
    if delimiter is None:
        start = fh.tell()
        header = fh.readline()
        fh.seek(start)
        delimiter = max(",;\t|", key=header.count) if any(c in header for c in ",;\t|") else ","
    reader = csv.DictReader(fh, delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path} has no header row; the first line must name the columns (e.g. text,label)")
    records, lines = [], []
    for row in reader:
        if None in row:  # more cells than header names
            raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns")
        records.append(row)
        lines.append(reader.line_num)
    return Records(records, lines)


# ---- recognising the format ------------------------------------------------------------------------
def detect_format(record: dict[str, Any], columns: dict[str, str]) -> str:
    """The format a record's fields imply (named ``columns`` count as present)."""
    keys = set(record) | set(columns)
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    raise DataError(
        f"cannot tell the data format from the fields {sorted(record)}; expected text, prompt+completion, "
        "messages, or text+label (name other columns with --text-column, --label-column, --prompt-column, "
        "--completion-column, --messages-column)"
    )


_FIELDS = {"text": ("text",), "prompt": ("prompt", "completion"), "chat": ("messages",),
           "classification": ("text", "label")}

# Column names of widely shared data sets, read as the canonical fields when a file has none of those and
# names no columns: Alpaca (instruction, input, output), question/answer and query/response pairs,
# sentence/label and content/category sets. The first name present wins.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("instruction", "question", "query", "input"),
    "completion": ("output", "response", "answer"),
    "text": ("sentence", "content"),
    "label": ("category", "class"),
}


# Alpaca's prompt is its instruction followed by the optional input column.
ALPACA_PROMPT_EXTRA = {"instruction": "input"}


def describe_columns(columns: dict[str, str]) -> str:
    """``{field: column}`` in words, e.g. "column 'instruction' (+ 'input' where given) as prompt"."""
    def one(name: str, column: str) -> str:
        extra = ALPACA_PROMPT_EXTRA.get(column) if name == "prompt" else None
        return f"column {column!r}" + (f" (+ {extra!r} where given)" if extra else "") + f" as {name}"

    return ", ".join(one(name, column) for name, column in columns.items())


def alias_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, str]:
    """``columns`` plus, for each canonical field the record lacks and ``columns`` does not name, the first
    of its :data:`COLUMN_ALIASES` the record has."""
    out = dict(columns)
    for name, aliases in COLUMN_ALIASES.items():
        if name in out or name in record:
            continue
        found = next((a for a in aliases if a in record and a not in out.values()), None)
        if found is not None:
            out[name] = found
    return out


def normalise(records: list[dict[str, Any]], fmt: str, columns: dict[str, str], source: str) -> list[dict]:
    """Map each record to the canonical fields of ``fmt``; check every field is there and well-formed.

    Args:
        columns: ``{canonical field: column name in the file}`` for files with other names.
    """
    lines = getattr(records, "lines", None)

    def where(i: int) -> str:  # "file:LINE" where the reader knows the line, else the record's number
        return f"{source}:{lines[i - 1]}" if lines else f"{source}: record {i}"

    out = []
    for i, record in enumerate(records, start=1):
        item = {}
        for name in _FIELDS[fmt]:
            column = columns.get(name, name)
            if column not in record:
                raise DataError(
                    f"{where(i)} has no column {column!r}; its columns are: {', '.join(map(str, record))}"
                )
            item[name] = record[column]
        if fmt == "chat":
            item["messages"] = _check_messages(item["messages"], where(i))
        elif fmt == "classification":
            if item["label"] is None or str(item["label"]).strip() == "":
                raise DataError(f"{where(i)} has an empty label")
            item["label"] = str(item["label"]).strip()
            item["text"] = str(item["text"])
        else:
            item = {k: str(v) for k, v in item.items()}
            extra_column = ALPACA_PROMPT_EXTRA.get(columns.get("prompt"))
            extra = record.get(extra_column) if extra_column else None
            if extra is not None and str(extra).strip():  # Alpaca: the instruction, then its input
                item["prompt"] = f"{item['prompt']}\n\n{extra}"
        out.append(item)
    return out


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'messages' must be a list of role/content objects") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so there is nothing to learn")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def split_off(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed`` and hold out ``fraction`` of the records (at least one)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(records) * fraction)) if len(records) > 1 else 0
    held = sorted(order[:n_held])
    kept = sorted(order[n_held:])
    return [records[i] for i in kept], [records[i] for i in held]


def load_dataset(data: str, *, eval_data: str | None = None, columns: dict[str, str] | None = None,
                 fmt: str | None = None, seed: int = 0, template: str | None = None) -> Dataset:
    """A built-in data set by name, or a file (plus an optional separate evaluation file).

    Without ``eval_data`` a file is split 90/10 (seeded); validation and test are then the same records.

    Raises:
        DataError: anything wrong with the files or columns; and a label in the evaluation data that
            the training data never shows.
    """
    columns = dict(columns or {})
    if data in BUILTIN_DATASETS:
        dataset = _load_builtin(data)
        if template:
            dataset.template = template
        return dataset
    records = read_records(data)
    if fmt is None:
        try:
            fmt = detect_format(records[0], columns)
        except DataError:  # none of the canonical fields: try the usual names of shared data sets
            aliased = alias_columns(records[0], columns)
            if aliased == columns:
                raise
            fmt = detect_format(records[0], aliased)
            columns = aliased
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of: {', '.join(FORMATS)}")
    records = normalise(records, fmt, columns, data)
    if eval_data:
        train = records
        held = normalise(read_records(eval_data), fmt, columns, eval_data)
    else:
        train, held = split_off(records, 0.1, seed)
        if not held:
            held = list(train)
    labels = None
    if fmt == "classification":
        labels = sorted({r["label"] for r in train})
        unseen = sorted({r["label"] for r in held} - set(labels))
        if unseen:
            raise DataError(
                f"evaluation data has label(s) {unseen} that the training data never shows "
                f"(training labels: {labels}); add training examples for them or drop those records"
            )
        if len(labels) < 2:
            raise DataError(f"classification needs at least two labels; {data} has only {labels}")
    default_template = DEFAULT_PROMPT_TEMPLATE if fmt == "prompt" else DEFAULT_CLASSIFY_TEMPLATE
    return Dataset(name=data, format=fmt, train=train, validation=held, test=held, labels=labels,
                   template=template or default_template,
                   columns_read={k: v for k, v in columns.items() if k != v and k in _FIELDS[fmt]})


def _load_builtin(name: str) -> Dataset:
    from deltatune.builtin import datasets as builtin

    if name == "bbc-news":
        labels = list(builtin.BBC_LABELS)
        splits = {s: [{"text": r["text"], "label": _label_name(r["label"], labels)} for r in builtin.load_bbc_news(s)]
                  for s in ("train", "validation", "test")}
        return Dataset(name=name, format="classification", train=splits["train"], validation=splits["validation"],
                       test=splits["test"], labels=labels, template=BBC_TEMPLATE)
    # chatterbot: questions and answers, no official split; hold out a seeded 10%.
    records = [{"prompt": r["prompt"], "completion": " " + r["completion"].strip()}
               for r in builtin.load_chatterbot()]
    train, held = split_off(records, 0.1, seed=0)
    return Dataset(name=name, format="prompt", train=train, validation=held, test=held,
                   template=CHATTERBOT_TEMPLATE)


def _label_name(label: Any, labels: list[str]) -> str:
    return labels[label] if isinstance(label, int) else str(label)


# ---- tokenising ------------------------------------------------------------------------------------
def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """A BOS token where the tokenizer adds one itself (Llama 2/3 do, SmolLM2 and GPT-2 do not)."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def label_words(labels: Sequence[str]) -> str:
    """``"a, b or c"``: how the prompt lists the classes."""
    labels = list(labels)
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


class Encoder:
    """Turns normalised records into token-id examples for one model.

    Args:
        tokenizer: A ``transformers`` tokenizer.
        fmt: The data format.
        max_length: Longest example in tokens (texts are truncated, or split into blocks for ``text``).
        labels: Class names (classification).
        template: Classification prompt with ``{text}`` and ``{labels}``, or a prompt-format template with
            ``{prompt}``.
        sequence_classifier: ``True`` for an encoder with a classification head: examples hold the class id.
    """

    def __init__(self, tokenizer, fmt: str, max_length: int, labels: list[str] | None = None,
                 template: str | None = None, sequence_classifier: bool = False) -> None:
        if max_length < 8:
            raise DataError(f"--max-length {max_length} is too short; use at least 8 tokens (256 is usual)")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.max_length = max_length
        self.labels = labels
        self.sequence_classifier = sequence_classifier
        if fmt == "classification" and not sequence_classifier:
            template = template or DEFAULT_CLASSIFY_TEMPLATE
            if "{text}" not in template:
                raise DataError(f"the prompt template must contain {{text}}: {template!r}")
            before, _, after = template.partition("{text}")
            words = label_words(labels or [])
            self._before = _bos(tokenizer) + _ids(tokenizer, before.replace("{labels}", words))
            self._after = _ids(tokenizer, after.replace("{labels}", words))
            # " business" + EOS: scored whole, so a label that is a prefix of another still wins or loses fairly.
            self.label_ids = [_ids(tokenizer, " " + label) + _eos(tokenizer) for label in labels or []]
        if fmt == "prompt":
            template = template or DEFAULT_PROMPT_TEMPLATE
            if "{prompt}" not in template:
                raise DataError(f"a template for prompt/completion data must contain {{prompt}}: {template!r}")
            self.template = template
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("chat data needs a tokenizer with a chat template; this model's tokenizer has none")

    def __call__(self, records: list[dict]) -> list[dict]:
        out: list[dict] = []
        for record in records:
            out.extend(self.encode(record))
        return out

    def encode(self, record: dict) -> list[dict]:
        tok = self.tokenizer
        if self.sequence_classifier:
            if self.fmt != "classification":
                raise DataError("an encoder model with a classification head needs text+label data")
            ids = tok(record["text"], truncation=True, max_length=self.max_length)["input_ids"]
            return [{"input_ids": ids, "label": self.labels.index(record["label"])}]
        if self.fmt == "text":
            ids = _bos(tok) + _ids(tok, record["text"]) + _eos(tok)
            # Split long texts into blocks; a last block of one token teaches nothing.
            blocks = [ids[i:i + self.max_length] for i in range(0, len(ids), self.max_length)]
            return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]
        if self.fmt == "prompt":
            prompt = _bos(tok) + _ids(tok, self.template.replace("{prompt}", record["prompt"]))
            completion = _ids(tok, record["completion"]) + _eos(tok)
            return [self._join(prompt, completion)]
        if self.fmt == "classification":
            index = self.labels.index(record["label"])
            completion = self.label_ids[index]
            room = self.max_length - len(self._before) - len(self._after) - max(map(len, self.label_ids))
            if room < 1:
                raise DataError(f"--max-length {self.max_length} leaves no room for the text after the "
                                f"instruction ({len(self._before) + len(self._after)} tokens); raise it")
            prompt = self._before + _ids(tok, record["text"])[:room] + self._after
            example = self._join(prompt, completion)
            example["label"] = index
            return [example]
        return [self._encode_chat(record["messages"])]

    def _join(self, prompt: list[int], completion: list[int]) -> dict:
        """Prompt + completion, loss on the completion; an over-long prompt loses its start."""
        completion = completion[: self.max_length - 1]
        prompt = prompt[-(self.max_length - len(completion)):]
        ids = prompt + completion
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + completion, "prompt_len": len(prompt)}

    def _encode_chat(self, messages: list[dict]) -> dict:
        """Render with the chat template; loss on the characters of each assistant turn (and its end marker).

        The template is rendered once per assistant turn: the text up to the turn (with the generation
        prompt) and the text including it; the difference is what the model must produce.
        """
        tok = self.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tok.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][: self.max_length]
        labels = [
            tid if any(s <= a < e for s, e in spans) else IGNORE_INDEX
            for tid, (a, _) in zip(ids, enc["offset_mapping"][: self.max_length])
        ]
        return {"input_ids": ids, "labels": labels}


# ---- batching --------------------------------------------------------------------------------------
SHAPE_BUCKET = 32  # batches are padded to a multiple of this many tokens (see ``collate``)


def collate(examples: list[dict], pad_id: int, left_pad: bool = True, multiple_of: int = 1
            ) -> dict[str, torch.Tensor]:
    """Pad a list of examples into tensors.

    Causal LMs are padded on the left, so every sequence ends at the last column: the completion
    tokens of the whole batch then sit in the last few columns, and only those need logits.

    ``multiple_of`` rounds the padded length up. CPU bf16 kernels (oneDNN/AMX) are built once per
    matrix shape, which costs far more than the matmul itself the first time: on SmolLM2 an
    evaluation over batches of all-different lengths ran 8x slower than a second pass. Rounding to
    ``SHAPE_BUCKET`` keeps the number of shapes small for a few percent of padding.

    Returns:
        ``input_ids, attention_mask, position_ids: (B, T)`` and ``labels: (B, T)`` (``-100`` on padding and
        prompts), or ``labels: (B,)`` class ids for a sequence classifier.
    """
    length = max(len(e["input_ids"]) for e in examples)
    length = -(-length // multiple_of) * multiple_of
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    has_token_labels = "labels" in examples[0]
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long) if has_token_labels else None
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        cols = slice(length - n, length) if left_pad else slice(0, n)
        ids[row, cols] = torch.tensor(e["input_ids"])
        mask[row, cols] = 1
        if has_token_labels:
            labels[row, cols] = torch.tensor(e["labels"])
    # Positions count real tokens only, so left padding does not shift them.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    batch["labels"] = labels if has_token_labels else torch.tensor([e["label"] for e in examples])
    return batch


def count_targets(examples: list[dict]) -> int:
    """Number of loss terms: labelled tokens after the one-token shift, or one per classified example."""
    if "labels" not in examples[0]:
        return len(examples)
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)
