"""EVA (init_lora_weights="eva") against real peft 0.21.2 and against the math it computes.

PEFT's EVA is deterministic (a seeded randomised SVD), so both libraries must give the same state dict (to
float64 rounding), the same ranks after the redistribution, the same initialised lora_A and the same config
patterns; adapters cross both ways with equal logits. The math is checked on its own too: the incremental SVD's
components are the top right singular vectors of all rows seen, centred.
"""

import json
import warnings

import pytest
import torch
from support.models import tiny_llama

import deltatune
from deltatune import (
    ConfigError,
    EvaConfig,
    LoraConfig,
    get_eva_state_dict,
    get_peft_model,
    initialize_lora_eva_weights,
)
from deltatune.lora.eva import (
    IncrementalSVD,
    _redistribute,
    prepare_model_inputs_fn_language_modeling,
)
from deltatune.lora.init import get_peft_model_with_data

peft = pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(n=4, batch=4, seq=16, seed=1, vocab=100):
    """Language-model batches: one row padded at the end, the first 3 labels masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, 10:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def lora_params(model):
    return {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("eva", [{}, {"use_label_mask": False, "tau": 0.98, "rho": 1.5}])
def test_eva_state_dict_equals_peft(eva):
    data = batches()
    theirs = quiet(peft.get_eva_state_dict, tiny_llama(), data,
                   peft.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva", eva_config=peft.EvaConfig(**eva)),
                   show_progress_bar=False)
    ours = quiet(get_eva_state_dict, tiny_llama(), data,
                 LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva", eva_config=eva), show_progress_bar=False)
    assert list(ours) == list(theirs)  # same layers, same order (owners of an SVD first)
    ranks = {k: v.shape[0] for k, v in ours.items()}
    assert ranks == {k: v.shape[0] for k, v in theirs.items()}  # the same redistribution
    assert sum(ranks.values()) == 4 * len(ours)  # the budget is sum of r
    assert max(ranks.values()) <= round(4 * eva.get("rho", 2.0))
    if eva.get("rho", 2.0) > 1:
        assert len(set(ranks.values())) > 1  # the test would not see a redistribution otherwise
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-10)


def test_whitened_components_equal_peft_without_shared_inputs():
    # o_proj and down_proj each see their own input: PEFT 0.21 whitens each once there (it divides a shared SVD
    # once per member layer, which deltatune does not copy)
    data = batches()
    kw = dict(r=3, target_modules=["o_proj", "down_proj"], init_lora_weights="eva")
    theirs = quiet(peft.get_eva_state_dict, tiny_llama(), data, peft.LoraConfig(**kw, eva_config=peft.EvaConfig(
        whiten=True)), show_progress_bar=False)
    ours = quiet(get_eva_state_dict, tiny_llama(), data, LoraConfig(**kw, eva_config={"whiten": True}),
                 show_progress_bar=False)
    assert list(ours) == list(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-10)
        assert not torch.allclose(ours[name].norm(dim=1), torch.ones_like(ours[name][:, 0]))  # really whitened


def test_initialised_adapter_equals_peft_and_is_the_base_at_init():
    data = batches()
    theirs = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(r=4, target_modules=ALL,
                                                                      init_lora_weights="eva"))
    quiet(peft.initialize_lora_eva_weights, theirs, data, show_progress_bar=False)
    ours = quiet(get_peft_model_with_data, tiny_llama(), LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva"),
                 data)
    a, b = lora_params(ours), lora_params(theirs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    mine, peft_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == peft_config.rank_pattern and mine.rank_pattern  # some ranks moved
    assert mine.alpha_pattern == peft_config.alpha_pattern  # alpha follows the rank (adjust_scaling_factors)
    assert all(mine.alpha_pattern[k] == 8 * r / 4 for k, r in mine.rank_pattern.items())
    assert set(mine.target_modules) == set(peft_config.target_modules)
    assert all(torch.count_nonzero(v) == 0 for k, v in a.items() if "lora_B" in k)
    x = data[0]["input_ids"]
    base = tiny_llama()(input_ids=x).logits
    torch.testing.assert_close(ours(input_ids=x).logits, base, rtol=0, atol=0)  # B = 0: the base exactly


def test_components_are_the_top_right_singular_vectors_of_the_centred_rows():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(24, 24, generator=g))[0]
    scales = torch.tensor([10.0, 7, 5, 3.5, 2.5] + [0.1] * 19)  # a clear gap after 5 directions
    rows = (torch.randn(150, 24, generator=g) * scales) @ basis.T + 2.0
    svd = IncrementalSVD(5)
    for chunk in rows.split(50):
        svd.update(chunk)
    centred = (rows - rows.mean(0)).double()
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    overlap = (svd.components.double() @ vt[:5].T).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(svd.singular_values.double(), s[:5], rtol=1e-4, atol=0)
    torch.testing.assert_close(svd.explained_variance_ratio.double(), s[:5] ** 2 / centred.square().sum(),
                               rtol=1e-4, atol=0)
    largest = svd.components.gather(1, svd.components.abs().argmax(1, keepdim=True))
    assert (largest > 0).all()  # each direction's sign: its largest entry positive


def test_redistribution_takes_the_largest_ratios_and_ties_go_to_the_svd_owner():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.01]), "b": torch.tensor([0.4, 0.2, 0.1]),
              "c": torch.tensor([0.4, 0.2, 0.1])}  # c shares b's SVD
    assert _redistribute(ratios, {"a": 3, "b": 3, "c": 3}, 4, {"c": "b"}) == {"a": 2, "b": 1, "c": 1}
    assert _redistribute(ratios, {"a": 3, "b": 3, "c": 3}, 5, {"c": "b"}) == {"a": 2, "b": 2, "c": 1}
    assert _redistribute(ratios, {"a": 1, "b": 3, "c": 3}, 6, {"c": "b"}) == {"a": 1, "b": 3, "c": 2}


def test_label_mask_leaves_masked_tokens_out():
    data = batches(n=3)
    cut = [dict(b) for b in data]
    for b in cut:  # change the tokens of the masked last 4 positions: nothing unmasked attends to them
        b["labels"] = b["labels"].clone()
        b["labels"][:, -4:] = -100
        b["input_ids"] = b["input_ids"].clone()
        b["input_ids"][:, -4:] = (b["input_ids"][:, -4:] + 7) % 100
    for b, c in zip(data, cut):
        b["labels"] = c["labels"]
    rows = prepare_model_inputs_fn_language_modeling(data[0], LoraConfig(init_lora_weights="eva"))
    assert not any(data[0]["labels"][i, j] == -100 or data[0]["attention_mask"][i, j] == 0 for i, j in rows.tolist())
    assert len(rows) == 4 * 16 - 6 - 4 * 3 - 4 * 4 + 4  # padding (6), 3 first + 4 last labels a row; 4 overlap

    def state(batches_, use_label_mask):
        config = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights="eva",
                            eva_config={"use_label_mask": use_label_mask})
        return quiet(get_eva_state_dict, tiny_llama(), batches_, config, show_progress_bar=False)

    masked, masked_cut = state(data, True), state(cut, True)
    for k in masked:
        torch.testing.assert_close(masked[k], masked_cut[k], rtol=0, atol=1e-12)
    unmasked, unmasked_cut = state(data, False), state(cut, False)
    assert any(a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(unmasked.values(), unmasked_cut.values()))


def test_adapters_cross_to_and_from_peft_with_equal_logits(tmp_path):
    from peft import PeftModel as HFPeftModel

    data = batches()
    x = data[1]["input_ids"]
    ours = quiet(get_peft_model_with_data, tiny_llama(), LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva"),
                 data)
    torch.manual_seed(3)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # as if trained: otherwise any A would give the base
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0 and saved["rank_pattern"]
    loaded = quiet(HFPeftModel.from_pretrained, tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(loaded(input_ids=x).logits, ours(input_ids=x).logits, rtol=0, atol=1e-5)

    theirs = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva"))
    quiet(peft.initialize_lora_eva_weights, theirs, data, show_progress_bar=False)
    torch.manual_seed(4)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    back = quiet(deltatune.PeftModel.from_pretrained, tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=x).logits, theirs(input_ids=x).logits, rtol=0, atol=1e-5)


def test_a_given_state_dict_with_rank_zero_loads_as_peft_does():
    """Ranks 0 and new ranks from a state dict: the layer goes, the patterns and (condensed, with 20+ layers)
    target_modules are PEFT's; a base-model state dict (no base_model.model. prefix) loads in deltatune too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, num_key_value_heads=2))

    g = torch.Generator().manual_seed(5)
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in
             ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"]]
    ranks = {n: (0 if "layers.1.self_attn.k_proj" in n else 3 if "down" in n else 2) for n in names}
    state = {n: torch.randn(ranks[n], 32 if "down" in n else 16, generator=g) for n in names}
    theirs = quiet(peft.get_peft_model, model(), peft.LoraConfig(r=2, target_modules=ALL, init_lora_weights="eva"))
    quiet(peft.initialize_lora_eva_weights, theirs, eva_state_dict={"base_model.model." + k: v.clone()
                                                                    for k, v in state.items()})
    ours = quiet(get_peft_model, model(), LoraConfig(r=2, target_modules=ALL, init_lora_weights="eva"))
    quiet(initialize_lora_eva_weights, ours, eva_state_dict={k: v.clone() for k, v in state.items()})
    a, b = lora_params(ours), lora_params(theirs)
    assert a.keys() == b.keys() and not any("layers.1.self_attn.k_proj" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    mine, peft_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == peft_config.rank_pattern
    assert mine.alpha_pattern == peft_config.alpha_pattern == {n: 12.0 for n in names if "down" in n}
    assert set(mine.target_modules) == set(peft_config.target_modules)
    assert len(mine.target_modules) < 20  # condensed to suffixes
    assert type(ours.base_model.model.model.layers[1].self_attn.k_proj) is torch.nn.Linear


def test_eva_config_from_dict_dataclass_or_default():
    from deltatune.config import PeftConfig

    saved = LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5, "future_key": 1}).to_dict()
    assert saved["eva_config"] == {**{k: v for k, v in vars(peft.EvaConfig()).items()}, "rho": 1.5}
    assert json.loads(json.dumps(saved))["eva_config"]["rho"] == 1.5
    assert PeftConfig.from_dict(saved).eva_config == EvaConfig(rho=1.5)
    assert LoraConfig(init_lora_weights="eva", eva_config=peft.EvaConfig(tau=0.9)).eva_config == EvaConfig(tau=0.9)
    with pytest.warns(UserWarning, match="Using default EVA config"):
        assert LoraConfig(init_lora_weights="eva").eva_config == EvaConfig()
    with pytest.raises(ConfigError, match="rho"):
        LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})


