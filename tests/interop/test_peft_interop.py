"""deltatune <-> Hugging Face PEFT 0.21.2: the same adapter files, read and written both ways.

One table of cases; each is (model factory, LoraConfig kwargs, adapter name). For every case:

- PEFT builds + perturbs + saves  -> deltatune loads into a fresh base -> same logits;
- deltatune builds + perturbs + saves -> PEFT loads into a fresh base -> same logits;
- both libraries, same config, same base: the safetensors files have the same keys, shapes, dtypes;
- deltatune's adapter_config.json reads back in PEFT with the same fields;
- deltatune -> deltatune: load + re-save gives bit-identical tensors and the same config JSON;
- PEFT's ``adapter_model.bin`` (``safe_serialization=False``) loads in deltatune.

Adapter tensors are perturbed with seeded noise after creation (every trainable parameter, including
``lora_B``, DoRA magnitudes, biases under ``bias="all"/"lora_only"`` and ``modules_to_save`` copies), so an
adapter that loaded partially or into the wrong place changes the logits.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.adapters import adapter_dir, quiet
from support.models import (
    kind_of,
    make_inputs,
    output,
    perturb_trainable,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_net,
    tiny_t5,
)

import deltatune

ATOL = 1e-6
RTOL = 1e-5

QV = ["q_proj", "v_proj"]

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def case(case_id: str, factory, adapter_name: str = "default", **config) -> tuple:
    """One row: (id, model factory, LoraConfig kwargs, adapter name)."""
    return (case_id, factory, config, adapter_name)


CASES = [
    case("llama-lora", tiny_llama, r=4, lora_alpha=8, target_modules=QV, task_type="CAUSAL_LM"),
    case("llama-rslora", tiny_llama, r=4, lora_alpha=16, use_rslora=True, target_modules=QKVO),
    case("llama-dora", tiny_llama, r=4, lora_alpha=8, use_dora=True, target_modules=[*QV, "up_proj"]),
    case("llama-init-false", tiny_llama, r=2, lora_alpha=4, init_lora_weights=False, target_modules=QV),
    case("llama-gaussian", tiny_llama, r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=QV),
    case("llama-rank-alpha-pattern", tiny_llama, r=4, lora_alpha=8, target_modules=[*QV, "o_proj"],
         rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6}, alpha_pattern={"o_proj": 3}),
    case("llama-modules-to-save", tiny_llama, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    case("llama-embedding", tiny_llama, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    case("llama-all-linear", tiny_llama, r=2, target_modules="all-linear"),
    case("llama-regex", tiny_llama, r=2, target_modules=r".*layers\.1\.(self_attn\.k_proj|mlp\.down_proj)"),
    case("llama-layers-pattern", tiny_llama, r=2, target_modules=[*QV, "gate_proj"], layers_to_transform=[1],
         layers_pattern="layers"),
    case("llama-layers-nopattern", tiny_llama, r=2, target_modules=QV, layers_to_transform=0),
    case("llama-exclude-list", tiny_llama, r=2, target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
    case("llama-exclude-regex", tiny_llama, r=2, target_modules=[*QV, "k_proj"], exclude_modules=r".*layers\.0\..*"),
    case("llama-named-adapter", tiny_llama, "my_adapter", r=4, lora_alpha=8, target_modules=QV),
    case("gpt2-conv1d", tiny_gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
         fan_in_fan_out=True),
    case("gpt2-dora", tiny_gpt2, r=4, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True),
    case("gpt2-all-linear", tiny_gpt2, r=2, target_modules="all-linear", fan_in_fan_out=True),
    case("gpt2-embedding", tiny_gpt2, r=2, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
    case("bert-seqcls", tiny_bert, r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    case("bert-seqcls-named", tiny_bert, "cls", r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    case("bert-bias-all", tiny_bert, r=4, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS"),
    case("bert-bias-lora-only", tiny_bert, r=4, target_modules=["query", "value", "dense"], bias="lora_only"),
    case("bert-lora-bias", tiny_bert, r=4, target_modules=["query", "key"], lora_bias=True, task_type="SEQ_CLS"),
    case("bert-explicit-mts", tiny_bert, r=2, target_modules=["value"], modules_to_save=["classifier", "pooler"]),
    case("bert-all-linear-seqcls", tiny_bert, r=2, target_modules="all-linear", task_type="SEQ_CLS"),
    case("bert-embedding", tiny_bert, r=2, target_modules=["word_embeddings", "query"], task_type="SEQ_CLS"),
    case("t5-default-targets", tiny_t5, r=4, task_type="SEQ_2_SEQ_LM"),
    case("t5-regex", tiny_t5, r=2, target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|v)"),
    case("net-linear", tiny_net, r=3, lora_alpha=6, target_modules=["lin1", "head"]),
    case("net-all-linear", tiny_net, r=2, target_modules="all-linear"),
    case("net-embedding", tiny_net, r=3, target_modules=["emb"]),
    case("net-conv", tiny_net, r=2, lora_alpha=5, target_modules=["conv1d", "conv2d", "conv3d"]),
    case("net-dora-conv2d", tiny_net, r=2, use_dora=True, target_modules=["conv2d", "lin1"]),
    case("net-dora-conv-all", tiny_net, r=2, use_dora=True, target_modules=["conv1d", "conv3d"]),
    case("net-lora-bias", tiny_net, r=2, lora_bias=True, target_modules=["lin1", "head", "conv2d"]),
    case("net-rslora-named", tiny_net, "other", r=4, use_rslora=True, target_modules=["lin1", "conv2d", "emb"]),
]

CASE_IDS = [c[0] for c in CASES]




def _build(lib, factory, kwargs, adapter_name):
    """Base from ``factory``, adapter from ``lib`` (peft or deltatune), every trainable tensor perturbed."""
    model = lib.get_peft_model(factory(0), lib.LoraConfig(**copy.deepcopy(kwargs)), adapter_name=adapter_name)
    perturb_trainable(model)
    return model.eval()


def _layout(model) -> dict:
    grads = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    return {k: (tuple(v.shape), grads.get(k)) for k, v in model.state_dict().items()}


@dataclass
class Saved:
    """One case, built and saved once by each library (the expensive part), shared by the tests below."""

    inputs: dict
    base_out: torch.Tensor  # the untouched base model
    peft_root: str
    peft_out: torch.Tensor
    dt_root: str
    dt_out: torch.Tensor
    peft_layout: dict  # {state-dict key: (shape, requires_grad)} of the PeftModel in memory
    dt_layout: dict


_CACHE: dict[str, Saved] = {}


@pytest.fixture(params=CASES, ids=CASE_IDS)
def row(request, tmp_path_factory):
    case_id, factory, kwargs, name = request.param
    if case_id not in _CACHE:
        inputs = make_inputs(kind_of(factory))
        root = tmp_path_factory.mktemp(case_id)
        with quiet():
            src_peft = _build(peft, factory, kwargs, name)
            src_peft.save_pretrained(root / "peft")
            src_dt = _build(deltatune, factory, kwargs, name)
            src_dt.save_pretrained(root / "dt")
            _CACHE[case_id] = Saved(inputs, output(factory(0), inputs), str(root / "peft"), output(src_peft, inputs),
                                    str(root / "dt"), output(src_dt, inputs), _layout(src_peft), _layout(src_dt))
    return request.param + (_CACHE[case_id],)


def test_peft_to_deltatune(row):
    _, factory, _kwargs, name, saved = row
    with quiet():
        loaded = deltatune.PeftModel.from_pretrained(factory(0), adapter_dir(saved.peft_root, name),
                                                     adapter_name=name)
    assert isinstance(loaded, deltatune.PeftModel)
    assert loaded.active_adapter == name
    assert not torch.allclose(saved.peft_out, saved.base_out, atol=1e-4), "the perturbed adapter must change the output"
    torch.testing.assert_close(output(loaded.eval(), saved.inputs), saved.peft_out, atol=ATOL, rtol=RTOL)


def test_deltatune_to_peft(row):
    _, factory, _kwargs, name, saved = row
    with quiet():
        loaded = peft.PeftModel.from_pretrained(factory(0), adapter_dir(saved.dt_root, name), adapter_name=name)
    assert not torch.allclose(saved.dt_out, saved.base_out, atol=1e-4), "the perturbed adapter must change the output"
    torch.testing.assert_close(output(loaded.eval(), saved.inputs), saved.dt_out, atol=ATOL, rtol=RTOL)


def test_same_module_layout_and_trainable_params(row):
    """PEFT's attribute layout in memory (``base_model.model.<path>.lora_A.<adapter>.weight``...) and the
    same parameters trainable: what makes state dicts, optimizers and user code interchangeable."""
    saved = row[-1]
    only_dt = sorted(set(saved.dt_layout) - set(saved.peft_layout))
    only_peft = sorted(set(saved.peft_layout) - set(saved.dt_layout))
    assert not only_dt and not only_peft, f"only in deltatune: {only_dt[:6]}; only in peft: {only_peft[:6]}"
    diff = {k: (saved.dt_layout[k], v) for k, v in saved.peft_layout.items() if saved.dt_layout[k] != v}
    assert not diff, f"(shape, requires_grad) deltatune vs peft: {dict(list(diff.items())[:6])}"


def _file_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def test_same_file_keys_shapes_and_location(row):
    _, _factory, _kwargs, name, saved = row
    for lib, root in (("peft", saved.peft_root), ("deltatune", saved.dt_root)):
        d = adapter_dir(root, name)
        assert os.path.isfile(os.path.join(d, "adapter_model.safetensors")), f"{lib}: no safetensors in {d}"
        assert os.path.isfile(os.path.join(d, "adapter_config.json")), f"{lib}: no config in {d}"
        if name != "default":
            assert not os.path.exists(os.path.join(root, "adapter_model.safetensors")), (
                f"{lib}: a non-default adapter must go into its sub-folder only")
    peft_files = _file_shapes(adapter_dir(saved.peft_root, name))
    dt_files = _file_shapes(adapter_dir(saved.dt_root, name))
    assert sorted(dt_files) == sorted(peft_files), (
        f"only in deltatune: {sorted(set(dt_files) - set(peft_files))}; "
        f"only in peft: {sorted(set(peft_files) - set(dt_files))}")
    assert dt_files == peft_files


# Fields that change what the adapter computes or how it is loaded: identical to PEFT's for the same config.
# (``target_modules`` is compared here unless it was "all-linear", whose expansion is checked below.)
CONFIG_FIELDS = ["peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora",
                 "use_dora", "bias", "lora_bias", "modules_to_save", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                 "layers_to_transform", "layers_pattern", "init_lora_weights", "lora_dropout", "inference_mode"]
# The writer's version is the only field allowed to differ in the full file.
IGNORED_CONFIG_FIELDS = {"peft_version"}


def _norm(value):
    if isinstance(value, (list, set, tuple)):
        return sorted(value)
    return value


def _configs(saved, name) -> tuple[dict, dict]:
    with open(os.path.join(adapter_dir(saved.peft_root, name), "adapter_config.json")) as fh:
        peft_json = json.load(fh)
    with open(os.path.join(adapter_dir(saved.dt_root, name), "adapter_config.json")) as fh:
        dt_json = json.load(fh)
    return peft_json, dt_json


def test_config_json_reads_in_peft(row):
    _, _factory, kwargs, name, saved = row
    with quiet():
        cfg = peft.PeftConfig.from_pretrained(adapter_dir(saved.dt_root, name))
    assert isinstance(cfg, peft.LoraConfig)
    peft_json, dt_json = _configs(saved, name)
    for field in CONFIG_FIELDS:
        if field == "target_modules" and kwargs.get("target_modules") == "all-linear":
            continue
        assert _norm(dt_json.get(field)) == _norm(peft_json.get(field)), (
            f"adapter_config.json[{field!r}]: deltatune wrote {dt_json.get(field)!r}, peft {peft_json.get(field)!r}")
    # What PEFT parsed from deltatune's file.
    assert str(getattr(cfg.peft_type, "value", cfg.peft_type)) == "LORA"
    assert cfg.r == kwargs["r"]
    assert cfg.lora_alpha == kwargs.get("lora_alpha", 8)
    assert getattr(cfg.task_type, "value", cfg.task_type) == kwargs.get("task_type")
    assert cfg.inference_mode is True
    if kwargs.get("target_modules") != "all-linear":
        assert _norm(cfg.target_modules) == _norm(peft_json["target_modules"])


def test_config_json_identical_to_peft(row):
    """The whole adapter_config.json, metadata included (``auto_mapping``, the "all-linear" expansion)."""
    _, _factory, _kwargs, name, saved = row
    peft_json, dt_json = _configs(saved, name)
    missing = sorted(set(peft_json) - set(dt_json) - IGNORED_CONFIG_FIELDS)
    assert not missing, f"adapter_config.json lacks PEFT's fields {missing}"
    diff = {f: (dt_json.get(f), peft_json[f]) for f in sorted(set(peft_json) - IGNORED_CONFIG_FIELDS)
            if _norm(dt_json.get(f)) != _norm(peft_json[f])}
    assert not diff, f"fields written differently (deltatune, peft): {diff}"


def test_deltatune_roundtrip_is_exact(row, tmp_path):
    _, factory, _kwargs, name, saved = row
    with quiet():
        loaded = deltatune.PeftModel.from_pretrained(factory(0), adapter_dir(saved.dt_root, name), adapter_name=name)
        loaded.save_pretrained(tmp_path)
    # Bitwise: the same weights, the same computation.
    assert torch.equal(output(loaded.eval(), saved.inputs), saved.dt_out)
    a = load_file(os.path.join(adapter_dir(saved.dt_root, name), "adapter_model.safetensors"))
    b = load_file(os.path.join(adapter_dir(tmp_path, name), "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(os.path.join(adapter_dir(saved.dt_root, name), "adapter_config.json")) as fh:
        ja = json.load(fh)
    with open(os.path.join(adapter_dir(tmp_path, name), "adapter_config.json")) as fh:
        jb = json.load(fh)
    assert ja == jb


BIN_CASES = [c for c in CASES if c[0] in ("llama-lora", "gpt2-conv1d", "bert-seqcls", "net-dora-conv2d",
                                          "net-rslora-named", "llama-embedding")]


@pytest.mark.parametrize("row", BIN_CASES, ids=[c[0] for c in BIN_CASES])
def test_deltatune_reads_peft_bin(row, tmp_path):
    _, factory, kwargs, name = row
    inputs = make_inputs(kind_of(factory))
    with quiet():
        src = _build(peft, factory, kwargs, name)
        expected = output(src, inputs)
        src.save_pretrained(tmp_path, safe_serialization=False)
        d = adapter_dir(tmp_path, name)
        assert os.path.isfile(os.path.join(d, "adapter_model.bin"))
        assert not os.path.exists(os.path.join(d, "adapter_model.safetensors"))
        loaded = deltatune.PeftModel.from_pretrained(factory(0), d, adapter_name=name)
    torch.testing.assert_close(output(loaded.eval(), inputs), expected, atol=ATOL, rtol=RTOL)


def test_peft_reads_deltatune_bin(tmp_path):
    """deltatune's ``safe_serialization=False`` writes a ``.bin`` that PEFT loads."""
    inputs = make_inputs("llama")
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": QV}
    src = _build(deltatune, tiny_llama, kwargs, "default")
    expected = output(src, inputs)
    src.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    torch.testing.assert_close(output(loaded.eval(), inputs), expected, atol=ATOL, rtol=RTOL)


