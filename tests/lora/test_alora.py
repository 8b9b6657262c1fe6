"""Activated LoRA (``LoraConfig.alora_invocation_tokens``): the adapter acts from the last invocation on.

References: real ``peft`` 0.21.2 (both directions, ``generate()`` included) and an independent implementation of
the math in this file (:func:`reference_logits`: the base model with forward hooks adding ``s · B A x`` on the
positions from each row's invocation start, found by a plain Python scan).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import tiny_llama

import deltatune
from deltatune.errors import ConfigError, MergeError
from deltatune.lora.alora import invocation_offsets
from deltatune.lora.layer import LoraLinear

INVOKE = [5, 6]
TARGETS = ["q_proj", "v_proj", "down_proj", "o_proj"]
PAD = 0
# Rows: invocation early, invocation late (twice: the last one counts), no invocation, left padding + invocation.
IDS = torch.tensor([
    [10, 11, 5, 6, 12, 13, 14, 15, 16, 17],
    [10, 5, 6, 11, 12, 13, 14, 5, 6, 15],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [PAD, PAD, PAD, 20, 21, 22, 5, 6, 23, 24],
])
MASK = (IDS != PAD).long()
STARTS = [2, 7, None, 6]  # start of the last invocation per row
ATOL, RTOL = 1e-5, 1e-5


def _config(lib, **kw):
    base = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, alora_invocation_tokens=INVOKE,
                task_type="CAUSAL_LM")
    return lib.LoraConfig(**{**base, **kw})


def _dt_model(seed: int = 0, **kw) -> deltatune.PeftModel:
    base = tiny_llama(0)  # seeds itself: the adapter's seed comes after
    torch.manual_seed(seed)
    return deltatune.get_peft_model(base, _config(deltatune, **kw)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A deltatune aLoRA model, saved and loaded into PEFT; a PEFT one (other weights), saved and loaded into
    deltatune."""
    root = tmp_path_factory.mktemp("alora")
    dt_src = _dt_model(0)
    dt_src.save_pretrained(root / "dt")
    base = tiny_llama(0)
    torch.manual_seed(1)
    peft_src = peft.get_peft_model(base, _config(peft)).eval()
    peft_src.save_pretrained(root / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_from_dt = peft.PeftModel.from_pretrained(tiny_llama(0), root / "dt").eval()
        dt_from_peft = deltatune.PeftModel.from_pretrained(tiny_llama(0), root / "peft").eval()
    return dict(dt=dt_src, peft_from_dt=peft_from_dt, peft=peft_src, dt_from_peft=dt_from_peft, root=root)


def _starts(ids: torch.Tensor, tokens=INVOKE) -> list[int | None]:
    """The last start of ``tokens`` in each row, by a plain scan (independent of deltatune.lora.alora)."""
    out = []
    for row in ids.tolist():
        hits = [i for i in range(len(row) - len(tokens) + 1) if row[i:i + len(tokens)] == list(tokens)]
        out.append(hits[-1] if hits else None)
    return out


def _lora_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module name in the base model: (A, B, s)}`` of a deltatune model's aLoRA layers."""
    return {name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                   m.scaling["default"])
            for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLinear)}


@torch.no_grad()
def reference_logits(weights, ids, starts, attention_mask=None) -> torch.Tensor:
    """The aLoRA math by hand: the base model, each adapted Linear adding ``s · B A x_t`` for ``t >= start``."""
    base = tiny_llama(0)
    length = ids.shape[1]
    first = torch.tensor([length if s is None else s for s in starts])
    keep = (torch.arange(length)[None, :] >= first[:, None]).float()[..., None]     # (batch, T, 1)
    handles = []
    for name, (a, b, s) in weights.items():
        def hook(_module, inputs, out, a=a, b=b, s=s):
            return out + (inputs[0] @ a.T @ b.T) * s * keep
        handles.append(base.get_submodule(name).register_forward_hook(hook))
    try:
        return base(input_ids=ids, attention_mask=attention_mask).logits
    finally:
        for h in handles:
            h.remove()


