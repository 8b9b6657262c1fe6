"""Mixed-adapter batches (``adapter_names``, one adapter per row) where PEFT 0.21.2 runs them too (issue 18):
``modules_to_save`` copies (each row runs its adapter's copy), Conv2d LoRA (plain, DoRA, grouped), and PEFT's
``TypeError`` refusals (a GRU in ``modules_to_save``, LoRA on ``nn.MultiheadAttention``). Also hot-swapping a grouped
Conv2d LoRA to another rank, which pads ``A`` group by group.

Every mixed output is checked row by row against each adapter run alone, and against PEFT's own mixed output on the
same files.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, MixedBatchTypeError
from deltatune.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

ROWS = ["__base__", "x", "y", "z", "x", "__base__", "y", "z", "x"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 12), nn.Linear(12, 3)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(X.float())))


class MLPWithGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.gru, self.lin1 = nn.Linear(10, 12), nn.GRU(12, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, X):
        h, _ = self.gru(self.lin0(X.float()).unsqueeze(1))
        return self.lin1(h.squeeze(1))


class Conv(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, X):
        return self.head(torch.relu(self.conv(X.float())).flatten(1))


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.mha, self.lin1 = nn.Linear(10, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, X):
        h = self.lin0(X.float())
        return self.lin1(self.mha(h, h, h)[0])


def _peft_files(tmp_path, make, configs: dict) -> tuple[nn.Module, str]:
    """A PEFT model holding ``configs`` (adapter name -> PEFT LoraConfig), its modules_to_save copies perturbed so
    they differ from the original; saved under ``tmp_path``. Returns (the PEFT model in eval mode, the directory)."""
    torch.manual_seed(0)
    names = list(configs)
    model = peft.get_peft_model(make(), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".modules_to_save." in key:
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(str(tmp_path))
    return model.eval(), str(tmp_path)


def _ours(make, directory: str, names: list[str]) -> dt.PeftModel:
    """The same adapters loaded into deltatune from PEFT's files (PEFT saves each adapter not named "default" in
    a subfolder named after it)."""
    torch.manual_seed(0)
    model = dt.PeftModel.from_pretrained(make(), f"{directory}/{names[0]}", adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(f"{directory}/{name}", adapter_name=name)
    return model.eval()


def _alone(model, x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return model(x)
    model.set_adapter(name)
    return model(x)


def _check_rows(model, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """The mixed output, asserting each row equals its adapter run alone on the whole batch."""
    with torch.no_grad():
        alone = {n: _alone(model, x, n) for n in dict.fromkeys(rows)}
        mixed = model(x, adapter_names=rows)
    assert len({round(float(v.sum()), 4) for v in alone.values()}) == len(alone)  # the adapters really differ
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=1e-5)
    return mixed


def _peft_mixed(model, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(x, adapter_names=rows)


def test_modules_to_save_rows_run_their_adapters_copy(tmp_path):
    """Rows of x and y run their own copy of lin1; rows of z (no modules_to_save) and __base__ the original."""
    configs = {
        "x": peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False),
        "y": peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], r=4, init_lora_weights=False),
        "z": peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False),
    }
    ref, directory = _peft_files(tmp_path, MLP, configs)
    ours = _ours(MLP, directory, list(configs))
    x = torch.arange(90).view(9, 10) / 90
    mixed = _check_rows(ours, x, ROWS)
    # PEFT's wrapper indexes its copies by every row's name, so its mixed batch needs each adapter to have one
    rows = [n for n in ROWS if n != "z"]
    torch.testing.assert_close(_peft_mixed(ours, x[:len(rows)], rows), _peft_mixed(ref, x[:len(rows)], rows),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1], _alone(ours, x, "z")[1])  # a's copy really changes the row


def test_modules_to_save_rows_repeat_for_generate_expansion(tmp_path):
    """Two names for a batch of four rows: each name covers two consecutive rows (num_beams=2)."""
    configs = {n: peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False)
               for n in ("x", "y")}
    _, directory = _peft_files(tmp_path, MLP, configs)
    ours = _ours(MLP, directory, list(configs))
    x = torch.rand(4, 10)
    with torch.no_grad():
        mixed = ours(x, adapter_names=["y", "x"])
        torch.testing.assert_close(mixed[:2], _alone(ours, x, "y")[:2])
        torch.testing.assert_close(mixed[2:], _alone(ours, x, "x")[2:])


def test_modules_to_save_unsplittable_module_raises_peft_type_error(tmp_path):
    configs = {n: peft.LoraConfig(target_modules=["lin0"], modules_to_save=["gru"], init_lora_weights=False)
               for n in ("x", "y")}
    _, directory = _peft_files(tmp_path, MLPWithGRU, configs)
    ours = _ours(MLPWithGRU, directory, list(configs))
    with pytest.raises(TypeError, match="^Mixed batching is only supported for the following modules: Linear, "
                                        r"Embedding, Conv1d, Conv2d, Conv3d\. This modules_to_save module is a GRU"):
        ours(torch.rand(3, 10), adapter_names=["__base__", "x", "y"])
    with pytest.raises(MixedBatchTypeError):  # also a ConfigError/ValueError for code that caught the old refusal
        ours(torch.rand(3, 10), adapter_names=["x", "x", "y"])
    assert issubclass(MixedBatchTypeError, ConfigError)
    assert all(getattr(m, "row_adapters", None) is None for m in ours.modules())  # reset after the error


@pytest.mark.parametrize("kind", ["plain", "dora", "groups"])
def test_conv2d_rows_equal_single_runs_and_peft(tmp_path, kind):
    groups = 2 if kind == "groups" else 1
    dora = kind == "dora"
    configs = {
        "x": peft.LoraConfig(target_modules=["conv"], r=4, use_dora=dora, init_lora_weights=False),
        "y": peft.LoraConfig(target_modules=["conv"], r=8, lora_alpha=4, use_dora=dora, init_lora_weights=False),
        "z": peft.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False, lora_bias=not dora),
    }

    def make():
        return Conv(groups)

    ref, directory = _peft_files(tmp_path, make, configs)
    ours = _ours(make, directory, list(configs))
    x = torch.rand(9, 4, 4, 4)
    mixed = _check_rows(ours, x, ROWS)
    if not dora:  # PEFT refuses DoRA in mixed batches; deltatune runs it (each row equals its single run above)
        torch.testing.assert_close(mixed, _peft_mixed(ref, x, ROWS), atol=1e-5, rtol=1e-5)


def test_conv2d_rows_keep_gradients():
    """The per-row deltas are added out of place: a backward through a mixed batch reaches every adapter's A."""
    torch.manual_seed(0)
    model = dt.get_peft_model(Conv(), dt.LoraConfig(target_modules=["conv"], init_lora_weights=False), "x")
    model.add_adapter("y", dt.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    model.set_requires_grad(["x", "y"])  # add_adapter leaves the new adapter frozen
    model.eval()
    model(torch.rand(3, 4, 4, 4), adapter_names=["x", "y", "__base__"]).sum().backward()
    conv = model.base_model.model.conv
    assert conv.lora_A["y"].weight.grad is not None and conv.lora_A["y"].weight.grad.abs().sum() > 0
    assert conv.lora_A["x"].weight.grad is not None and conv.lora_A["x"].weight.grad.abs().sum() > 0


def test_mha_rows_raise_peft_type_error():
    torch.manual_seed(0)
    model = dt.get_peft_model(Mha(), dt.LoraConfig(target_modules=["mha"], init_lora_weights=False), "x")
    model.add_adapter("y", dt.LoraConfig(target_modules=["mha"], r=16, init_lora_weights=False))
    model.eval()
    with pytest.raises(TypeError, match="^lora.MultiheadAttention does not support mixed adapter batches"):
        model(torch.rand(3, 10), adapter_names=["__base__", "x", "y"])


@pytest.mark.parametrize("ranks", [(2, 4), (4, 2)])
def test_hotswap_grouped_conv2d_to_another_rank_equals_fresh_load(tmp_path, ranks):
    x = torch.rand(2, 4, 4, 4)
    outputs, dirs = [], []
    def base() -> Conv:
        torch.manual_seed(0)  # one base model for every adapter
        return Conv(groups=2)

    for i, r in enumerate(ranks):
        model = base()
        torch.manual_seed(10 + i)
        model = dt.get_peft_model(model, dt.LoraConfig(target_modules=["conv"], r=r, lora_alpha=3 * r - 1,
                                                                init_lora_weights=False)).eval()
        with torch.no_grad():
            outputs.append(model(x))
        dirs.append(str(tmp_path / f"adapter{i}"))
        model.save_pretrained(dirs[-1])
    assert not torch.allclose(outputs[0], outputs[1])
    model = dt.PeftModel.from_pretrained(base(), dirs[0]).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=max(ranks))  # pads A group by group (a plain pad fails)
    conv = model.base_model.model.conv
    assert conv.lora_A["default"].weight.shape[0] == max(ranks)
    assert conv.lora_B["default"].weight.shape[1] == max(ranks) // 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), outputs[0], atol=1e-5, rtol=1e-5)
        hotswap_adapter(model, dirs[1], adapter_name="default")
        torch.testing.assert_close(model(x), outputs[1], atol=1e-5, rtol=1e-5)
        hotswap_adapter(model, dirs[0], adapter_name="default")
        torch.testing.assert_close(model(x), outputs[0], atol=1e-5, rtol=1e-5)


def test_hotswap_grouped_conv2d_rank_not_divisible_by_groups_refused(tmp_path):
    torch.manual_seed(0)
    model = dt.get_peft_model(Conv(groups=2), dt.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    before = model.base_model.model.conv.lora_A["default"].weight.clone()
    with pytest.raises(ValueError, match="^Trying to pad a Conv2d LoRA adapter with groups=2 to target rank 5, but "
                                         "the target rank is not divisible by 2"):
        prepare_model_for_compiled_hotswap(model, target_rank=5)
    assert torch.equal(model.base_model.model.conv.lora_A["default"].weight, before)  # nothing changed
