"""The config base class shared by every method, and the ``PeftType``/``TaskType`` names.

A config is a plain dataclass. Its JSON form is Hugging Face PEFT's ``adapter_config.json``: the same
field names, the same ``peft_type``/``task_type`` strings, so the file is read by either library.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

from deltatune.core.io import CONFIG_NAME, atomic_write_text, resolve_adapter_dir
from deltatune.errors import AdapterLoadError, ConfigError, ConfigKeysError

# The PEFT release whose adapter_config.json format (and math) deltatune follows. Every config records it as
# ``peft_version``, as PEFT records its own version, so PEFT's version-dependent checks (e.g. OFT's Cayley-Neumann
# change in 0.18) read deltatune's files as current ones. ``__version__`` is PEFT's name for it
# (``peft.config.__version__``); it is read when a config is created, so patching it changes what is recorded.
PEFT_FORMAT_VERSION = "0.21.2"
__version__ = PEFT_FORMAT_VERSION

# Keyword arguments of ``from_pretrained`` that say where to download from (``huggingface_hub.hf_hub_download``'s),
# not what the config holds; PEFT sorts them out the same way (``revision`` is one, though also a config field).
_HUB_KWARGS = frozenset({"revision", "cache_dir", "token", "use_auth_token", "force_download", "local_files_only",
                         "proxies", "user_agent", "repo_type", "etag_timeout", "resume_download", "library_name",
                         "library_version", "local_dir", "endpoint", "headers", "subfolder"})


class PeftWarning(UserWarning):
    """The warnings deltatune gives where PEFT gives one (merging twice, adapting an adapted model, a
    ``rank_pattern`` key that matches nothing): catch or filter them by this class, as ``peft.PeftWarning``."""


class PeftRuntimeWarning(PeftWarning, RuntimeWarning):
    """A :class:`PeftWarning` where PEFT warns with ``RuntimeWarning`` (a ``rank_pattern`` key or a
    ``target_modules``/``target_parameters`` entry that matched nothing): both ``except``/filter clauses catch it."""


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
    LILY = "LILY"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    MISS = "MISS"
    HRA = "HRA"
    C3A = "C3A"
    RANDLORA = "RANDLORA"
    PVERA = "PVERA"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    CARTRIDGE = "CARTRIDGE"
    ROAD = "ROAD"
    BEFT = "BEFT"
    PSOFT = "PSOFT"
    OSF = "OSF"
    FROD = "FROD"
    DELORA = "DELORA"
    # deltatune's own methods (PEFT has none of these; only deltatune reads their files)
    BITFIT = "BITFIT"
    BOTTLENECK = "BOTTLENECK"
    GRALORA = "GRALORA"  # PEFT's
    FOURIERFT = "FOURIERFT"  # PEFT's
    PEANUT = "PEANUT"  # PEFT's
    GLORA = "GLORA"  # PEFT's
    WAVEFT = "WAVEFT"
    VBLORA = "VBLORA"
    XLORA = "XLORA"  # PEFT's
    DEFT = "DEFT"  # PEFT's
    SUPERTUNING = "SUPERTUNING"  # PEFT's
    CPT = "CPT"
    TINYLORA = "TINYLORA"  # PEFT's
    UNILORA = "UNILORA"  # PEFT's
    SHADOW = "SHADOW"  # PEFT's
    POLY = "POLY"  # PEFT's
    ADAMSS = "ADAMSS"  # PEFT's

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


# ``peft_type -> config class`` of every registered method, filled by ``deltatune.registry.register`` (this
# module is below the registry: it reads the table, never imports the methods).
CONFIG_CLASSES: dict[PeftType, type[PeftConfig]] = {}


def config_class_for(peft_type: PeftType | str | None) -> type[PeftConfig]:
    """The config class of the registered method ``peft_type``.

    Raises:
        ConfigError: no registered method has that name (the message lists the known ones).
    """
    try:
        key = PeftType(str(peft_type).upper())
    except ValueError:
        key = None
    if key not in CONFIG_CLASSES:
        known = ", ".join(sorted(m.value for m in CONFIG_CLASSES))
        raise ConfigError(f"peft_type={peft_type!r} is not a method deltatune implements; known: {known}")
    return CONFIG_CLASSES[key]


def check_layer_selection(config: Any, pattern_needs_layers: bool = False) -> None:
    """What every weight config with PEFT's targeting fields does after ``__post_init__``: list/tuple
    ``target_modules``/``exclude_modules`` become sets (PEFT's form), and PEFT's refusals of layer selection with a
    regex ``target_modules`` (its sentence first, then the fix). ``pattern_needs_layers``: also refuse
    ``layers_pattern`` without ``layers_to_transform``, as PEFT's configs of those methods do.

    Raises:
        ConfigError: ``layers_to_transform`` or ``layers_pattern`` beside a string ``target_modules``; with
            ``pattern_needs_layers``, ``layers_pattern`` alone.
    """
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, set(value))
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str. Put the layer "
                          "indices into the regex, or pass target_modules as a list of names")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str. Put the layer "
                          "pattern into the regex, or pass target_modules as a list of names")
    if pattern_needs_layers and config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                          "(layers_pattern only names where the layer index is; set both or neither)")


def _enum_value(enum_cls: type[enum.Enum], value: Any, field_name: str) -> Any:
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).upper())
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        if enum_cls is TaskType:  # PEFT's message (code matches on it); it already lists the fix
            raise ConfigError(f"Invalid task type: '{value}'. Must be one of the following task types: "
                              f"{choices}.") from None
        raise ConfigError(f"{field_name}={value!r} is not known; use one of: {choices}") from None


def _get_commit_hash(pkg_name: str) -> str | None:
    """The commit a development build was installed from, recorded after ``@`` in ``peft_version`` (PEFT's
    rule for dev versions). deltatune records a released PEFT format version, so there is none to find."""
    del pkg_name
    return None


def _peft_version() -> str:
    """What a new config records as ``peft_version``: :data:`__version__`, plus ``@<commit>`` (``@UNKNOWN`` when
    it cannot be found) for a development version, as PEFT records it."""
    version = __version__
    if not re.search(r"dev\d*$", version):
        return version
    try:
        commit = _get_commit_hash("peft")
    except Exception:  # noqa: BLE001 (recording a version must never break creating a config)
        warnings.warn("A dev version of PEFT is used but there was an error while trying to determine the commit "
                      "hash; peft_version records it as @UNKNOWN.", PeftWarning, stacklevel=3)
        commit = None
    return f"{version}@{commit or 'UNKNOWN'}"


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
        auto_mapping: Which ``AutoModel`` class rebuilds the base (PEFT's field, kept as given).
        peft_version: The PEFT file format the config was written in; a new config records
            :data:`PEFT_FORMAT_VERSION` (a loaded one keeps the file's).
    """

    peft_type: PeftType | str | None = None
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None
    peft_version: str | None = None

    def __post_init__(self) -> None:
        self.peft_type = _enum_value(PeftType, self.peft_type, "peft_type")
        self.task_type = _enum_value(TaskType, self.task_type, "task_type")
        if self.peft_version is None:
            self.peft_version = _peft_version()

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes: public fields, enums as strings, sets as sorted lists."""
        out: dict[str, Any] = {}
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

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically). ``kwargs``: PEFT's
        ``auto_mapping_dict`` is recorded as ``auto_mapping``; the rest (PEFT passes hub options) are ignored."""
        auto_mapping = kwargs.get("auto_mapping_dict")
        data = self.to_dict()
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build a config from its JSON object: the class ``data["peft_type"]`` names (when called on
        ``PeftConfig``), else ``cls``.

        Keys the class does not have (fields of a newer PEFT) are dropped with one warning, PEFT's: the config
        then holds, and saves, only what deltatune implements. A field deltatune does not implement may change
        what the adapter computes, so the warning says to check.

        Raises:
            ConfigKeysError: ``data`` has unknown keys and no ``peft_type``: it is not an adapter config at all
                (a ``TypeError`` too, as PEFT's).
            ConfigError: ``peft_type`` names a method deltatune does not implement, or a value cannot work.
        """
        data = dict(data)
        target_cls = cls
        if cls is PeftConfig and data.get("peft_type") is not None:
            target_cls = config_class_for(data["peft_type"])
            if target_cls.from_dict.__func__ is not PeftConfig.from_dict.__func__:
                return target_cls.from_dict(data)  # a method with its own reading rules (e.g. old OFT files)
        names = {f.name for f in dataclasses.fields(target_cls) if f.init and not f.name.startswith("_")}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            if "peft_type" not in data:  # PEFT's minimum: any other JSON is not an adapter config
                shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                raise ConfigKeysError(
                    f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                    f"{{'peft_type'}}. It names no peft_type, so no method can read its keys ({shown}): pass the "
                    "directory that save_pretrained wrote (its adapter_config.json names the method in peft_type)")
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {target_cls.__name__}, these are ignored. The "
                f"file was probably written by a newer PEFT; deltatune reads the fields of PEFT "
                f"{PEFT_FORMAT_VERSION}, and a newer field may change what the adapter computes: compare the "
                "adapter's outputs with the library that wrote it before relying on them.",
                PeftWarning, stacklevel=3,
            )
        if cls is PeftConfig and data.get("peft_type") is None:
            config_class_for(None)  # raises: a bare PeftConfig describes no adapter
        return target_cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """PEFT's constructor from keyword arguments: the config class ``peft_type`` names (``cls`` without one),
        unknown keys dropped with a warning. Same as :meth:`from_dict`."""
        return cls.from_dict(kwargs)

    @staticmethod
    def _read_json(path: str | os.PathLike, missing_hint: str) -> dict[str, Any]:
        """The JSON object in ``path``; a ``runtime_config`` entry (only meaningful at run time) is dropped with a
        warning, as PEFT does.

        Raises:
            AdapterLoadError: the file is missing (``missing_hint`` says what to pass), not JSON, or not an object.
        """
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise AdapterLoadError(missing_hint) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterLoadError(f"{os.fspath(path)} is not valid JSON ({exc}); re-save the adapter") from None
        if not isinstance(data, dict):
            raise AdapterLoadError(f"{os.fspath(path)} must hold a JSON object, found {type(data).__name__}")
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.", PeftWarning, stacklevel=3)
            del data["runtime_config"]
        return data

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object in ``path_json_file``, as a dict (PEFT's method returns the dict, not a config: build one
        with ``PeftConfig.from_dict``). A ``runtime_config`` entry, which is only meaningful at run time, is
        dropped with a warning, as PEFT does.

        Raises:
            AdapterLoadError: the file is missing, not JSON, or not a JSON object.
        """
        return cls._read_json(path_json_file, f"{os.fspath(path_json_file)} does not exist; pass the path of an "
                                              f"{CONFIG_NAME}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> PeftConfig:
        """Read ``adapter_config.json`` from a directory (the method's config class is picked for you).

        ``kwargs``, as PEFT's: download options (``revision``, ``cache_dir``, ``token``, ...) are not config
        fields and are ignored; a config field given here fills in a key the file lacks (the file's own values
        win: change the returned config to override them).

        Raises:
            AdapterLoadError: no such directory or file, or it is not JSON; the file holds another method than
                ``cls``.
            ConfigKeysError: the JSON has no ``peft_type`` and keys no config has (some other JSON file).
        """
        directory = resolve_adapter_dir(pretrained_model_name_or_path, subfolder)
        path = os.path.join(directory, CONFIG_NAME)
        data = cls._read_json(path, f"{directory} has no {CONFIG_NAME}: is this an adapter directory written by "
                                    "save_pretrained?")
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {**{k: v for k, v in kwargs.items() if k in fields and k not in _HUB_KWARGS}, **data}
        if not data.get("peft_type") and cls is PeftConfig and set(data) <= fields:
            what = "is empty: it names no peft_type" if not data else "names no peft_type"
            raise ConfigKeysError(f"{path} {what}, so it describes no adapter; re-save the adapter "
                                  "(save_pretrained writes the whole config)")
        config = cls.from_dict(data)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise AdapterLoadError(f"{path} holds a {config.peft_type} adapter, not one for {cls.__name__}")
        return config

