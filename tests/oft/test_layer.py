"""OFT layers against reference math (Linear, Conv1D, Conv2d, Embedding), identity at init, orthogonality,
COFT, block sharing, module dropout, merge/unmerge, several adapters, config parity with PEFT, and the
model-level contract (tiny Llama, GPT-2, BERT).

References are built here from the stored upper triangles with ``torch.block_diag`` and ``torch.linalg.inv``
(the layer uses batched solves and per-block products, never a dense rotation).
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, layer_and_input
from support.models import Holder, output, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import OFTConfig, PeftConfig, get_peft_model
from deltatune.errors import ConfigError
from deltatune.oft.layer import nearest_divisor

ATOL = 1e-5


def _layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    # OFT's blocks: a 2x2 conv2d on 4 channels, a 1x1 conv on 8, a 20 x 16 embedding. Conv1D keeps its init.
    geometry = {"conv2d": {"dims": (4, 6), "kernel_size": 2, "size": (7, 7)}, "conv2d_1x1": {"dims": (8, 6)},
                "embedding": {"dims": (20, 16)}}.get(kind, {})
    return layer_and_input(kind, conv1D_weight_std=None, **geometry)


def _adapt(kind: str, **config):
    model, x = _layer_and_input(kind)
    config.setdefault("oft_block_size", 4)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, OFTConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    q = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    iu = torch.triu_indices(b, b, 1)
    q[:, iu[0], iu[1]] = vec
    return q - q.transpose(1, 2)


def _reference_rotation(layer: nn.Module, name: str = "default", exact: bool = False, terms: int = 5) -> torch.Tensor:
    """The dense block-diagonal ``R: (D, D)`` from the stored triangles."""
    container = layer.oft_embedding_R if layer.is_embedding else layer.oft_R
    b = layer.oft_block_size[name]
    q = _skew(container[name].weight.detach().double(), b)
    eye = torch.eye(b, dtype=torch.float64)
    blocks = []
    for qi in q:
        if exact:
            blocks.append((eye - qi) @ torch.linalg.inv(eye + qi))
        else:  # PEFT's truncated series: I + 2Q + ... + 2Q^(n-2) + Q^(n-1)
            last = max(3, terms - 1)
            r = eye + sum(2 * torch.linalg.matrix_power(qi, k) for k in range(1, last)) \
                + torch.linalg.matrix_power(qi, last)
            blocks.append(r)
    if len(blocks) == 1:
        blocks = blocks * layer.r[name]
    return torch.block_diag(*blocks).float()


def _reference_out(layer: nn.Module, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        return base(x) @ rot
    if isinstance(base, Conv1D):
        return F.linear(x @ rot, base.weight.T, base.bias)
    if isinstance(base, nn.Linear):
        return F.linear(x @ rot, base.weight, base.bias)
    w = base.weight.reshape(base.out_channels, -1) @ rot.T   # W Rᵀ over (in, kh, kw)
    return base._conv_forward(x, w.reshape(base.weight.shape), base.bias)


KINDS = ["linear", "conv1D", "conv2d", "conv2d_1x1", "embedding"]


@pytest.mark.parametrize("exact", [False, True], ids=["neumann", "exact"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, exact):
    pm, layer, x = _adapt(kind, use_cayley_neumann=not exact)
    expected = _reference_out(layer, x, _reference_rotation(layer, exact=exact))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_then_merge_equals_unmerged(kind):
    pm, layer, x = _adapt(kind, init_weights=True)
    container = layer.oft_embedding_R if layer.is_embedding else layer.oft_R
    assert torch.count_nonzero(container["default"].weight) == 0
    base = layer.base_layer(x)
    torch.testing.assert_close(output(pm, {"x": x}), base, atol=0, rtol=0)
    with torch.no_grad():
        container["default"].weight.normal_(std=0.2)
    expected = output(pm, {"x": x})
    assert (expected - base).abs().max() > 1e-3
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_exact_cayley_is_orthogonal_and_neumann_nearly():
    for exact, tol in ((True, 1e-5), (False, 0.1)):  # Q ~ N(0, 0.1²): series error ~ |Q|^5
        _, layer, _ = _adapt("linear", use_cayley_neumann=not exact)
        blocks = layer.oft_R["default"].blocks().detach()
        eye = torch.eye(4).expand_as(blocks)
        err = (blocks.transpose(1, 2) @ blocks - eye).abs().max()
        assert err < tol, (exact, err)
        if not exact:
            assert err > 1e-3, "the truncated series is not exactly orthogonal"


def test_conv2d_is_the_merged_layer_where_peft_unmerged_is_not():
    """PEFT 0.21 rotates a Conv2d's input patches and folds them back, which differs from its own merged
    weight for kernels > 1; deltatune convolves with ``W Rᵀ``, i.e. PEFT's merged layer."""
    model, x = _layer_and_input("conv2d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, peft.OFTConfig(target_modules=["layer"], oft_block_size=4,
                                                           init_weights=False)).eval()
    ours, _, _ = _adapt("conv2d")
    with torch.no_grad():
        ours.base_model.model.layer.oft_R["default"].weight.copy_(theirs.base_model.model.layer.oft_R["default"].weight)
    peft_unmerged = output(theirs, {"x": x})
    theirs.merge_adapter()
    peft_merged = output(theirs, {"x": x})
    assert (peft_unmerged - peft_merged).abs().max() > 1e-2
    torch.testing.assert_close(output(ours, {"x": x}), peft_merged, atol=ATOL, rtol=1e-5)


