"""``deltatune merge`` writes only its own files (issue 16): ``--overwrite`` keeps what it did not write, an
output directory that overlaps an input is refused, and a full disk leaves nothing behind."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from . import reliability
from .reliability import one_line_error, run, tree

adapter, own_adapter = reliability.adapter, reliability.own_adapter  # fixtures


# ---- merge --overwrite replaces only the files a merge writes -------------------------------------------------
def test_merge_overwrite_keeps_unrelated_files(capsys, adapter, tmp_path):
    out = tmp_path / "merged"
    (out / "notes").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "notes" / "keep.md").write_text("also mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a stale shard of an earlier merge")
    code, stdout, err = run(capsys, "merge", "--adapter", adapter, "--output-dir", out, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "notes" / "keep.md").read_text() == "also mine"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()  # an earlier merge's file: replaced
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-merge-")]
    # And it is the merged model: transformers loads it.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize("where", ["adapter itself", "dot inside the adapter", "inside the adapter",
                                   "holds the adapter"])
def test_merge_refuses_an_output_dir_that_overlaps_its_adapter(capsys, own_adapter, tmp_path, monkeypatch, where):
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = tree(tmp_path)
    out = {"adapter itself": own_adapter, "dot inside the adapter": ".",
           "inside the adapter": os.path.join(own_adapter, "merged"), "holds the adapter": str(tmp_path)}[where]
    monkeypatch.chdir(own_adapter)
    line = one_line_error(capsys, "merge", "--adapter", own_adapter, "--output-dir", out, "--overwrite")
    assert "--output-dir" in line and "--adapter" in line, line
    assert tree(tmp_path) == before  # nothing deleted, nothing written


def test_merge_refuses_an_output_dir_that_is_its_model_or_one_of_its_adapters(capsys, llama_dir, adapter, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    before = tree(tmp_path)
    line = one_line_error(capsys, "merge", "--adapter", adapter, "--model", model, "--output-dir", model,
                          "--overwrite")
    assert "--model" in line, line
    other = tmp_path / "b"
    shutil.copytree(adapter, other)
    before = tree(tmp_path)
    line = one_line_error(capsys, "merge", "--adapters", adapter, other, "--output-dir", tmp_path, "--overwrite")
    assert "--adapters" in line and str(other) in line, line
    assert tree(tmp_path) == before


def test_merge_disk_full_is_one_line_and_leaves_nothing(capsys, adapter, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def full(tensors, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    out = tmp_path / "merged"
    line = one_line_error(capsys, "merge", "--adapter", adapter, "--output-dir", out)
    assert "no space left on device" in line.lower() and str(tmp_path) in line, line
    assert os.listdir(tmp_path) == []  # no half-written output, no temporary directory
    # The same into an existing directory with --overwrite: its files stay as they were.
    out.mkdir()
    (out / "config.json").write_text("{}")
    line = one_line_error(capsys, "merge", "--adapter", adapter, "--output-dir", out, "--overwrite")
    assert tree(out) == {"config.json": b"{}"} and os.listdir(tmp_path) == ["merged"]
    monkeypatch.setattr(modeling_utils, "safe_save_file", real)




def test_merge_overwrite_never_writes_over_a_file_it_does_not_know(capsys, adapter, tmp_path, monkeypatch):
    """A file the merge writes but that is not one of a merge's known outputs (a tokenizer file of a kind the list
    lacks, say) is not written over a user's file of that name: refused, and the directory is as it was."""
    from deltatune.cli import merge

    def writer(merged, tokenizer):
        def write(tmp):
            for name in ("config.json", "notes.txt"):
                with open(os.path.join(tmp, name), "w") as fh:
                    fh.write("new")

        return write

    monkeypatch.setattr(merge, "_save_model", writer)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_line_error(capsys, "merge", "--adapter", adapter, "--output-dir", out, "--overwrite")
    assert "already holds notes.txt" in line, line
    assert tree(out) == {"notes.txt": b"mine"} and os.listdir(tmp_path) == ["merged"]
