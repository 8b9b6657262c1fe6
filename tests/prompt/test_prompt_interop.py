"""Prompt-learning adapters cross between deltatune and Hugging Face PEFT 0.21.2 both ways.

One table of cases (method x model). For every case:

- PEFT builds + perturbs + saves -> deltatune loads into a fresh base -> same logits, same greedy generations;
- deltatune builds + perturbs + saves -> PEFT loads into a fresh base -> same logits, same greedy generations;
- both libraries write the same tensor names/shapes/dtypes and the same ``adapter_config.json`` fields.

"Same greedy generations" is checked against greedy decoding computed from PEFT's own forward (one full
forward per new token, no cache): PEFT 0.21.2's ``generate`` for decoder-only models and for prefix tuning
re-inserts the prompt at every step under transformers 5 (it looks for ``past_key_values``, which
transformers 5 renamed ``cache``), so its output is not a reference there. Where PEFT's ``generate`` is
sound (encoder-decoder soft prompts) deltatune's output must also equal it token for token.

The inputs have a left-padded row, so the attention-mask extension is checked too. Every trainable tensor
(the prompt encoder, MPT's task factors, a classifier head in ``modules_to_save``) gets seeded noise first.
"""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.models import perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

import deltatune

ATOL = 1e-5

# class names, identical in both libraries
CONFIGS = {
    "prompt": "PromptTuningConfig",
    "ptuning": "PromptEncoderConfig",
    "prefix": "PrefixTuningConfig",
    "mpt": "MultitaskPromptTuningConfig",
}

# (id, factory, method, config kwargs). PEFT fills token_dim etc. from the model in both directions.
CASES = [
    ("llama-prompt", tiny_llama, "prompt", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}),
    ("llama-ptuning-mlp", tiny_llama, "ptuning",
     {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_hidden_size": 24}),
    ("llama-ptuning-lstm", tiny_llama, "ptuning",
     {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM",
      "encoder_hidden_size": 16}),
    ("llama-prefix-gqa", tiny_llama, "prefix", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 5}),
    ("llama-prefix-projection", tiny_llama, "prefix",
     {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 20}),
    ("llama-mpt", tiny_llama, "mpt", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_tasks": 3,
                                      "num_ranks": 2}),
    ("gpt2-prompt", tiny_gpt2, "prompt", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}),
    ("gpt2-ptuning", tiny_gpt2, "ptuning", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3}),
    ("gpt2-prefix", tiny_gpt2, "prefix", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}),
    ("gpt2-mpt", tiny_gpt2, "mpt", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_tasks": 2}),
    ("t5-prompt", tiny_t5, "prompt", {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4}),
    ("t5-ptuning", tiny_t5, "ptuning", {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}),
    ("t5-prefix", tiny_t5, "prefix", {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4}),
    ("t5-mpt", tiny_t5, "mpt", {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3, "num_tasks": 2}),
    ("bert-prompt-seqcls", tiny_bert, "prompt", {"task_type": "SEQ_CLS", "num_virtual_tokens": 4}),
    ("bert-ptuning-seqcls", tiny_bert, "ptuning", {"task_type": "SEQ_CLS", "num_virtual_tokens": 3}),
    ("bert-prefix-seqcls", tiny_bert, "prefix", {"task_type": "SEQ_CLS", "num_virtual_tokens": 4}),
    ("bert-mpt-seqcls", tiny_bert, "mpt", {"task_type": "SEQ_CLS", "num_virtual_tokens": 3, "num_tasks": 2}),
]

# PEFT 0.21.2 cannot run prefix tuning on BERT with transformers 5 (it looks for a `past_key_values`
# argument, which transformers 5 renamed `cache`): files still cross, logits are checked against
# a reference built directly from the file (the cache transformers itself takes).
PEFT_CANNOT_RUN = {"bert-prefix-seqcls"}
# Cases where PEFT's own generate() is correct under transformers 5 (see the module docstring).
PEFT_GENERATE_SOUND = {"t5-prompt", "t5-ptuning", "t5-mpt"}
# PEFT's seq2seq MPT prompts the decoder in forward() but not in generate(); deltatune does the same, so
# a forward-based greedy reference does not apply and PEFT's generate() is the reference.
NO_FORWARD_REFERENCE = {"t5-mpt"}


def _config(lib, method: str, kwargs: dict):
    return getattr(lib, CONFIGS[method])(**kwargs)


def _kind(factory) -> str:
    return {tiny_llama: "llama", tiny_gpt2: "gpt2", tiny_t5: "t5", tiny_bert: "bert"}[factory]


