"""DoRA on ``nn.Embedding``: the math against an independent reference, merge/unmerge, and files crossing with
``peft`` 0.21.2 both ways with equal logits (PEFT normalises each embedding dimension over the vocabulary)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import deltatune as dt


class EmbModel(nn.Module):
    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        if scale is not None:  # Gemma-style scaled embedding: forward multiplies by embed_scale
            self.emb.register_buffer("embed_scale", torch.tensor(scale))
            self.emb.forward = lambda x, e=self.emb: nn.Embedding.forward(e, x) * e.embed_scale
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


def _base(scale: float | None = None) -> EmbModel:
    torch.manual_seed(0)
    return EmbModel(scale)


def _config(lib, **kw):
    kw = {"target_modules": ["emb"], "use_dora": True, "init_lora_weights": False, "r": 4, "lora_alpha": 8, **kw}
    return lib.LoraConfig(**kw)


def _perturb_magnitude(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))


IDS = torch.tensor([[0, 3, 7, 19, 3], [5, 5, 1, 0, 12]])


def test_forward_equals_reference_math():
    model = dt.get_peft_model(_base(), _config(dt))
    _perturb_magnitude(model)
    layer = model.base_model.model.emb
    w = layer.base_layer.weight.detach()                                             # (num, dim)
    a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    delta = 2.0 * (b @ a).T                                                          # s = 8 / 4
    adapted = w + delta
    m = layer.lora_magnitude_vector["default"].weight.detach()                       # (dim,)
    assert m.shape == (8,)
    expected = (m / adapted.norm(dim=0)) * adapted[IDS]                             # column-normalised
    torch.testing.assert_close(layer(IDS), expected, rtol=1e-5, atol=1e-6)


def test_identity_at_init_and_magnitude_is_column_norm():
    base = _base()
    expected = base(IDS)
    model = dt.get_peft_model(base, _config(dt, init_lora_weights=True))
    layer = model.base_model.model.emb
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight,
                               layer.base_layer.weight.norm(dim=0))
    torch.testing.assert_close(model(IDS), expected)


@pytest.mark.parametrize("scale", [None, 3.0])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_crosses_with_peft_equal_logits(tmp_path, direction, scale):
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    torch.manual_seed(1)
    model = src.get_peft_model(_base(scale), _config(src))
    _perturb_magnitude(model)
    model.eval()
    expected = model(IDS)
    model.save_pretrained(tmp_path)
    loaded = dst.PeftModel.from_pretrained(_base(scale), tmp_path).eval()
    torch.testing.assert_close(loaded(IDS), expected, rtol=1e-5, atol=1e-6)
    # both libraries give the same magnitude shape and key
    keys = [k for k in loaded.state_dict() if "lora_magnitude_vector" in k]
    assert keys == ["base_model.model.emb.lora_magnitude_vector.default.weight"]


@pytest.mark.parametrize("scale", [None, 3.0])
def test_merge_unmerge_and_merge_and_unload(scale):
    model = dt.get_peft_model(_base(scale), _config(dt)).eval()
    _perturb_magnitude(model)
    layer = model.base_model.model.emb
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = model(IDS)
    model.merge_adapter()
    torch.testing.assert_close(model(IDS), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(IDS), unmerged, rtol=1e-5, atol=1e-6)
    plain = model.merge_and_unload(safe_merge=True)
    assert type(plain.emb) is not type(layer)
    torch.testing.assert_close(plain(IDS), unmerged, rtol=1e-5, atol=1e-5)


def test_merged_weight_equals_peft_merge():
    torch.manual_seed(1)
    ours = dt.get_peft_model(_base(), _config(dt))
    _perturb_magnitude(ours)
    theirs = peft.get_peft_model(_base(), _config(peft))
    theirs.load_state_dict(ours.state_dict())
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(ours.base_model.model.emb.base_layer.weight,
                               theirs.base_model.model.emb.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_two_active_dora_adapters_merged_equals_forward_and_peft():
    def build(lib):
        torch.manual_seed(2)
        model = lib.get_peft_model(_base(), _config(lib), adapter_name="a")
        model.add_adapter("b", _config(lib, r=2, lora_alpha=3))
        _perturb_magnitude(model)
        model.base_model.set_adapter(["a", "b"])
        return model.eval()

    ours, theirs = build(dt), build(peft)
    theirs.load_state_dict(ours.state_dict())
    forward = ours(IDS)
    torch.testing.assert_close(theirs(IDS), forward, rtol=1e-5, atol=1e-6)
    ours.merge_adapter(["a", "b"])
    torch.testing.assert_close(ours(IDS), forward, rtol=1e-5, atol=1e-5)


def test_mixed_batch_rows_match_single_adapter_runs():
    torch.manual_seed(3)
    model = dt.get_peft_model(_base(), _config(dt), adapter_name="a")
    model.add_adapter("b", _config(dt, use_dora=False))
    _perturb_magnitude(model)
    model.eval()
    outs = {}
    with model.disable_adapter():
        outs["__base__"] = model(IDS)
    for name in ("a", "b"):
        model.set_adapter(name)
        outs[name] = model(IDS)
    names = ["a", "__base__"]
    mixed = model(IDS, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], outs[name][i], rtol=1e-5, atol=1e-6)


def test_gradients_reach_magnitude_and_factors_but_not_through_the_norm():
    model = dt.get_peft_model(_base(), _config(dt))
    model(IDS).sum().backward()
    layer = model.base_model.model.emb
    for p in (layer.lora_magnitude_vector["default"].weight, layer.lora_embedding_A["default"],
              layer.lora_embedding_B["default"]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # same gradients as PEFT's layer on the same tensors (the norm detached in both)
    theirs = peft.get_peft_model(_base(), _config(peft))
    theirs.load_state_dict(model.state_dict())
    theirs(IDS).sum().backward()
    emb = theirs.base_model.model.emb
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.grad,
                               emb.lora_magnitude_vector["default"].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_embedding_A["default"].grad, emb.lora_embedding_A["default"].grad,
                               rtol=1e-5, atol=1e-6)


def test_plain_lora_on_scaled_embedding_scales_the_update_like_peft():
    """A base that multiplies its output by ``embed_scale`` scales the LoRA update too (PEFT's rule), so merging
    (which the base then scales) equals the unmerged forward."""
    torch.manual_seed(4)
    ours = dt.get_peft_model(_base(3.0), _config(dt, use_dora=False)).eval()
    theirs = peft.get_peft_model(_base(3.0), _config(peft, use_dora=False)).eval()
    theirs.load_state_dict(ours.state_dict())
    expected = theirs(IDS)
    torch.testing.assert_close(ours(IDS), expected, rtol=1e-5, atol=1e-6)
    ours.merge_adapter()
    torch.testing.assert_close(ours(IDS), expected, rtol=1e-5, atol=1e-5)


def test_non_scalar_embed_scale_warns_and_is_not_applied():
    model = _base()
    model.emb.register_buffer("embed_scale", torch.ones(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = dt.get_peft_model(model, _config(dt, use_dora=False))
        pm(IDS)
    assert any(issubclass(w.category, dt.PeftWarning) and "embed_scale" in str(w.message) for w in caught)
