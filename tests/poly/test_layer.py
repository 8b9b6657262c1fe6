"""Poly / MHR layers against reference math, against peft's layer on the same tensors, the router, task_ids through
forward and generate (and their refusals, PEFT's sentences first), identity at init, the merge refusal, a second
adapter, files both ways with peft, GPT-2's Conv1D, and ``deltatune train/generate --method poly``.

The reference is computed here row by row from the paper's formula: each split's mixed factors
``Σ_s w[q, s] A[q, s]`` and ``Σ_s w[q, s] B[q, s]`` put together block by block, not with the layer's einsum and
reshape.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from support import tinymodels
from support.layers import layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama

import deltatune
from deltatune import PolyConfig, PolyLayer, PolyModel, get_peft_model
from deltatune.cli import main
from deltatune.errors import ConfigError, MergeError
from deltatune.registry import task_count

ATOL = 1e-5


def _adapt(kind: str = "linear", **config):
    model, x = layer_and_input(kind)
    config = {"r": 3, "n_tasks": 3, "n_skills": 4, "n_splits": 2, "init_weights": False, **config}
    pm = get_peft_model(model, PolyConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _reference(layer: PolyLayer, x: torch.Tensor, task_ids: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``base(x) + (1/r) x_b A_b B_b`` row by row; in evaluation the router's weights are ``σ(z) / Σ σ(z)``."""
    a, b = layer.poly_lora_A[name], layer.poly_lora_B[name]   # (q, s, in/q, r), (q, s, r, out/q)
    logits = layer.poly_router[name].module_logits           # (tasks, q · s)
    n_splits, n_skills, r = a.shape[0], a.shape[1], layer.r[name]
    rows = []
    for row, task in zip(x, task_ids.tolist()):
        p = torch.sigmoid(logits[task]).reshape(n_splits, n_skills)
        w = p / p.sum(-1, keepdim=True)
        a_row = torch.cat([sum(w[q, s] * a[q, s] for s in range(n_skills)) for q in range(n_splits)], dim=0)
        b_row = torch.cat([sum(w[q, s] * b[q, s] for s in range(n_skills)) for q in range(n_splits)], dim=1)
        rows.append(layer.base_layer(row) + row @ a_row @ b_row / r)
    return torch.stack(rows)


# ---- the math ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv1D"])  # Conv1D (GPT-2) is beyond PEFT, which adapts nn.Linear
def test_layer_matches_reference(kind):
    pm, layer, x = _adapt(kind)
    perturb_trainable(pm, std=0.5)  # router logits far from their near-zero init: the mixture matters
    task_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(pm(x=x, task_ids=task_ids), _reference(layer, x, task_ids), atol=ATOL, rtol=1e-5)
        flat = pm(x=x[:, 0], task_ids=task_ids)  # (batch, in): a layer input without a sequence axis
    torch.testing.assert_close(flat, _reference(layer, x[:, :1], task_ids)[:, 0], atol=ATOL, rtol=1e-5)


def test_same_as_peft_layer_on_the_same_tensors_and_seeded_init_is_peft():
    (model, x), their_model = layer_and_input("linear"), layer_and_input("linear")[0]
    kwargs = {"target_modules": ["layer"], "r": 3, "n_tasks": 3, "n_splits": 2, "init_weights": False}
    torch.manual_seed(5)
    ours = get_peft_model(model, PolyConfig(**kwargs)).eval()
    torch.manual_seed(5)
    theirs = peft.get_peft_model(their_model, peft.PolyConfig(**kwargs)).eval()
    their_state = theirs.state_dict()
    assert sorted(ours.state_dict()) == sorted(their_state)
    for key, value in ours.state_dict().items():  # PEFT's draws, in PEFT's order
        assert torch.equal(value, their_state[key]), key
    perturb_trainable(theirs, std=0.5)
    ours.load_state_dict(theirs.state_dict())
    task_ids = torch.tensor([1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x=x, task_ids=task_ids), theirs.base_model(x=x, task_ids=task_ids),
                                   atol=1e-6, rtol=0)


def test_router_training_samples_a_mixture_per_split():
    pm, layer, x = _adapt()
    router = layer.poly_router["default"]
    router.train()
    w = router(torch.tensor([0, 1, 2, 0]))
    assert w.shape == (4, 2, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 2))
    assert not torch.equal(w[0], w[3])  # RelaxedBernoulli: the same task draws another mixture
    pm.train()
    pm(x=x, task_ids=torch.tensor([0, 1, 1])).square().sum().backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert grads["base_model.model.layer.poly_router.default.module_logits"][2].abs().sum() == 0  # task 2 unused


