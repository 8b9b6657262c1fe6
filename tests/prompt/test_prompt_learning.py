"""Prompt tuning, P-tuning, prefix tuning and multitask prompt tuning on tiny models.

Reference math (the forward equals the base model fed ``[P; E(x)]`` or a hand-built prefix cache),
generation (padded rows equal the rows alone; cache / no cache / sampling agree), the init options,
MPT's task ids, ``disable_adapter``, gradient checkpointing, files, bad input, and a few training steps.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from support.models import perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError, MergeError

SOFT = {
    "prompt": (dt.PromptTuningConfig, {}),
    "ptuning": (dt.PromptEncoderConfig, {"encoder_hidden_size": 16}),
    "mpt": (dt.MultitaskPromptTuningConfig, {"num_tasks": 2, "num_ranks": 2}),
}
ALL = {**SOFT, "prefix": (dt.PrefixTuningConfig, {})}


def make(factory, method: str, n: int = 3, task_type: str | None = None, **kwargs) -> dt.PeftModel:
    cls, defaults = ALL[method]
    task_type = task_type or {tiny_t5: "SEQ_2_SEQ_LM", tiny_bert: "SEQ_CLS"}.get(factory, "CAUSAL_LM")
    model = dt.get_peft_model(factory(), cls(task_type=task_type, num_virtual_tokens=n, **{**defaults, **kwargs}))
    perturb_trainable(model)  # far from any init, so a lost or misplaced prompt changes the output
    return model.eval()


def task_kw(method: str, ids: list[int]) -> dict:
    return {"task_ids": torch.tensor(ids)} if method == "mpt" else {}


def ids_(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


# ---- the forward is the method's equation ------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_soft_prompt_forward_is_base_model_on_prompt_then_embeddings(factory, method):
    model = make(factory, method)
    ids = ids_(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    base = model.get_base_model()
    prompt = model.prompt_encoder["default"]().detach()                      # (n, d)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1))
        got = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=0)


def test_prefix_forward_is_base_model_with_prefix_cache_gqa():
    """Llama with 4 query / 2 key-value heads: each layer's cache starts with (B, 2, n, 8) prefix keys/values."""
    from transformers import DynamicCache

    model = make(tiny_llama, "prefix", n=5)
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads) == (16, 2)  # head_dim 8 x 2 kv heads, not 32 / 4
    table = model.prompt_encoder["default"]().detach()                     # (n, L * 2 * 16)
    assert table.shape == (5, 2 * 2 * 16)
    kv = table.view(5, 4, 2, 8).permute(1, 2, 0, 3)                         # (2L, kv_heads, n, head_dim)
    ids = ids_(2, 6)
    cache = DynamicCache([(kv[2 * i].expand(2, -1, -1, -1), kv[2 * i + 1].expand(2, -1, -1, -1)) for i in range(2)])
    base = model.get_base_model()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=torch.ones(2, 11, dtype=torch.long), cache=cache).logits
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_causal_lm_labels_and_positions_are_extended():
    model = make(tiny_gpt2, "prompt", n=4)
    ids = ids_(2, 6)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        explicit = model(input_ids=ids, position_ids=torch.arange(6).expand(2, -1))
    assert out.logits.shape == (2, 10, 100)
    # The loss covers the real tokens only, the first one too (predicted from the last virtual token):
    # logits at positions n-1..n+T-2 predict tokens 0..T-1.
    expected = nn.functional.cross_entropy(out.logits[:, 3:-1].reshape(-1, 100), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(explicit.logits, out.logits)  # user positions 0..T-1 become n..n+T-1


def test_token_classification_labels_and_feature_extraction_shapes():
    from transformers import BertConfig, BertForTokenClassification, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = dt.get_peft_model(BertForTokenClassification(cfg).eval(),
                              dt.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2))
    ids, labels = ids_(2, 5), torch.randint(0, 3, (2, 5))
    out = model(input_ids=ids, labels=labels, token_type_ids=torch.zeros_like(ids))
    assert out.logits.shape == (2, 7, 3)
    expected = nn.functional.cross_entropy(out.logits[:, 2:].reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    features = dt.get_peft_model(BertModel(cfg).eval(), dt.PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                               num_virtual_tokens=2))
    assert features(input_ids=ids).last_hidden_state.shape == (2, 5, 32)  # the prefix lives in the cache