def test_peft_multi_adapter_dir_loads_each_adapter(tmp_path):
    """PEFT's multi-adapter save (default at the root, others in sub-folders) loads adapter by adapter."""
    inputs = make_inputs("llama")
    with quiet():
        src = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=2, target_modules=QV))
        src.add_adapter("second", peft.LoraConfig(r=3, target_modules=["k_proj"]))
        perturb_trainable(src)  # only "default" is trainable; perturb "second" explicitly
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for n, p in src.named_parameters():
                if ".second." in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        src.eval()
        out_default = output(src, inputs)
        src.set_adapter("second")
        out_second = output(src, inputs)
        src.save_pretrained(tmp_path)
        dt = deltatune.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
        dt.load_adapter(tmp_path / "second", adapter_name="second")
    dt.eval()
    torch.testing.assert_close(output(dt, inputs), out_default, atol=ATOL, rtol=RTOL)
    dt.set_adapter("second")
    torch.testing.assert_close(output(dt, inputs), out_second, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("cfg", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
    {"target_modules": ["embed_tokens"]},
], ids=["lora", "dora", "embedding"])
def test_half_precision_base_keeps_fp32_adapter_like_peft(tmp_path, cfg):
    """On a bf16 base, PEFT (autocast_adapter_dtype=True) keeps LoRA tensors in fp32, and each layer returns
    the base dtype; deltatune does the same and loads PEFT's file to the same logits."""
    inputs = make_inputs("llama")
    cfg = {"r": 4, **cfg}
    with quiet():
        dt = deltatune.get_peft_model(tiny_llama(0).to(torch.bfloat16), deltatune.LoraConfig(**cfg))
        pf = peft.get_peft_model(tiny_llama(0).to(torch.bfloat16), peft.LoraConfig(**cfg))
    dt_types = {k: v.dtype for k, v in dt.state_dict().items()}
    pf_types = {k: v.dtype for k, v in pf.state_dict().items()}
    assert dt_types == pf_types
    assert any(t == torch.float32 for k, t in dt_types.items() if "lora_" in k)
    perturb_trainable(pf)
    with quiet():
        pf.save_pretrained(tmp_path)
        loaded = deltatune.PeftModel.from_pretrained(tiny_llama(0).to(torch.bfloat16), tmp_path)
    torch.testing.assert_close(output(loaded.eval(), inputs), output(pf.eval(), inputs), atol=1e-2, rtol=1e-2)
