"""The prompt encoders called as PEFT's are: ``PromptEmbedding(config, word_embeddings)``, ``PromptEncoder(config)``,
``PrefixEncoder(config)``, ``MultitaskPromptEmbedding(config, word_embeddings)``, each ``enc(indices)``.

Every case builds the encoder in deltatune and in ``peft`` 0.21.2 from the same seed and checks: the same state
dict (names and values, so one loads into the other), the same ``enc(indices)`` (shape and values, for in-order,
shuffled and repeated indices), and the same warnings. Independent reference math pins the networks too.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.prompt import MultitaskPromptEmbedding

VOCAB, D, N = 30, 8, 5
SHAPE = {"num_virtual_tokens": N, "token_dim": D, "num_transformer_submodules": 1, "num_attention_heads": 2,
         "num_layers": 3}

# name -> (encoder class name, config class name, config kwargs). Both libraries use the same names.
CASES = {
    "prompt_random": ("PromptEmbedding", "PromptTuningConfig", {}),
    "prompt_sample_vocab": ("PromptEmbedding", "PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "prompt_seq2seq_rows": ("PromptEmbedding", "PromptTuningConfig", {"num_transformer_submodules": 2}),
    "prompt_inference": ("PromptEmbedding", "PromptTuningConfig",
                         {"prompt_tuning_init": "SAMPLE_VOCAB", "inference_mode": True}),
    "ptuning_mlp": ("PromptEncoder", "PromptEncoderConfig", {"encoder_hidden_size": 12}),
    "ptuning_mlp_dropout_ignored": ("PromptEncoder", "PromptEncoderConfig",
                                    {"encoder_hidden_size": 12, "encoder_dropout": 0.3}),
    "ptuning_lstm_2": ("PromptEncoder", "PromptEncoderConfig",
                       {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 6}),
    "ptuning_lstm_1": ("PromptEncoder", "PromptEncoderConfig",
                       {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 6, "encoder_num_layers": 1}),
    "ptuning_inference": ("PromptEncoder", "PromptEncoderConfig", {"encoder_hidden_size": 12, "inference_mode": True}),
    "prefix": ("PrefixEncoder", "PrefixTuningConfig", {}),
    "prefix_zero": ("PrefixEncoder", "PrefixTuningConfig", {"init_weights": "zero"}),
    "prefix_projection": ("PrefixEncoder", "PrefixTuningConfig",
                          {"prefix_projection": True, "encoder_hidden_size": 12}),
    "prefix_projection_zero": ("PrefixEncoder", "PrefixTuningConfig",
                               {"prefix_projection": True, "encoder_hidden_size": 12, "init_weights": "zero"}),
    "prefix_projection_inference": ("PrefixEncoder", "PrefixTuningConfig",
                                    {"prefix_projection": True, "encoder_hidden_size": 12, "inference_mode": True}),
    "mpt": ("MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", {"num_tasks": 3, "num_ranks": 2}),
}


def _word_embeddings() -> nn.Embedding:
    torch.manual_seed(99)
    return nn.Embedding(VOCAB, D)


def build(lib, case: str, seed: int = 0) -> nn.Module:
    """``case``'s encoder from ``lib`` (``dt`` or ``peft``), built exactly as PEFT's docs show, from ``seed``."""
    enc_name, cfg_name, kwargs = CASES[case]
    config = getattr(lib, cfg_name)(task_type="CAUSAL_LM", **{**SHAPE, **kwargs})
    if enc_name == "MultitaskPromptEmbedding":  # not exported at the top level by either library
        enc_cls = MultitaskPromptEmbedding if lib is dt else peft.tuners.MultitaskPromptEmbedding
    else:
        enc_cls = getattr(lib, enc_name)
    words = _word_embeddings()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's LSTM warns for PEFT's dropout on 1 layer; warnings are tested below
        encoder = enc_cls(config, words) if enc_name in ("PromptEmbedding", "MultitaskPromptEmbedding") else enc_cls(
            config)
    return encoder.eval()


def call(encoder: nn.Module, case: str, indices: torch.Tensor) -> torch.Tensor:
    if case == "mpt":
        return encoder(indices, torch.tensor([2, 0]))
    no_network = case in ("ptuning_inference", "prefix_projection_inference")
    if no_network and isinstance(encoder, peft.tuners.tuners_utils.BasePromptEncoder):
        # PEFT's forward fails here (no network); its PeftModel reads embedding.weight as the prompt instead
        return encoder.embedding(indices)
    return encoder(indices)


def indices_for(case: str) -> list[torch.Tensor]:
    rows = 2 * N if CASES[case][2].get("num_transformer_submodules") == 2 else N
    order = torch.arange(rows)
    return [
        order.unsqueeze(0).expand(2, -1),                      # what PeftModel passes: (B, n) of 0..n-1
        torch.stack([order.flip(0), order[torch.randperm(rows, generator=torch.Generator().manual_seed(1))]]),
        torch.tensor([[0, 0, 1], [rows - 1, 2, 2]]),           # repeats, and fewer than n
    ][: 2 if case == "mpt" else 3]  # MPT's task matrix is (B, n, d): PEFT needs all n indices too


@pytest.mark.parametrize("case", list(CASES))
def test_same_state_dict_as_peft(case):
    ours, theirs = build(dt, case), build(peft, case)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key, value in theirs_sd.items():
        assert torch.equal(ours_sd[key], value), f"{key}: the same seed must give PEFT's initial values"
    # and a trained PEFT encoder's weights load into ours strictly (and back)
    trained = build(peft, case, seed=5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    ours.load_state_dict(trained.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_indices_equals_peft(case):
    ours, theirs = build(dt, case), build(peft, case)
    with torch.no_grad():  # far from any init (zero init would hide a wrong network)
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ours.load_state_dict(theirs.state_dict())
    width = SHAPE["num_layers"] * 2 * D if CASES[case][0] == "PrefixEncoder" else D
    for idx in indices_for(case):
        with torch.no_grad():
            got, want = call(ours, case, idx), call(theirs, case, idx)
        assert got.shape == want.shape == (*idx.shape, width)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if case != "mpt":  # a 1-D index vector is an unbatched sequence in both
        idx = torch.tensor([3, 1, 4])
        with torch.no_grad():
            torch.testing.assert_close(ours(idx), call(theirs, case, idx), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["prompt_random", "ptuning_mlp", "ptuning_lstm_2", "prefix_projection"])
def test_whole_table_is_indices_in_order(case):
    """deltatune's own call, ``enc()``, is ``enc(arange(n))`` (what PeftModel computes), also for the LSTM."""
    encoder = build(dt, case)
    with torch.no_grad():
        table = encoder()
        torch.testing.assert_close(table, encoder(torch.arange(N).unsqueeze(0))[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(encoder.prompt_embeddings(), table)


def test_mlp_and_projection_reference_math():
    """Independent of peft: P-tuning's ``W3 relu(W2 relu(W1 h))`` and prefix tuning's ``W2 tanh(W1 e)``."""
    idx = torch.tensor([[4, 0, 2]])
    mlp = build(dt, "ptuning_mlp")
    lin = [m for m in mlp.mlp_head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(D, 12), (12, 12), (12, D)]
    h = mlp.embedding.weight[idx]
    want = lin[2](torch.relu(lin[1](torch.relu(lin[0](h)))))
    torch.testing.assert_close(mlp(idx), want)

    prefix = build(dt, "prefix_projection")
    w1, w2 = prefix.transform[0], prefix.transform[2]
    e = prefix.embedding.weight[idx]
    torch.testing.assert_close(prefix(idx), torch.tanh(e @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias)


def test_inference_mode_has_no_network_like_peft():
    assert [n for n, _ in build(dt, "ptuning_inference").named_parameters()] == ["embedding.weight"]
    prefix = build(dt, "prefix_projection_inference")
    assert prefix.embedding.weight.shape == (N, 3 * 2 * D) and prefix.transform is None
    assert prefix.prefix_projection is True  # PEFT keeps the flag
    idx = torch.tensor([[1, 2]])
    torch.testing.assert_close(prefix(idx), prefix.embedding.weight[idx], rtol=0, atol=0)


def test_peft_attributes_present():
    enc = build(dt, "ptuning_lstm_2")
    sizes = (enc.token_dim, enc.input_size, enc.output_size, enc.hidden_size, enc.total_virtual_tokens)
    assert sizes == (D, D, D, 6, N)
    assert enc.encoder_type == "LSTM"


# ---- warnings ------------------------------------------------------------------------------------------
PEFT_MESSAGE = "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."


def _warnings_of(lib, **kwargs) -> list[warnings.WarningMessage]:
    config = lib.PromptEncoderConfig(num_virtual_tokens=20, num_transformer_submodules=1, token_dim=16,
                                     encoder_hidden_size=16, **kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lib.PromptEncoder(config)
    return [w for w in record if "encoder_num_layers" in str(w.message)]


@pytest.mark.parametrize("kwargs", [
    {"encoder_num_layers": 123},
    {"encoder_num_layers": 1},
    {"encoder_num_layers": 2},
    {},
    {"encoder_num_layers": 3, "encoder_reparameterization_type": "LSTM"},
    {"encoder_num_layers": 3, "inference_mode": True},
])
def test_encoder_num_layers_warning_as_peft(kwargs):
    ours, theirs = _warnings_of(dt, **kwargs), _warnings_of(peft, **kwargs)
    assert [(w.category, str(w.message)) for w in ours] == [(w.category, str(w.message)) for w in theirs]
    if kwargs.get("encoder_num_layers", 2) != 2 and "inference_mode" not in kwargs and len(kwargs) == 1:
        assert [str(w.message) for w in ours] == [PEFT_MESSAGE]


def test_peft_suite_warning_test_passes_verbatim():
    # PEFT's tests/test_config.py::test_prompt_encoder_warning_num_layers, with deltatune's names
    kwargs = {"num_virtual_tokens": 20, "num_transformer_submodules": 1, "token_dim": 768, "encoder_hidden_size": 768}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.PromptEncoder(dt.PromptEncoderConfig(**kwargs))
    with pytest.warns(UserWarning) as record:
        dt.PromptEncoder(dt.PromptEncoderConfig(encoder_num_layers=123, **kwargs))
    assert str(record.list[0].message) == PEFT_MESSAGE


def test_get_peft_model_warns_like_peft():
    from support.models import tiny_llama

    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_num_layers": 4}
    with pytest.warns(UserWarning, match=r"^for MLP, the argument `encoder_num_layers` is ignored\."):
        ours = dt.get_peft_model(tiny_llama(), dt.PromptEncoderConfig(**config))
    with pytest.warns(UserWarning, match=r"^for MLP, the argument `encoder_num_layers` is ignored\."):
        theirs = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(**config))
    ours_keys = sorted(k for k, _ in ours.prompt_encoder["default"].named_parameters())
    assert ours_keys == sorted(k for k, _ in theirs.prompt_encoder["default"].named_parameters())


# ---- errors --------------------------------------------------------------------------------------------
def test_missing_shape_names_the_fix():
    with pytest.raises(ConfigError, match=r"token_dim=None.*get_peft_model\(\) fill them"):
        dt.PromptEncoder(dt.PromptEncoderConfig(num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="num_layers=None"):
        dt.PrefixEncoder(dt.PrefixTuningConfig(num_virtual_tokens=4, token_dim=8))


def test_mpt_needs_task_ids():
    with pytest.raises(ValueError, match="needs task_ids"):  # PEFT raises ValueError too
        build(dt, "mpt")(torch.arange(N).unsqueeze(0), None)
