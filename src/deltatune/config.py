"""The config base class shared by every method, and the ``PeftType``/``TaskType`` names.

A config is a plain dataclass. Its JSON form is Hugging Face PEFT's ``adapter_config.json``: the same
field names, the same ``peft_type``/``task_type`` strings, so the file is read by either library.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from deltatune.core.io import CONFIG_NAME, atomic_write_text, resolve_adapter_dir
from deltatune.errors import AdapterLoadError, ConfigError


class PeftWarning(UserWarning):
    """The warnings deltatune gives where PEFT gives one (merging twice, adapting an adapted model, a
    ``rank_pattern`` key that matches nothing): catch or filter them by this class, as ``peft.PeftWarning``."""


class PeftType(enum.StrEnum):
    """The method names as PEFT writes them into ``adapter_config.json``."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    OFT = "OFT"
    BOFT = "BOFT"
    LN_TUNING = "LN_TUNING"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    # deltatune's own methods (PEFT has none of these; only deltatune reads their files)
    BITFIT = "BITFIT"
    BOTTLENECK = "BOTTLENECK"

    def __str__(self) -> str:
        return self.value


class TaskType(enum.StrEnum):
    """What the wrapped model does; picks the ``PeftModel`` subclass and the default ``modules_to_save``."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _enum_value(enum_cls: type[enum.Enum], value: Any, field_name: str) -> Any:
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).upper())
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{field_name}={value!r} is not known; use one of: {choices}") from None


@dataclass
class PeftConfig:
    """Fields every adapter config has.

    Attributes:
        peft_type: Which method; set by each subclass.
        task_type: What the model does (``TaskType``); ``None`` for a plain ``nn.Module``.
        base_model_name_or_path: The base the adapter was trained on; filled in by ``get_peft_model``
            and checked (as a hint in error messages) when loading.
        revision: The base model's revision, kept for PEFT compatibility.
        inference_mode: ``True`` once loaded for inference: adapter parameters are frozen.
    """

    peft_type: PeftType | str | None = None
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None

    # Fields present in PEFT's files that this class reads but does not use; kept to write them back.
    _extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.peft_type = _enum_value(PeftType, self.peft_type, "peft_type")
        self.task_type = _enum_value(TaskType, self.task_type, "task_type")

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes: public fields, enums as strings, sets as sorted lists."""
        out: dict[str, Any] = dict(self._extra)
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a sub-config (CordaConfig)
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config class that ``data["peft_type"]`` names (when called on ``PeftConfig``)."""
        data = dict(data)
        target_cls = cls
        if cls is PeftConfig:
            from deltatune.registry import config_class_for

            target_cls = config_class_for(data.get("peft_type"))
            if target_cls.from_dict.__func__ is not PeftConfig.from_dict.__func__:
                return target_cls.from_dict(data)  # a method with its own reading rules (e.g. old OFT files)
        names = {f.name for f in dataclasses.fields(target_cls) if f.init and not f.name.startswith("_")}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        # Fields newer/other PEFT versions add. We keep them so a re-save writes them back, and say so
        # once, because a field we do not implement could change the adapter's meaning.
        unused = {k: v for k, v in extra.items() if v not in (None, False, {}, [], "") and k != "peft_version"}
        if unused:
            warnings.warn(
                f"{target_cls.__name__}: ignoring fields deltatune does not implement: {sorted(unused)}",
                stacklevel=2,
            )
        config = target_cls(**known)
        config._extra = extra
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object in ``path_json_file``, as a dict (PEFT's method returns the dict, not a config: build one
        with ``PeftConfig.from_dict``). A ``runtime_config`` entry, which is only meaningful at run time, is
        dropped with a warning, as PEFT does.

        Raises:
            AdapterLoadError: the file is missing, not JSON, or not a JSON object.
        """
        try:
            with open(path_json_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise AdapterLoadError(f"{os.fspath(path_json_file)} does not exist; pass the path of an "
                                   f"{CONFIG_NAME}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterLoadError(f"{os.fspath(path_json_file)} is not valid JSON ({exc}); re-save the "
                                   "adapter") from None
        if not isinstance(data, dict):
            raise AdapterLoadError(f"{os.fspath(path_json_file)} must hold a JSON object, found {type(data).__name__}")
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.", PeftWarning, stacklevel=2)
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> PeftConfig:
        """Read ``adapter_config.json`` from a directory (the method's config class is picked for you)."""
        directory = resolve_adapter_dir(pretrained_model_name_or_path, subfolder)
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise AdapterLoadError(
                f"{directory} has no {CONFIG_NAME}: is this an adapter directory written by save_pretrained?"
            ) from None
        except json.JSONDecodeError as exc:
            raise AdapterLoadError(f"{path} is not valid JSON ({exc}); re-save the adapter") from None
        if not isinstance(data, dict):
            raise AdapterLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
        if not {**data, **kwargs}.get("peft_type") and cls is PeftConfig:  # the method decides everything else
            what = "is empty: it names no peft_type" if not data else "names no peft_type"
            raise AdapterLoadError(f"{path} {what}, so it describes no adapter; re-save the adapter "
                                   "(save_pretrained writes the whole config)")
        data.update(kwargs)
        config = cls.from_dict(data)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise AdapterLoadError(f"{path} holds a {config.peft_type} adapter, not one for {cls.__name__}")
        return config