def test_question_answering_positions_are_shifted_past_the_prompt():
    from transformers import BertConfig, BertForQuestionAnswering

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = dt.get_peft_model(BertForQuestionAnswering(cfg).eval(),
                              dt.PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=3))
    assert model.peft_config["default"].modules_to_save == ["qa_outputs"]
    start, end = torch.tensor([1, 4]), torch.tensor([2, 4])
    out = model(input_ids=ids_(2, 6), start_positions=start, end_positions=end)
    # Span logits cover the 3 virtual tokens too, so a position i of the text is logit i + 3.
    ce = nn.functional.cross_entropy
    torch.testing.assert_close(out.loss, (ce(out.start_logits, start + 3) + ce(out.end_logits, end + 3)) / 2)


def test_seq2seq_losses_and_mpt_decoder_prompt():
    ids, labels = ids_(2, 6), ids_(2, 4, seed=1)
    for method in ("prompt", "prefix", "mpt"):
        model = make(tiny_t5, method)
        out = model(input_ids=ids, labels=labels, **task_kw(method, [0, 1]))
        assert torch.isfinite(out.loss)
        # MPT (as PEFT) also prompts the decoder: n extra decoder positions, labels padded with -100.
        assert out.logits.shape == (2, 4 + (3 if method == "mpt" else 0), 100)


# ---- generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ALL))
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_left_padded_batch_generates_what_each_row_generates_alone(factory, method):
    model = make(factory, method)
    a, b = ids_(1, 6, seed=1), ids_(1, 4, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    gen = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        both = model.generate(input_ids=batch, attention_mask=mask, **gen, **task_kw(method, [1, 0]))
        alone_a = model.generate(input_ids=a, **gen, **task_kw(method, [1]))
        alone_b = model.generate(input_ids=b, **gen, **task_kw(method, [0]))
        no_cache = model.generate(input_ids=batch, attention_mask=mask, use_cache=False, **gen,
                                  **task_kw(method, [1, 0]))
        top1 = model.generate(input_ids=batch, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=5,
                              **task_kw(method, [1, 0]))
    # A row that stops early (EOS) is padded with pad_token_id (0) in the batch.
    assert torch.equal(both[0, : alone_a.shape[1]], alone_a[0]) and not both[0, alone_a.shape[1]:].any()
    assert torch.equal(both[1, 2 : 2 + alone_b.shape[1]], alone_b[0]) and not both[1, 2 + alone_b.shape[1]:].any()
    assert torch.equal(no_cache, both)
    assert torch.equal(top1, both)  # sampling from the top-1 token is greedy decoding


@pytest.mark.parametrize("method", list(ALL))
def test_sampling_beams_and_seq2seq_generate(method):
    model = make(tiny_llama, method)
    ids = ids_(2, 5)
    torch.manual_seed(3)
    first = model.generate(input_ids=ids, do_sample=True, num_return_sequences=3, max_new_tokens=4,
                           **task_kw(method, [0, 1]))
    torch.manual_seed(3)
    again = model.generate(input_ids=ids, do_sample=True, num_return_sequences=3, max_new_tokens=4,
                           **task_kw(method, [0, 1]))
    assert first.shape == (6, 9) and torch.equal(first, again)
    assert model.generate(input_ids=ids, num_beams=2, max_new_tokens=3, **task_kw(method, [0, 1])).shape == (2, 8)
    t5 = make(tiny_t5, method)
    out = t5.generate(input_ids=ids, max_new_tokens=3, **task_kw(method, [0, 1]))
    assert out.shape[0] == 2 and out.shape[1] >= 2


def test_generate_leaves_no_hook_behind():
    model = make(tiny_llama, "prefix")
    model.generate(input_ids=ids_(1, 4), max_new_tokens=2)
    assert not model.get_base_model()._forward_pre_hooks


# ---- disable_adapter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ALL))
@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_disable_adapter_gives_the_base_model(factory, method):
    model = make(factory, method)
    base = factory()
    ids = ids_(2, 5)
    with torch.no_grad():
        adapted = model(input_ids=ids, **task_kw(method, [0, 1])).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, **task_kw(method, [0, 1])).logits
            if factory is tiny_llama:
                assert torch.equal(model.generate(input_ids=ids, max_new_tokens=3, do_sample=False),
                                   base.generate(input_ids=ids, max_new_tokens=3, do_sample=False))
        again = model(input_ids=ids, **task_kw(method, [0, 1])).logits
    assert torch.equal(disabled, base(input_ids=ids).logits)  # head included (the original, not the copy)
    assert torch.equal(again, adapted)