def test_identity_at_init():
    pm, layer, x = _adapt(init_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(pm(x=x, task_ids=torch.tensor([0, 1, 2])), layer.base_layer(x), atol=0, rtol=0)


# ---- task_ids and PEFT's refusals -------------------------------------------------------------

def test_calls_without_task_ids_or_out_of_range_are_refused_with_peft_sentences():
    pm, _, x = _adapt()
    with pytest.raises(ConfigError, match=r"^task_ids should not be None\."):
        pm(x=x)
    with pytest.raises(ConfigError, match=r"^Only 3 tasks available\. Found task id = 3"):
        pm(x=x, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ConfigError, match="task ids run from 0"):
        pm(x=x, task_ids=torch.tensor([0, -1, 1]))  # PEFT would read task n_tasks - 1 from the end
    with pytest.raises(ConfigError, match="task_ids has 2 entries for a batch of 3 rows"):
        pm(x=x, task_ids=torch.tensor([0, 1]))
    with pm.disable_adapter(), torch.no_grad():  # the base alone needs no task
        pm(x=x)
    torch.testing.assert_close(pm(x=x, task_ids=[0, 1, 2]), pm(x=x, task_ids=torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "`r` should be a positive integer value but the value passed is 0"),
    ({"poly_type": "mhr"}, "Unsupported poly_type: mhr"), ({"n_tasks": 0}, "n_tasks"), ({"n_skills": 1.5}, "n_skills"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        PolyConfig(**bad)


def test_n_splits_must_divide_the_features():
    with pytest.raises(ConfigError, match="n_splits=5 must divide"):
        _adapt(n_splits=5)


def test_config_fields_and_defaults_match_peft():
    ours, theirs = PolyConfig().to_dict(), peft.PolyConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    assert all(value == theirs[key] for key, value in ours.items() if key != "peft_type")
    assert ours["peft_type"] == "POLY" and PolyConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}
    given = {"r": 2, "n_tasks": 5, "n_skills": 3, "n_splits": 4, "target_modules": ["q"], "init_weights": False}
    ours, theirs = PolyConfig(**given).to_dict(), peft.PolyConfig(**given).to_dict()
    theirs["target_modules"] = sorted(theirs["target_modules"])  # a set in PEFT's dict, a list once in its file
    assert all(value == theirs[key] for key, value in ours.items() if key not in ("peft_type", "peft_version"))


def test_task_count_is_what_needs_task_ids():
    assert task_count([PolyConfig(n_tasks=3)]) == 3
    assert task_count([deltatune.MultitaskPromptTuningConfig(num_tasks=2)]) == 2
    assert task_count([deltatune.LoraConfig()]) == 0


def test_lora_ignores_task_ids_in_forward_and_generate():
    model = get_peft_model(tiny_llama(), deltatune.LoraConfig(r=2, init_lora_weights=False)).eval()
    ids = make_inputs("llama")["input_ids"]
    plain = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    routed = model.generate(input_ids=ids, task_ids=torch.tensor([0, 1]), max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, routed)


# ---- merge, several adapters ------------------------------------------------------------------

def test_merge_is_refused_and_changes_nothing():
    pm, layer, x = _adapt()
    task_ids = torch.tensor([0, 1, 2])
    before = output(pm, {"x": x, "task_ids": task_ids})
    for merge in (pm.merge_adapter, pm.merge_and_unload):
        with pytest.raises(MergeError, match="cannot be merged: its mixture of LoRA skills is chosen per row"):
            merge()
    with pytest.raises(MergeError):  # the layer refuses too (PEFT's layer raises a bare NotImplementedError)
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(output(pm, {"x": x, "task_ids": task_ids}), before, atol=0, rtol=0)
    assert isinstance(pm.unload().layer, torch.nn.Linear)


def test_second_adapter_with_its_own_tasks_and_mixed_rows():
    pm, layer, x = _adapt()
    pm.add_adapter("other", PolyConfig(target_modules=["layer"], r=2, n_tasks=5, n_skills=2, init_weights=False))
    pm.eval()  # the new router is a new module, in training mode (sampling), as in PEFT
    perturb_trainable(pm, std=0.3)
    assert not layer.poly_lora_A["other"].requires_grad  # an added adapter is not active: frozen (PEFT's)
    first_ids, other_ids = torch.tensor([2, 0, 1]), torch.tensor([4, 3, 0])
    default_out = output(pm, {"x": x, "task_ids": first_ids})
    pm.set_adapter("other")
    other_out = output(pm, {"x": x, "task_ids": other_ids})
    torch.testing.assert_close(other_out, _reference(layer, x, other_ids, "other"), atol=ATOL, rtol=1e-5)
    with pytest.raises(ConfigError, match="Only 3 tasks available"):  # task 4 exists for "other" only
        pm.set_adapter("default")
        output(pm, {"x": x, "task_ids": other_ids})
    mixed = output(pm, {"x": x, "task_ids": torch.tensor([2, 3, 0]), "adapter_names": ["default", "other", "__base__"]})
    torch.testing.assert_close(mixed[0], default_out[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], other_out[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], layer.base_layer(x[2]), atol=ATOL, rtol=0)
    pm.delete_adapter("other")
    assert "other" not in layer.poly_router and "other" not in layer.n_tasks


# ---- files and generate with peft, both ways ----------------------------------------------------

def test_files_both_ways_with_peft_give_equal_logits_and_generations(tmp_path):
    config = {"task_type": "CAUSAL_LM", "r": 4, "n_tasks": 3, "n_skills": 3, "n_splits": 2}
    inputs = make_inputs("llama")
    task_ids = torch.tensor([2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.PolyConfig(**config))
    perturb_trainable(theirs, seed=3, std=0.3)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    assert isinstance(ours.base_model, PolyModel)
    want = output(theirs, {**inputs, "task_ids": task_ids})
    torch.testing.assert_close(output(ours, {**inputs, "task_ids": task_ids}), want, atol=1e-6, rtol=1e-5)
    assert (output(ours, {**inputs, "task_ids": torch.tensor([1, 1])}) - want).abs().max() > 1e-3  # tasks differ
    greedy = {"input_ids": inputs["input_ids"], "max_new_tokens": 6, "do_sample": False, "task_ids": task_ids}
    assert torch.equal(ours.generate(**greedy), theirs.generate(**greedy))

    ours = get_peft_model(tiny_llama(), PolyConfig(**config))
    perturb_trainable(ours, seed=4, std=0.3)
    ours.eval().save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["n_splits"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, {**inputs, "task_ids": task_ids}),
                               output(ours, {**inputs, "task_ids": task_ids}), atol=1e-6, rtol=1e-5)
    assert torch.equal(ours.generate(**greedy), theirs.generate(**greedy))


def test_poly_model_takes_task_ids_as_peft_poly_model():
    """``PolyModel(model, config, name)`` (PEFT's tuner constructed directly): its forward and generate take
    ``task_ids`` as PEFT's do."""
    config = {"r": 2, "n_tasks": 2, "init_weights": False, "target_modules": ["q_proj", "v_proj"]}
    torch.manual_seed(0)
    ours = PolyModel(tiny_llama(), PolyConfig(**config), "default").eval()
    torch.manual_seed(0)
    theirs = peft.PolyModel(tiny_llama(), peft.PolyConfig(**config), "default").eval()
    inputs, task_ids = make_inputs("llama"), torch.tensor([1, 0])
    torch.testing.assert_close(output(ours, {**inputs, "task_ids": task_ids}),
                               output(theirs, {**inputs, "task_ids": task_ids}), atol=1e-6, rtol=0)
    greedy = {"input_ids": inputs["input_ids"], "max_new_tokens": 3, "do_sample": False, "task_ids": task_ids}
    assert torch.equal(ours.generate(**greedy), theirs.generate(**greedy))


def test_generate_repeats_task_ids_for_expanded_rows():
    """Beam search expands each input row; the row's task id follows it (PEFT's generate fails there)."""
    model = get_peft_model(tiny_gpt2(), PolyConfig(task_type="CAUSAL_LM", r=2, n_tasks=2, init_weights=False)).eval()
    perturb_trainable(model, std=0.5)
    ids = make_inputs("gpt2")["input_ids"]
    beams = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    both = model.generate(input_ids=ids, task_ids=torch.tensor([1, 0]), **beams)
    for row, task in ((0, 1), (1, 0)):
        alone = model.generate(input_ids=ids[row:row + 1], task_ids=torch.tensor([task]), **beams)
        assert torch.equal(both[row], alone[0])


# ---- CLI -------------------------------------------------------------------------------------------

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_cli_trains_task_zero_and_generates_any_task(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "poly", "--r", "2", "--n-tasks", "2", "--n-splits", "2", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["n_tasks"], cfg["n_splits"]) == ("POLY", 2, 2, 2)
    for extra in ([], ["--task-id", "1", "--num-beams", "2"]):
        code = main([str(a) for a in ("generate", "--adapter", out, "--max-new-tokens", 2, "--raw", *extra, "hi")])
        assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([str(a) for a in ("generate", "--adapter", out, "--max-new-tokens", 2, "--task-id", 2, "hi")]) == 2
    assert "Only 2 tasks available. Found task id = 2" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    assert "r=2, n_skills=4, n_splits=2 per layer; n_tasks=2" in capsys.readouterr().out
