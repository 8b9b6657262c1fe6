"""``AutoPeftModel*``: load the base model an adapter names, then the adapter, from the adapter directory alone.

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``adapter_config.json``'s
``base_model_name_or_path`` (and ``revision``), loads that base with the ``transformers`` Auto class of the task,
and returns ``PeftModelForCausalLM.from_pretrained(base, adapter_dir)``, as PEFT's classes of the same names do.
``AutoPeftModel`` is for adapters without a ``task_type``: the base class comes from the config's
``auto_mapping`` (written by ``save_pretrained``), imported only from an allowlist of libraries.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

from deltatune.config import PeftConfig
from deltatune.core.io import resolve_adapter_dir
from deltatune.errors import AdapterLoadError, ConfigError
from deltatune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# Libraries whose classes an ``auto_mapping`` may name (importing a module runs its code: an adapter file must
# not be able to make us import anything else). PEFT's default list.
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")

# ``from_pretrained`` arguments that are the adapter's, not the base model's.
_ADAPTER_KWARGS = ("subfolder", "autocast_adapter_dtype", "low_cpu_mem_usage", "torch_device",
                   "ephemeral_gpu_offload", "key_mapping")


def _allowed(library: str, allowlist: list[str] | tuple[str, ...]) -> bool:
    return library in allowlist or any(library.startswith(f"{allowed}.") for allowed in allowlist)


class _AutoPeftModel:
    # The transformers Auto class name (resolved on use, so importing deltatune does not import every model) and
    # the PeftModel class this Auto class returns.
    _auto_class: ClassVar[str | None] = None
    _peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_dir)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, revision: str | None = None,
                        import_allowlist: list[str] | None = None, **kwargs: Any) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter onto it.

        Other keyword arguments go to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...),
        except the adapter's own (``subfolder``, ``autocast_adapter_dtype``, ``low_cpu_mem_usage``).

        Raises:
            AdapterLoadError: the config names no base model, or its ``task_type`` is not this class's.
            ConfigError: ``auto_mapping`` names a library outside ``import_allowlist``.
        """
        adapter_kwargs = {k: kwargs.pop(k) for k in _ADAPTER_KWARGS if k in kwargs}
        directory = resolve_adapter_dir(pretrained_model_name_or_path, adapter_kwargs.get("subfolder"))
        peft_config = config or PeftConfig.from_pretrained(directory)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise AdapterLoadError(f"{directory}/adapter_config.json names no base_model_name_or_path, so the base "
                                   "model is unknown; load it yourself and use PeftModel.from_pretrained(base, dir)")
        base_cls = cls._base_class(peft_config, directory, import_allowlist)
        base = base_cls.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        _grow_embeddings_to_tokenizer(base, directory)
        return cls._peft_class.from_pretrained(base, directory, adapter_name=adapter_name, is_trainable=is_trainable,
                                               config=config, **adapter_kwargs)

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, directory: str, allowlist: list[str] | None) -> Any:
        task = peft_config.task_type
        if cls._auto_class is not None:
            from deltatune.mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task) if task is not None else None
            if expected is not None and expected is not cls._peft_class:
                raise AdapterLoadError(f"{directory} holds a {task} adapter; load it with "
                                       f"AutoPeftModelFor{expected.__name__.removeprefix('PeftModelFor')}, not "
                                       f"{cls.__name__}")
            return getattr(importlib.import_module("transformers"), cls._auto_class)
        if task is not None:
            specific = f"AutoPeftModelFor{_TASK_SUFFIX.get(str(task), '...')}"
            raise AdapterLoadError(f"{directory} holds a {task} adapter; AutoPeftModel is for adapters without a "
                                   f"task_type: use {specific}")
        mapping = peft_config.auto_mapping or {}
        class_name, library = mapping.get("base_model_class"), mapping.get("parent_library")
        if not class_name or not library:
            raise AdapterLoadError(f"{directory}/adapter_config.json has neither task_type nor auto_mapping, so the "
                                   "base model's class is unknown; load the base yourself and use "
                                   "PeftModel.from_pretrained(base, dir)")
        allowlist = DEFAULT_IMPORT_ALLOWLIST if allowlist is None else allowlist
        if not _allowed(library, allowlist):
            raise ConfigError(f"the adapter's auto_mapping asks to import {library!r}, which is not in the import "
                              f"allowlist; if that library is safe, pass import_allowlist=[{library!r}]")
        return getattr(importlib.import_module(library), class_name)


def _grow_embeddings_to_tokenizer(base: Any, directory: str) -> None:
    """A tokenizer saved beside the adapter with more tokens than the base has embeddings means the vocabulary was
    grown for training: grow the base's embeddings to match before loading (PEFT does the same)."""
    if not os.path.exists(os.path.join(directory, "tokenizer_config.json")) or \
            not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


_TASK_SUFFIX = {"CAUSAL_LM": "CausalLM", "SEQ_2_SEQ_LM": "Seq2SeqLM", "SEQ_CLS": "SequenceClassification",
                "TOKEN_CLS": "TokenClassification", "QUESTION_ANS": "QuestionAnswering",
                "FEATURE_EXTRACTION": "FeatureExtraction"}


class AutoPeftModel(_AutoPeftModel):
    """For adapters without a ``task_type``: the base class is the config's ``auto_mapping``."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    _auto_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    _auto_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    _auto_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    _auto_class = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
