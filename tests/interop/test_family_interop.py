"""deltatune <-> Hugging Face PEFT 0.21.2 for (IA)³, LoHa, LoKr, VeRA, OFT, BOFT, LN tuning, trainable tokens and
LoRA's ``trainable_token_indices``: the same adapter files, both ways.

One table of cases: (id, model factory, method, config kwargs, adapter name). For every case:

- PEFT builds + perturbs + saves  -> deltatune loads into a fresh base -> same logits;
- deltatune builds + perturbs + saves -> PEFT loads into a fresh base -> same logits;
- both libraries, same config, same base: the safetensors files have the same keys, shapes and dtypes;
- the same trainable parameters in memory (names, shapes), so optimizers and user code carry over;
- deltatune's adapter_config.json has PEFT's key set and reads back in PEFT as the same config class.

Adapter tensors are perturbed with seeded noise after creation, so an adapter that loaded partially or into
the wrong place changes the logits. Not in the table, because PEFT 0.21 cannot do them: LoHa/LoKr on GPT-2's
``Conv1D`` (PEFT refuses the type; deltatune supports it) and LoKr's effective-conv on ``Conv1d`` (PEFT's
``torch.kron`` fails on the strided core product); (IA)³ on ``Conv1d`` (PEFT has Conv2d/3d only); OFT/BOFT on
``Conv1D`` (PEFT refuses the type), OFT on a Conv2d with a kernel > 1 (PEFT's unmerged forward differs from its
merged one; tests/oft checks deltatune against PEFT's merged layer) and BOFT with more than one butterfly factor
(PEFT needs its CUDA kernel; tests/boft emulates it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.adapters import adapter_dir, quiet
from support.models import kind_of, make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_net

import deltatune

ATOL = 1e-6
RTOL = 1e-5

CONFIG_NAMES = {"ia3": "IA3Config", "loha": "LoHaConfig", "lokr": "LoKrConfig", "vera": "VeraConfig",
                "oft": "OFTConfig", "boft": "BOFTConfig", "ln_tuning": "LNTuningConfig",
                "trainable_tokens": "TrainableTokensConfig", "lora": "LoraConfig"}


def case(case_id, factory, method, name="default", **kwargs):
    return (case_id, factory, method, kwargs, name)


CASES = [
    # (IA)³: output scaling on keys/values, input scaling on the MLP output projection
    case("ia3-llama-default", tiny_llama, "ia3", task_type="CAUSAL_LM"),
    case("ia3-llama-named", tiny_llama, "ia3", "other", target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
         feedforward_modules=["up_proj", "down_proj"]),
    case("ia3-llama-all-linear-regex-ff", tiny_llama, "ia3", target_modules="all-linear",
         feedforward_modules=r".*mlp\..*"),
    case("ia3-gpt2-default", tiny_gpt2, "ia3"),
    case("ia3-bert-seqcls", tiny_bert, "ia3", task_type="SEQ_CLS"),
    case("ia3-net-conv", tiny_net, "ia3", target_modules=["lin1", "conv2d", "conv3d", "head"],
         feedforward_modules=["conv2d", "head"]),
    # LoHa
    case("loha-llama-default", tiny_llama, "loha", r=4, alpha=8),
    case("loha-llama-patterns-named", tiny_llama, "loha", "other", r=4,
         target_modules=["q_proj", "o_proj", "down_proj"], rank_pattern={"down_proj": 2},
         alpha_pattern={"q_proj": 3}, exclude_modules=r".*layers\.0\.self_attn\.o_proj"),
    case("loha-llama-layers", tiny_llama, "loha", r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
         layers_pattern="layers"),
    case("loha-bert-seqcls", tiny_bert, "loha", r=2, task_type="SEQ_CLS"),
    case("loha-net-conv", tiny_net, "loha", r=2, target_modules=["conv1d", "lin1", "conv2d"]),
    case("loha-net-effective", tiny_net, "loha", r=2, target_modules=["conv1d", "conv2d"], use_effective_conv2d=True),
    # LoKr
    case("lokr-llama-default", tiny_llama, "lokr", r=4, alpha=8),
    case("lokr-llama-decompose-both", tiny_llama, "lokr", r=1, target_modules=["q_proj", "up_proj", "down_proj"],
         decompose_both=True, decompose_factor=4, rank_pattern={"down_proj": 2}),
    case("lokr-llama-lycoris-all-linear", tiny_llama, "lokr", "other", r=2, target_modules="all-linear",
         init_weights="lycoris"),
    case("lokr-bert-seqcls", tiny_bert, "lokr", r=2, task_type="SEQ_CLS"),
    case("lokr-net-conv-whole", tiny_net, "lokr", r=8, target_modules=["conv1d", "conv2d", "lin1"]),
    case("lokr-net-conv-lowrank", tiny_net, "lokr", r=1, target_modules=["conv1d", "conv2d"]),
    case("lokr-net-effective", tiny_net, "lokr", r=1, target_modules=["conv2d"], use_effective_conv2d=True),
    # VeRA
    case("vera-llama-default", tiny_llama, "vera", r=8),
    case("vera-llama-no-projection", tiny_llama, "vera", r=8, target_modules=["q_proj", "v_proj", "down_proj"],
         save_projection=False, projection_prng_key=7),
    case("vera-llama-named", tiny_llama, "vera", "other", r=16, d_initial=0.3, target_modules=["k_proj", "up_proj"]),
    case("vera-gpt2", tiny_gpt2, "vera", r=4, target_modules=["c_attn", "c_fc"]),
    case("vera-gpt2-bias-vera-only", tiny_gpt2, "vera", r=4, bias="vera_only"),
    case("vera-bert-seqcls-bias-all", tiny_bert, "vera", r=8, task_type="SEQ_CLS", bias="all"),
    # OFT (Cayley-Neumann by default; small blocks keep the seeded noise in the series' range)
    case("oft-llama-default", tiny_llama, "oft", oft_block_size=4, task_type="CAUSAL_LM"),
    case("oft-llama-r-exact-named", tiny_llama, "oft", "other", r=8, oft_block_size=0, use_cayley_neumann=False,
         target_modules=["q_proj", "o_proj", "down_proj"]),
    case("oft-llama-shared-all-linear", tiny_llama, "oft", oft_block_size=8, block_share=True,
         target_modules="all-linear"),
    case("oft-llama-fitted-block-size", tiny_llama, "oft", oft_block_size=5, target_modules=["q_proj", "down_proj"]),
    case("oft-llama-coft-3-terms", tiny_llama, "oft", oft_block_size=4, coft=True, eps=1.0,
         num_cayley_neumann_terms=3, layers_to_transform=[1], layers_pattern="layers"),
    case("oft-bert-seqcls-bias", tiny_bert, "oft", oft_block_size=4, task_type="SEQ_CLS", bias="oft_only"),
    case("oft-net-embedding-linear", tiny_net, "oft", oft_block_size=4, target_modules=["emb", "lin1", "head"]),
    # BOFT (PEFT without its CUDA kernel runs one butterfly factor; more factors: tests/boft)
    case("boft-llama-default", tiny_llama, "boft", task_type="CAUSAL_LM"),
    case("boft-llama-block-num-named", tiny_llama, "boft", "other", boft_block_size=0, boft_block_num=8,
         target_modules=["q_proj", "down_proj"]),
    case("boft-bert-seqcls-bias", tiny_bert, "boft", boft_block_size=8, task_type="SEQ_CLS", bias="boft_only"),
    case("boft-net-conv", tiny_net, "boft", boft_block_size=3, target_modules=["conv2d"]),
    case("boft-net-linear-all", tiny_net, "boft", boft_block_size=4, target_modules=["lin1", "head"], bias="all"),
    # LN tuning: trainable copies of the norms (RMSNorm on Llama, LayerNorm on GPT-2/BERT)
    case("ln-llama-default", tiny_llama, "ln_tuning", task_type="CAUSAL_LM"),
    case("ln-llama-named-exclude", tiny_llama, "ln_tuning", "other", target_modules=["input_layernorm", "norm"],
         exclude_modules=r".*layers\.0\..*"),
    case("ln-gpt2-default", tiny_gpt2, "ln_tuning"),
    case("ln-bert-seqcls", tiny_bert, "ln_tuning", task_type="SEQ_CLS", target_modules=["LayerNorm"]),
    # Trainable tokens: chosen embedding rows (GPT-2 ties lm_head to wte: the head follows)
    case("tokens-llama-default", tiny_llama, "trainable_tokens", token_indices=[27, 70, 98]),
    case("tokens-gpt2-tied", tiny_gpt2, "trainable_tokens", token_indices=[48, 53], task_type="CAUSAL_LM"),
    case("tokens-bert-named", tiny_bert, "trainable_tokens", "other", token_indices=[98, 36, 61],
         target_modules=["word_embeddings"]),
    # LoRA + trainable_token_indices (a list: the input embedding; a dict: named layers)
    case("lora-tokens-llama", tiny_llama, "lora", r=4, target_modules=["q_proj", "v_proj"],
         trainable_token_indices=[27, 66]),
    case("lora-tokens-gpt2-tied", tiny_gpt2, "lora", r=4, trainable_token_indices={"wte": [69, 3]}),
    case("lora-tokens-bert-named", tiny_bert, "lora", "other", r=4, task_type="SEQ_CLS",
         trainable_token_indices={"word_embeddings": [76, 39]}),
]
CASE_IDS = [c[0] for c in CASES]




def _build(lib, factory, method, kwargs, adapter_name):
    """Base from ``factory``, adapter from ``lib`` (peft or deltatune), every trainable tensor perturbed."""
    config = getattr(lib, CONFIG_NAMES[method])(**json.loads(json.dumps(kwargs)))
    model = lib.get_peft_model(factory(0), config, adapter_name=adapter_name)
    perturb_trainable(model, std=0.2)
    return model.eval()


def _params(model) -> dict:
    return {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}


@dataclass
class Saved:
    inputs: dict
    base_out: torch.Tensor
    peft_root: str
    peft_out: torch.Tensor
    dt_root: str
    dt_out: torch.Tensor
    peft_params: dict
    dt_params: dict


_CACHE: dict[str, Saved] = {}


@pytest.fixture(params=CASES, ids=CASE_IDS)
def row(request, tmp_path_factory):
    case_id, factory, method, kwargs, name = request.param
    if case_id not in _CACHE:
        inputs = make_inputs(kind_of(factory))
        root = tmp_path_factory.mktemp(case_id)
        with quiet():
            src_peft = _build(peft, factory, method, kwargs, name)
            src_peft.save_pretrained(root / "peft")
            src_dt = _build(deltatune, factory, method, kwargs, name)
            src_dt.save_pretrained(root / "dt")
            _CACHE[case_id] = Saved(inputs, output(factory(0), inputs), str(root / "peft"), output(src_peft, inputs),
                                    str(root / "dt"), output(src_dt, inputs), _params(src_peft), _params(src_dt))
    return request.param + (_CACHE[case_id],)


def test_peft_to_deltatune(row):
    _, factory, _method, _kwargs, name, saved = row
    with quiet():
        loaded = deltatune.PeftModel.from_pretrained(factory(0), adapter_dir(saved.peft_root, name),
                                                     adapter_name=name)
    assert loaded.active_adapter == name
    assert not torch.allclose(saved.peft_out, saved.base_out, atol=1e-4), "the perturbed adapter must change the output"
    torch.testing.assert_close(output(loaded, saved.inputs), saved.peft_out, atol=ATOL, rtol=RTOL)


def test_deltatune_to_peft(row):
    _, factory, _method, _kwargs, name, saved = row
    with quiet():
        loaded = peft.PeftModel.from_pretrained(factory(0), adapter_dir(saved.dt_root, name), adapter_name=name)
    assert not torch.allclose(saved.dt_out, saved.base_out, atol=1e-4), "the perturbed adapter must change the output"
    torch.testing.assert_close(output(loaded.eval(), saved.inputs), saved.dt_out, atol=ATOL, rtol=RTOL)


def test_same_file_keys_shapes_dtypes(row):
    _, _factory, _method, _kwargs, name, saved = row

    def shapes(root):
        tensors = load_file(os.path.join(adapter_dir(root, name), "adapter_model.safetensors"))
        return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}

    ours, theirs = shapes(saved.dt_root), shapes(saved.peft_root)
    assert ours == theirs, (f"only in deltatune: {sorted(set(ours) - set(theirs))[:5]}; "
                            f"only in peft: {sorted(set(theirs) - set(ours))[:5]}; "
                            f"differing: {[k for k in ours if k in theirs and ours[k] != theirs[k]][:5]}")


def test_same_trainable_parameters(row):
    saved = row[-1]
    assert saved.dt_params == saved.peft_params, (
        f"only in deltatune: {sorted(set(saved.dt_params) - set(saved.peft_params))[:5]}; "
        f"only in peft: {sorted(set(saved.peft_params) - set(saved.dt_params))[:5]}")


def test_config_json_is_peft_s(row):
    _, _factory, method, _kwargs, name, saved = row
    with open(os.path.join(adapter_dir(saved.dt_root, name), "adapter_config.json")) as fh:
        ours = json.load(fh)
    with open(os.path.join(adapter_dir(saved.peft_root, name), "adapter_config.json")) as fh:
        theirs = json.load(fh)
    assert set(ours) | {"peft_version"} == set(theirs)
    for key in ("peft_type", "r", "alpha", "feedforward_modules", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "decompose_both", "decompose_factor", "init_weights", "save_projection", "projection_prng_key",
                "d_initial", "bias", "task_type", "use_effective_conv2d", "oft_block_size", "block_share", "coft",
                "eps", "use_cayley_neumann", "num_cayley_neumann_terms", "module_dropout", "boft_block_size",
                "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "token_indices", "target_modules",
                "trainable_token_indices", "exclude_modules"):
        if key in theirs:
            a, b = ours[key], theirs[key]
            if isinstance(a, list) and isinstance(b, list):
                a, b = sorted(a), sorted(b)
            assert a == b, f"{key}: deltatune {ours[key]!r}, peft {theirs[key]!r}"
    with quiet():
        config = peft.PeftConfig.from_pretrained(adapter_dir(saved.dt_root, name))
    assert type(config).__name__ == CONFIG_NAMES[method]
