"""The settings of a ``train`` (or ``compare``) run: one typed object, :class:`RunSettings`, and its layering.

Settings come in layers, later ones winning:

    defaults  <  recipe of a built-in data set  <  ``--config`` file  <  command-line flags     (:func:`layered`)
    the resumed run's ``run_config.json``  <  flags a resume may change                        (:func:`resumed`)

A resume replaces the first four layers by the saved run (whose settings they made), so ``--resume`` computes what
the interrupted run would have; a flag that would change the computation is refused. Where the code needs to know
which layer gave a value, :attr:`RunSettings.source` says (``--lr`` given or not, the recipe's method options kept
apart). ``run_config.json`` is :meth:`RunSettings.record`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from deltatune.cli.common import BUILTIN_MODELS, RUN_CONFIG_NAME, UsageError, read_json
from deltatune.training import runlock
from deltatune.training.data import BUILTIN_DATASETS


@dataclass
class RunSettings:
    """Everything a training run is told, typed; the first block is what ``run_config.json`` records.

    Attributes:
        method_options: The method's config fields (``r``, ``lora_alpha``...), from the config file and flags;
            ``train`` completes them (:func:`deltatune.cli.options.fill_method_defaults`) before recording.
        progress: ``False`` for ``--no-progress``; ``None`` when not given (then not recorded).
        resume, overwrite, config: How this command treats the output directory, and the config file's path.
        flags: What the command line itself gave (method options under ``method_options``): what a resume may
            or may not change, and what ``compare`` passes on to each method.
        recipe_method_options: The recipe's method options, LoRA-style (``r``, ``lora_alpha``): kept apart, so
            each method gets only those it takes (:func:`deltatune.cli.options.shared_options_for`).
        source: Setting name -> the layer that gave its value: ``"default"``, ``"recipe"``, ``"config"``,
            ``"flag"`` or ``"resume"``.
        saved: Keys of a resumed ``run_config.json`` that are not settings (``labels``, ``model_path``,
            ``world_size``...), kept in its order so the record is rewritten as it was.
    """

    model: str = "smollm2-135m"
    data: str = "bbc-news"
    eval_data: str | None = None
    method: str = "lora"
    output_dir: str | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float | None = None
    seed: int = 0
    eval_steps: int = 0
    save_steps: int = 10
    eval_samples: int = 200
    eval_batch_size: int = 8
    max_length: int = 512
    precision: str = "auto"
    gradient_checkpointing: bool = False
    chunked_loss: bool = True
    compile: str | None = None
    device: str = "auto"
    format: str | None = None
    template: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str | None = None
    forgetting_tokens: int = 4096
    forgetting_data: str | None = None
    eval_before: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None
    fsdp: bool = False
    # ---- not recorded: this command's handling, and where values came from
    progress: bool | None = field(default=None, metadata={"record": False})
    resume: bool = field(default=False, metadata={"record": False})
    overwrite: bool = field(default=False, metadata={"record": False})
    config: str | None = field(default=None, metadata={"record": False})
    flags: dict[str, Any] = field(default_factory=dict, metadata={"record": False})
    recipe_method_options: dict[str, Any] = field(default_factory=dict, metadata={"record": False})
    source: dict[str, str] = field(default_factory=dict, metadata={"record": False})
    saved: dict[str, Any] = field(default_factory=dict, metadata={"record": False})

    @classmethod
    def from_layer(cls, values: dict[str, Any], source: dict[str, str] | None = None) -> RunSettings:
        """Settings from one merged dict (``explicit`` is the older name of ``flags``); keys that are not settings
        go to :attr:`saved`."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(values)
        if "explicit" in values:
            values["flags"] = values.pop("explicit")
        known = {k: v for k, v in values.items() if k in names}
        saved = {k: v for k, v in values.items() if k not in names}
        return cls(**known, saved={**known.pop("saved", {}), **saved}, source=dict(source or {}))

    def given(self, key: str) -> bool:
        """Whether the user set ``key`` (in the config file or on the command line), not a default or recipe."""
        return self.source.get(key) in ("config", "flag")

    def record(self) -> dict[str, Any]:
        """What ``run_config.json`` holds of these settings, in the order it always had: every recorded setting,
        ``progress`` when given, then the saved run's other keys (the caller adds ``labels``, ``model_path``...).
        Paths are absolute, so ``--resume`` works from any working directory."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("record", True)}
        if self.progress is not None:
            out["progress"] = self.progress
        out.update(self.saved)
        return out

    # Read access by name, for callers written against the dict these settings once were.
    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in {f.name for f in dataclasses.fields(self)} else default


# Defaults for any data; a built-in data set's recipe (below) overrides them.
DEFAULTS: dict[str, Any] = {f.name: getattr(RunSettings(), f.name) for f in dataclasses.fields(RunSettings)
                            if f.metadata.get("record", True)}

# bbc-news, the default job: sized for 5 minutes on a 2-core CPU without bf16 (fp32 there), whose cost is the tokens
# it runs (every article is longer than max_length). 96 tokens keep the headline and lead paragraph, which carry the
# topic, of 99% of the articles; 224 tokens and 60 steps took 9 min 45 s on such a CPU (7.3 s per step). Steps matter
# more than length here (seed 0, fp32: 96 x 60 steps 0.94, 96 x 40 0.86, 128 x 40 0.89). One recipe for every CPU.
RECIPES: dict[str, dict[str, Any]] = {
    "bbc-news": {"max_steps": 60, "batch_size": 8, "lr": 1e-3, "max_length": 96, "eval_samples": 100,
                 "eval_steps": 0, "save_steps": 10, "warmup_ratio": 0.1,
                 "method_options": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
    "chatterbot": {"max_steps": 60, "batch_size": 8, "lr": 1e-3, "max_length": 128, "eval_samples": 100,
                   "method_options": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
}
# An encoder with a fresh classification head learns faster and needs more steps of a tiny model.
ENCODER_RECIPES: dict[str, dict[str, Any]] = {
    "bbc-news": {"max_steps": 60, "batch_size": 16, "lr": 1e-2, "max_length": 128, "eval_samples": 200,
                 "method_options": {"r": 8, "lora_alpha": 16}},
}
# Settings that do not change what a run computes: a resume may change them.
CHANGEABLE_ON_RESUME = {"eval_steps", "save_steps", "eval_samples", "eval_batch_size", "device", "progress", "resume",
                        "overwrite", "config", "output_dir", "forgetting_tokens", "eval_before",
                        "fsdp"}  # DDP or FSDP compute the same update
HARMLESS = CHANGEABLE_ON_RESUME  # the older name
# Settings naming files: run_config.json stores them absolute, so --resume works from any working directory.
# A built-in name (and anything that is not an existing path, like a hub id) stays as it is.
_PATH_SETTINGS = {"data": BUILTIN_DATASETS, "eval_data": (), "forgetting_data": (), "model": BUILTIN_MODELS,
                  "model_path": ()}


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON file of settings (keys as the flags, with ``-`` or ``_``)."""
    if not os.path.exists(path):
        raise UsageError(f"--config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise various types
        raise UsageError(f"--config {path}: cannot parse ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def layer_settings(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge dicts left to right; ``method_options`` merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "method_options":
                out["method_options"] = {**out.get("method_options", {}), **value}
            else:
                out[key] = value
    return out


def recipe_for(data: str, model: str) -> dict[str, Any]:
    """Built-in data sets carry settings measured to fit the time budget."""
    if model == "minilm-l6" and data in ENCODER_RECIPES:
        return dict(ENCODER_RECIPES[data])
    return dict(RECIPES.get(data, {}))


# ---- the layers ---------------------------------------------------------------------------------------------
def layered(args: argparse.Namespace, method_option_names: set[str]) -> RunSettings:
    """Defaults < recipe < ``--config`` file < command-line flags, for the parsed ``args`` of ``train``/``compare``.

    Raises:
        UsageError: an unknown key in the config file, or a value there that its flag would refuse.
    """
    flags = _flag_layer(args, method_option_names)
    from_file = _file_layer(flags.get("config"), method_option_names)
    top = layer_settings([from_file, flags])
    data = top.get("data", DEFAULTS["data"])
    model = top.get("model", DEFAULTS["model"])
    recipe = recipe_for(data, model)
    # The recipe's method options are LoRA-style (r, lora_alpha, ...): kept apart, and `train` gives each method
    # only those it takes (options.shared_options_for), so `--method ia3` or `oft` on a built-in data set works.
    recipe_options = recipe.pop("method_options", {})
    source = {**dict.fromkeys(DEFAULTS, "default"), **dict.fromkeys(recipe, "recipe"),
              **dict.fromkeys(from_file, "config"), **dict.fromkeys(flags, "flag")}
    settings = RunSettings.from_layer({**layer_settings([DEFAULTS, recipe, top]), "flags": flags,
                                       "recipe_method_options": recipe_options}, source)
    if settings.output_dir is None:
        stem = lambda s: os.path.splitext(os.path.basename(os.path.normpath(s)))[0]  # noqa: E731
        settings.output_dir = os.path.join("runs", f"{stem(data)}-{stem(model)}-{settings.method}")
    return settings


def _flag_layer(args: argparse.Namespace, method_option_names: set[str]) -> dict[str, Any]:
    """The flags given on the command line (absent flags are absent), method options under ``method_options``."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    options = {k: flags.pop(k) for k in list(flags) if k in method_option_names}
    if options:
        flags["method_options"] = options
    return flags


def _file_layer(path: str | None, method_option_names: set[str]) -> dict[str, Any]:
    """The ``--config`` file's settings (none without one), checked and typed as their flags would be."""
    from_file = load_config_file(path) if path is not None else {}
    file_options = {k: from_file.pop(k) for k in list(from_file) if k in method_option_names}
    from_file.setdefault("method_options", {}).update(file_options)
    known = set(DEFAULTS) | {"progress", "resume", "overwrite", "config"}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}")
    return _typed_file_settings(path, from_file) if path is not None else from_file


def _typed_file_settings(path: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config file's settings checked and converted as their flags would be (``lr: "3e-4"`` -> 3e-4).

    Raises:
        UsageError: a value its flag would refuse (``lr: fast``, ``data: [1, 2]``, ``precision: fp8``).
    """
    from deltatune.cli.options import add_train_arguments, learning_rate

    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    out = dict(values)
    for key, value in values.items():
        a = actions.get(key)
        if a is None or key == "method_options" or value is None:
            continue
        where = f"--config {path}: {key}: "
        if a.nargs == 0:  # an on/off flag (--resume, --no-progress ...): a yes/no setting in a file
            if not isinstance(value, bool):
                raise UsageError(where + f"{value!r} is not true or false")
        elif a.nargs == "?" and isinstance(value, bool):  # --compile with no value
            value = a.const if value else None
        elif isinstance(value, str):
            if a.type is not None:
                try:
                    value = a.type(value)
                except argparse.ArgumentTypeError as exc:  # the type's own reason (--lr nan)
                    raise UsageError(where + str(exc)) from None
                except (ValueError, TypeError):
                    raise UsageError(where + f"cannot read {value!r} as {a.type.__name__}") from None
        elif a.type in (int, float, learning_rate) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if a.type is int and value != int(value):
                raise UsageError(where + f"{value!r} is not a whole number")
            try:
                value = a.type(value)
            except argparse.ArgumentTypeError as exc:  # lr: -1 or .nan in a YAML file
                raise UsageError(where + str(exc)) from None
        else:
            raise UsageError(where + f"{value!r} is not a {a.type.__name__ if a.type else 'string'}")
        if a.choices and value not in a.choices:
            raise UsageError(where + f"{value!r} is not one of {', '.join(map(str, a.choices))}")
        out[key] = value
    return out


def resumed(settings: RunSettings, world_size: int) -> RunSettings:
    """On ``--resume``: the saved run's settings, with the flags a resume may change (:data:`CHANGEABLE_ON_RESUME`,
    and ``--batch-size`` for the same global batch under another process count) on top.

    Raises:
        UsageError: no run to resume in the output directory, or a flag that would change the computation.
    """
    runlock.check_free(settings.output_dir)  # a live run may not have written its settings yet
    saved = read_json(os.path.join(settings.output_dir, RUN_CONFIG_NAME))
    if not saved:
        raise UsageError(f"--resume: {settings.output_dir} holds no run to resume (no {RUN_CONFIG_NAME}); "
                         "start without --resume")
    flags = settings.flags
    for key, value in flags.items():
        if key in CHANGEABLE_ON_RESUME:
            continue
        old = saved.get(key)
        if key == "batch_size" and int(value) * world_size == int(old) * int(saved.get("world_size", 1)):
            continue  # another process count, the same global batch: the run computes the same steps
        if key == "method_options":
            changed = {k: v for k, v in value.items() if saved.get("method_options", {}).get(k) != v}
            if changed:
                raise UsageError(f"--resume: method options {changed} differ from the run's "
                                 f"{saved.get('method_options')}; resume without them")
        elif key == "quantize" and {value, old} <= {None, "none"}:
            continue  # --quantize none is the default: no quantisation
        elif old != value and absolute_path(key, old) != absolute_path(key, value):
            raise UsageError(f"--resume: --{key.replace('_', '-')} {value!r} differs from the run's {old!r}; "
                             "resume with the same options or train into a new --output-dir")
    changed = {k: v for k, v in flags.items() if k in CHANGEABLE_ON_RESUME or k == "batch_size"}
    merged = {**saved, **changed, "world_size": world_size, "resume": True, "flags": flags}
    return RunSettings.from_layer(merged, {**dict.fromkeys(saved, "resume"), **dict.fromkeys(changed, "flag")})


def for_evaluation(run: dict[str, Any], flags: dict[str, Any], model: str | None) -> RunSettings:
    """``deltatune eval``'s settings: defaults < the adapter's training run (its ``run_config.json``) < the recipe of
    the data < the training run again unless ``--data`` names other data < ``flags`` (the data flags given).
    ``model`` is ``--model`` (it picks the recipe)."""
    recorded = {k: v for k, v in run.items() if k in DEFAULTS}
    values = {**DEFAULTS, **recorded}
    values.update(recipe_for(flags.get("data") or values["data"], model or values["model"]))
    if run and not flags.get("data"):  # the adapter's own run settings beat the recipe
        values.update(recorded)
    values.update(flags)
    return RunSettings.from_layer(values)


def absolute_path(key: str, value: Any) -> Any:
    """``value`` as an absolute path when ``key`` names a file setting and ``value`` an existing path."""
    if key in _PATH_SETTINGS and isinstance(value, str) and value not in _PATH_SETTINGS[key] \
            and os.path.exists(value):
        return os.path.abspath(value)
    return value


__all__ = ["RunSettings", "DEFAULTS", "RECIPES", "ENCODER_RECIPES", "CHANGEABLE_ON_RESUME", "HARMLESS",
           "load_config_file", "layer_settings", "recipe_for", "layered", "resumed", "for_evaluation", "absolute_path"]
