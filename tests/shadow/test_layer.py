"""ShadowPEFT: the equations against an independent reference, PEFT's config, init draws, files and refusals, the
auxiliary loss, generation with the two caches, several adapters, a loaded shadow backbone, GPT-2 and Qwen3."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from support.models import VOCAB, make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune.errors import ConfigError, MergeError
from deltatune.shadow import ShadowCache, ShadowLayer

IDS = make_inputs("llama")["input_ids"]  # (2, 7)


def tiny_qwen3(seed: int = 0) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


def _peft_model(factory, seed: int = 1, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(factory(), peft.ShadowConfig(task_type="CAUSAL_LM", **kwargs))


def _ours(factory, seed: int = 1, adapter_name: str = "default", **kwargs) -> deltatune.PeftModel:
    torch.manual_seed(seed)
    return deltatune.get_peft_model(factory(), deltatune.ShadowConfig(task_type="CAUSAL_LM", **kwargs),
                                    adapter_name=adapter_name)


# ---- config --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"r": 4, "shadow_alpha": 0.5, "shadow_num_hidden_layers": 2,
                                         "shadow_hidden_size": 16, "update_hidden_size": 12,
                                         "target_modules": ["model.layers.0"], "auxiliary_loss_weight": 0.0}])
def test_config_to_dict_is_peft(kwargs):
    ours = deltatune.ShadowConfig(**kwargs).to_dict()
    theirs = {k: sorted(v) if isinstance(v, set) else v for k, v in peft.ShadowConfig(**kwargs).to_dict().items()}
    ours.pop("peft_version"), theirs.pop("peft_version")  # peft's sets are written as lists (json)
    assert ours == theirs


def test_config_refusals_are_peft_sentences():
    with pytest.raises(ConfigError, match="^Explicit `shadow_model` checkpoints define their architecture; unset "
                                          "these mirror-only overrides: shadow_hidden_size."):
        deltatune.ShadowConfig(shadow_model="/some/path", shadow_hidden_size=16)
    with pytest.raises(ConfigError, match="^When `layers_pattern` is specified, `layers_to_transform` must"):
        deltatune.ShadowConfig(layers_pattern="layers")


# ---- the equations -------------------------------------------------------------------------------------------------
def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    hidden = F.gelu(x @ sd[f"{stem}.0.weight"].T + sd[f"{stem}.0.bias"])
    return hidden @ sd[f"{stem}.2.weight"].T + sd[f"{stem}.2.bias"]


def _reference_logits(model: deltatune.PeftModel, ids: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """The paper's Eq. 1-7 written out on a fresh copy of the base: s⁽⁰⁾ from the backbone on the base embeddings,
    then per block h̃ = h + α W_up W_down (h - s), s ← (1 - σ(G(h_out))) s + σ(G(h_out)) T(h_out)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    base = tiny_llama()
    state = {"s": model.base_model.shadow_backbone["default"](inputs_embeds=base.model.embed_tokens(ids))
             .last_hidden_state}
    seed = state["s"]

    class Reference(nn.Module):
        def __init__(self, block: nn.Module, i: int) -> None:
            super().__init__()
            self.block, self.stem = block, f"base_model.model.model.layers.{i}"
            self.attention_type = getattr(block, "attention_type", None)

        def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            s = state["s"]
            down, up = sd[f"{self.stem}.shadow_down.default.weight"], sd[f"{self.stem}.shadow_up.default.weight"]
            out = self.block(h + alpha * ((h - s) @ down.T) @ up.T, *args, **kwargs)
            gate = torch.sigmoid(_mlp(out, sd, f"{self.stem}.shadow_update_gate.default"))
            state["s"] = (1 - gate) * s + gate * _mlp(out, sd, f"{self.stem}.shadow_update_transform.default")
            return out

    for i, block in enumerate(list(base.model.layers)):
        base.model.layers[i] = Reference(block, i)
    with torch.no_grad():
        return base(input_ids=ids).logits, seed


