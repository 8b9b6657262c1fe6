"""X-LoRA: the mixture against its formula computed by hand, against peft 0.21.2 on the same experts and classifier
(both ways through files, experts written by peft and by deltatune), training, generate, and the refusals."""

from __future__ import annotations

import json
import os
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.models import make_inputs, output, tiny_gpt2, tiny_llama

import deltatune
from deltatune.config import PeftWarning
from deltatune.errors import ConfigError, MergeError
from xlora.experts import contract_experts, write_experts

INPUTS = make_inputs("llama")
EXPERT_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.")  # not "lora_model"
TARGETS = ("q_proj", "v_proj", "embed_tokens")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """``library -> adapters``: two experts (q/v projections and the embedding) written by deltatune and by peft."""
    root = tmp_path_factory.mktemp("experts")
    return {"deltatune": contract_experts(), "peft": write_experts(str(root), library="peft", targets=TARGETS)}


def _base(factory=tiny_llama):
    model = factory()
    model.config.use_cache = False  # peft refuses the cache; deltatune turns it off per call
    return model


def _ours(adapters, factory=tiny_llama, **kwargs) -> deltatune.PeftModel:
    config = deltatune.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, **kwargs)
    return deltatune.get_peft_model(factory(), config)


def _theirs(adapters, factory=tiny_llama, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, **kwargs)
        return peft.get_peft_model(_base(factory), config)


def _classifier(model) -> torch.nn.Module:
    xlora = model.base_model
    return xlora.internal_xlora_classifier[xlora.active_adapter] if isinstance(model, deltatune.PeftModel) \
        else xlora.internal_xlora_classifier


def _same_classifier(ours, theirs, seed: int = 0) -> None:
    """Random (non-default) classifier tensors, the same in both."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pairs = zip(_classifier(ours).named_parameters(), _classifier(theirs).named_parameters())
        for (name, p), (their_name, q) in pairs:
            assert name == their_name
            p.copy_(torch.randn(p.shape, generator=g))
            q.copy_(p)


# ---- the formula ------------------------------------------------------------------------------------------------
def test_forward_is_the_x_lora_formula(experts):
    """Logits against an independent computation on the plain model: the scaling pass is the base model
    (``scaling_pass_value=0``), ``g = softmax(W h + b)`` from its last hidden state, then every adapted projection
    adds ``Σ_e s_e B_e A_e (g_e x)`` and the embedding ``Σ_e g_e s_e A_e^T[ids] B_e^T``."""
    adapters = experts["deltatune"]
    ours = _ours(adapters).eval()
    _same_classifier(ours, ours)
    w, b = (p.detach() for p in _classifier(ours).layers[0].parameters())
    plain = _base()
    with torch.no_grad():
        hidden = plain(**INPUTS, output_hidden_states=True).hidden_states[-1]
        g = torch.softmax(hidden @ w.T + b, dim=-1)                                  # (batch, seq, experts)
    files = [load_file(os.path.join(adapters[k], "adapter_model.safetensors")) for k in ("0", "1")]
    scale = 4 / 2  # lora_alpha / r of write_experts

    def hook(module_name):
        def add(module, args, out):
            x = args[0]
            for e, state in enumerate(files):
                if module_name.endswith("embed_tokens"):  # A: (r, vocab), B: (dim, r)
                    a = state[f"base_model.model.{module_name}.lora_embedding_A"]
                    bb = state[f"base_model.model.{module_name}.lora_embedding_B"]
                    out = out + g[..., e:e + 1] * scale * (a.T[x] @ bb.T)
                else:  # A: (r, in), B: (out, r)
                    a = state[f"base_model.model.{module_name}.lora_A.weight"]
                    bb = state[f"base_model.model.{module_name}.lora_B.weight"]
                    out = out + scale * ((g[..., e:e + 1] * x) @ a.T @ bb.T)
            return out
        return add

    for name, module in plain.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        want = plain(**INPUTS).logits
    torch.testing.assert_close(output(ours, INPUTS), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.base_model.get_latest_scalings()[:, :, 0], g, atol=1e-6, rtol=0)


# ---- equal to peft on the same tensors ------------------------------------------------------------------------
CASES = {
    "default": {},
    "layerwise-depth3": {"layerwise_scalings": True, "xlora_depth": 3, "xlora_size": 8},
    "top1-softmax-topk": {"top_k_lora": 1, "enable_softmax": False, "enable_softmax_topk": True},
    "pass-value-weight-temperature": {"scaling_pass_value": 0.5, "global_scaling_weight": 2.0,
                                      "softmax_temperature": 0.5},
}


@pytest.mark.parametrize(("case", "library"), [("default", "deltatune")] + [(c, "peft") for c in CASES])
def test_logits_and_scalings_equal_peft(experts, library, case):
    adapters = experts[library]
    ours, theirs = _ours(adapters, **CASES[case]).eval(), _theirs(adapters, **CASES[case]).eval()
    _same_classifier(ours, theirs)
    torch.testing.assert_close(output(ours, INPUTS), output(theirs, INPUTS), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.base_model.get_latest_scalings(), theirs.base_model.get_latest_scalings())
    assert not torch.allclose(output(ours, INPUTS), output(_base(), INPUTS), atol=1e-3)


def test_gpt2_conv1d_experts(tmp_path):
    """Beyond peft (whose X-LoRA loader assumes keys under ``model.``, which GPT-2's are not): GPT-2's ``Conv1D``
    projections (transposed weights) as expert layers. A classifier that puts all weight on one expert gives that
    expert's plain LoRA model."""
    adapters = {}
    for i in range(2):
        torch.manual_seed(i)
        model = deltatune.get_peft_model(tiny_gpt2(), deltatune.LoraConfig(r=2, target_modules=["c_attn"],
                                                                           init_lora_weights=False))
        model.save_pretrained(tmp_path / f"e{i}")
        adapters[str(i)] = str(tmp_path / f"e{i}")
    ours = _ours(adapters, factory=tiny_gpt2).eval()
    last = _classifier(ours).layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-200.0, 200.0]))  # softmax: exactly (0, 1) in float32
    second = deltatune.PeftModel.from_pretrained(tiny_gpt2(), adapters["1"]).eval()
    torch.testing.assert_close(output(ours, INPUTS), output(second, INPUTS), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(output(ours, INPUTS), output(tiny_gpt2(), INPUTS), atol=1e-3)


def test_generate_equals_peft(experts):
    ours, theirs = _ours(experts["peft"]).eval(), _theirs(experts["peft"]).eval()
    _same_classifier(ours, theirs)
    ids = INPUTS["input_ids"][:1]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(input_ids=ids, **kwargs), theirs.generate(input_ids=ids, **kwargs))


