"""``PeftModel``: a model with named adapters, saved and loaded in Hugging Face PEFT's file format.

The attribute layout is PEFT's (``peft_model.base_model.model`` is the user's model), so the
state-dict keys, and with them the files, are the same in both libraries.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig, TaskType
from deltatune.core.io import BIN_NAME, SAFETENSORS_NAME, atomic_save_tensors, load_adapter_weights, resolve_adapter_dir
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.core.state_dict import adapter_state_dict, check_and_load, to_model_keys
from deltatune.core.tuner import AdapterModel
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.registry import method_for


def _model_name_or_path(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


class PeftModel(nn.Module):
    """A base model plus adapters.

    Args:
        model: Any ``nn.Module`` (a ``transformers`` model or not).
        peft_config: The first adapter's config.
        adapter_name: Its name; ``"default"`` is saved at the top of the directory, others in sub-folders.
    """

    # Heads that classification task types train in full (added to ``modules_to_save``).
    default_modules_to_save: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, **kwargs: Any) -> None:
        super().__init__()
        self._add_task_heads(peft_config)
        self.base_model = AdapterModel(model, peft_config, adapter_name)

    def _add_task_heads(self, config: PeftConfig) -> None:
        if self.default_modules_to_save and hasattr(config, "modules_to_save"):
            current = list(config.modules_to_save or [])
            config.modules_to_save = current + [n for n in self.default_modules_to_save if n not in current]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- what it holds -----------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The model's forward. ``adapter_names`` (one per batch row, ``"__base__"`` for none) runs each
        row through its own adapter in one batched pass (inference only)."""
        with self._mixed_batch(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._mixed_batch(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ConfigError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first")
        unknown = sorted({n for n in adapter_names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise AdapterNameError(f"adapter_names mentions {unknown}; this model has {sorted(self.peft_config)} "
                                   "(use '__base__' for rows without an adapter)")
        layers = [m for m in self.modules() if hasattr(m, "row_adapters")]
        if any(isinstance(m, ModulesToSaveWrapper) for m in self.modules()):
            raise ConfigError("adapter_names does not support models with modules_to_save yet; run one adapter "
                              "per batch")
        for layer in layers:
            layer.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; tied parameters are counted once."""
        trainable = total = 0
        for p in self.parameters():  # .parameters() already de-duplicates shared tensors
            n = p.numel()
            if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
                n *= 2  # two 4-bit values per stored byte
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / max(total, 1)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # ---- adapters ----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add another adapter (not made active: call :meth:`set_adapter`)."""
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _model_name_or_path(self.get_base_model())
        self._add_task_heads(peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config)
        self.base_model.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this block the model computes exactly the base model's output."""
        self.base_model.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the adapters into the weights and return the plain base model (no adapter layers left)."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---- files -------------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys PEFT's files use."""
        name = adapter_name or self.active_adapters[0]
        config = self.peft_config[name]
        method = method_for(config.peft_type)
        return adapter_state_dict(self, name, method.containers, getattr(config, "bias", "none"),
                                  method.file_suffixes)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Write each adapter as ``adapter_model.safetensors`` + ``adapter_config.json``.

        The ``"default"`` adapter goes into ``save_directory`` itself, any other into
        ``save_directory/<name>``, as PEFT does. Each file is written to a temporary name and renamed.
        """
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"cannot save adapters {unknown}: this model has {sorted(self.peft_config)}")
        if not is_main_process:
            return
        for name in names:
            out_dir = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out_dir, exist_ok=True)
            state = self.get_adapter_state_dict(name)
            file = SAFETENSORS_NAME if safe_serialization else BIN_NAME
            atomic_save_tensors(state, os.path.join(out_dir, file), safe_serialization=safe_serialization)
            config = self.peft_config[name]
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = _model_name_or_path(self.get_base_model())
            inference_mode = config.inference_mode
            config.inference_mode = True  # PEFT's files say so; loading decides trainability
            try:
                config.save_pretrained(out_dir)
            finally:
                config.inference_mode = inference_mode

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **kwargs: Any) -> PeftModel:
        """Load an adapter directory (written by deltatune or PEFT) onto ``model``.

        Raises:
            AdapterLoadError: missing/corrupt files, or tensors that do not fit ``model``. ``model`` is left
                as it was.
        """
        directory = resolve_adapter_dir(model_id, kwargs.get("subfolder"))
        config = config or PeftConfig.from_pretrained(directory)
        weights = load_adapter_weights(directory, device=_device_of(model))
        config.inference_mode = not is_trainable
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            from deltatune.mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

            target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type]
        with _no_reinit(config):
            peft_model = target_cls(model, config, adapter_name)
        try:
            peft_model._load_weights(weights, adapter_name)
        except BaseException:
            peft_model.base_model._remove_adapter(adapter_name)
            raise
        peft_model.set_adapter(adapter_name)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     config: PeftConfig | None = None, **kwargs: Any) -> None:
        """Load another adapter directory under ``adapter_name`` (not made active)."""
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"an adapter named {adapter_name!r} is already loaded; pick another name")
        directory = resolve_adapter_dir(model_id, kwargs.get("subfolder"))
        config = config or PeftConfig.from_pretrained(directory)
        weights = load_adapter_weights(directory, device=_device_of(self))
        config.inference_mode = not is_trainable
        with _no_reinit(config):
            self.add_adapter(adapter_name, config)
        try:
            self._load_weights(weights, adapter_name)
        except BaseException:
            self.base_model._remove_adapter(adapter_name)
            raise
        self.base_model.set_adapter(self.active_adapter)

    def _load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        method = method_for(config.peft_type)
        containers = method.containers
        model_state = to_model_keys(self, weights, adapter_name, containers, method.file_suffixes)
        check_and_load(self, model_state, adapter_name, containers, config.base_model_name_or_path)


@contextlib.contextmanager
def _no_reinit(config: PeftConfig) -> Iterator[None]:
    """Loading overwrites the adapter's tensors, so skip initialisations that would rewrite the base
    weights (PiSSA/OLoRA keep a residual base that the saved adapter assumes; PEFT behaves the same)."""
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        warnings.warn(
            f"adapter was initialised with {init!r}: it expects the residual base model saved at training "
            "time, not the original one", stacklevel=3,
        )
        config.init_lora_weights = True
        try:
            yield
        finally:
            config.init_lora_weights = init
    else:
        yield


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class PeftModelForCausalLM(PeftModel):
    """A decoder-only language model with adapters."""


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder model (T5, BART) with adapters."""


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the head (``classifier`` or ``score``) trains in full."""

    default_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    """Token classification; the head (``classifier`` or ``score``) trains in full."""

    default_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA; the span head (``qa_outputs``) trains in full."""

    default_modules_to_save = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder producing embeddings."""


def _check_task(task_type: TaskType | None) -> None:
    if task_type is not None and not isinstance(task_type, TaskType):
        raise ConfigError(f"task_type={task_type!r} is not a TaskType")
