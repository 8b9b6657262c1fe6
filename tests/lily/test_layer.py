"""Lily layers against the formula computed here from PEFT's definition, against peft's own layer on the same
tensors, the sharing across layers (one ``A`` per ``stride_A`` neighbours, one set of experts per target), files
both ways with peft (sharing included), identity at init, the merge refusal, a second adapter, mixed batches, GPT-2's
``Conv1D``, and PEFT's config refusals (same sentence first).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import LilyConfig, LilyLayer, get_peft_model
from deltatune.errors import ConfigError, MergeError

ATOL = 1e-6


class Stack(nn.Module):
    """Three blocks of the same two linears (``blocks.<i>.up: 8 -> 12``, ``blocks.<i>.down: 12 -> 8``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 12), "down": nn.Linear(12, 8)})
                                    for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["down"](torch.tanh(block["up"](x)))
        return x


def _stack(lib=deltatune, seed: int = 5, **config) -> nn.Module:
    config = {"r": 3, "num_B": 3, "stride_A": 2, "target_modules": ["up", "down"], **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(Stack(), lib.LilyConfig(**config))
    perturb_trainable(model, seed=seed, std=0.3)
    return model.eval()


def _layers(model: nn.Module, suffix: str) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(suffix) and hasattr(m, "lily_A")]


