"""Model-level checks shared by the per-method tests (``tests/<method>/test_*.py``) and ``tests/test_contract.py``.

Every check runs one method on one tiny ``transformers`` model and asserts real numbers:

- identity at init: the adapted model's logits equal the base model's (bit for bit up to float error);
- after seeded noise on the adapter tensors the logits move (so the adapter is really in the forward);
- ``disable_adapter`` gives the base logits; merged equals unmerged; unmerge restores the base weights;
- ``merge_and_unload`` returns the plain model with the adapted logits;
- a backward pass puts gradients on adapter tensors (and ``modules_to_save`` copies) only;
- save -> load into a fresh base gives the same logits, and a re-save writes bit-identical tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.core.layer import AdapterLayer

from .models import make_inputs, output, perturb_trainable

ATOL = 1e-5


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base model's weights, by module path with adapter wrappers looked through."""
    out = {}
    for name, p in model.named_parameters():
        if any(t in name for t in (".ia3_", ".hada_", ".lokr_", ".vera_", ".oft_", ".boft_", "modules_to_save",
                                   ".ln_tuning_", ".trainable_tokens_", ".bitfit_", ".bottleneck_")):
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        name = name.replace(".token_adapter", "")
        out[name] = p.detach().clone()
    return out


def check_model_contract(factory: Callable[[], nn.Module], kind: str, config: Callable[[], deltatune.PeftConfig],
                         prefix: str | tuple[str, ...], tmp_path, identity_at_init: bool = True) -> None:
    """Run every model-level property listed in the module docstring for one (model, method config)."""
    inputs = make_inputs(kind)
    base_model = factory()
    ref = output(base_model, inputs)
    base_weights = weights_of(base_model)

    model = deltatune.get_peft_model(factory(), config())
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert layers, "no layer was adapted"
    if identity_at_init:
        torch.testing.assert_close(output(model, inputs), ref, atol=ATOL, rtol=0)

    perturb_trainable(model, std=0.2)
    out = output(model, inputs)
    assert (out - ref).abs().max() > 1e-3, "perturbed adapter does not change the output"

    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(output(model, inputs), out, atol=ATOL, rtol=0)

    model.merge_adapter()
    assert all(layer.merged for layer in layers)
    torch.testing.assert_close(output(model, inputs), out, atol=ATOL, rtol=1e-4)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers)
    restored = weights_of(model)
    for name, w in base_weights.items():
        torch.testing.assert_close(restored[name], w, atol=1e-6, rtol=1e-5, msg=f"unmerge did not restore {name}")
    torch.testing.assert_close(output(model, inputs), out, atol=ATOL, rtol=0)

    # Gradients reach the adapter tensors (and saved heads) only.
    loss = model(**inputs).logits.float().pow(2).mean()
    loss.backward()
    touched = []
    for name, p in model.named_parameters():
        adapter = any(p in name for p in ((prefix,) if isinstance(prefix, str) else prefix)) \
            or ".modules_to_save." in name
        assert p.requires_grad == adapter, f"{name}: requires_grad={p.requires_grad}"
        if adapter:
            assert p.grad is not None, f"{name} got no gradient"
            touched.append(p.grad.abs().sum().item())
        else:
            assert p.grad is None, f"base parameter {name} got a gradient"
    assert sum(touched) > 0
    model.zero_grad(set_to_none=True)

    # Round trip through files.
    save_dir = tmp_path / "adapter"
    model.save_pretrained(save_dir)
    loaded = deltatune.PeftModel.from_pretrained(factory(), save_dir)
    torch.testing.assert_close(output(loaded, inputs), out, atol=1e-6, rtol=0)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    first = load_file(os.path.join(save_dir, "adapter_model.safetensors"))
    second = load_file(os.path.join(again, "adapter_model.safetensors"))
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"re-saved {key} differs"
    assert all(not p.requires_grad for p in loaded.parameters()), "inference-mode load must be frozen"

    # merge_and_unload: the plain architecture, computing the adapted function.
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(output(plain, inputs), out, atol=ATOL, rtol=1e-4)


def check_two_adapters(factory: Callable[[], nn.Module], kind: str, first: deltatune.PeftConfig,
                       second: deltatune.PeftConfig, tmp_path) -> None:
    """Two named adapters: switching picks one, a mixed batch (``adapter_names``) runs each row through its
    own, each equals a model holding only it, files round-trip, and deleting one leaves the other working (and
    the model plain when both are gone)."""
    inputs = make_inputs(kind)
    ref = output(factory(), inputs)
    model = deltatune.get_peft_model(factory(), first)
    model.add_adapter("second", second)
    assert model.active_adapter == "default"
    model.set_adapter("second")
    perturb_trainable(model, seed=11, std=0.2)  # only "second" is trainable now
    model.set_adapter("default")
    perturb_trainable(model, seed=12, std=0.2)
    model.eval()
    out_default = output(model, inputs)
    model.set_adapter("second")
    out_second = output(model, inputs)
    assert (out_default - out_second).abs().max() > 1e-3
    assert (out_second - ref).abs().max() > 1e-3

    # A mixed batch: each row through its own adapter (or none), in one call.
    mixed = output(model, {**inputs, "adapter_names": ["second", "__base__"]})
    torch.testing.assert_close(mixed[0], out_second[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], ref[1], atol=ATOL, rtol=0)
    mixed = output(model, {**inputs, "adapter_names": ["default", "second"]})
    torch.testing.assert_close(mixed[0], out_default[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], out_second[1], atol=ATOL, rtol=0)
    # generate() expands each input row in place (num_beams, num_return_sequences), not adapter_names.
    doubled = {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()}
    mixed = output(model, {**doubled, "adapter_names": ["default", "second"]})
    for row, want in enumerate([out_default[0], out_default[0], out_second[1], out_second[1]]):
        torch.testing.assert_close(mixed[row], want, atol=ATOL, rtol=0)
    assert model.active_adapter == "second"

    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "second" / "adapter_model.safetensors")
    only_second = deltatune.PeftModel.from_pretrained(factory(), tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(output(only_second, inputs), out_second, atol=1e-6, rtol=0)
    both = deltatune.PeftModel.from_pretrained(factory(), tmp_path)
    both.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(output(both, inputs), out_default, atol=1e-6, rtol=0)
    both.set_adapter("second")
    torch.testing.assert_close(output(both, inputs), out_second, atol=1e-6, rtol=0)

    model.delete_adapter("second")
    assert model.active_adapter == "default"
    torch.testing.assert_close(output(model, inputs), out_default, atol=1e-6, rtol=0)
    model.delete_adapter("default")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    torch.testing.assert_close(output(model, inputs), ref, atol=1e-6, rtol=0)
