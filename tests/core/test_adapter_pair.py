"""An adapter's two files are replaced as a pair: a reader sees the old adapter or the new one, never new weights
with an old config; a pair mixed some other way is refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from support.models import make_inputs, output, perturb_trainable, tiny_llama

import deltatune.core.io as io
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import AdapterLoadError


class Killed(BaseException):
    """Stands for the process dying: nothing after the raise runs (no except Exception catches it)."""


def _adapter(alpha: int, seed: int):
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    perturb_trainable(pm, seed=seed, std=0.5)  # weights of their own (tiny_llama reseeds torch)
    return pm.eval()


@pytest.fixture(scope="module")
def pair():
    """Two adapters that differ in weights and lora_alpha, and their outputs."""
    old, new = _adapter(8, 1), _adapter(32, 2)
    inputs = make_inputs("llama")
    out_old, out_new = output(old, inputs), output(new, inputs)
    assert (out_old - out_new).abs().max() > 1e-3
    return old, new, inputs, out_old, out_new


def _load(directory, inputs) -> torch.Tensor:
    return output(PeftModel.from_pretrained(tiny_llama(0), directory), inputs)


def _which(got: torch.Tensor, want_old: torch.Tensor, want_new: torch.Tensor) -> str:
    if torch.allclose(got, want_old, atol=1e-6, rtol=0):
        return "old"
    if torch.allclose(got, want_new, atol=1e-6, rtol=0):
        return "new"
    return "mixed"


@pytest.mark.parametrize("renames_before_kill", [0, 1, 2, 3, 4])
def test_a_save_killed_at_any_rename_loads_old_or_new(tmp_path, monkeypatch, pair, renames_before_kill):
    """The process dies after ``renames_before_kill`` calls of os.replace during the second save (the old code made
    two: weights, then config; killed after the first, it left new weights under the old lora_alpha)."""
    old, new, inputs, out_old, out_new = pair
    old.save_pretrained(tmp_path)
    calls = {"n": 0}
    real_replace = os.replace

    def replace(src, dst):
        if calls["n"] == renames_before_kill:
            raise Killed
        calls["n"] += 1
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        new.save_pretrained(tmp_path)
        finished = True
    except Killed:
        finished = False
    monkeypatch.undo()
    want = "new" if finished or renames_before_kill else "old"
    assert _which(_load(tmp_path, inputs), out_old, out_new) == want
    # The reader completed the save: no journal is left, and the config on disk is the loaded one's.
    assert not (tmp_path / ".deltatune-save.json").exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == (32 if want == "new" else 8)


def test_a_process_killed_between_the_renames(tmp_path, pair):
    """A real process, killed with os._exit right after the first rename of the second save."""
    old, new, inputs, out_old, out_new = pair
    old.save_pretrained(tmp_path)
    new_dir = tmp_path / "new_src"
    new.save_pretrained(new_dir)
    target = tmp_path / "target"
    old.save_pretrained(target)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        from support.models import tiny_llama
        from deltatune import PeftModel
        model = PeftModel.from_pretrained(tiny_llama(0), {str(new_dir)!r})
        real, seen = os.replace, []
        def replace(src, dst):
            real(src, dst)
            if os.path.basename(str(dst)) in ("adapter_model.safetensors", "adapter_config.json"):
                os._exit(9)  # right after the first of the pair's renames
        os.replace = replace
        model.save_pretrained({str(target)!r})
        os._exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert (target / io.JOURNAL_NAME).exists()  # killed mid-way: the journal is there to be completed
    assert _which(_load(target, inputs), out_old, out_new) == "new"
    assert sorted(os.listdir(target)) == ["README.md", io.CONFIG_NAME, io.SAFETENSORS_NAME]


def test_a_hand_mixed_pair_is_refused_in_one_line(tmp_path, pair):
    old, new, inputs, _, _ = pair
    old.save_pretrained(tmp_path / "a")
    new.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / io.CONFIG_NAME, tmp_path / "a" / io.CONFIG_NAME)  # lora_alpha 32 over 8's weights
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    message = str(info.value)
    assert "\n" not in message
    assert "lora_alpha is 32 in adapter_config.json but 8 in the weights' save" in message


def test_descriptive_fields_may_be_edited(tmp_path, pair):
    old, _, inputs, out_old, _ = pair
    old.save_pretrained(tmp_path)
    path = tmp_path / io.CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(base_model_name_or_path="somewhere/else", revision="v2", inference_mode=False,
                peft_version="0.21.2", task_type="CAUSAL_LM")
    path.write_text(json.dumps(data))
    torch.testing.assert_close(_load(tmp_path, inputs), out_old, atol=1e-6, rtol=0)


def test_a_save_that_fails_before_the_journal_leaves_the_old_pair_and_no_temporaries(tmp_path, monkeypatch, pair):
    old, new, inputs, out_old, _ = pair
    old.save_pretrained(tmp_path)
    real = io._write_temp

    def write_temp(directory, final_name, write):
        if final_name == io.CONFIG_NAME:
            raise OSError(28, "No space left on device")
        return real(directory, final_name, write)

    monkeypatch.setattr(io, "_write_temp", write_temp)
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", io.CONFIG_NAME, io.SAFETENSORS_NAME]
    monkeypatch.undo()
    torch.testing.assert_close(_load(tmp_path, inputs), out_old, atol=1e-6, rtol=0)


def test_bin_save_over_safetensors_replaces_what_readers_read(tmp_path, pair):
    old, new, inputs, _, out_new = pair
    old.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", io.CONFIG_NAME, io.BIN_NAME]
    torch.testing.assert_close(_load(tmp_path, inputs), out_new, atol=1e-6, rtol=0)


def test_sweep_removes_old_temporaries_only(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}")
    stale, fresh = tmp_path / ".tmp-abcadapter_model.safetensors", tmp_path / ".tmp-defadapter_config.json"
    stale.write_text("x")
    fresh.write_text("y")
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    assert io.sweep_stale_temp_files(tmp_path) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == [fresh.name, "metrics.jsonl"]
    assert io.sweep_stale_temp_files(tmp_path, min_age_s=0) == [str(fresh)]


def test_sweep_completes_a_journal_before_deleting(tmp_path, monkeypatch, pair):
    """A killed save's temporaries are the new pair: the sweep renames them in rather than deleting them."""
    old, new, inputs, out_old, out_new = pair
    old.save_pretrained(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(str(dst)) == io.SAFETENSORS_NAME:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    io.sweep_stale_temp_files(tmp_path, min_age_s=0)
    assert sorted(os.listdir(tmp_path)) == ["README.md", io.CONFIG_NAME, io.SAFETENSORS_NAME]
    assert _which(_load(tmp_path, inputs), out_old, out_new) == "new"


def test_other_files_in_the_directory_are_kept(tmp_path, pair):
    old, new, _, _, _ = pair
    (tmp_path / "metrics.jsonl").write_text("{}")
    (tmp_path / "other").mkdir()
    old.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", io.CONFIG_NAME, io.SAFETENSORS_NAME, "metrics.jsonl", "other"]


def test_the_training_runs_sweep_completes_an_interrupted_save_before_deleting_temporaries(tmp_path, monkeypatch,
                                                                                          pair):
    """``deltatune train`` sweeps ``.tmp-*`` files at its start; a killed save's journal names some of them, and
    deleting those would lose the new adapter: the sweep rolls the save forward first."""
    from deltatune.training import runlock

    inputs, out_old, out_new = _save_killed_between_the_pairs_renames(tmp_path, monkeypatch, pair)
    assert (tmp_path / ".deltatune-save.json").exists()
    runlock.sweep_temp_files(str(tmp_path))
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / ".deltatune-save.json").exists()
    assert _which(_load(tmp_path, inputs), out_old, out_new) == "new"


def test_the_cli_reads_the_finished_pair_of_an_interrupted_save(tmp_path, monkeypatch, pair):
    """``deltatune eval/generate/merge --adapter`` read adapter_config.json before loading: after a save killed between
    its renames they see the new config, the one that goes with the weights the loader will roll forward."""
    from deltatune.cli import loading

    inputs, out_old, out_new = _save_killed_between_the_pairs_renames(tmp_path, monkeypatch, pair)
    assert loading.check_adapter_dir(str(tmp_path))["lora_alpha"] == 32
    assert _which(_load(tmp_path, inputs), out_old, out_new) == "new"


def _save_killed_between_the_pairs_renames(tmp_path, monkeypatch, pair):
    """Save the old adapter, then the new one killed between its two renames; return inputs and both outputs."""
    old, new, inputs, out_old, out_new = pair
    old.save_pretrained(tmp_path)
    _kill_between_the_pairs_renames(monkeypatch)
    with pytest.raises(Killed):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    return inputs, out_old, out_new


def _kill_between_the_pairs_renames(monkeypatch) -> None:
    """Make the next save die after renaming the first of its two adapter files into place, before the second."""
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) in ("adapter_model.safetensors", "adapter_config.json"):
            if renamed:
                raise Killed
            renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