def test_two_active_adapters_rotate_in_order_and_merge_to_the_same():
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", OFTConfig(target_modules=["layer"], oft_block_size=8, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    rot = _reference_rotation(layer, "default") @ _reference_rotation(layer, "other")
    expected = _reference_out(layer, x, rot)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_block_share_uses_one_block_everywhere():
    pm, layer, x = _adapt("linear", block_share=True)
    assert layer.oft_R["default"].weight.shape == (1, 6)
    rot = _reference_rotation(layer)
    torch.testing.assert_close(rot[:4, :4], rot[12:, 12:])
    torch.testing.assert_close(output(pm, {"x": x}), _reference_out(layer, x, rot), atol=ATOL, rtol=1e-5)


def test_coft_projects_each_block_into_its_ball():
    pm, layer, x = _adapt("linear", coft=True, eps=0.1)
    weight = layer.oft_R["default"].weight
    with torch.no_grad():
        weight.mul_(10)
        weight[0].mul_(1e-4)  # one block already inside the ball: left as it is
    inside = weight[0].detach().clone()
    output(pm, {"x": x})
    norms = torch.linalg.matrix_norm(_skew(weight.detach(), 4))
    radius = 0.1 / 4 ** 0.5
    torch.testing.assert_close(norms[1:], torch.full((3,), radius), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight[0].detach(), inside)


def test_module_dropout_replaces_blocks_with_identity_when_training():
    pm, layer, x = _adapt("linear", module_dropout=0.5)
    pm.train()
    blocks = layer._blocks("default").detach()
    is_eye = [bool(torch.equal(b, torch.eye(4))) for b in blocks]
    assert sum(is_eye) == 2, "int(0.5 * 4 blocks) become the identity"
    pm.eval()
    assert not any(torch.equal(b, torch.eye(4)) for b in layer._blocks("default").detach())


def test_a_size_that_does_not_divide_moves_to_the_nearest_divisor():
    assert [nearest_divisor(32, v) for v in (5, 6, 7, 3, 40)] == [4, 4, 8, 2, 32]
    assert nearest_divisor(576, 30) == 32 and nearest_divisor(12, 5) == 4
    with pytest.warns(UserWarning, match="oft_block_size=5 does not divide"):
        _, layer, _ = _adapt("linear", oft_block_size=5)
    assert layer.oft_block_size["default"] == 4 and layer.r["default"] == 4
    with pytest.warns(UserWarning, match="r=5 does not divide"):
        _, layer, _ = _adapt("linear", r=5, oft_block_size=0)
    assert layer.r["default"] == 4 and layer.oft_block_size["default"] == 4


def test_config_fields_and_defaults_match_peft():
    ours, theirs = OFTConfig().to_dict(), peft.OFTConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": 8}, "exactly one"), ({"oft_block_size": 0}, "exactly one"),
                                       ({"module_dropout": 1.0}, "module_dropout"), ({"bias": "lora_only"}, "bias"),
                                       ({"layers_pattern": "layers"}, "layers_to_transform"),
                                       ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        OFTConfig(**bad)


def test_old_peft_oft_files_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 8, "target_modules": ["q"]}))
    with pytest.raises(ConfigError, match="PEFT < 0.14"):
        PeftConfig.from_pretrained(tmp_path)


def test_grouped_conv_is_refused():
    model = Holder(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        get_peft_model(model, OFTConfig(target_modules=["layer"], oft_block_size=2))
    assert isinstance(model.layer, nn.Conv2d), "a failed injection leaves the model as it was"


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: OFTConfig(oft_block_size=4, task_type="CAUSAL_LM")),
    ("llama-exact-all-linear", tiny_llama, "llama",
     lambda: OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules="all-linear")),
    ("gpt2", tiny_gpt2, "gpt2", lambda: OFTConfig(oft_block_size=4, target_modules=["c_attn", "c_fc"])),
    ("bert", tiny_bert, "bert", lambda: OFTConfig(r=8, oft_block_size=0, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: fan_in_fan_out follows Conv1D
        check_model_contract(factory, kind, config, "oft_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", OFTConfig(oft_block_size=4),
                       OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"]), tmp_path)
