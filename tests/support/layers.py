"""One base layer of each kind an adapter can wrap, seeded, with an input for it: the layer-level tests'
``layer_and_input(kind)`` (LoRA, IA3, LoHa, LoKr, OFT, BOFT).

Each kind has default sizes; a method whose math wants other sizes (LoKr's Kronecker factors, OFT's blocks)
passes them (``dims=(in, out)``, ``kernel_size``, ``size``), so every test still builds exactly the layer it
always did, from the same seed, with the same random draws in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .models import Holder

# kind -> keyword arguments of the conv layer, plus ``dims`` (in, out channels) and ``size`` (the input's
# spatial size). Input: (2, in, *size).
_CONV_DEFAULTS: dict[str, dict] = {
    "conv1d": {"dims": (4, 6), "kernel_size": 3, "padding": 1, "stride": 1, "groups": 1, "size": (9,)},
    "conv2d": {"dims": (3, 5), "kernel_size": 3, "padding": 1, "stride": 2, "groups": 1, "size": (8, 8)},
    "conv2d_groups": {"dims": (4, 6), "kernel_size": 3, "padding": 1, "stride": 1, "groups": 2, "size": (6, 6)},
    "conv2d_1x1": {"dims": (4, 6), "kernel_size": 1, "padding": 0, "stride": 1, "groups": 1, "size": (5, 5)},
    "conv3d": {"dims": (2, 4), "kernel_size": 3, "padding": 1, "stride": 1, "groups": 1, "size": (4, 5, 5)},
}
_CONV_CLASSES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv2d_groups": nn.Conv2d, "conv2d_1x1": nn.Conv2d,
                 "conv3d": nn.Conv3d}
KINDS = ("linear", "linear_nobias", "conv1D", "embedding", *_CONV_DEFAULTS)


def layer_and_input(kind: str, seed: int = 0, *, conv1D_weight_std: float | None = 0.2,
                    **geometry) -> tuple[nn.Module, torch.Tensor]:
    """A base layer of ``kind`` (in a :class:`Holder`, so ``target_modules=["layer"]`` finds it) and an input.

    Kinds and their defaults:

    - ``linear`` / ``linear_nobias``: ``nn.Linear(16, 12)``, x ``(3, 5, 16)``.
    - ``conv1D``: transformers' GPT-2 ``Conv1D(12, 16)`` (weight ``(in, out)``), x ``(3, 5, 16)``; the bias
      drawn from N(0, 0.2²) so it is non-zero, and the weight from N(0, conv1D_weight_std²) unless that is
      ``None`` (then transformers' own init).
    - ``embedding``: ``nn.Embedding(30, 12)``, ids ``(3, 5)``.
    - ``conv1d`` / ``conv2d`` / ``conv2d_groups`` / ``conv2d_1x1`` / ``conv3d``: see ``_CONV_DEFAULTS``;
      x ``(2, in, *size)``.

    Args:
        kind: One of :data:`KINDS`.
        seed: ``torch.manual_seed`` before the layer (then the input) is drawn.
        conv1D_weight_std: See ``conv1D`` above.
        **geometry: Overrides of the defaults: ``dims=(in, out)`` (channels, or embedding rows and width),
            and for convs ``kernel_size``, ``padding``, ``stride``, ``groups``, ``size``.

    Returns:
        ``(Holder(layer).eval(), x)``.
    """
    torch.manual_seed(seed)
    if kind in ("linear", "linear_nobias"):
        d_in, d_out = geometry.get("dims", (16, 12))
        layer, x = nn.Linear(d_in, d_out, bias=kind == "linear"), torch.randn(3, 5, d_in)
    elif kind == "conv1D":  # transformers' GPT-2 Conv1D: weight (in, out)
        from transformers.pytorch_utils import Conv1D

        layer, x = Conv1D(12, 16), torch.randn(3, 5, 16)
        if conv1D_weight_std is not None:
            nn.init.normal_(layer.weight, std=conv1D_weight_std)
        nn.init.normal_(layer.bias, std=0.2)
    elif kind == "embedding":
        num, dim = geometry.get("dims", (30, 12))
        layer, x = nn.Embedding(num, dim), torch.randint(0, num, (3, 5))
    elif kind in _CONV_DEFAULTS:
        spec = {**_CONV_DEFAULTS[kind], **geometry}
        (c_in, c_out), size = spec.pop("dims"), spec.pop("size")
        layer, x = _CONV_CLASSES[kind](c_in, c_out, **spec), torch.randn(2, c_in, *size)
    else:
        raise ValueError(f"unknown layer kind {kind!r}; known: {', '.join(KINDS)}")
    return Holder(layer).eval(), x


def count_slot_fills(monkeypatch) -> list[str]:
    """Names of the adapters whose mixed-batch slots (``LoraLayer._fill_slot``) get (re)filled from here on."""
    from deltatune.lora.layer import LoraLayer

    fills: list[str] = []
    real = LoraLayer._fill_slot

    def counting(self, table, name, *args):
        fills.append(name)
        return real(self, table, name, *args)

    monkeypatch.setattr(LoraLayer, "_fill_slot", counting)
    return fills


def base_output(layer: nn.Module, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The wrapped base layer's output with ``extra`` added to its weight (``W + extra``; ``extra`` shaped
    like ``W`` as ``F.linear``/the conv read it, so ``(out, in)`` for GPT-2's transposed ``Conv1D``): the
    reference a weight-delta method's forward must equal."""
    base = layer.base_layer
    if isinstance(base, Conv1D):
        w = base.weight.T if extra is None else base.weight.T + extra
        return F.linear(x, w, base.bias)
    w = base.weight if extra is None else base.weight + extra
    if isinstance(base, nn.Linear):
        return F.linear(x, w, base.bias)
    return base._conv_forward(x, w, base.bias)


def assert_merge_round_trip(pm: nn.Module, layer: nn.Module, x: torch.Tensor, expected: torch.Tensor,
                            atol: float) -> None:
    """Merging gives the unmerged output ``expected`` (to ``atol``, rtol 1e-5), and unmerging restores the base
    weight (1e-6)."""
    from .models import output

    w0 = layer.base_layer.weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=atol, rtol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def assert_same_as_peft_layer(pm: nn.Module, layer: nn.Module, theirs: nn.Module, their_layer: nn.Module,
                              x: torch.Tensor, atol: float, unmerge_atol: float | None = None) -> None:
    """deltatune's adapted ``layer`` (in ``pm``) and peft's ``their_layer`` (in ``theirs``), holding the same
    adapter tensors, give the same output, the same merged weight and the same weight after unmerging."""
    from .models import output

    torch.testing.assert_close(output(pm, {"x": x}), output(theirs, {"x": x}), atol=atol, rtol=1e-5)
    pm.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, atol=atol, rtol=1e-5)
    pm.unmerge_adapter()
    theirs.unmerge_adapter()
    unmerge_atol = atol if unmerge_atol is None else unmerge_atol
    torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, atol=unmerge_atol, rtol=1e-5)


def built_like_peft(base: nn.Module, ours_config, theirs_config, msg: object = None):
    """``(ours, theirs, layer, their_layer)``: ``base`` adapted by deltatune and a deep copy by peft, each
    ``get_peft_model`` after ``torch.manual_seed(1)`` (the same draws), both in eval mode; asserts their adapted
    ``layer`` holds the same tensors under the same names as peft's."""
    import copy

    import peft

    import deltatune

    theirs_base = copy.deepcopy(base)
    torch.manual_seed(1)
    ours = deltatune.get_peft_model(base, ours_config).eval()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(theirs_base, theirs_config).eval()
    layer, their_layer = ours.base_model.model.layer, theirs.base_model.model.layer
    mine, their_state = layer.state_dict(), their_layer.state_dict()
    assert mine.keys() == their_state.keys(), msg
    assert all(torch.equal(mine[k], v) for k, v in their_state.items()), msg
    return ours, theirs, layer, their_layer