def test_errors_say_what_to_change():
    data = batches(n=2)
    with pytest.raises(ConfigError, match="input has only 32 features"):  # round(2 * 20) = 40 > 32
        quiet(get_eva_state_dict, tiny_llama(), data, LoraConfig(r=20, target_modules=["q_proj"],
                                                                  init_lora_weights="eva"), show_progress_bar=False)
    few = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in data]
    few[0]["labels"][0, 5] = 7  # one labelled token per batch: far fewer than the 8 components
    few[1]["labels"][1, 5] = 7
    with pytest.raises(ConfigError, match="use_label_mask=False"):
        quiet(get_eva_state_dict, tiny_llama(), few, LoraConfig(r=4, target_modules=["q_proj"],
                                                                 init_lora_weights="eva"), show_progress_bar=False)
    with pytest.raises(ConfigError, match="needs a PeftModel"):
        initialize_lora_eva_weights(tiny_llama(), data)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(plain, data)
    with pytest.raises(ConfigError, match="calibration batches"):
        quiet(get_peft_model_with_data, tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                                  init_lora_weights="eva"), [])


def test_get_peft_model_alone_gives_peft_eva_adapter_before_the_data():
    """As PEFT: creating an "eva" adapter is allowed without data (B = 0, A as nn.Linear made it, the same under
    the same seed); initialize_lora_eva_weights then gives it A."""
    kw = dict(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="eva")
    torch.manual_seed(7)
    theirs = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(**kw))
    torch.manual_seed(7)
    ours = quiet(get_peft_model, tiny_llama(), LoraConfig(**kw))
    a, b = lora_params(ours), lora_params(theirs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        assert (torch.count_nonzero(a[k]) == 0) == ("lora_B" in k)