# ---- files -----------------------------------------------------------------------------------------------------
def test_peft_loads_deltatune_files_with_equal_logits(experts, tmp_path):
    ours = _ours(experts["deltatune"], xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0).eval()
    _same_classifier(ours, ours, seed=3)
    ours.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.internal_xlora_classifier.layers.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    torch.testing.assert_close(output(theirs, INPUTS), output(ours, INPUTS), atol=1e-6, rtol=1e-5)
    again = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(output(again, INPUTS), output(ours, INPUTS), atol=0, rtol=0)
    assert not any(p.requires_grad for p in again.parameters())


def test_experts_are_filed_beside_in_peft_layout_with_what_training_changed(experts, tmp_path):
    """PEFT files the experts as the adapters "0", "1" (sub-folders); so does deltatune, with trained experts
    (``use_trainable_adapters``) as trained: pointing ``adapters`` at the copies reloads the same model."""
    model = _ours(experts["deltatune"], use_trainable_adapters=True)
    _train(model, steps=1)
    model.eval()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path / "0")) == ["adapter_config.json", "adapter_model.safetensors"]
    original = load_file(os.path.join(experts["deltatune"]["0"], "adapter_model.safetensors"))
    copy = load_file(tmp_path / "0" / "adapter_model.safetensors")
    lora_keys = sorted(k for k in original if EXPERT_TENSOR.search(k + "."))  # the original also has the embedding
    assert sorted(copy) == lora_keys and not torch.equal(copy[lora_keys[0]], original[lora_keys[0]])
    config = deltatune.PeftConfig.from_pretrained(tmp_path)
    config.adapters = {k: str(tmp_path / k) for k in config.adapters}
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config).eval()
    torch.testing.assert_close(output(loaded, INPUTS), output(model, INPUTS), atol=0, rtol=0)


