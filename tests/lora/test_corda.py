"""CorDA (``init_lora_weights="corda"``): deltatune creates the adapters peft 0.21.2 creates.

Same base, same calibration samples -> the same ``A``, ``B`` and residual base as ``peft``'s
``preprocess_corda`` + ``get_peft_model`` (both modes), the model's output unchanged at initialisation, the
conversion to plain LoRA (``path_initial_model_for_weight_conversion``) crossing both ways with equal logits,
PEFT's cache/covariance files, and the refusal when ``preprocess_corda`` did not run.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess  # needs attrs (dev extra)
from support.models import VOCAB, output, perturb_trainable, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.lora.corda import CordaConfig, preprocess_corda
from deltatune.lora.init import get_peft_model_with_data

TARGETS = ["q_proj", "v_proj", "down_proj"]  # in 32 and 64: the calibration below has 130 tokens
INPUTS = {"input_ids": torch.tensor([[1, 5, 7, 9, 11, 13, 17], [2, 4, 6, 8, 10, 12, 14]])}


def samples() -> list[torch.Tensor]:
    """Ten calibration samples ``(1, tokens)`` of 8 to 17 tokens (one per forward, as PEFT's recipe runs them)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (1, 8 + i), generator=g) for i in range(10)]


def runner(model):
    return lambda: [model(input_ids=ids) for ids in samples()]


def kwargs(method: str, **extra) -> dict:
    return {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "corda",
            "corda_config": {"corda_method": method}, **extra}


def peft_corda(method: str, make=tiny_llama, **extra):
    config = peft.LoraConfig(**{**kwargs(method, **extra),
                                "corda_config": peft.tuners.lora.config.CordaConfig(corda_method=method)})
    base = make()
    peft_preprocess(base, config, run_model=runner(base))
    return peft.get_peft_model(base, config)


def ours_corda(method: str, make=tiny_llama, **extra):
    config = dt.LoraConfig(**kwargs(method, **extra))
    base = make()
    preprocess_corda(base, config, run_model=runner(base))
    return dt.get_peft_model(base, config)


def assert_same_state(ours, theirs, atol: float = 1e-6) -> None:
    """Every tensor of the two models (adapter factors and every base weight, residuals included)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_adapter_and_residual_base_equal_peft(method):
    theirs, ours = peft_corda(method), ours_corda(method)
    assert_same_state(ours, theirs)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert (layer.base_layer.weight - w).abs().max() > 1e-3  # the base was rewritten into the residual ...
    residual_plus_ba = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ \
        layer.lora_A["default"].weight
    torch.testing.assert_close(residual_plus_ba, w, rtol=0, atol=1e-5)  # ... W - s B A, so W_res + s B A = W
    torch.testing.assert_close(output(ours, INPUTS), output(tiny_llama(), INPUTS), rtol=0, atol=1e-4)
    assert not hasattr(layer.base_layer, "eigens")  # dropped once used, as PEFT


def reference_covariance(model, name: str) -> torch.Tensor:
    """The paper's C for layer ``name``: mean over samples of X^T X, each sample X: (tokens, in) scaled by
    1 / |max X| (PEFT's normalisation), collected with a hook of this test's own."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, inp, out: seen.append(inp[0][0].detach()))
    with torch.no_grad():
        runner(model)()
    handle.remove()
    return torch.stack([(x / x.max().abs()).T @ (x / x.max().abs()) for x in seen]).mean(0)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_adapter_holds_the_largest_or_smallest_singular_values_of_w_c(method):
    """s B A C_d = U_r S_r Vh_r (V^T C_d = Vh): its singular values are the r largest (IPM) or smallest (KPM)
    singular values of W C_d, C_d = C + 0.01 mean(diag C) I (this C inverts at the first damping)."""
    name = "model.layers.1.mlp.down_proj"
    base = tiny_llama()
    c = reference_covariance(base, name)
    c_d = c + 0.01 * torch.diag(c).mean() * torch.eye(c.shape[0])
    assert torch.dist(c_d @ torch.linalg.inv(c_d), torch.eye(c.shape[0])) < 0.05
    spectrum = torch.linalg.svdvals(base.get_submodule(name).weight.detach() @ c_d)  # (32,) descending
    layer = ours_corda(method).base_model.model.get_submodule(name)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    got = torch.linalg.svdvals(delta.detach() @ c_d)[:4]
    want = spectrum[:4] if method == "ipm" else spectrum[-4:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert spectrum[3] > 1.5 * spectrum[-4]  # the two ends differ: the test tells IPM from KPM


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_gpt2_conv1d_equals_peft(method):
    """transformers' Conv1D stores W as (in, out): decomposed and rewritten transposed, as PEFT."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set for Conv1D
        extra = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        ours, theirs = ours_corda(method, tiny_gpt2, **extra), peft_corda(method, tiny_gpt2, **extra)
    assert_same_state(ours, theirs)
    torch.testing.assert_close(output(ours, INPUTS), output(tiny_gpt2(), INPUTS), rtol=0, atol=1e-4)


def test_rank_pattern_and_rslora_equal_peft():
    extra = dict(rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both: rslora + patterns cannot be converted later
        assert_same_state(ours_corda("kpm", **extra), peft_corda("kpm", **extra))


def test_refused_before_the_model_changes_when_preprocess_did_not_run():
    config = dt.LoraConfig(**kwargs("ipm"))
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=r"preprocess_corda.*self_attn.q_proj has none"):
        dt.get_peft_model(base, config)
    assert list(base.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="run `preprocess_corda` first"):  # peft's condition and exception type
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(**{**kwargs("ipm"), "corda_config": None}))
    # eigens built for another rank (e.g. a stale cache_file) are refused too, before anything changes
    preprocess_corda(base, dt.LoraConfig(**{**kwargs("ipm"), "r": 2}), run_model=runner(base))
    with pytest.raises(ConfigError, match=r"U_WC is \(32, 2\), not \(32, 4\)"):
        dt.get_peft_model(base, config)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ConfigError, match="needs run_model"):
        preprocess_corda(tiny_llama(), config)


def test_converted_adapter_loads_in_peft_on_the_original_base(tmp_path):
    ours = ours_corda("ipm").eval()
    ours.save_pretrained(tmp_path / "init")
    perturb_trainable(ours, seed=3, std=0.05)  # stands in for training
    trained = output(ours, INPUTS)
    assert (trained - output(tiny_llama(), INPUTS)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8 and saved["lora_alpha"] == 16
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(output(theirs, INPUTS), trained, rtol=0, atol=1e-5)


def test_peft_created_adapter_loads_in_deltatune(tmp_path):
    theirs = peft_corda("kpm").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "init"))
        perturb_trainable(theirs, seed=4, std=0.05)
        trained = output(theirs, INPUTS)
        theirs.save_pretrained(str(tmp_path / "as_is"))
        theirs.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")  # the original base
    torch.testing.assert_close(output(plain, INPUTS), trained, rtol=0, atol=1e-5)
    residual = tiny_llama()  # saved as it is, the adapter needs PEFT's residual base
    residual.load_state_dict(theirs.get_base_model().state_dict(), strict=False)
    residual.load_state_dict({k.replace(".base_layer", ""): v for k, v in theirs.get_base_model().state_dict().items()
                              if ".base_layer." in k}, strict=False)
    with pytest.warns(UserWarning, match="residual base"):
        as_is = dt.PeftModel.from_pretrained(residual, tmp_path / "as_is")
    torch.testing.assert_close(output(as_is, INPUTS), trained, rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "as_is" / "adapter_config.json").read_text())
    assert saved["corda_config"] == dataclasses.asdict(peft.tuners.lora.config.CordaConfig(corda_method="kpm"))


def test_config_and_files_as_peft(tmp_path):
    """corda_config is PEFT's dataclass (from a dict or None) and saved as PEFT's dict; the cache_file and
    covariance_file deltatune writes are PEFT's format: peft builds the same adapter from them without data."""
    with pytest.warns(UserWarning, match="Using default CorDA config"):
        config = dt.LoraConfig(init_lora_weights="corda")
    assert config.corda_config == CordaConfig() and CordaConfig().corda_method == "ipm"
    assert dt.CordaConfig is CordaConfig
    peft_default = dataclasses.asdict(peft.tuners.lora.config.CordaConfig())
    assert config.to_dict()["corda_config"] == peft_default == dataclasses.asdict(CordaConfig())

    files = dict(cache_file=str(tmp_path / "c" / "cache.pt"), covariance_file=str(tmp_path / "c" / "cov.pt"))
    config = dt.LoraConfig(**{**kwargs("kpm"), "corda_config": {"corda_method": "kpm", **files}})
    base = tiny_llama()
    preprocess_corda(base, config, run_model=runner(base))
    ours = dt.get_peft_model(base, config)
    for only in ("cache_file", "covariance_file"):  # each file alone rebuilds the adapter, without run_model
        sub = peft.tuners.lora.config.CordaConfig(corda_method="kpm", **{only: files[only]})
        pconfig = peft.LoraConfig(**{**kwargs("kpm"), "corda_config": sub})
        pbase = tiny_llama()
        peft_preprocess(pbase, pconfig)
        assert_same_state(ours, peft.get_peft_model(pbase, pconfig))


def test_get_peft_model_with_data_runs_each_sample_alone_without_padding():
    """Padded batches give the adapter of the samples run one by one (PEFT's recipe)."""
    rows = samples()
    width = max(r.shape[1] for r in rows)
    batches = []
    for i in range(0, len(rows), 4):  # right-padded batches of 4, 4, 2
        chunk = rows[i:i + 4]
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, :r.shape[1]], mask[j, :r.shape[1]] = r[0], 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    ours = get_peft_model_with_data(tiny_llama(), dt.LoraConfig(**kwargs("ipm")), batches)
    assert_same_state(ours, ours_corda("ipm"), atol=1e-5)


def test_batched_run_model_and_hooked_model():
    """A (batch, tokens, in) input counts each row as a sample (PEFT's hook takes batch 1 only), and
    hooked_model collects the covariances on another copy of the model."""
    equal_length = [s[:, :8] for s in samples()]
    reference = tiny_llama()
    config = dt.LoraConfig(**kwargs("kpm"))
    preprocess_corda(reference, config, run_model=lambda: [reference(input_ids=s) for s in equal_length])
    batched, hooked, copy = tiny_llama(), tiny_llama(), tiny_llama()
    preprocess_corda(batched, config, run_model=lambda: batched(input_ids=torch.cat(equal_length)))
    preprocess_corda(hooked, config, run_model=lambda: copy(input_ids=torch.cat(equal_length)), hooked_model=copy)
    want = dt.get_peft_model(reference, config)
    assert_same_state(dt.get_peft_model(batched, config), want)
    assert_same_state(dt.get_peft_model(hooked, config), want)
