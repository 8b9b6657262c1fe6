"""C3A layers against a reference built element by element from the paper's block-circulant ``ΔW``, against
peft's own layer and FFT helpers on the same tensors, identity at init, PEFT's initialisations, merge/unmerge,
several adapters, PEFT's refusals, files both ways with peft, and the model-level contract (GPT-2's ``Conv1D``).

The reference ``ΔW`` is written out with Python loops over blocks and positions, ``C_ij[u, t] = w_ij[(t-u) mod b]
/ in``, not with the layer's FFTs or gather.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.models import Holder, make_inputs, output, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import C3AConfig, C3ALayer, C3AModel, PeftModel, get_peft_model
from deltatune.c3a.layer import circulant_dense, circular_apply
from deltatune.errors import ConfigError

ATOL = 1e-5


def _reference_delta(kernel: torch.Tensor, in_features: int) -> torch.Tensor:
    m, n, b = kernel.shape
    delta = torch.zeros(m * b, n * b, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            for u in range(b):
                for t in range(b):
                    delta[i * b + u, j * b + t] = float(kernel[i, j, (t - u) % b])
    return delta / in_features


def _adapt(base: nn.Module, **config) -> tuple[nn.Module, C3ALayer]:
    torch.manual_seed(0)
    config.setdefault("block_size", 4)
    config.setdefault("init_weights", "gaussian")
    pm = get_peft_model(Holder(base), C3AConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer


def test_dense_update_and_fft_forward_equal_the_reference():
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 4)
    reference = _reference_delta(kernel, 8)
    assert torch.allclose(circulant_dense(kernel).double() / 8, reference, atol=1e-6)
    x = torch.randn(5, 8)
    assert torch.allclose(circular_apply(x, kernel).double() / 8, x.double() @ reference.T, atol=1e-5)
    # peft's helpers on the same kernel: same dense ΔW (its transposed-eye trick), same FFT product
    from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast

    assert torch.allclose(get_circulant_fast(kernel), circulant_dense(kernel), atol=1e-5)
    assert torch.allclose(BlockCircularConvolution.apply(x, kernel), circular_apply(x, kernel), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_layer_forward_and_merge_match_the_reference(kind):
    torch.manual_seed(1)
    base = nn.Linear(8, 12) if kind == "linear" else Conv1D(12, 8)
    pm, layer = _adapt(base)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        weight = base.weight if kind == "linear" else base.weight.T  # (out, in)
        delta = _reference_delta(layer.c3a_kernel["default"].detach(), 8).float()
        expected = x @ (weight + delta).T + base.bias
        assert torch.allclose(pm(x), expected, atol=ATOL)
        stored = delta if kind == "linear" else delta.T
        assert torch.allclose(layer.get_delta_weight("default"), stored, atol=ATOL)
        layer.merge()
        assert torch.allclose(pm(x), expected, atol=ATOL)
        layer.unmerge()
        assert torch.allclose(pm(x), expected, atol=ATOL)
        merged = pm.merge_and_unload()
        assert type(merged.layer) is type(base)
        assert torch.allclose(merged(x), expected, atol=ATOL)


def test_equal_to_peft_layer_on_the_same_tensors():
    torch.manual_seed(2)
    ours, layer = _adapt(nn.Linear(16, 8), block_size=8)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(Holder(nn.Linear(16, 8)), peft.C3AConfig(target_modules=["layer"], block_size=8))
    theirs.eval()
    their_layer = theirs.base_model.model.layer
    assert their_layer.c3a_kernel["default"].shape == layer.c3a_kernel["default"].shape == (1, 2, 8)
    with torch.no_grad():
        their_layer.c3a_kernel["default"].copy_(layer.c3a_kernel["default"])
        x = torch.randn(3, 16)
        assert torch.allclose(ours(x), theirs(x), atol=ATOL)
        assert torch.allclose(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"), atol=ATOL)


def test_initialisations_are_peft_s():
    base = nn.Linear(16, 32)
    _, layer = _adapt(base, init_weights=True)
    assert not layer.c3a_kernel["default"].any()  # zeros: the identity
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), base(x))
    for init, bound in [("xavier_uniform", math.sqrt(6 / 48)), (False, math.sqrt(6 / 48)),
                        ("kaiming_uniform", math.sqrt(1 / 16))]:
        _, layer = _adapt(nn.Linear(16, 32), init_weights=init)
        kernel = layer.c3a_kernel["default"]
        assert kernel.dtype == torch.float32 and kernel.abs().max() <= bound and kernel.abs().max() > bound / 2
    assert C3AConfig().init_weights == "xavier_uniform" and C3AConfig().block_size == 256


def test_kernel_stays_float32_over_a_half_precision_base():
    _, layer = _adapt(nn.Linear(8, 8).to(torch.bfloat16))
    assert layer.c3a_kernel["default"].dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_two_active_adapters_add_their_updates():
    pm, layer = _adapt(nn.Linear(8, 8))
    pm.add_adapter("other", C3AConfig(target_modules=["layer"], block_size=2, init_weights="gaussian"))
    layer.set_adapter(["default", "other"])
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (layer.get_delta_weight("default") + layer.get_delta_weight("other")).T
        assert torch.allclose(layer(x), expected, atol=ATOL)


def test_block_size_pattern_uses_peft_s_rule():
    config = C3AConfig(block_size=4, block_size_pattern={"q_proj": 8, "model.x.v": 2})
    assert config.block_size_for("model.layers.0.self_attn.q_proj") == 8
    assert config.block_size_for("model.x.v") == 2  # the full name as a key
    assert config.block_size_for("model.layers.0.self_attn.v_proj") == 4


def test_peft_s_refusals():
    with pytest.raises(ConfigError, match="The block size should be a factor of the input size. However, the input "
                                          "size is 10 and the block size is 4"):
        _adapt(nn.Linear(10, 8))
    with pytest.raises(ConfigError, match="The block size should be a factor of the output size"):
        _adapt(nn.Linear(8, 10))
    with pytest.raises(ConfigError, match="`block_size` should be a positive integer value"):
        _adapt(nn.Linear(8, 8), block_size=0)
    with pytest.raises(ConfigError, match="Unknown init_weights: uniform"):
        C3AConfig(init_weights="uniform")
    with pytest.raises(ConfigError, match="`layers_to_transform` cannot be used when `target_modules` is a str."):
        C3AConfig(target_modules=".*q", layers_to_transform=[0])


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_files_cross_with_peft(direction, tmp_path):
    inputs = make_inputs("llama")
    config = {"block_size": 8, "block_size_pattern": {"q_proj": 16}, "task_type": "CAUSAL_LM"}
    torch.manual_seed(4)
    if direction == "peft_to_ours":
        source = peft.get_peft_model(tiny_llama(), peft.C3AConfig(**config)).eval()
        source.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert isinstance(loaded.base_model, C3AModel)
    else:
        source = get_peft_model(tiny_llama(), C3AConfig(**config)).eval()
        source.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    q = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert q.c3a_kernel["default"].shape[-1] == 16
    with torch.no_grad():
        assert torch.allclose(output(loaded, inputs), output(source, inputs), atol=1e-4)


def test_gpt2_conv1d_model_contract(tmp_path):
    def config():
        return C3AConfig(block_size=16, init_weights="gaussian")  # PEFT's GPT-2 target: mlp.c_proj (Conv1D)

    check_model_contract(tiny_gpt2, "gpt2", config, "c3a_", tmp_path, identity_at_init=False)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", C3AConfig(block_size=16, task_type="CAUSAL_LM"),
                       C3AConfig(block_size=8, init_weights="kaiming_uniform", task_type="CAUSAL_LM"), tmp_path)