def test_deltatune_loads_peft_files_warning_about_what_peft_leaves_out(experts, tmp_path):
    """peft 0.21.2 leaves out of its file every classifier key with an expert's name as a part (``layers.0.``):
    deltatune loads what is there, keeps the rest as created (as peft does) and names it in a warning."""
    theirs = _theirs(experts["peft"], xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0).eval()
    ours_before = _ours(experts["peft"], xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0)
    _same_classifier(ours_before, theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.internal_xlora_classifier.layers.2.weight", "base_model.internal_xlora_classifier.layers.2.bias"}
    with pytest.warns(PeftWarning, match=r"layers\.0\.weight.*expert's name"):
        ours = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    mine, their = _classifier(ours).layers, _classifier(theirs).layers
    torch.testing.assert_close(mine[2].weight, their[2].weight, atol=0, rtol=0)
    with torch.no_grad():  # the part the file lacks, as peft's model has it: then the logits are peft's
        mine[0].weight.copy_(their[0].weight)
        mine[0].bias.copy_(their[0].bias)
    torch.testing.assert_close(output(ours, INPUTS), output(theirs, INPUTS), atol=1e-6, rtol=1e-5)


def test_config_file_is_peft_s(experts, tmp_path):
    _ours(experts["deltatune"]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    their_fields = set(peft.XLoraConfig(hidden_size=32, adapters={}).to_dict())
    assert set(data) == their_fields and data["peft_type"] == "XLORA" and data["adapters"] == experts["deltatune"]
    defaults = {k: v for k, v in deltatune.XLoraConfig(hidden_size=32, adapters={}).to_dict().items()
                if k != "peft_version"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_defaults = peft.XLoraConfig(hidden_size=32, adapters={}).to_dict()
    assert defaults == {k: v for k, v in peft_defaults.items() if k != "peft_version"}


# ---- training ----------------------------------------------------------------------------------------------------
def _train(model, steps: int = 3) -> list[float]:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        loss = model(**INPUTS, labels=INPUTS["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_only_the_classifier_trains(experts):
    model = _ours(experts["deltatune"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.internal_xlora_classifier.default.layers.0.weight",
                         "base_model.internal_xlora_classifier.default.layers.0.bias"]
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if EXPERT_TENSOR.search(n)}
    assert len(experts_before) == 20  # (q, v) x 2 layers x 2 experts x (A, B), the embedding's 2 x 2
    losses = _train(model)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in experts_before:
            assert torch.equal(p, experts_before[n]), n


def test_gradient_checkpointing_recomputes_with_the_same_mixture(experts):
    grads = []
    for checkpointing in (False, True):
        model = _ours(experts["deltatune"])
        _same_classifier(model, model)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        model(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
        grads.append(_classifier(model).layers[0].weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_use_trainable_adapters_trains_the_experts_too(experts):
    model = _ours(experts["deltatune"], use_trainable_adapters=True)
    lora = {n for n, p in model.named_parameters() if p.requires_grad and EXPERT_TENSOR.search(n)}
    assert len(lora) == 20 and all(EXPERT_TENSOR.search(n) or "internal_xlora_classifier" in n
                                   for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in lora}
    _train(model, steps=1)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in lora)
    with model.disable_adapter():  # frozen in the block, as every deltatune adapter
        assert not any(p.requires_grad for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad and EXPERT_TENSOR.search(n)} == lora


# ---- adapters, switching, refusals --------------------------------------------------------------------------------
def test_disable_merge_and_mixed_batch(experts):
    model = _ours(experts["deltatune"]).eval()
    adapted = output(model, INPUTS)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, INPUTS), output(tiny_llama(), INPUTS), atol=0, rtol=0)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(MergeError, match="the mixture depends on the input"):
            call()
    with pytest.raises(ConfigError, match="adapter_names"):
        model(**INPUTS, adapter_names=["default", "default"])
    torch.testing.assert_close(output(model, INPUTS), adapted, atol=0, rtol=0)
    plain = model.unload()
    torch.testing.assert_close(output(plain, INPUTS), output(tiny_llama(), INPUTS), atol=0, rtol=0)


def test_second_adapter_has_its_own_experts_and_classifier(experts, tmp_path):
    model = _ours(experts["deltatune"]).eval()
    first = output(model, INPUTS)
    other_experts = write_experts(str(tmp_path), library="peft", targets=("k_proj", "v_proj"))  # k: new layers
    alone = _ours(other_experts).eval()
    _same_classifier(alone, alone, seed=9)
    config = deltatune.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=other_experts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter("other", config)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # the new one is frozen
    assert model.base_model.experts == {"default": ["0", "1"], "other": ["2", "3"]}
    with torch.no_grad():
        assert _classifier(model) is model.base_model.internal_xlora_classifier["default"]  # still active
        model.base_model.internal_xlora_classifier["other"].load_state_dict(_classifier(alone).state_dict())
    torch.testing.assert_close(output(model, INPUTS), first, atol=0, rtol=0)
    model.set_adapter("other")
    torch.testing.assert_close(output(model, INPUTS), output(alone, INPUTS), atol=1e-6, rtol=1e-5)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapter == "other"
    assert not any(".lora_A.0." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(output(model, INPUTS), output(alone, INPUTS), atol=1e-6, rtol=1e-5)


def test_peft_api_setters_and_scalings_log(experts):
    model = _ours(experts["deltatune"]).eval()
    xlora = model.base_model
    xlora.enable_scalings_logging()
    output(model, INPUTS)
    assert xlora.get_latest_scalings().shape == (2, 7, 5, 2)  # 2 layers x (q, v) + the embedding
    model.set_topk_lora(1)  # PeftModel hands PEFT's XLoraModel methods on, as peft's does
    model.set_global_scaling_weight(0.0)
    assert model.peft_config["default"].top_k_lora == 1 and xlora.get_global_scaling_weight() == 0.0
    torch.testing.assert_close(output(model, INPUTS), output(tiny_llama(), INPUTS), atol=1e-6, rtol=0)
    xlora.set_scaling_pass_value(None)
    assert model.peft_config["default"].scaling_pass_value == 0.5
    assert len(xlora.get_scalings_log()) == 2 and list(xlora.get_bucketed_scalings_log()) == [7]
    xlora.disable_scalings_logging()
    xlora.clear_scalings_log()
    assert xlora.get_scalings_log() == []


def test_refusals(experts, tmp_path):
    dora = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="^X-LoRA currently does not support LoRA layers with DoRA"):
        _ours({"0": str(tmp_path / "dora")})
    ia3 = deltatune.get_peft_model(tiny_llama(), deltatune.IA3Config(target_modules=["q_proj"],
                                                                      feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ConfigError, match="X-LoRA mixes LoRA adapters"):
        _ours({"0": str(tmp_path / "ia3")})
    with pytest.raises(ConfigError, match="pass hidden_size=32"):
        deltatune.get_peft_model(tiny_llama(), deltatune.XLoraConfig(hidden_size=64, adapters=experts["peft"]))
    with pytest.warns(PeftWarning, match="No value was provided for `adapters`"):
        config = deltatune.XLoraConfig(hidden_size=32)
    with pytest.raises(ConfigError, match="X-LoRA needs LoRA experts"):
        deltatune.get_peft_model(tiny_llama(), config)
    with pytest.raises(ConfigError, match="^X-LoRA depth must be strictly positive"):
        deltatune.XLoraConfig(hidden_size=32, adapters={}, xlora_depth=0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):  # the second expert fails: the first one is rolled back
        _ours({"0": experts["peft"]["0"], "1": str(tmp_path / "ia3")}, factory=lambda: model)
    assert set(model.state_dict()) == set(before)


def test_cli_names_what_to_pass(experts, tmp_path, capsys):
    from deltatune.cli import main
    from deltatune.cli import options as cli_options

    assert "xlora" not in cli_options.method_table()
    with pytest.raises(Exception, match="--method lora.*XLoraConfig"):
        cli_options.build_peft_config("xlora", {}, "CAUSAL_LM")
    model = _ours(experts["deltatune"])
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a classifier weighing 2 LoRA experts" in out and "2 experts; classifier depth 1" in out