def test_forward_and_auxiliary_loss_equal_the_reference():
    model = _ours(tiny_llama, r=4, shadow_alpha=0.3, shadow_dropout=0.0)
    perturb_trainable(model, std=0.3)
    model.eval()
    want, seed = _reference_logits(model, IDS, alpha=0.3)
    with torch.no_grad():
        out = model(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    task = F.cross_entropy(want[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
    shadow = F.cross_entropy(model.base_model.model.lm_head(seed)[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
    torch.testing.assert_close(out.shadow_loss, shadow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, task + 0.05 * shadow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.base_model.last_shadow_loss, shadow, atol=1e-5, rtol=1e-5)


def test_init_draws_and_keys_are_peft_and_identity_at_init():
    theirs, ours = _peft_model(tiny_llama), _ours(tiny_llama)
    assert sorted(theirs.state_dict()) == sorted(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    torch.testing.assert_close(output(ours.eval(), {"input_ids": IDS}), output(tiny_llama(), {"input_ids": IDS}))
    layers = [m for m in ours.modules() if isinstance(m, ShadowLayer)]
    assert len(layers) == 2 and repr(layers[0]).startswith("shadow.ShadowLayer(")


# ---- files both ways -----------------------------------------------------------------------------------------------
def _both_ways(factory, tmp_path, **kwargs) -> None:
    inputs = {"input_ids": IDS}
    ours = _ours(factory, **kwargs)
    perturb_trainable(ours, seed=5, std=0.3)
    ours.eval().save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(loaded, inputs), output(ours, inputs), atol=1e-5, rtol=1e-5)
    theirs = _peft_model(factory, **kwargs)
    perturb_trainable(theirs, seed=6, std=0.3)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    back = deltatune.PeftModel.from_pretrained(factory(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(back, inputs), output(theirs, inputs), atol=1e-5, rtol=1e-5)


def test_gpt2_with_a_narrower_projected_backbone_crosses_both_ways(tmp_path):
    # width 16 != 32: the backbone has its own embeddings and shadow_projection (16 -> 32) appears
    _both_ways(tiny_gpt2, tmp_path, r=4, shadow_hidden_size=16, shadow_num_attention_heads=2,
               shadow_intermediate_size=32)


def test_qwen3_two_layer_mirror_crosses_both_ways(tmp_path):
    _both_ways(tiny_qwen3, tmp_path, r=4, shadow_num_hidden_layers=2, update_hidden_size=6)


def test_a_saved_transformers_checkpoint_as_shadow_model(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(3)
    LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "small")
    source = str(tmp_path / "small")
    _both_ways(tiny_llama, tmp_path, r=4, shadow_model=source)
    model = _ours(tiny_llama, shadow_model=source)
    backbone = model.base_model.shadow_backbone["default"]
    assert backbone.embed_tokens.weight.shape == (VOCAB, 24)  # its own table (not shared), frozen as PEFT's
    assert not backbone.embed_tokens.weight.requires_grad and backbone.norm.weight.requires_grad
    assert model.base_model.shadow_projection["default"].weight.shape == (32, 24)


def test_sequence_classification_head_loss_and_files(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()

    labels = torch.tensor([0, 2])
    torch.manual_seed(1)
    ours = deltatune.get_peft_model(classifier(), deltatune.ShadowConfig(task_type="SEQ_CLS", r=4))
    perturb_trainable(ours, std=0.3)
    ours.eval().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(classifier(), tmp_path).eval()
    with torch.no_grad():
        a, b = ours(input_ids=IDS, labels=labels), theirs(input_ids=IDS, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.shadow_loss, b.shadow_loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="^ShadowPEFT does not support multiple adapters when any adapter uses "
                                          "sequence classification"):
        ours.add_adapter("other", deltatune.ShadowConfig(task_type="SEQ_CLS", r=4))


# ---- generation ----------------------------------------------------------------------------------------------------
def _greedy_by_full_forwards(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = output(model, {"input_ids": ids, "use_cache": False})
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_generate_with_both_caches_equals_full_forwards_and_peft():
    theirs = _peft_model(tiny_llama)
    perturb_trainable(theirs, seed=9, std=0.3)
    theirs.eval()
    ours = _ours(tiny_llama)
    ours.load_state_dict(theirs.state_dict())  # the same tensors (PEFT's keys are ours)
    ours.eval()
    with torch.no_grad():
        generated = ours.generate(input_ids=IDS, max_new_tokens=10, do_sample=False)
        peft_full = theirs.generate(input_ids=IDS, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(generated, _greedy_by_full_forwards(ours, IDS, 10))
    # peft's own cached decoding loses the backbone's cache under transformers 5 (it passes `past_key_values`,
    # the model reads `cache`); without the cache peft decodes the same tokens
    assert torch.equal(generated, peft_full)
    with torch.no_grad():
        step = ours(input_ids=IDS, use_cache=True)
    assert isinstance(step.cache, ShadowCache) and step.cache.get_seq_length() == IDS.shape[1]
    assert step.cache.shadow.get_seq_length() == IDS.shape[1]


def test_mixed_adapter_generate_equals_each_adapter_alone(tmp_path):
    ours = _ours(tiny_llama, r=4)
    perturb_trainable(ours, seed=1, std=0.3)
    other = _ours(tiny_llama, r=4, seed=2)
    perturb_trainable(other, seed=2, std=0.3)
    other.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, adapter_name="other")
    ours.eval()
    with torch.no_grad():
        mixed = ours.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, adapter_names=["default", "other"])
        alone = ours.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
        by_other = other.eval().generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(mixed[0], alone[0]) and torch.equal(mixed[1], by_other[1])


# ---- adapters, refusals, unloading ---------------------------------------------------------------------------------
def test_several_adapters_one_active_and_switching(tmp_path):
    model = _ours(tiny_llama, r=4)
    model.add_adapter("second", deltatune.ShadowConfig(task_type="CAUSAL_LM", r=2, target_modules=["model.layers.1"]))
    perturb_trainable(model, std=0.3)
    model.eval()
    first = output(model, {"input_ids": IDS})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)
    model.set_adapter("second")
    second = output(model, {"input_ids": IDS})
    assert all(".second." in n for n, p in model.named_parameters() if p.requires_grad)
    assert (first - second).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="^ShadowPEFT requires exactly one active adapter, but got 2 adapters."):
        model.base_model.set_adapter(["default", "second"])
    model.delete_adapter("second")
    torch.testing.assert_close(output(model, {"input_ids": IDS}), first)


def test_merge_refused_and_unload_gives_the_plain_model():
    model = _ours(tiny_llama, r=4)
    perturb_trainable(model, std=0.3)
    with pytest.raises(MergeError, match="ShadowPEFT cannot be merged into the base model: the adaptation is an "
                                         "input-dependent, layer-space trajectory"):
        model.merge_and_unload()
    plain = model.unload()
    assert not any(isinstance(m, ShadowLayer) for m in plain.modules())
    assert not plain._forward_pre_hooks and not plain._forward_hooks  # the runtime's hooks went with the layers
    torch.testing.assert_close(output(plain, {"input_ids": IDS}), output(tiny_llama(), {"input_ids": IDS}))


def test_diffusers_models_are_refused_naming_what_works():
    class FluxLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ConfigError, match="diffusers.*transformers decoder-only model"):
        deltatune.get_peft_model(FluxLike(), deltatune.ShadowConfig())


def test_unload_shadow_is_peft_standalone_shadow_network(tmp_path):
    theirs = _peft_model(tiny_llama, r=4)
    perturb_trainable(theirs, seed=4, std=0.3)
    ours = _ours(tiny_llama, r=4)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        want = theirs.base_model.unload_shadow()(input_ids=IDS, labels=IDS)
        alone = ours.unload_shadow()
        got = alone(input_ids=IDS, labels=IDS)
        torch.testing.assert_close(got.logits, want.logits)
        torch.testing.assert_close(got.loss, want.loss)
        # the shadow loss of the adapted model is this standalone model's loss (Eq. 8 reads s⁽⁰⁾)
        torch.testing.assert_close(ours.eval()(input_ids=IDS, labels=IDS).shadow_loss, got.loss)
        copied = ours.unload_shadow(copy=True)
        assert torch.equal(copied.generate(input_ids=IDS, max_new_tokens=4, do_sample=False),
                           alone.generate(input_ids=IDS, max_new_tokens=4, do_sample=False))
