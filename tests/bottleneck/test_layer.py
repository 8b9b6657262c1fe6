"""Bottleneck adapters: reference math (sequential and parallel), identity at init, disable, the merge refusal,
gradients only in the adapter, file round trips and two adapters, on tiny Llama, GPT-2 and BERT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_two_adapters
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import BottleneckConfig, get_peft_model
from deltatune.bottleneck.layer import BottleneckLayer
from deltatune.errors import ConfigError, MergeError, TargetModuleError


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_layer_math(parallel):
    torch.manual_seed(0)
    lin = nn.Linear(12, 16)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    config = BottleneckConfig(target_modules=["layer"], reduction_factor=4, non_linearity="gelu",
                              parallel=parallel, scaling=2.0)
    model = get_peft_model(Holder(lin), config)
    x = torch.randn(3, 12)
    h = F.linear(x, w, b)
    torch.testing.assert_close(model(x), h)  # W_up = 0: identity
    layer = model.base_model.model.layer
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    assert down.weight.shape == ((4, 12) if parallel else (4, 16)) and up.weight.shape == (16, 4)
    with torch.no_grad():
        up.weight.normal_()
        up.bias.normal_()
    z = x if parallel else h
    want = h + 2.0 * F.linear(F.gelu(F.linear(z, down.weight, down.bias)), up.weight, up.bias)
    torch.testing.assert_close(model(x), want)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("factory,kind,kwargs", [
    (tiny_llama, "llama", {"locations": ["attn", "ffn"]}),
    (tiny_gpt2, "gpt2", {"parallel": True, "scaling": 4.0}),
    (tiny_bert, "bert", {"task_type": "SEQ_CLS", "locations": ["attn", "ffn"], "non_linearity": "tanh"}),
], ids=["llama-houlsby", "gpt2-parallel", "bert-houlsby"])
def test_model_contract(factory, kind, kwargs, tmp_path):
    inputs = make_inputs(kind)
    ref = output(factory(), inputs)
    model = get_peft_model(factory(), BottleneckConfig(reduction_factor=8, **kwargs))
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == (4 if kwargs.get("locations") == ["attn", "ffn"] else 2)
    torch.testing.assert_close(output(model, inputs), ref, atol=1e-5, rtol=0)
    perturb_trainable(model, std=0.2)
    out = output(model, inputs)
    assert (out - ref).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), ref, atol=1e-5, rtol=0)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="non-linear"):
        model.merge_adapter()
    with pytest.raises(MergeError, match="non-linear"):
        model.merge_and_unload()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a refused merge changed weights"
    torch.testing.assert_close(output(model, inputs), out, atol=0, rtol=0)

    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        is_adapter = "bottleneck_" in name or ".modules_to_save." in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    model.eval()

    model.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(output(loaded, inputs), out, atol=1e-6, rtol=0)
    assert loaded.peft_config["default"].peft_type == "BOTTLENECK"
    plain = loaded.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    if "task_type" not in kwargs:  # (a classifier head in modules_to_save stays trained after unload, as in PEFT)
        torch.testing.assert_close(output(plain, inputs), ref, atol=1e-6, rtol=0)


def test_two_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", BottleneckConfig(reduction_factor=4),
                       BottleneckConfig(reduction_factor=8, locations=["attn"], parallel=True), tmp_path)


def test_bad_options():
    with pytest.raises(ConfigError, match="locations"):
        BottleneckConfig(locations=["middle"])
    with pytest.raises(ConfigError, match="non_linearity"):
        BottleneckConfig(non_linearity="softmax")
    with pytest.raises(ConfigError, match="reduction_factor"):
        BottleneckConfig(reduction_factor=0)


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, **kw)).eval()


@pytest.mark.parametrize("arch, attn, ffn", [
    ("gpt_neox", "gpt_neox.layers.{}.attention.dense", "gpt_neox.layers.{}.mlp"),
    ("opt", "model.decoder.layers.{}.self_attn.out_proj", "model.decoder.layers.{}.fc2"),
])
def test_architectures_without_a_table_entry_are_placed_by_module_name(arch, attn, ffn):
    """GPT-NeoX (attention.dense, mlp) and OPT (self_attn.out_proj, fc2 with no mlp module) get both placements,
    with a warning naming the modules; the model is unchanged at init and trains."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    base = (_tiny(GPTNeoXConfig, GPTNeoXForCausalLM, hidden_size=32, intermediate_size=64) if arch == "gpt_neox" else
            _tiny(OPTConfig, OPTForCausalLM, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = base(ids).logits
    with pytest.warns(UserWarning, match=f"model_type='{arch}', placed by module name: after "
                                         f"{attn.format(0)} and {ffn.format(0)}"):
        model = get_peft_model(base, BottleneckConfig(locations=["attn", "ffn"]))
    adapted = sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, BottleneckLayer))
    assert adapted == sorted([attn.format(i) for i in range(2)] + [ffn.format(i) for i in range(2)])
    torch.testing.assert_close(model(ids).logits, ref)  # W_up = 0: the identity
    perturb_trainable(model, seed=3, std=0.5)
    assert (model(ids).logits - ref).abs().max() > 1e-3


def test_no_placement_found_lists_the_modules_of_one_block():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

    with pytest.raises(TargetModuleError, match=r"no default bottleneck placement for model_type=None at \['ffn'\]; "
                                                r"pass target_modules=.*the modules of one block are: 0, 1\)"):
        get_peft_model(Net(), BottleneckConfig())
