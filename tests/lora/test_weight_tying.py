"""``LoraConfig(ensure_weight_tying=True)`` (PEFT 0.21): with tied word embeddings, an embedding trained through
``modules_to_save`` keeps ``lm_head`` tied to it (one tensor) while training, after save/load and after
``merge_and_unload``, as PEFT does; ``trainable_token_indices`` naming both tied layers ties them with equal ids
and refuses different ids; the embedding (or ``lm_head``) in ``target_modules`` puts the LoRA on the embedding and
ties ``lm_head``'s factors to it (transposed), with PEFT's config rewrite, keys, files and warnings."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import ConfigError

IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


def tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _train(model: nn.Module, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _head_and_embedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    inner = model.base_model.model
    return inner.get_output_embeddings().weight, inner.get_input_embeddings().weight


@pytest.mark.parametrize("saved", [["embed_tokens"], ["embed_tokens", "lm_head"], ["lm_head"]])
def test_modules_to_save_keeps_lm_head_tied_like_peft(saved: list[str], tmp_path) -> None:
    kw = dict(r=2, target_modules=["q_proj"], ensure_weight_tying=True)
    ours = get_peft_model(tied_llama(), LoraConfig(modules_to_save=list(saved), **kw))
    theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(modules_to_save=list(saved), **kw))
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n)
    original = tied_llama().lm_head.weight.detach().clone()
    for model in (ours, theirs):
        _train(model)
        head, emb = _head_and_embedding(model)
        assert head is emb  # one tensor, trained
        assert (head - original).abs().max() > 1e-3
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert sorted(files[0]) == sorted(files[1])
    expected = ours(input_ids=IDS).logits
    for directory in ("ours", "theirs"):
        back = PeftModel.from_pretrained(tied_llama(), tmp_path / directory, is_trainable=True)
        head, emb = _head_and_embedding(back)
        assert head is emb
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    theirs_back = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours")
    torch.testing.assert_close(theirs_back(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    _train(back, 1)  # the loaded pair keeps training as one tensor
    head, emb = _head_and_embedding(back)
    assert head is emb
    merged = back.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_without_ensure_weight_tying_the_copy_is_untied_like_peft() -> None:
    kw = dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with pytest.warns(UserWarning, match="a tied layer is part of the adapter, but `ensure_weight_tying` is not set"):
        ours = get_peft_model(tied_llama(), LoraConfig(**kw))
    _train(ours)
    head, emb = _head_and_embedding(ours)
    assert head is not emb and torch.equal(head, tied_llama().lm_head.weight)


def test_trainable_token_indices_on_both_tied_layers() -> None:
    same = {"embed_tokens": [3, 4], "lm_head": [3, 4]}
    for ewt in (False, True):
        ours = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=same,
                                                       ensure_weight_tying=ewt))
        theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   trainable_token_indices=same,
                                                                   ensure_weight_tying=ewt))
        trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n)
        assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n)
        assert len(trainable) == 1  # one set of rows: lm_head follows the embedding
        _train(ours)
        inner = ours.base_model.model
        torch.testing.assert_close(inner.lm_head.token_adapter.weight_with(["default"]),
                                   inner.model.embed_tokens.token_adapter.weight_with(["default"]))
    different = {"embed_tokens": [3, 4], "lm_head": [3, 5]}
    with pytest.raises(ValueError, match="different token indices"):
        peft.get_peft_model(tied_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                          trainable_token_indices=different, ensure_weight_tying=True))
    base = tied_llama()
    with pytest.raises(ConfigError, match=r"different token ids \(embed_tokens: \[3, 4\], lm_head: \[3, 5\]\)"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=different,
                                        ensure_weight_tying=True))
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    untied = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                     trainable_token_indices=different))
    assert len([n for n, p in untied.named_parameters() if p.requires_grad and "lora_" not in n]) == 2


def tied_gpt2() -> nn.Module:
    from support.models import tiny_gpt2  # GPT-2 ties lm_head to transformer.wte by default

    model = tiny_gpt2()
    for module in model.modules():  # no dropout: training steps comparable across libraries
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _embedding_pair(model) -> tuple[nn.Module, nn.Module]:
    inner = model.base_model.model
    return inner.get_input_embeddings(), inner.get_output_embeddings()


def _assert_factors_tied(model) -> None:
    """lm_head's LoRA factors are the embedding's, transposed, in the same storage."""
    emb, head = _embedding_pair(model)
    a_emb, b_emb = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    a_head, b_head = head.lora_A["default"].weight, head.lora_B["default"].weight
    assert torch.equal(a_head, b_emb.T) and torch.equal(b_head, a_emb.T)
    assert a_head.data_ptr() == b_emb.data_ptr() and b_head.data_ptr() == a_emb.data_ptr()
    assert head.base_layer.weight is emb.base_layer.weight


def _reference_logits(make_base, model) -> torch.Tensor:
    """Independent reference: the plain base with ``W + s (B_emb A_emb)^T`` written into its one tied weight."""
    emb, _ = _embedding_pair(model)
    a, b, s = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"], emb.scaling["default"]
    base = make_base()
    with torch.no_grad():
        base.get_input_embeddings().weight += s * (b @ a).T
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    return base(input_ids=IDS).logits


TIED_LORA_CASES = [
    (tied_llama, ["embed_tokens"], ["embed_tokens", "model.embed_tokens"]),
    (tied_llama, ["embed_tokens", "lm_head"], ["embed_tokens", "model.embed_tokens"]),
    (tied_llama, ["lm_head"], ["model.embed_tokens"]),
    (tied_llama, ["q_proj", "lm_head"], ["q_proj", "model.embed_tokens"]),
    (tied_gpt2, ["lm_head"], ["transformer.wte"]),
    (tied_gpt2, ["c_attn", "lm_head"], ["c_attn", "transformer.wte"]),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: save_embedding_layers, GPT-2's Conv1D fan_in_fan_out
@pytest.mark.parametrize(("make_base", "targets", "rewritten"), TIED_LORA_CASES,
                         ids=lambda v: "+".join(v) if isinstance(v, list) else getattr(v, "__name__", v))
def test_lora_on_tied_embedding_like_peft(make_base, targets: list[str], rewritten: list[str], tmp_path) -> None:
    kw = dict(r=2, lora_alpha=4, target_modules=list(targets), ensure_weight_tying=True)
    torch.manual_seed(1)
    ours = get_peft_model(make_base(), LoraConfig(**kw))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(**kw))
    # PEFT's config rewrite: the embedding's full name in, the tied output layer out
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    assert set(ours.peft_config["default"].target_modules) == set(rewritten)
    assert "target_modules_to_tie" not in ours.peft_config["default"].to_dict()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    _assert_factors_tied(ours)
    emb, head = _embedding_pair(ours)
    assert not emb.lora_embedding_A["default"].any()  # identity at init: lm_head's B = 0 is the embedding's A
    torch.testing.assert_close(head.lora_A["default"].weight, _embedding_pair(theirs)[1].lora_A["default"].weight)

    # Same non-zero weights in both: equal logits, equal to the reference math.
    with torch.no_grad():
        emb.lora_embedding_A["default"].normal_(std=0.5)
    theirs.load_state_dict(ours.state_dict())
    _assert_factors_tied(ours)
    expected = ours(input_ids=IDS).logits
    torch.testing.assert_close(expected, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected, _reference_logits(make_base, ours), atol=1e-5, rtol=1e-5)

    # Training (SGD: the shared storage moves by both gradients in both libraries) keeps the tie.
    for model in (ours, theirs):
        _train(model)
    _assert_factors_tied(ours)
    trained = ours(input_ids=IDS).logits
    assert (trained - expected).abs().max() > 1e-3
    torch.testing.assert_close(trained, theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
    if set(targets) <= {"embed_tokens", "lm_head"}:  # no other LoRA (q_proj's B is no longer 0)
        torch.testing.assert_close(trained, _reference_logits(make_base, ours), atol=1e-4, rtol=1e-4)

    # Files: the same keys (PEFT's: lm_head's factors saved too); each library reads the other's.
    from safetensors.torch import load_file

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert sorted(files[0]) == sorted(files[1])
    for directory in ("ours", "theirs"):
        back = PeftModel.from_pretrained(make_base(), tmp_path / directory, is_trainable=True)
        _assert_factors_tied(back)
        torch.testing.assert_close(back(input_ids=IDS).logits, trained, atol=1e-4, rtol=1e-4)
        if make_base is tied_gpt2:
            continue  # PEFT 0.21.2 reloads a tied "transformer.wte" target without lm_head's factors (its own too)
        theirs_back = peft.PeftModel.from_pretrained(make_base(), tmp_path / directory)
        torch.testing.assert_close(theirs_back(input_ids=IDS).logits, trained, atol=1e-4, rtol=1e-4)
    _train(back, 1)  # the loaded pair keeps training tied
    _assert_factors_tied(back)
    retrained = back(input_ids=IDS).logits

    # Merging keeps the tie (as PEFT's) and writes the shared delta once (PEFT writes it twice: W + 2ΔW).
    back.merge_adapter()
    torch.testing.assert_close(back(input_ids=IDS).logits, retrained, atol=1e-4, rtol=1e-4)
    back.unmerge_adapter()
    torch.testing.assert_close(back(input_ids=IDS).logits, retrained, atol=1e-4, rtol=1e-4)
    merged = back.merge_and_unload()
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert type(merged.get_output_embeddings()) is nn.Linear and type(merged.get_input_embeddings()) is nn.Embedding
    torch.testing.assert_close(merged(input_ids=IDS).logits, retrained, atol=1e-4, rtol=1e-4)
    peft_merged = theirs.merge_and_unload()
    assert peft_merged.get_output_embeddings().weight is peft_merged.get_input_embeddings().weight


def test_regex_target_modules_gets_the_embedding_like_peft() -> None:
    kw = dict(r=2, target_modules=r".*(q_proj|lm_head)", ensure_weight_tying=True)  # the regex matches lm_head
    ours = get_peft_model(tied_llama(), LoraConfig(**kw))
    theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(**kw))
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules
    assert ours.peft_config["default"].target_modules == r"(?:.*(q_proj|lm_head)|^model\.embed_tokens$)"
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    _assert_factors_tied(ours)
    emb, head = _embedding_pair(ours)
    assert list(head.lora_A) == ["default"]  # one adapter, tied (not a second, untied one from the regex match)
    with torch.no_grad():
        emb.lora_embedding_A["default"].normal_(std=0.5)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["lm_head"]])
def test_tied_lora_target_without_ensure_weight_tying_warns_like_peft(targets: list[str]) -> None:
    with pytest.warns(UserWarning, match="a tied layer is part of the adapter, but `ensure_weight_tying` is not set"):
        peft.get_peft_model(tied_llama(), peft.LoraConfig(r=2, target_modules=list(targets)))
    with pytest.warns(UserWarning, match="a tied layer is part of the adapter, but `ensure_weight_tying` is not set"):
        ours = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=list(targets)))
    assert ours.peft_config["default"].target_modules == set(targets)  # untouched: each layer gets its own LoRA
    _train(ours)
    emb, head = _embedding_pair(ours)
    lora_layer = emb if "embed_tokens" in targets else head
    assert type(emb if lora_layer is head else head) in (nn.Linear, nn.Embedding)  # the other one has no LoRA


@pytest.mark.parametrize(("extra", "match"), [
    (dict(use_dora=True), "plain LoRA factors only"),
    (dict(init_lora_weights="olora"), "plain LoRA factors only"),
    (dict(exclude_modules=["embed_tokens"]), "got none"),
])
def test_lora_on_tied_embedding_refusals(extra: dict, match: str) -> None:
    base = tied_llama()
    with pytest.raises(ConfigError, match=match):
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True, **extra))
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear  # the failed call left the model as it was


def test_ensure_weight_tying_without_tied_layers_warns() -> None:
    from support.models import tiny_llama  # tie_word_embeddings=False

    with pytest.warns(UserWarning, match="nothing to tie"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                ensure_weight_tying=True))


def test_tied_lora_factors_survive_copies_and_second_adapter() -> None:
    model = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["lm_head"], ensure_weight_tying=True))
    model.add_adapter("two", LoraConfig(r=4, target_modules=["lm_head"], ensure_weight_tying=True))
    emb, head = _embedding_pair(model)
    assert head.lora_A["two"].weight.shape == (4, 32) and head.lora_A["two"].weight.data_ptr() == \
        emb.lora_embedding_B["two"].data_ptr()
    with torch.no_grad():
        for name in ("default", "two"):
            emb.lora_embedding_A[name].normal_(std=0.5)
    expected = model(input_ids=IDS).logits
    model.set_adapter("two")
    assert (model(input_ids=IDS).logits - expected).abs().max() > 1e-2  # each adapter its own tied pair
    model.set_adapter("default")
    import copy

    twin = copy.deepcopy(model)  # deepcopy (and .to(dtype)) give each parameter its own tensor: re-tied on use
    torch.testing.assert_close(twin(input_ids=IDS).logits, expected)
    _assert_factors_tied(twin)
    twin.double()
    torch.testing.assert_close(twin(input_ids=IDS.clone()).logits.float(), expected, atol=1e-4, rtol=1e-4)
    _assert_factors_tied(twin)
    model.delete_adapter("two")
    assert list(head.lora_A) == ["default"] and head.tied_adapters == {"default"}


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj", "embed_tokens", "lm_head"]])
def test_config_tie_word_embeddings_false_is_not_tied_like_peft(targets: list[str]) -> None:
    """PEFT's rule (its issue #2944): ``config.tie_word_embeddings=False`` means no tie, even if the tensors are one."""
    def base() -> nn.Module:
        model = tied_llama()
        model.config.tie_word_embeddings = False
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model

    kw = dict(r=2, target_modules=list(targets), ensure_weight_tying=True)
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):
        theirs = peft.get_peft_model(base(), peft.LoraConfig(**kw))
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):
        ours = get_peft_model(base(), LoraConfig(**kw))
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    emb, head = _embedding_pair(ours)
    assert type(head).__name__ == "LoraLinear" and head.lora_A["default"].weight.shape == (2, 32)
    if "embed_tokens" in targets:
        assert head.lora_B["default"].weight.data_ptr() != emb.lora_embedding_A["default"].data_ptr()