def _reference(layer: nn.Module, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``W x + b + s · (A x) Σ_e p_e B_e`` with ``p = mean over tokens of softmax(R A x)`` (the paper's/PEFT's)."""
    base = layer.base_layer
    w = base.weight.T if isinstance(base, Conv1D) else base.weight
    a, r_w = layer.lily_A[name].weight, layer.lily_router[name].weight  # (r, in), (E, r)
    experts = layer.lily_B[name].weight.reshape(r_w.shape[0], a.shape[0], -1)  # (E, r, out)
    h = x @ a.T
    p = torch.softmax(h @ r_w.T, dim=-1).reshape(-1, r_w.shape[0]).mean(0)
    b_bar = sum(p[e] * experts[e] for e in range(r_w.shape[0]))
    return x @ w.T + base.bias + layer.scaling[name] * (h @ b_bar)


def test_layer_matches_reference():
    model = _stack()
    x = torch.randn(4, 5, 8)
    layer = _layers(model, "blocks.1.up")[0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x), atol=ATOL, rtol=1e-5)
        # the router averages over the whole batch: a row alone routes differently (as PEFT's)
        assert not torch.allclose(layer(x[:1]), layer(x)[:1], atol=1e-4)


def test_sharing_across_layers():
    model = _stack(stride_A=2)
    for suffix in ("up", "down"):
        layers = _layers(model, suffix)
        assert len(layers) == 3
        a = [id(m.lily_A["default"]) for m in layers]
        assert a[0] == a[1] != a[2]  # blocks 0 and 1 share A, block 2 starts the next stride
        assert len({id(m.lily_B["default"]) for m in layers}) == 1  # one set of experts per target
        assert len({id(m.lily_router["default"]) for m in layers}) == 3  # each layer routes for itself
    ups, downs = _layers(model, "up"), _layers(model, "down")
    assert ups[0].lily_B["default"] is not downs[0].lily_B["default"]  # targets never share
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * (2 + 1 + 3)  # per target: 2 A, 1 stack of experts, 3 routers
    one = _stack(stride_A=1)
    assert len({id(m.lily_A["default"]) for m in _layers(one, "up")}) == 3


def test_shared_tensors_train_once_from_every_layer():
    model = _stack(stride_A=3)
    model.train()
    model(torch.randn(2, 4, 8)).pow(2).mean().backward()
    ups = _layers(model, "up")
    grad = ups[0].lily_A["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert ups[2].lily_A["default"].weight.grad is grad


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_equal_to_peft_on_the_same_tensors(direction, tmp_path):
    src_lib, dst_lib = (peft, deltatune) if direction == "peft_to_ours" else (deltatune, peft)
    source = _stack(src_lib)
    source.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dst_lib.PeftModel.from_pretrained(Stack(), tmp_path).eval()
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), atol=ATOL, rtol=1e-5)
        assert not torch.allclose(source(x), Stack()(x), atol=1e-3)
    if dst_lib is deltatune:  # the loaded copies land in one shared tensor again
        ups = _layers(loaded, "up")
        assert ups[0].lily_A["default"] is ups[1].lily_A["default"]


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_files_cross_with_peft_on_llama(direction, tmp_path):
    config = {"r": 4, "num_B": 3, "stride_A": 2, "scaling": 0.5, "task_type": "CAUSAL_LM"}
    src_lib, dst_lib = (peft, deltatune) if direction == "peft_to_ours" else (deltatune, peft)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = src_lib.get_peft_model(tiny_llama(), src_lib.LilyConfig(**config))
        perturb_trainable(source, seed=3, std=0.2)
        source.eval().save_pretrained(tmp_path)
        loaded = dst_lib.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    inputs = make_inputs("llama")
    want = output(source, inputs)
    assert not torch.allclose(want, output(tiny_llama(), inputs), atol=1e-3)
    torch.testing.assert_close(output(loaded, inputs), want, atol=ATOL, rtol=1e-5)


def test_identity_at_init_and_random_init():
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        base = Stack()(x)
        fresh = get_peft_model(Stack(), LilyConfig(r=3, target_modules=["up", "down"])).eval()
        torch.testing.assert_close(fresh(x), base, atol=0, rtol=0)
        noisy = get_peft_model(Stack(), LilyConfig(r=3, target_modules=["up"], init_weights=False)).eval()
        assert not torch.allclose(noisy(x), base, atol=1e-4)


def test_merge_is_refused_and_unload_gives_the_base():
    model = _stack()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        adapted = model(x)
        for merge in (model.merge_adapter, model.merge_and_unload):
            with pytest.raises(MergeError):
                merge()
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)  # nothing changed
        with pytest.raises(MergeError, match="^This method is not supported for Lily"):
            _layers(model, "up")[0].merge()
        plain = model.unload()
        assert not any(isinstance(m, LilyLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), Stack()(x), atol=0, rtol=0)


def test_second_adapter_has_its_own_sharing(tmp_path):
    model = _stack(seed=1)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        first = model(x)
        model.add_adapter("two", LilyConfig(r=2, num_B=2, stride_A=3, target_modules=["up"]))
        model.set_adapter("two")
        perturb_trainable(model, seed=2, std=0.3)
        second = model(x)
        assert not torch.allclose(first, second, atol=1e-4)
        ups = _layers(model, "up")
        assert len({id(m.lily_A["two"]) for m in ups}) == 1  # stride_A=3 covers all three blocks
        assert ups[0].lily_A["two"] is not ups[0].lily_A["default"]
        assert all("two" not in m.lily_A for m in _layers(model, "down"))
        model.set_adapter("default")
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        model.save_pretrained(tmp_path)  # the second adapter's file loads alone
        alone = deltatune.PeftModel.from_pretrained(Stack(), tmp_path / "two").eval()
        model.set_adapter("two")
        torch.testing.assert_close(alone(x), model(x), atol=ATOL, rtol=1e-5)


def test_mixed_batch_routes_each_adapter_over_the_whole_batch():
    x = torch.randn(3, 4, 8)
    model = _stack(seed=1)
    model.add_adapter("two", LilyConfig(r=2, num_B=2, stride_A=1, target_modules=["up", "down"]))
    model.set_adapter("two")
    perturb_trainable(model, seed=2, std=0.3)
    model.set_adapter("default")
    model.eval()
    layer = _layers(model, "blocks.0.up")[0]  # the first adapted layer: its input is the same in every run
    with torch.no_grad():
        default = layer(x)
        layer.set_adapter("two")
        two = layer(x)
        layer.set_adapter("default")
        layer.row_adapters = ["two", "default", "__base__"]
        try:
            mixed = layer(x)
        finally:
            layer.row_adapters = None
        torch.testing.assert_close(mixed[0], two[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(mixed[1], default[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(mixed[2], layer.base_layer(x[2]), atol=ATOL, rtol=0)
        same = model(x, adapter_names=["default"] * 3)  # one name for every row: the plain forward
        torch.testing.assert_close(same, model(x), atol=ATOL, rtol=0)


def test_conv1d_matches_reference():
    model = get_peft_model(tiny_gpt2(), LilyConfig(r=4, target_modules=["c_attn", "c_fc"], init_weights=False))
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LilyLayer)]
    assert len(layers) == 4 and all(isinstance(m.base_layer, Conv1D) for m in layers)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layers[0](x), _reference(layers[0], x), atol=ATOL, rtol=1e-5)
    attn = _layers(model, "c_attn")
    assert attn[0].lily_B["default"] is attn[1].lily_B["default"]  # the two c_attn share experts


def test_config_fields_and_defaults_match_peft():
    ours, theirs = LilyConfig().to_dict(), peft.LilyConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad", [{"stride_A": 0}, {"num_B": 1},
                                 {"layers_pattern": "layers"}])
def test_refusals_say_peft_sentence_first(bad):
    with pytest.raises(ValueError) as theirs:
        peft.LilyConfig(**bad)
    with pytest.raises(ConfigError) as ours:
        LilyConfig(**bad)
    assert str(ours.value).startswith(str(theirs.value))


def test_bad_rank_is_refused():
    with pytest.raises(ConfigError, match="^`r` should be a positive integer value but the value passed is 0"):
        LilyConfig(r=0)


def test_embedding_is_refused():
    with pytest.raises(deltatune.TargetModuleError):
        get_peft_model(tiny_llama(), LilyConfig(r=4, target_modules=["embed_tokens"]))
