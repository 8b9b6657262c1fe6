"""``deltatune inspect`` names the modules every registered method adapts (issue 21 part 4).

Parametrised over ``deltatune.registry.METHODS``, so a method is checked the moment it registers: its adapter is
made on the tiny Llama from its row in ``support.contract.CASES``, saved, and inspected in-process; the modules
inspect names (read from the file's keys alone) must be the modules that hold the method's layers in the live
model (found by ``isinstance`` on the registry's ``layer_cls``, not by key names), each counted once.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.contract import config_for
from support.models import tiny_llama

import deltatune
from deltatune.registry import METHODS

from .reliability import read_json, run

PREFIX = "base_model.model."


def _live_modules(model: torch.nn.Module, peft_type: str) -> set[str]:
    """Module paths (without ``base_model.model.``) that hold a layer of the method in the live model."""
    layer_cls = METHODS[peft_type].layer_cls
    if layer_cls is None:  # virtual tokens: no layer is wrapped
        return set()
    return {name.removeprefix(PREFIX) for name, module in model.named_modules() if isinstance(module, layer_cls)}


def _targets_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("targets"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``peft_type -> (adapter dir, live model)``, made on demand."""
    made: dict[str, tuple[str, torch.nn.Module]] = {}

    def make(peft_type: str, config=None) -> tuple[str, torch.nn.Module]:
        key = peft_type if config is None else f"{peft_type}-{id(config)}"
        if key not in made:
            torch.manual_seed(0)
            model = deltatune.get_peft_model(tiny_llama(), config or config_for(peft_type))
            d = tmp_path_factory.mktemp(peft_type.lower())
            model.save_pretrained(str(d))
            made[key] = (str(d), model)
        return made[key]

    return make


@pytest.mark.parametrize("peft_type", [t.value for t in METHODS])
def test_inspect_names_the_adapted_modules(capsys, saved, peft_type):
    directory, model = saved(peft_type)
    live = _live_modules(model, peft_type)
    code, stdout, err = run(capsys, "inspect", directory, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert set(info["module_names"]) == live
    assert info["adapted_modules"] == len(info["module_names"]) == len(live)  # once each
    assert info["module_suffixes"] == sorted({m.rsplit(".", 1)[-1] for m in live})
    if METHODS[peft_type].layer_cls is not None:
        assert live, f"{peft_type}'s contract case adapts nothing on the tiny Llama"

    code, stdout, err = run(capsys, "inspect", directory)
    assert code == 0, err
    line = _targets_line(stdout)
    if live:
        word = "layer" if len(live) == 1 else "layers"
        assert f"({len(live)} {word}: {', '.join(sorted({m.rsplit('.', 1)[-1] for m in live}))})" in line, line
    else:
        assert "virtual tokens" in line
    size_rows = [row for row in stdout.splitlines() if row.split("  ")[0].strip() in ("rank", "size",
                                                                                     "virtual tokens")]
    assert len(size_rows) == 1, stdout
    config = read_json(f"{directory}/adapter_config.json")
    method = METHODS[peft_type]
    if config.get("num_virtual_tokens"):
        assert size_rows[0].split()[-1] == str(config["num_virtual_tokens"])
    elif method.hooks.inspect_size is not None:
        assert info["size"] and size_rows[0].startswith("size") and size_rows[0].endswith(info["size"])
    elif config.get("r") is not None:
        assert f"r={config['r']}" in size_rows[0]
    else:
        assert size_rows[0].split()[-1] == "n/a"


def test_bottleneck_is_its_mlp_modules_not_its_two_projections(capsys, saved):
    """The case the issue names: a bottleneck adapter wraps each ``mlp`` once (it read "4 layers: bottleneck_down,
    bottleneck_up")."""
    directory, _ = saved("BOTTLENECK")
    line = _targets_line(run(capsys, "inspect", directory)[1])
    assert "(2 layers: mlp)" in line and "bottleneck_" not in line, line


def test_one_layer_is_singular(capsys, saved):
    """Only the last norm (``model.norm``): "1 layer", never "1 layers"."""
    directory, model = saved("LN_TUNING", deltatune.LNTuningConfig(target_modules=["model.norm"],
                                                                  task_type="CAUSAL_LM"))
    assert _live_modules(model, "LN_TUNING") == {"model.norm"}
    line = _targets_line(run(capsys, "inspect", directory)[1])
    assert "(1 layer: norm)" in line, line


def test_lora_ranks_and_trainable_token_indices(capsys, saved):
    """LoRA's rank count comes from its registered ``rank_container``; the token adapter beside LoRA (PEFT keys
    ``embed_tokens.token_adapter.trainable_tokens_delta``) adapts the embedding, not a module named token_adapter."""
    config = deltatune.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5],
                                  task_type="CAUSAL_LM")
    directory, model = saved("LORA", config)
    info = json.loads(run(capsys, "inspect", directory, "--json")[1])
    assert set(info["module_names"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                         "model.embed_tokens"}
    assert info["ranks_in_file"] == {"4": 2}
    delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert info["parameters"] == 2 * 2 * 4 * 32 + math.prod(delta.shape)


def test_common_does_not_import_inspect():
    """cli/common no longer imports cli/inspect (the cycle issue 21 lists): common holds the header reader."""
    import inspect as pyinspect

    from deltatune.cli import common

    assert "deltatune.cli.inspect" not in pyinspect.getsource(common)
