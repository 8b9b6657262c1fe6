"""Cartridges: a cartridge initialised from a prefill serves exactly the base model's continuation of that text
(an independent check of the table's layout, the cache and the positions), frozen entries stay frozen, files both
ways with peft (PEFT's default of one frozen entry), ``generate`` equals greedy full forward passes (peft 0.21.2's
own ``generate`` ignores the cache under transformers 5.25 on Llama: checked, so the day it is fixed this test
says so), composition, and PEFT's refusals (same sentence first)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import make_inputs, output, perturb_trainable, tiny_llama

import deltatune
from deltatune import CartridgeConfig, get_peft_model
from deltatune.errors import ConfigError

N = 4


class _Tokenizer:
    """The one call the helpers make of a tokenizer without a chat template: fixed ids for any text."""

    chat_template = None

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __call__(self, text, return_tensors="pt", truncation=False, max_length=None):
        return {"input_ids": self.ids[:, :max_length] if max_length else self.ids}


def _cartridge(**config) -> deltatune.PeftModel:
    return get_peft_model(tiny_llama(), CartridgeConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", **config))


def test_initialised_from_a_prefill_it_continues_that_text():
    text = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    model = _cartridge().eval()
    table = deltatune.initialize_kv_prefix_from_text(model, _Tokenizer(text), text="ignored")
    assert table.shape == (N, 2 * 2 * 16)  # 2 layers x (K, V) x 2 kv heads x head_dim 8
    x = make_inputs("llama", batch=1)
    want = output(tiny_llama(), {"input_ids": torch.cat([text[:, :N], x["input_ids"]], dim=1)})[:, N:]
    torch.testing.assert_close(output(model, x), want, atol=1e-5, rtol=1e-5)
    # the same table from the cache itself, and as peft's helper lays it out
    cache = tiny_llama()(input_ids=text, use_cache=True).past_key_values
    legacy = [(layer.keys, layer.values) for layer in cache.layers]
    ours = deltatune.prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=N)
    torch.testing.assert_close(ours, table, atol=0, rtol=0)
    torch.testing.assert_close(peft.prompt_embeddings_from_past_key_values(legacy, num_virtual_tokens=N), ours,
                               atol=0, rtol=0)


def test_frozen_entries_stay_frozen_while_the_rest_trains():
    model = _cartridge(num_frozen_tokens=1)
    encoder = model.prompt_encoder["default"]
    assert not encoder.frozen_embedding.requires_grad and encoder.trainable_embedding.requires_grad
    before = encoder.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    ids = make_inputs("llama")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = encoder.weight.detach()
    assert torch.equal(after[:1], before[:1]) and not torch.equal(after[1:], before[1:])
    with model.disable_adapter():
        pass
    model.set_adapter("default")
    assert not encoder.frozen_embedding.requires_grad and encoder.trainable_embedding.requires_grad


def test_files_both_ways_with_peft_with_a_frozen_entry_and_generate(tmp_path):
    inputs = make_inputs("llama")
    ours = _cartridge(num_frozen_tokens=1)
    perturb_trainable(ours, std=0.5)
    ours.eval().save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=1e-6, rtol=1e-5)
    assert theirs.peft_config["default"].num_frozen_tokens == 1
    theirs.save_pretrained(tmp_path / "theirs")
    again = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(again, inputs), output(ours, inputs), atol=1e-6, rtol=1e-5)
    assert not again.prompt_encoder["default"].frozen_embedding.requires_grad

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    greedy = ids
    for _ in range(4):
        greedy = torch.cat([greedy, output(ours, {"input_ids": greedy})[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, greedy)
    base = tiny_llama().generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    theirs_generated = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(theirs_generated, base) and not torch.equal(generated, base)  # peft's drops the cartridge


def test_composed_cartridges_hold_both_caches(tmp_path):
    tables = []
    for i, seed in enumerate((1, 2)):
        model = _cartridge(num_frozen_tokens=1)
        perturb_trainable(model, seed=seed, std=0.5)
        tables.append(model.prompt_encoder["default"].prompt_embeddings())
        model.save_pretrained(tmp_path / f"c{i}")
    deltatune.compose_cartridge_adapters([tmp_path / "c0", tmp_path / "c1"], output_path=tmp_path / "both")
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "both").eval()
    assert loaded.peft_config["default"].num_virtual_tokens == 2 * N
    torch.testing.assert_close(loaded.prompt_encoder["default"].prompt_embeddings(), torch.cat(tables), atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "both").eval()
    inputs = make_inputs("llama")
    torch.testing.assert_close(output(theirs, inputs), output(loaded, inputs), atol=1e-6, rtol=1e-5)


def test_refusals_say_what_peft_says(tmp_path):
    with pytest.raises(ConfigError, match="`num_frozen_tokens` must be >= 0"):
        CartridgeConfig(num_virtual_tokens=N, num_frozen_tokens=-1)
    with pytest.raises(ConfigError, match="`num_frozen_tokens` must be <= `num_virtual_tokens`"):
        CartridgeConfig(num_virtual_tokens=2, num_frozen_tokens=3)
    model = _cartridge()
    two = torch.randint(3, 100, (2, 6))
    with pytest.raises(ConfigError, match="expects `past_key_values` from a single-sequence prefill"):
        deltatune.initialize_kv_prefix_from_past_key_values(
            model, past_key_values=tiny_llama()(input_ids=two, use_cache=True).past_key_values)
    with pytest.raises(ConfigError, match=f"Need at least {N} cached tokens"):
        deltatune.initialize_kv_prefix_from_text(model, _Tokenizer(two[:1, :2]), text="short")
    model.save_pretrained(tmp_path / "one")
    with pytest.raises(ConfigError, match="Need at least 2 adapters to compose."):
        deltatune.compose_cartridge_adapters([tmp_path / "one"], output_path=tmp_path / "out")