# ---- init options ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A local word-level tokenizer over 'w0'..'w99' (ids 0..99): no hub needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return str(path)


def test_text_init_repeats_the_texts_token_embeddings(word_tokenizer):
    base = tiny_llama()
    config = dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="w7 w3", tokenizer_name_or_path=word_tokenizer)
    model = dt.get_peft_model(base, config)
    expected = base.get_input_embeddings().weight[[7, 3, 7, 3, 7]]
    assert torch.equal(model.prompt_encoder["default"]().detach(), expected)


def test_text_init_longer_than_the_prompt_is_refused(word_tokenizer):
    config = dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="w1 w2 w3", tokenizer_name_or_path=word_tokenizer)
    with pytest.raises(ConfigError, match=r"3 tokens long but num_virtual_tokens=2.*num_virtual_tokens >= 3"):
        dt.get_peft_model(tiny_llama(), config)
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        dt.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")


def test_sample_vocab_rows_are_vocabulary_embeddings_and_random_is_not():
    base = tiny_gpt2()
    vocab = base.get_input_embeddings().weight
    sampled = dt.get_peft_model(base, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                            prompt_tuning_init="SAMPLE_VOCAB"))
    rows = sampled.prompt_encoder["default"]().detach()
    assert all(any(torch.equal(r, v) for v in vocab) for r in rows)
    random = dt.get_peft_model(tiny_gpt2(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    assert not any(torch.equal(r, v) for r in random.prompt_encoder["default"]().detach() for v in vocab)


def test_prefix_zero_init_and_projection_shapes():
    zero = dt.get_peft_model(tiny_gpt2(), dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                init_weights="zero", prefix_projection=True))
    assert torch.count_nonzero(zero.prompt_encoder["default"]()) == 0
    projected = zero.prompt_encoder["default"]
    assert projected.embedding.weight.shape == (3, 32) and projected.transform[-1].out_features == 2 * 2 * 32


# ---- multitask prompt tuning -------------------------------------------------------------------------
def test_mpt_task_ids_errors_name_the_fix():
    model = make(tiny_llama, "mpt")
    ids = ids_(2, 4)
    with pytest.raises(ConfigError, match="needs task_ids"):
        model(input_ids=ids)
    with pytest.raises(ConfigError, match=r"task_ids \[2\] out of range.*num_tasks=2"):
        model(input_ids=ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="3 entries for a batch of 2"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match="needs task_ids"):
        model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ConfigError, match="out of range"):
        model.generate(input_ids=ids, max_new_tokens=2, task_ids=[5, 0])


