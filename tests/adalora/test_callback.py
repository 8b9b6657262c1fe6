"""AdaLoraCallback drives the allocation inside AdapterTrainer: no manual update_and_allocate."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.models import tiny_llama

import deltatune as dt
from deltatune.adalora import adalora_layers

STEPS = 8


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 100, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _trainer(model, tmp_path, callbacks, max_steps=STEPS):
    from transformers import TrainingArguments

    from deltatune.integrations.transformers import AdapterTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
                             remove_unused_columns=False)  # Trainer only inspects peft.PeftModel signatures
    return AdapterTrainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)


def _model(total_step=STEPS):
    torch.manual_seed(0)
    config = dt.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=total_step,
                              target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return dt.get_peft_model(tiny_llama(), config)


def test_trainer_with_callback_allocates(tmp_path):
    from deltatune.adalora import AdaLoraCallback

    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # neither "never called" nor a total_step mismatch
        _trainer(model, tmp_path, [AdaLoraCallback()]).train()
    layers = adalora_layers(model.base_model, "default")
    allocator = layers[0][1].allocator["default"]
    assert allocator.calls == STEPS and allocator.finalized
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == 2 * len(layers)
    for name, layer in layers:
        e = layer.lora_E["default"].detach().view(-1)
        assert torch.all(e[~torch.tensor(pattern[f"{name}.lora_E"])] == 0)


def test_trainer_without_callback_warns(tmp_path):
    model = _model(total_step=4)  # tinit 1 + tfinal 2 < 4
    with pytest.warns(UserWarning, match=r"update_and_allocate\(\) was never called"):
        _trainer(model, tmp_path, [], max_steps=6).train()
    assert model.peft_config["default"].rank_pattern is None


def test_callback_warns_about_a_total_step_mismatch(tmp_path):
    from deltatune.adalora import AdaLoraCallback

    with pytest.warns(UserWarning, match="total_step=8 but the Trainer runs max_steps=3"):
        _trainer(_model(), tmp_path, [AdaLoraCallback()], max_steps=3).train()