def _logits(model, ids=IDS, mask=MASK, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _valid(x: torch.Tensor) -> torch.Tensor:
    return x[MASK.bool()]  # the positions that are not padding: (n, vocab)


def test_offsets_are_peft_convention():
    assert _starts(IDS) == STARTS
    assert invocation_offsets(IDS, INVOKE) == [8, 3, None, 4]  # T - start, counted from the end (PEFT)
    assert invocation_offsets(IDS[:, :1], INVOKE) == [None] * 4  # shorter than the invocation
    # PEFT's own search agrees
    from peft.tuners.lora.variants import calculate_alora_offsets

    assert calculate_alora_offsets({"default": _config(peft)}, "default", IDS) == [8, 3, None, 4]


def test_logits_equal_reference_and_peft_both_ways(models):
    for dt, pf in ((models["dt"], models["peft_from_dt"]), (models["dt_from_peft"], models["peft"])):
        ours = _logits(dt)
        reference = reference_logits(_lora_weights(dt), IDS, STARTS, MASK)
        torch.testing.assert_close(_valid(ours), _valid(reference), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(_valid(ours), _valid(_logits(pf)), atol=ATOL, rtol=RTOL)
    # the two adapters differ (else the second direction would prove nothing new)
    assert not torch.allclose(_logits(models["dt"]), _logits(models["dt_from_peft"]), atol=1e-3)


def test_positions_before_invocation_are_the_base_exactly(models):
    dt = models["dt"]
    ours = _logits(dt)
    with dt.disable_adapter():
        base = _logits(dt)
    for i, start in enumerate(STARTS):
        valid = MASK[i].bool()
        stop = IDS.shape[1] if start is None else start
        assert torch.equal(ours[i, :stop][valid[:stop]], base[i, :stop][valid[:stop]])
        if start is not None:  # from the invocation on, the adapter acts
            assert (ours[i, start:] - base[i, start:]).abs().amax(-1).min() > 1e-3
    # the inner model called directly (no offsets): the base for aLoRA adapters, as PEFT
    with torch.no_grad():
        assert torch.equal(dt.get_base_model()(input_ids=IDS, attention_mask=MASK).logits, base)


def _greedy_by_reference(weights, ids, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes of :func:`reference_logits` (no cache), the starts from the prompt."""
    starts = _starts(ids)
    for _ in range(steps):
        nxt = reference_logits(weights, ids, starts)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_generate_equals_peft_and_full_forward_decoding(models):
    prompts = IDS[:3]  # no padding: full-forward decoding then needs no attention mask
    steps = 5
    for dt, pf in ((models["dt"], models["peft_from_dt"]), (models["dt_from_peft"], models["peft"])):
        with torch.no_grad():
            ours = dt.generate(input_ids=prompts, max_new_tokens=steps, do_sample=False)
            theirs = pf.generate(input_ids=prompts, max_new_tokens=steps, do_sample=False)
        expected = _greedy_by_reference(_lora_weights(dt), prompts, steps)
        assert torch.equal(ours, expected)
        assert torch.equal(ours, theirs)
        with torch.no_grad(), dt.disable_adapter():
            base = dt.generate(input_ids=prompts, max_new_tokens=steps, do_sample=False)
        assert torch.equal(base[2], ours[2])  # the row without the invocation decodes as the base model
        assert not torch.equal(base[:2], ours[:2])
    # left padding with an attention mask: the same tokens as PEFT
    with torch.no_grad():
        ours = models["dt"].generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=steps, do_sample=False)
        theirs = models["peft_from_dt"].generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=steps,
                                                 do_sample=False)
    assert torch.equal(ours, theirs)


def test_reuses_the_base_models_kv_cache_of_the_prefix(models):
    dt = models["dt"]
    ids = IDS[:1]                                   # invocation at 2: prefix [10, 11], rest from [5, 6] on
    full = _logits(dt, ids, None)
    with torch.no_grad(), dt.disable_adapter():
        cache = dt.get_base_model()(input_ids=ids[:, :2], use_cache=True).past_key_values
        prefix_logits = dt(input_ids=ids[:, :2]).logits
    torch.testing.assert_close(prefix_logits, full[:, :2], atol=ATOL, rtol=RTOL)  # other shapes: rounding only
    with torch.no_grad():
        rest = dt(input_ids=ids[:, 2:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 2:], atol=ATOL, rtol=RTOL)
    # generate() given the base model's cache of the prefix (it feeds only the uncached tokens): same tokens
    with torch.no_grad(), dt.disable_adapter():
        cache = dt.get_base_model()(input_ids=ids[:, :2], use_cache=True).past_key_values
    with torch.no_grad():
        reused = dt.generate(input_ids=ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
        fresh = dt.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(reused, fresh)


def test_inputs_embeds_need_offsets(models):
    dt = models["dt"]
    embeds = dt.get_input_embeddings()(IDS)
    with pytest.raises(ConfigError, match="alora_offsets"):
        dt(inputs_embeds=embeds, attention_mask=MASK)
    # explicit offsets (PEFT's kwarg): the same logits as from input_ids
    offsets = invocation_offsets(IDS, INVOKE)
    with torch.no_grad():
        given = dt(inputs_embeds=embeds, attention_mask=MASK, alora_offsets=offsets).logits
    torch.testing.assert_close(_valid(given), _valid(_logits(dt)), atol=ATOL, rtol=RTOL)


def test_beam_search_rows_keep_their_offsets(models):
    """PEFT refuses beams for aLoRA; here each expanded row repeats its offset. Checked against the reference:
    with length_penalty=0 a returned beam's score is the sum of its tokens' log-probabilities."""
    dt = models["dt"]
    prompts = IDS[:3]
    with pytest.raises(ValueError, match="Beam search"):
        models["peft_from_dt"].generate(input_ids=prompts, max_new_tokens=3, num_beams=2)
    with torch.no_grad():
        out = dt.generate(input_ids=prompts, max_new_tokens=3, num_beams=3, num_return_sequences=3,
                          length_penalty=0.0, do_sample=False, output_scores=True, return_dict_in_generate=True)
    seqs = out.sequences                                                   # (9, 13)
    starts = [s for s in _starts(prompts) for _ in range(3)]
    logp = reference_logits(_lora_weights(dt), seqs, starts).log_softmax(-1)
    new = seqs[:, prompts.shape[1]:]
    score = logp[:, prompts.shape[1] - 1:-1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, score, atol=1e-4, rtol=1e-4)


def test_refusals(models, tmp_path):
    dt = models["dt"]
    with pytest.raises(MergeError, match="aLoRA"):
        dt.merge_adapter()
    with pytest.raises(MergeError, match="aLoRA"):
        dt.merge_and_unload()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):  # PEFT refuses too
        models["peft_from_dt"].merge_adapter()
    assert not any(m.merged for m in dt.modules() if isinstance(m, LoraLinear))
    with pytest.raises(ConfigError, match="DoRA"):
        _config(deltatune, use_dora=True)
    with pytest.raises(ValueError, match="variant combination"):  # PEFT: at model creation
        peft.get_peft_model(tiny_llama(0), _config(peft, use_dora=True))
    with pytest.raises(ConfigError, match="Linear layers"):
        _dt_model(target_modules=["embed_tokens"])
    for bad in ("5 6", [5, -1], [5.0], [True]):
        with pytest.raises(ConfigError, match="alora_invocation_tokens"):
            _config(deltatune, alora_invocation_tokens=bad)
    with pytest.warns(UserWarning, match="CAUSAL_LM"):
        _config(deltatune, task_type=None)
    with pytest.raises(ConfigError, match="mixed-adapter"):
        dt(input_ids=IDS, adapter_names=["default", "__base__", "default", "__base__"])
    # an aLoRA adapter in a saved config round-trips as a list of ints (PEFT's reader takes it)
    cfg = deltatune.LoraConfig.from_pretrained(models["root"] / "dt")
    assert cfg.alora_invocation_tokens == INVOKE and cfg.merge_refusal


def test_training_changes_only_post_invocation_behaviour():
    model = _dt_model(3)
    with torch.no_grad(), model.disable_adapter():
        base = _logits(model)
    before = _logits(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.where(MASK.bool(), IDS, -100)
    grads = []
    for checkpointing in (False, True):  # gradient checkpointing recomputes each layer in backward: same grads
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads[0])
    model.get_base_model().gradient_checkpointing_disable()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=labels).loss.backward()
        opt.step()
    model.eval()
    after = _logits(model)
    for i, start in enumerate(STARTS):
        stop = IDS.shape[1] if start is None else start
        assert torch.equal(after[i, :stop], base[i, :stop])
        if start is not None:
            assert (after[i, start:] - before[i, start:]).abs().amax() > 1e-3


def test_bf16_base_with_fp32_adapter():
    """Over a bf16 base the fp32 update is added and rounded once, as PEFT does; the prefix stays the base's."""
    model = _dt_model(0)
    model.get_base_model().to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.float(), m.lora_B.float()
    ours = _logits(model)
    with model.disable_adapter():
        base = _logits(model)
    assert ours.dtype == torch.bfloat16
    for i, start in enumerate(STARTS):
        stop = IDS.shape[1] if start is None else start
        assert torch.equal(ours[i, :stop], base[i, :stop])
    reference = reference_logits(_lora_weights(model), IDS, STARTS, MASK)  # fp32 all through
    error = (_valid(ours).float() - _valid(reference)).abs().max()
    effect = (_valid(base).float() - _valid(reference)).abs().max()  # what the adapter changes
    assert error < 0.1 * effect, (error, effect)