def test_mpt_rows_use_their_own_task():
    model = make(tiny_llama, "mpt")
    ids = ids_(2, 4)
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=torch.tensor([1, 0])).logits
        row0 = model(input_ids=ids[:1], task_ids=torch.tensor([1])).logits
        row1 = model(input_ids=ids[1:], task_ids=torch.tensor([0])).logits
        other = model(input_ids=ids[:1], task_ids=torch.tensor([0])).logits
    torch.testing.assert_close(mixed, torch.cat([row0, row1]), atol=1e-6, rtol=0)
    assert not torch.allclose(row0, other, atol=1e-4)


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_mpt_init_from_source_checkpoint_matches_peft(init, tmp_path):
    import peft

    source = make(tiny_llama, "mpt", n=4, num_tasks=3, num_ranks=2)
    source.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    kwargs = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_ranks": 2, "prompt_tuning_init": init,
              "prompt_tuning_init_state_dict_path": path, "prompt_tuning_init_task": 2}
    ours = dt.get_peft_model(tiny_llama(), dt.MultitaskPromptTuningConfig(**kwargs)).prompt_encoder["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(**kwargs)).prompt_encoder["default"]
    src = load_file(path)
    assert torch.equal(ours.embedding.weight, src["prompt_embeddings"])
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)
    if init != "ONLY_SOURCE_SHARED":
        for name in ("prefix_task_cols", "prefix_task_rows"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
        want = src["prefix_task_cols"].mean(0) if init == "AVERAGE_SOURCE_TASKS" else src["prefix_task_cols"][2]
        torch.testing.assert_close(ours.prefix_task_cols[0], want)
    with pytest.raises(ConfigError, match="prompt_tuning_init_task=7 is not a task"):
        dt.get_peft_model(tiny_llama(), dt.MultitaskPromptTuningConfig(
            **{**kwargs, "prompt_tuning_init": "EXACT_SOURCE_TASK", "prompt_tuning_init_task": 7}))


def test_mpt_source_init_needs_a_path():
    with pytest.raises(ConfigError, match="prompt_tuning_init_state_dict_path"):
        dt.MultitaskPromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="EXACT_SOURCE_TASK")


# ---- files and adapters ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ALL))
def test_save_load_resave_is_identical_and_trainable_load_trains(method, tmp_path):
    model = make(tiny_bert, method)  # SEQ_CLS: the classifier head is saved too
    model.save_pretrained(tmp_path / "a")
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a")
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.save_pretrained(tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(
        tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert "base_model.classifier.weight" in first
    trainable = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", is_trainable=True)
    names = sorted(n for n, p in trainable.named_parameters() if p.requires_grad)
    # P-tuning / projected prefixes come back as the plain table the file holds: that is what trains.
    assert "prompt_encoder.default.embedding.weight" in names
    assert "base_model.classifier.modules_to_save.default.weight" in names
    assert not any(n.startswith("prompt_encoder.default.mlp_head") or ".transform." in n for n in names)
    out = trainable(input_ids=ids_(2, 5), labels=torch.tensor([0, 1]), **task_kw(method, [0, 1]))
    out.loss.backward()
    assert trainable.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


def test_two_adapters_switch_delete_and_load_adapter(tmp_path):
    model = make(tiny_gpt2, "prompt")
    model.add_adapter("other", dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids = ids_(1, 5)
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        second = model(input_ids=ids).logits
    assert first.shape == (1, 8, 100) and second.shape == (1, 5, 100)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.other.embedding.weight"]
    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "other" / "adapter_model.safetensors")
    fresh = dt.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    fresh.load_adapter(tmp_path / "other", "other")
    fresh.set_adapter("other")
    torch.testing.assert_close(fresh(input_ids=ids).logits, second)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(input_ids=ids).logits, first)


def test_families_do_not_mix_and_merge_is_refused():
    prompt_model = make(tiny_llama, "prompt")
    with pytest.raises(ConfigError, match="cannot also hold a LORA adapter"):
        prompt_model.add_adapter("lora", dt.LoraConfig(target_modules=["q_proj"]))
    lora_model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="cannot also hold a PROMPT_TUNING adapter"):
        lora_model.add_adapter("p", dt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(MergeError, match="no weights to merge"):
        prompt_model.merge_and_unload()
    head = make(tiny_bert, "prompt")
    base = head.unload()
    assert isinstance(base.classifier, nn.Linear)


def test_loading_into_the_wrong_model_names_the_problem(tmp_path):
    make(tiny_llama, "prefix").save_pretrained(tmp_path / "prefix")
    wrong = "token_dim=16 but this model needs token_dim=32: the adapter belongs to another model"
    with pytest.raises(AdapterLoadError, match=wrong):
        dt.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "prefix")
    make(tiny_bert, "prompt").save_pretrained(tmp_path / "prompt")
    with open(tmp_path / "prompt" / "adapter_config.json") as fh:
        text = fh.read().replace('"num_virtual_tokens": 3', '"num_virtual_tokens": 4')
    with open(tmp_path / "prompt" / "adapter_config.json", "w") as fh:
        fh.write(text)
    base = tiny_bert()
    with pytest.raises(AdapterLoadError, match=r"prompt_embeddings in the file has shape \(3, 32\).*\(4, 32\)"):
        dt.PeftModel.from_pretrained(base, tmp_path / "prompt")
    assert isinstance(base.classifier, nn.Linear)  # the failed load left no modules_to_save wrapper behind
    with pytest.raises(ConfigError, match="token_dim=16 but this model needs token_dim=32"):
        dt.get_peft_model(tiny_gpt2(), dt.PromptTuningConfig(num_virtual_tokens=2, token_dim=16))


