"""Small PEFT APIs (issue 18, misc share), each checked against real ``peft`` 0.21.2 doing the same thing."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import deltatune
from deltatune.helpers import check_if_peft_model, disable_input_dtype_casting
from deltatune.quantization import prepare_model_for_kbit_training

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x))


def test_check_if_peft_model_matches_peft(tmp_path) -> None:
    torch.manual_seed(0)
    model = deltatune.get_peft_model(MLP(), deltatune.LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"foo": "bar"}')
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "ok", tmp_path / "broken", tmp_path / "empty", tmp_path / "missing"):
        assert check_if_peft_model(path) == peft.helpers.check_if_peft_model(str(path)), path
    assert check_if_peft_model(tmp_path / "ok") is True
    assert check_if_peft_model(tmp_path / "broken") is False


def _hooked_fp16(model: nn.Module, dtypes: list[torch.dtype], lora_layer: type) -> nn.Module:
    """fp16 storage, fp32 compute through hooks (diffusers' layerwise casting), as PEFT's test builds it."""
    model = model.to(torch.float16)

    def up(module, args):
        for p in module.parameters(recurse=False):
            p.data = p.data.float()

    def down(module, args, out):
        for p in module.parameters(recurse=False):
            p.data = p.data.half()

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(up)
            module.register_forward_hook(down)
        if isinstance(module, lora_layer):
            module.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    return model


@pytest.mark.parametrize("lib", ["deltatune", "peft"])
def test_disable_input_dtype_casting(lib: str) -> None:
    if lib == "deltatune":
        from deltatune.lora.layer import LoraLayer
        get, config, ctx = deltatune.get_peft_model, deltatune.LoraConfig, disable_input_dtype_casting
    else:
        from peft.tuners.lora.layer import LoraLayer
        get, config, ctx = peft.get_peft_model, peft.LoraConfig, peft.helpers.disable_input_dtype_casting
    dtypes: list[torch.dtype] = []

    def fresh() -> nn.Module:  # a failed forward leaves a weight upcast, so each check starts anew
        torch.manual_seed(0)
        return _hooked_fp16(get(MLP(), config(target_modules=["lin0"])), dtypes, LoraLayer)

    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="same dtype"):  # the cast input meets the hook's fp32 weight
        fresh()(x)
    with pytest.raises(RuntimeError, match="same dtype"), ctx(model := fresh(), active=False):
        model(x)
    model = fresh()
    dtypes.clear()
    with ctx(model):
        out = model(x)
    assert dtypes == [torch.float32] and out.dtype == torch.float32
    with pytest.raises(RuntimeError, match="same dtype"):  # the setting comes back on exit
        model(x)


@pytest.mark.parametrize("clear", [True, False])
def test_prepare_model_for_kbit_training_auto_clear_cache(clear: bool) -> None:
    calls = []
    for prepare in (prepare_model_for_kbit_training, peft.prepare_model_for_kbit_training):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(torch.float16)
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.empty_cache") as empty:
            prepare(model, use_gradient_checkpointing=False, auto_clear_cache=clear)
        calls.append(empty.call_count)
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert calls[0] == calls[1] == int(clear)


def test_calculate_alora_offsets_matches_peft() -> None:
    from peft.tuners.lora.variants import calculate_alora_offsets as peft_offsets

    from deltatune.lora.alora import calculate_alora_offsets

    torch.manual_seed(0)
    ids = torch.randint(0, 4, (6, 12))
    ids[0, -3:] = torch.tensor([1, 2, 3])
    tokens = {"a1": [1, 2], "a2": [3], "plain": None, "long": list(range(20))}
    ours = {n: deltatune.LoraConfig(alora_invocation_tokens=t) for n, t in tokens.items()}
    theirs = {n: peft.LoraConfig(alora_invocation_tokens=t) for n, t in tokens.items()}
    for names in (None, ["a1", "a2", "__base__", "plain", "long", "a2"], ["a2", "a1"]):
        got = calculate_alora_offsets(ours, "a1", ids, adapter_names=names)
        assert got == peft_offsets(theirs, "a1", ids, adapter_names=names)
        assert any(o is not None for o in got)
    assert calculate_alora_offsets(ours, "a1", torch.tensor([[5, 1, 2, 1, 2, 0]])) == [3]  # the last occurrence
    with pytest.warns(UserWarning, match="'nope' not found"):
        assert calculate_alora_offsets(ours, "nope", ids[:1]) == [None]
    assert calculate_alora_offsets(ours, "a1", None) == []


class FourLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2, self.lin3 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 20), \
            nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin3(self.lin2(self.lin1(self.lin0(x))))


def test_vera_second_adapter_shares_the_first_projections_as_peft() -> None:
    x = torch.randn(3, 10)
    outs = {}
    for lib in (deltatune, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(FourLinear(), lib.VeraConfig(target_modules=["lin1", "lin2"], init_weights=False))
        model.add_adapter("other", lib.VeraConfig(target_modules=["lin1", "lin3"], init_weights=False))
        vera_a, vera_b = model.base_model.vera_A, model.base_model.vera_B
        assert vera_a["other"] is vera_a["default"] and vera_b["other"] is vera_b["default"]
        assert model.base_model.model.lin1.vera_A["other"] is model.base_model.model.lin1.vera_A["default"]
        torch.manual_seed(1)
        for name, p in sorted(model.named_parameters()):
            if "vera_lambda" in name:
                p.data = torch.randn_like(p)
        model.base_model.set_adapter("other")
        outs[lib.__name__] = (model(x), vera_a["default"].clone())
    torch.testing.assert_close(outs["deltatune"][1], outs["peft"][1], rtol=0, atol=0)
    torch.testing.assert_close(outs["deltatune"][0], outs["peft"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lib", [deltatune, peft], ids=["deltatune", "peft"])
def test_vera_second_adapter_too_wide_names_the_shapes(lib) -> None:
    model = lib.get_peft_model(FourLinear(), lib.VeraConfig(target_modules=["lin0"], r=8))
    with pytest.raises(ValueError, match="vera_A has a size of 10 but 20 or greater is required"):
        model.add_adapter("other", lib.VeraConfig(target_modules=["lin1"]))
    model = lib.get_peft_model(FourLinear(), lib.VeraConfig(target_modules=["lin3"]))
    with pytest.raises(ValueError, match="vera_B has a size of 2 but 20 or greater is required"):
        model.add_adapter("other", lib.VeraConfig(target_modules=["lin1"]))


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 10)
        self.lin0 = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.emb(x))


@pytest.mark.parametrize("aux", ["modules_to_save", "trainable_tokens"])
def test_mixed_delete_list_of_adapters(aux: str) -> None:
    x = torch.tensor([[0, 1, 2, 3]])
    extra = {"modules_to_save": ["emb"]} if aux == "modules_to_save" else {"trainable_token_indices": {"emb": [0, 1]}}
    for names in (["a0", "a1"], ["a1", "a0"]):
        torch.manual_seed(0)
        base = EmbNet()
        ref = base(x)
        model = deltatune.get_peft_model(base, deltatune.LoraConfig(target_modules=["lin0"], **extra), "a0",
                                         mixed=True)
        second = (deltatune.LoHaConfig(target_modules=["lin0"], init_weights=False, **extra) if aux == "modules_to_save"
                  else deltatune.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **extra))
        model.add_adapter("a1", second)
        with pytest.raises(ValueError, match=r"Adapter\(s\) \['nope'\] not found"):
            model.delete_adapter(["a0", "nope"])
        assert set(model.peft_config) == {"a0", "a1"}  # nothing deleted when a name is unknown
        model.delete_adapter(names)
        assert not model.peft_config
        torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("lib", [deltatune, peft], ids=["deltatune", "peft"])
def test_messages_begin_with_peft_sentence(lib) -> None:
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]), "a0", mixed=True)
    with pytest.raises(ValueError, match="The provided `peft_type` 'PREFIX_TUNING' is not compatible with the "
                                         "`PeftMixedModel`."):
        model.add_adapter("a1", lib.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="^`feedforward_modules` should be a subset of `target_modules`$"):
        lib.IA3Config(target_modules=["k", "v"], feedforward_modules=["q"])
    with pytest.raises(ValueError, match="When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None"):
        lib.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="some text")
    with pytest.raises(ValueError, match="When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None"):
        lib.PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="t5-base")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_oft_half_precision_on_cpu_matches_peft(dtype: torch.dtype) -> None:
    outs = []
    x = torch.randn(4, 10)
    for lib in (deltatune, peft):
        torch.manual_seed(0)
        config = lib.OFTConfig(target_modules=["lin0"], r=2, oft_block_size=0, init_weights=False,
                              use_cayley_neumann=False)
        model = lib.get_peft_model(MLP(), config).to(dtype)
        out = model(x.to(dtype))  # the Cayley solve has no half-precision LU on CPU: it runs in fp32
        assert out.dtype == dtype
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], rtol=0.02, atol=0.02)


@pytest.mark.parametrize("lib", [deltatune, peft], ids=["deltatune", "peft"])
def test_save_warns_for_ungathered_lora_shard(lib, tmp_path) -> None:
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], r=4))
    model.save_pretrained(tmp_path / "ok")  # no warning for whole factors (filterwarnings=error would raise)
    model.base_model.model.lin0.lora_A["default"].weight.data = torch.zeros(40)  # a flat ZeRO-3 shard
    with pytest.warns(lib.PeftWarning if lib is deltatune else peft.utils.PeftWarning,
                      match=r"1 LoRA tensor\(s\) have invalid shape: .*lin0\.lora_A.*\(40,\).*DeepSpeed ZeRO-3 / FSDP"):
        model.save_pretrained(tmp_path / "broken")
    assert (tmp_path / "broken" / "adapter_config.json").exists()


class FakeConfig(dict):
    def __getattr__(self, item: str):
        try:
            return self[item]
        except KeyError as error:
            raise AttributeError(item) from error


class NoEmbeddings(nn.Module):
    """A model with no token embedding and no forward of its own (PEFT's key-mapping fixture)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = FakeConfig(vocab_size=10)
        self.device = "cpu"  # PEFT reads it when loading
        self.lm_head = nn.Linear(10, 10)

    def prepare_inputs_for_generation(self) -> None:  # PEFT's causal-LM wrapper reads it
        return None


def test_prefix_tuning_needs_no_word_embeddings(tmp_path) -> None:
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, num_layers=2, token_dim=8, num_attention_heads=2)
    states = []
    for lib in (deltatune, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(NoEmbeddings(), lib.PrefixTuningConfig(**config))
        model.save_pretrained(tmp_path / lib.__name__)
        loaded = lib.PeftModel.from_pretrained(NoEmbeddings(), tmp_path / lib.__name__)
        states.append({k: v.shape for k, v in lib.get_peft_model_state_dict(loaded).items()})
        torch.testing.assert_close(lib.get_peft_model_state_dict(loaded), lib.get_peft_model_state_dict(model))
    assert states[0] == states[1] == {"prompt_embeddings": torch.Size([3, 2 * 2 * 8])}


@pytest.mark.parametrize("autocast", [True, False])
def test_trainable_tokens_autocast_adapter_dtype_as_peft(autocast: bool) -> None:
    dtypes = []
    for lib in (deltatune, peft):
        model = EmbNet().to(torch.bfloat16)
        config = lib.TrainableTokensConfig(target_modules=["emb"], token_indices=[0, 1, 3])
        model = lib.get_peft_model(model, config, autocast_adapter_dtype=autocast)
        model.add_adapter("other", config, autocast_adapter_dtype=autocast)
        dtypes.append({n: p.dtype for n, p in model.named_parameters() if "trainable_tokens_delta" in n})
        assert model(torch.tensor([[0, 1, 2]])).dtype == torch.bfloat16
    assert dtypes[0] == dtypes[1] and len(dtypes[0]) == 2
    assert set(dtypes[0].values()) == {torch.float32 if autocast else torch.bfloat16}


@pytest.mark.parametrize("lib", [deltatune, peft], ids=["deltatune", "peft"])
def test_trainable_token_key_inside_lora_layer_is_refused(lib) -> None:
    config = lib.LoraConfig(target_modules=["emb"], trainable_token_indices={"foobar": [1, 2, 3]})
    msg = ("You are trying to target a module with <class 'peft.utils.other.TrainableTokensWrapper'> that is a child "
           "of <class 'peft.tuners.lora.layer.Embedding'>. This is almost certainly not the intended behavior. Please "
           "ensure that the adapter name, 'foobar', does not conflict with any of the targeted modules.")
    with pytest.raises(ValueError, match=msg):
        lib.get_peft_model(EmbNet(), config, adapter_name="foobar")
    model = lib.get_peft_model(EmbNet(), lib.LoraConfig(target_modules=["lin0"],  # no clash: the embedding
                                                        trainable_token_indices={"emb": [1, 2]}), adapter_name="foobar")
    assert any("trainable_tokens_delta" in n for n, _ in model.named_parameters())
