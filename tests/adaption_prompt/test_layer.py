"""Adaption prompts (LLaMA-Adapter) against the formula computed by hand from the model's weights, against peft's
``AdaptedAttention`` (files both ways, equal logits and ``generate``) on every architecture both libraries know,
Qwen2/Qwen3 (deltatune only), greedy ``generate`` against greedy full forward passes, several named adapters,
mixed-adapter ``generate``, the merge refusal, training, and PEFT's refusals (same sentence first).

The reference recomputes one adapted attention layer from its parts: ``Q = RoPE(norm_q(x W_qᵀ))``,
``Kₚ = norm_k(P W_kᵀ + b_k)``, ``Vₚ = P W_vᵀ + b_v``, the key/value heads repeated for grouped-query attention,
``out = Attn(x) + W_o (g · softmax(Q Kₚᵀ / √d_h) Vₚ)`` (GPT-2: the packed ``c_attn``, no ``c_proj``).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import VOCAB, make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama

import deltatune
from deltatune import AdaptedAttention, AdaptionPromptConfig, get_peft_model
from deltatune.errors import ConfigError, MergeError, TargetModuleError

ATOL = 1e-5


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(  # q/k/v with biases
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(  # head_dim 16 != hidden / heads: q_norm / k_norm per head
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()


FACTORIES = {"llama": tiny_llama, "mistral": tiny_mistral, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2,
             "qwen3": tiny_qwen3}
IN_PEFT = ("llama", "mistral", "gpt2")


def _adapted(kind: str, seed: int = 7, **config) -> deltatune.PeftModel:
    cfg = AdaptionPromptConfig(task_type="CAUSAL_LM", **{"adapter_len": 3, "adapter_layers": 2, **config})
    model = get_peft_model(FACTORIES[kind](), cfg)
    perturb_trainable(model, seed=seed, std=0.3)
    return model.eval()


def _greedy_by_full_passes(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        ids = torch.cat([ids, output(model, {"input_ids": ids})[:, -1:].argmax(-1)], dim=1)
    return ids


def _reference_layer(layer: AdaptedAttention, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor] | None,
                     name: str = "default") -> torch.Tensor:
    """The adapter term of ``layer`` for hidden states ``x: (B, T, d)``, from the formula (double precision)."""
    attn = layer.base_layer
    b, t, d = x.shape
    hd = attn.head_dim
    prompt, gate = layer.adaption_prompt[name].detach().double(), layer.adaption_gate[name].detach().double()

    def lin(mod, v):
        w = mod.weight.detach().double()
        bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().double()
        return v @ w.T + (0 if bias is None else bias)

    x = x.double()
    if layer.layout == "gpt2":
        w, bias = attn.c_attn.weight.detach().double(), attn.c_attn.bias.detach().double()  # Conv1D: (d, 3d)
        q = (x @ w + bias)[..., :d].reshape(b, t, -1, hd).transpose(1, 2)
        packed = prompt @ w + bias
        k, v = packed[..., d:2 * d], packed[..., 2 * d:]
    else:
        q = lin(attn.q_proj, x).reshape(b, t, -1, hd)
        k, v = lin(attn.k_proj, prompt), lin(attn.v_proj, prompt)
        if hasattr(attn, "q_norm"):  # RMS norm over each head's d_h values, then its weight
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + attn.q_norm.variance_epsilon)
            q = q * attn.q_norm.weight.detach().double()
        q = q.transpose(1, 2)
        cos, sin = (e.double().unsqueeze(1) for e in pos)
        half = hd // 2
        q = q * cos + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin
    kv_heads = k.shape[-1] // hd
    k = k.reshape(1, -1, kv_heads, hd)
    if hasattr(attn, "k_norm"):
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + attn.k_norm.variance_epsilon)
        k = k * attn.k_norm.weight.detach().double()
    k, v = k.transpose(1, 2), v.reshape(1, -1, kv_heads, hd).transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    probs = torch.softmax(q @ k.transpose(2, 3) / hd ** 0.5, dim=-1)
    heads = (gate * probs @ v).transpose(1, 2).reshape(b, t, -1)
    return heads if layer.layout == "gpt2" else heads @ attn.o_proj.weight.detach().double().T


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_layer_equals_the_formula(kind):
    model = _adapted(kind)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedAttention))
    layer.adaption_gate["default"].data.fill_(2.0)  # the tiny model's 0.02-std weights give a small term otherwise
    seen = {}

    def grab(module, args, kwargs, out):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pos"] = kwargs.get("position_embeddings")
        seen["out"], seen["base"] = out[0], module.base_layer(*args, **{**kwargs, "cache": None})[0]

    handle = layer.register_forward_hook(grab, with_kwargs=True)
    output(model, make_inputs("llama"))
    handle.remove()
    want = _reference_layer(layer, seen["x"], seen["pos"])
    torch.testing.assert_close((seen["out"] - seen["base"]).double(), want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_identity_at_init_and_generate_equals_greedy_full_passes(kind):
    inputs = make_inputs("llama")
    base = output(FACTORIES[kind](), inputs)
    fresh = get_peft_model(FACTORIES[kind](), AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                   task_type="CAUSAL_LM")).eval()
    torch.testing.assert_close(output(fresh, inputs), base, atol=0, rtol=0)  # gate 0: exactly the base
    model = _adapted(kind)
    assert (output(model, inputs) - base).abs().max() > 1e-3
    ids = inputs["input_ids"]
    generated = model.generate(input_ids=ids, attention_mask=inputs["attention_mask"], max_new_tokens=4,
                               do_sample=False)
    assert torch.equal(generated, _greedy_by_full_passes(model, ids, 4))


@pytest.mark.parametrize("kind", IN_PEFT)
def test_files_both_ways_with_peft_equal_logits_and_generate(kind, tmp_path):
    inputs = make_inputs("llama")
    ours = _adapted(kind)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(FACTORIES[kind](), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=1e-6, rtol=1e-5)
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "max_new_tokens": 4,
          "do_sample": False}
    assert torch.equal(theirs.generate(**kw), ours.generate(**kw))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(FACTORIES[kind](), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                                task_type="CAUSAL_LM"))
    perturb_trainable(made, seed=5, std=0.3)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = deltatune.PeftModel.from_pretrained(FACTORIES[kind](), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=1e-6, rtol=1e-5)
    assert loaded.peft_config["default"].target_modules == made.peft_config["default"].target_modules


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_beyond_peft_round_trip_and_peft_refuses(kind, tmp_path):
    inputs = make_inputs("llama")
    model = _adapted(kind)
    model.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(FACTORIES[kind](), tmp_path).eval()
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), atol=0, rtol=0)
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt"):
        peft.get_peft_model(FACTORIES[kind](), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))


def test_several_adapters_switch_delete_and_mixed_generate():
    inputs = make_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    model = _adapted("llama", seed=1, adapter_layers=1)
    model.add_adapter("two", AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM"))
    assert model.active_adapter == "default"
    wrapped = {n: sorted(m.adapter_names()) for n, m in model.named_modules() if isinstance(m, AdaptedAttention)}
    assert wrapped == {"base_model.model.model.layers.0.self_attn": ["two"],
                       "base_model.model.model.layers.1.self_attn": ["default", "two"]}
    model.set_adapter("two")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"base_model.model.model.layers.{i}.self_attn.adaption_{t}.two" for i in (0, 1) for t in ("prompt", "gate")]
    perturb_trainable(model, seed=2, std=0.3)
    model.eval()
    two = output(model, inputs)
    model.set_adapter("default")
    one = output(model, inputs)
    assert (one - two).abs().max() > 1e-3
    gen = {}
    for name in ("default", "two"):
        model.set_adapter(name)
        gen[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    mixed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           adapter_names=["two", "default"])
    assert torch.equal(mixed[0], gen["two"][0]) and torch.equal(mixed[1], gen["default"][1])
    model.delete_adapter("two")
    assert not any(isinstance(m, AdaptedAttention) for m in model.base_model.model.model.layers[0].modules())
    torch.testing.assert_close(output(model, inputs), one, atol=0, rtol=0)


def test_merge_refused_and_unload_gives_the_plain_model():
    inputs = make_inputs("llama")
    model = _adapted("llama")
    adapted = output(model, inputs)
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_and_unload()
    torch.testing.assert_close(output(model, inputs), adapted, atol=0, rtol=0)
    plain = model.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in plain.modules())
    torch.testing.assert_close(output(plain, inputs), output(tiny_llama(), inputs), atol=0, rtol=0)


def test_training_opens_the_gate_and_lowers_the_loss():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    gates = [m.adaption_gate["default"] for m in model.modules() if isinstance(m, AdaptedAttention)]
    assert all(g.abs().item() > 0 for g in gates)


def test_half_precision_base_keeps_fp32_adapter_tensors():
    model = get_peft_model(tiny_llama().to(torch.bfloat16),
                           AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"))
    perturb_trainable(model, std=0.3)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedAttention))
    assert layer.adaption_prompt["default"].dtype == torch.float32
    logits = output(model.eval(), make_inputs("llama"))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_refusals_say_what_peft_says():
    with pytest.raises(ConfigError, match="Unsupported model type for adaption prompt: 'bert'"):
        from support.models import tiny_bert

        get_peft_model(tiny_bert(), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    with pytest.raises(TargetModuleError, match="Config specifies more adapter layers '3' than the model has '2'"):
        get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=3, adapter_layers=3))
    with pytest.raises(ConfigError, match="needs adapter_len"):
        get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_layers=1))
    with pytest.raises(ConfigError, match="adapter_len must be a positive integer"):
        AdaptionPromptConfig(adapter_len=0, adapter_layers=1)
    assert AdaptionPromptConfig().is_adaption_prompt and not AdaptionPromptConfig().is_prompt_learning


def test_queries_and_output_projection_run_once_per_call():
    # the prompt's heads join the module's own o_proj input, and its queries are the module's q_proj output
    model = _adapted("llama", adapter_layers=1)
    attn = model.base_model.model.model.layers[1].self_attn.base_layer
    calls = {"q_proj": 0, "o_proj": 0}
    for name in calls:
        getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    output(model, make_inputs("llama"))
    assert calls == {"q_proj": 1, "o_proj": 1}


def test_o_proj_bias_is_added_once_unlike_peft():
    # A Llama with attention_bias=True: PEFT calls o_proj on the prompt's heads, bias included, so even a zero gate
    # shifts every output by o_proj's bias; deltatune adds the heads to o_proj's input and starts as the identity.
    from transformers import LlamaConfig, LlamaForCausalLM

    def biased():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             attention_bias=True)).eval()
        for layer in model.model.layers:  # transformers initialises biases to zero
            layer.self_attn.o_proj.bias.data.normal_(std=0.1)
        return model

    inputs = make_inputs("llama")
    base = output(biased(), inputs)
    ours = get_peft_model(biased(), AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"))
    torch.testing.assert_close(output(ours.eval(), inputs), base, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(biased(), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    assert (output(theirs.eval(), inputs) - base).abs().max() > 1e-4