# ---- what a model must offer -------------------------------------------------------------------------
class NoEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, inputs_embeds=None):
        return self.proj(inputs_embeds)


class EmbeddingsNoCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        return inputs_embeds if inputs_embeds is not None else self.embed(input_ids)


def test_bad_models_get_clear_errors():
    shapes = {"token_dim": 8, "num_layers": 1, "num_attention_heads": 1, "num_virtual_tokens": 2}
    with pytest.raises(ConfigError, match="no word embeddings.*get_input_embeddings"):
        dt.get_peft_model(NoEmbeddings(), dt.PromptTuningConfig(**shapes))
    with pytest.raises(ConfigError, match="takes a key/value `cache`.*use prompt tuning or P-tuning"):
        dt.get_peft_model(EmbeddingsNoCache(), dt.PrefixTuningConfig(**shapes))
    with pytest.raises(ConfigError, match="needs num_virtual_tokens"):
        dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig())
    soft = dt.get_peft_model(EmbeddingsNoCache(), dt.PromptTuningConfig(**shapes))
    assert soft(input_ids=torch.tensor([[1, 2, 3]])).shape == (1, 5, 8)  # works without transformers


# ---- gradient checkpointing --------------------------------------------------------------------------
def test_gradient_checkpointing_soft_prompts_work_and_prefix_is_refused():
    ids = ids_(2, 6)
    grads = []
    for checkpointing in (False, True):
        model = make(tiny_llama, "prompt")
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0].abs().sum() > 0
    checkpointed = tiny_llama()
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing.*gradient_checkpointing_disable"):
        dt.get_peft_model(checkpointed, dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    later = make(tiny_llama, "prefix")
    later.get_base_model().gradient_checkpointing_enable()
    later.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        later(input_ids=ids, labels=ids)


# ---- learning ----------------------------------------------------------------------------------------
def expressive_llama() -> nn.Module:
    """The tiny Llama with weights ~N(0, 0.3) instead of 0.02: at the usual scale a random model's output
    hardly depends on its input, so no prompt could move the loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                        tie_word_embeddings=False))


def expressive_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=2, initializer_range=0.3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("method", list(ALL))
@pytest.mark.parametrize("factory", [expressive_llama, expressive_bert])
def test_a_few_steps_lower_the_loss_and_touch_only_the_adapter(factory, method):
    cls, defaults = ALL[method]
    task_type = "SEQ_CLS" if factory is expressive_bert else "CAUSAL_LM"
    model = dt.get_peft_model(factory(), cls(task_type=task_type, num_virtual_tokens=4, **defaults))
    frozen = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "modules_to_save" not in k}
    ids = ids_(4, 8)
    batch = {"input_ids": ids, **task_kw(method, [0, 1, 0, 1])}
    batch["labels"] = torch.tensor([0, 1, 1, 0]) if factory is expressive_bert else ids
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
