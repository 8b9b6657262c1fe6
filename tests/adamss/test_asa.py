"""AdaMSS's adaptive subspace allocation (ASA) against PEFT's: the schedule, the masks from the same importance
statistics, a whole training run with pruning (deltatune and peft from the same seed, the same batches: equal masks
at every step and equal weights), the ``transformers.Trainer`` callback, the deltatune trainer's loop, masks that
survive switching adapters, and the resume state.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import tiny_llama

import deltatune
from deltatune.adamss import asa, asa_layers
from deltatune.adamss import training_state as asa_training_state

ASA = {"r": 12, "num_subspaces": 3, "subspace_rank": 2, "target_modules": ["q_proj", "v_proj"], "use_asa": True,
       "asa_target_subspaces": 4, "init_warmup": 1, "final_warmup": 7, "mask_interval": 2, "task_type": "CAUSAL_LM"}
TOTAL = 12  # 2 blocks x (q, v) x 3 subspaces


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (4, 10), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _both(**extra):
    config = {**ASA, **extra}
    torch.manual_seed(1)
    ours = deltatune.get_peft_model(tiny_llama(), deltatune.AdamssConfig(**config))
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.AdamssConfig(**config))
    return ours, theirs


def _trainable(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters() if "adamss_" in n}


def _active(model) -> int:
    return asa.active_subspaces(asa_layers(model.base_model, "default"), "default")


def test_budget_is_peft_schedule():
    ours, theirs = _both(asa_schedule_exponent=2.0, final_warmup=20)
    config = ours.peft_config["default"]
    for step in [0, 1, 2, 5, 10, 19, 20, 21, 100]:
        assert asa.budget(step, config, TOTAL) == theirs.base_model._schedule_threshold(step, config), step
    assert asa.budget(1, config, TOTAL) == TOTAL and asa.budget(20, config, TOTAL) == 4


def test_masks_equal_peft_on_the_same_importance():
    """Random statistics, copied into both libraries' layers: the global top-k keeps the same subspaces (those
    strictly above the k-th score, PEFT's rule: k - 1 of them)."""
    ours, theirs = _both()
    g = torch.Generator().manual_seed(0)
    ours_layers = asa_layers(ours.base_model, "default")
    theirs_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.adamss.AdamssLayer)]
    for mine, their in zip(ours_layers, theirs_layers):
        for stat in ("exp_avg_ipt_A", "exp_avg_ipt_B", "exp_avg_unc_A", "exp_avg_unc_B"):
            params = mine.adamss_A if stat.endswith("A") else mine.adamss_B
            values = [torch.rand(p.shape, generator=g) for p in params["default"]]
            getattr(mine, stat)["default"] = [v.clone() for v in values]
            getattr(their, stat)["default"] = [v.clone() for v in values]
    asa.mask_to_budget(ours_layers, "default", 5)
    theirs.base_model._global_mask_to_target(5, "default", theirs_layers)
    assert _trainable(ours) == _trainable(theirs)
    assert _active(ours) == 4


def test_training_with_asa_equals_peft():
    """10 AdamW steps on both, ``update_and_allocate(step)`` after each ``optimizer.step()`` with PEFT's step index:
    the same subspaces are frozen at the same steps and the weights end equal."""
    ours, theirs = _both()
    models = {"ours": ours.train(), "theirs": theirs.train()}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for k, m in models.items()}
    actives = []
    for step, batch in enumerate(_batches(10)):
        for key, model in models.items():
            model(**batch).loss.backward()
            optimizers[key].step()
            (model if key == "ours" else model.base_model).update_and_allocate(step)
            optimizers[key].zero_grad()
        assert _trainable(ours) == _trainable(theirs), step
        actives.append(_active(ours))
    # budgets 8 and 5 at steps 2 and 4 (n - 1 kept); 4 at step 6 keeps all 4 left (no more than the budget)
    assert actives == [TOTAL] * 2 + [7] * 2 + [4] * 6
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if "adamss_" in name:
            torch.testing.assert_close(p, theirs_params[name], atol=1e-5, rtol=1e-4, msg=name)


def test_masks_survive_disable_and_set_adapter():
    ours, _ = _both()
    layers = asa_layers(ours.base_model, "default")
    layers[0].asa_active["default"][1] = False
    layers[0]._apply_asa_masks()
    with ours.disable_adapter():
        pass
    ours.set_adapter("default")
    assert not layers[0].adamss_A["default"][1].requires_grad and layers[0].adamss_A["default"][0].requires_grad
    state = asa_training_state(ours)
    fresh, _ = _both()
    deltatune.adamss.restore_training_state(fresh, state)
    assert _trainable(fresh) == _trainable(ours)


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 100, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_callback_drives_asa_in_transformers_trainer(tmp_path, monkeypatch):
    """``AdamssAsaCallback`` (imported from where PEFT has it) in a ``Trainer``: pruning at the steps PEFT's
    callback prunes (``state.global_step`` 2 and 4 of 5 steps: budgets 8 and 5, 7 and 4 kept)."""
    from transformers import TrainingArguments

    from deltatune.adamss.asa_callback import AdamssAsaCallback
    from deltatune.integrations.transformers import AdapterTrainer

    assert deltatune.adamss.AdamssAsaCallback is AdamssAsaCallback
    ours, _ = _both()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, remove_unused_columns=False)
    AdapterTrainer(model=ours, args=args, train_dataset=_Data(), callbacks=[AdamssAsaCallback()]).train()
    assert _active(ours) == 4


def test_deltatune_trainer_drives_asa(tmp_path, monkeypatch):
    """The CLI's training loop calls ``update_and_allocate(steps taken)`` after each step: with 5 steps the masks
    fall at its steps 2 and 4."""
    from deltatune.training.trainer import TrainConfig, Trainer

    ours, _ = _both()
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": list(ids)} for ids in torch.randint(3, 100, (10, 9), generator=g).tolist()]
    config = TrainConfig(output_dir=str(tmp_path), max_steps=5, batch_size=2, grad_accum=1, lr=1e-2, seed=0,
                         precision="fp32", progress=False, save_steps=0)
    Trainer(ours, examples, config, pad_id=0).train()
    assert _active(ours) == 4


def test_resume_is_exact_with_asa(tmp_path, monkeypatch):
    """The trainer's checkpoint keeps ASA's statistics and masks (the ``training_state`` hook): a run stopped
    after step 3 and resumed ends where the uninterrupted run ends (masks at steps 2 and 4)."""
    from deltatune.training.trainer import TrainConfig, Trainer, TrainingInterrupted

    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": list(ids)} for ids in torch.randint(3, 100, (12, 9), generator=g).tolist()]

    def config(out):
        return TrainConfig(output_dir=str(out), max_steps=6, batch_size=2, grad_accum=1, lr=1e-2, seed=0,
                           precision="fp32", progress=False, save_steps=0)

    ref, _ = _both()
    Trainer(ref, examples, config(tmp_path / "ref"), pad_id=0).train()
    first, _ = _both()
    trainer = Trainer(first, examples, config(tmp_path / "run"), pad_id=0)
    trainer.on_step_end = lambda step: trainer.request_stop() if step == 3 else None
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    resumed, _ = _both()
    Trainer(resumed, examples, config(tmp_path / "run"), pad_id=0).train(resume=True)
    assert _trainable(resumed) == _trainable(ref) and _active(ref) == 4
    params = dict(resumed.named_parameters())
    for name, p in ref.named_parameters():
        if "adamss_" in name:
            assert torch.equal(p, params[name]), name