def _inputs(factory, method: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if factory is tiny_t5:
        target = torch.randint(3, 100, (2, 5), generator=g)
        # PEFT's seq2seq MPT builds its decoder input from labels only.
        inputs.update({"labels": target} if method == "mpt" else {"decoder_input_ids": target})
    if method == "mpt":
        inputs["task_ids"] = torch.tensor([1, 0])
    return inputs


def _gen_inputs(factory, method: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "do_sample": False}
    if method == "mpt":
        out["task_ids"] = torch.tensor([0, 1])
    return out


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**inputs)


def _greedy_by_forward(model, inputs) -> torch.Tensor:
    """Greedy decoding by one full forward per new token (no cache, no ``generate``), stopping like
    ``generate``: a row that emitted EOS continues with padding; all rows done -> stop."""
    ids = inputs["input_ids"]
    extra = {"task_ids": inputs["task_ids"]} if "task_ids" in inputs else {}
    cfg = model.get_base_model().config
    seq2seq = cfg.is_encoder_decoder
    seq = torch.full((ids.shape[0], 1), cfg.decoder_start_token_id) if seq2seq else ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(inputs["max_new_tokens"]):
        with torch.no_grad():
            if seq2seq:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=seq,
                               **extra).logits
            else:
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **extra).logits
        token = logits[:, -1].argmax(-1).masked_fill(done, cfg.pad_token_id)
        done |= token == cfg.eos_token_id
        seq = torch.cat([seq, token[:, None]], dim=1)
        if done.all():
            break
    return seq


def _check_generation(case: str, ours, theirs, gen_inputs) -> None:
    generated = _generate(ours, gen_inputs)
    assert generated.shape[1] > gen_inputs["input_ids"].shape[1] or theirs.get_base_model().config.is_encoder_decoder
    if case not in NO_FORWARD_REFERENCE:
        assert torch.equal(generated, _greedy_by_forward(theirs, gen_inputs))
    if case in PEFT_GENERATE_SOUND:
        assert torch.equal(generated, _generate(theirs, gen_inputs))


def _bert_prefix_reference(factory, directory: str, inputs) -> torch.Tensor:
    """Logits of a BERT classifier whose attention layers see the file's prefix, built by hand."""
    from transformers import DynamicCache

    model = factory()
    state = load_file(os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    n, layers, heads = cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"]
    table = state.pop("prompt_embeddings")                     # (n, layers * 2 * token_dim)
    kv = table.view(n, 2 * layers, heads, -1).permute(1, 2, 0, 3).unsqueeze(1).expand(-1, 2, -1, -1, -1)
    cache = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
    model.classifier.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items()})
    mask = torch.cat([torch.ones(2, n, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=mask, cache=cache).logits


def _files(directory: str) -> tuple[dict, dict]:
    state = load_file(os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json")) as fh:
        config = json.load(fh)
    config.pop("peft_version", None)
    if config.get("modules_to_save"):  # PEFT lists the default heads twice for prompt learning; same meaning
        config["modules_to_save"] = sorted(set(config["modules_to_save"]))
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, config


@pytest.mark.parametrize(("factory", "method", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_prompt_adapters_cross_both_ways(factory, method, kwargs, tmp_path):
    case = next(c[0] for c in CASES if c[1:] == (factory, method, kwargs))
    inputs, gen_inputs = _inputs(factory, method), _gen_inputs(factory, method)
    generative = factory is not tiny_bert
    runs_in_peft = case not in PEFT_CANNOT_RUN

    # PEFT -> deltatune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), _config(peft, method, kwargs)).eval()
    assert perturb_trainable(theirs), "nothing trainable to perturb"
    theirs.save_pretrained(tmp_path / "peft")
    ours = deltatune.PeftModel.from_pretrained(factory(), tmp_path / "peft")
    expected = _logits(theirs, inputs) if runs_in_peft else _bert_prefix_reference(factory, tmp_path / "peft", inputs)
    base = _logits(factory(), {k: v for k, v in inputs.items() if k != "task_ids"})
    assert not torch.allclose(expected[..., -base.shape[1]:, :] if expected.dim() == 3 else expected, base,
                              atol=1e-3), "the adapter does not change the output: the test would prove nothing"
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=ATOL, rtol=1e-4)
    if generative:
        _check_generation(case, ours, theirs, gen_inputs)

    # deltatune -> PEFT
    ours = deltatune.get_peft_model(factory(), _config(deltatune, method, kwargs)).eval()
    assert perturb_trainable(ours, seed=11)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    expected = _logits(theirs, inputs) if runs_in_peft else _bert_prefix_reference(factory, tmp_path / "ours", inputs)
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=ATOL, rtol=1e-4)
    if generative:
        _check_generation(case, ours, theirs, gen_inputs)

    # Same file layout and config fields from both libraries.
    assert _files(tmp_path / "ours") == _files(tmp_path / "peft")
