"""The table of methods: which methods exist (:data:`BUILTIN`), and how each plugs into the shared machinery.

A method lives in its own package and describes itself with one :class:`Method` (a small core every weight
method fills in) plus an optional :class:`Hooks` (the extension points only some methods need). Adding a
method means adding its package and one line in :data:`BUILTIN` (or one :func:`register` call for a method
defined outside deltatune). The rest of the library (``get_peft_model``, loading files, the CLI, ``compare``)
looks methods up here and knows nothing else about them; this module imports no method (they are loaded by
name, in one place: :func:`load_builtins`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.config import CONFIG_CLASSES, PeftConfig, PeftType, config_class_for

# The built-in methods, by package; each package defines its Method entries (module attributes) and registers
# nothing itself. The order is the registry's order (tests parametrised over METHODS, ``deltatune --help``).
BUILTIN: tuple[str, ...] = (
    "deltatune.trainable_tokens",
    "deltatune.lora",
    "deltatune.adalora",
    "deltatune.prompt",
    "deltatune.bitfit",
    "deltatune.oft",
    "deltatune.boft",
    "deltatune.bottleneck",
    "deltatune.ia3",
    "deltatune.ln_tuning",
    "deltatune.loha",
    "deltatune.lokr",
    "deltatune.vera",
    "deltatune.lily",
    "deltatune.hira",
    "deltatune.shira",
    "deltatune.miss",
    "deltatune.hra",
    "deltatune.c3a",
    "deltatune.gralora",
    "deltatune.fourierft",
    "deltatune.randlora",
    "deltatune.pvera",
    "deltatune.peanut",
    "deltatune.glora",
    "deltatune.waveft",
    "deltatune.vblora",
    "deltatune.xlora",
    "deltatune.adaption_prompt",
    "deltatune.cartridge",
    "deltatune.road",
    "deltatune.beft",
    "deltatune.psoft",
    "deltatune.osf",
    "deltatune.frod",
    "deltatune.delora",
    "deltatune.deft",
    "deltatune.supertuning",
    "deltatune.cpt",
    "deltatune.tinylora",
    "deltatune.unilora",
    "deltatune.shadow",
    "deltatune.poly",
    "deltatune.adamss",
)


@dataclass(frozen=True)
class Hooks:
    """Optional extension points of a method; every one defaults to "nothing to do".

    Building an adapter (``AdapterModel.inject_adapter``, in this order):
        prepare_config: ``(model, config) -> None``: fill config defaults that depend on the model (run before
            targeting), e.g. IA3's ``feedforward_modules`` per architecture.
        find_targets: ``(model, config) -> [module name]``: the modules to adapt, for a method whose
            ``target_modules`` does not follow the shared rules (adaption prompts: the top ``adapter_layers``
            attention modules); replaces ``core.targeting.find_targets`` for it.
        init_shared: ``(adapter_model, adapter_name, config, target_names) -> kwargs``: create the adapter's
            entries in ``shared_containers`` before any layer is wrapped; the returned keyword arguments are
            passed on to every ``create_or_update`` call of that injection.
        after_inject: ``(adapter_model, adapter_name, config) -> None``: work once every target is wrapped, e.g.
            trainable tokens also wrap the output layer tied to the wrapped input embedding.

    Where tensors live besides the layers' own containers (saved, loaded and deleted with the adapter):
        shared_containers: Per-adapter containers held once per model (on the ``AdapterModel``, so their keys
            read ``base_model.<name>.<adapter>``), e.g. VeRA's frozen shared projections.
        uses_shared_state: PEFT's ``uses_shared_state`` of the tuner class where it is not "has
            ``shared_containers``" (RandLoRA: ``False``, PEFT's layers also own their references to the bases, so
            ``inject_adapter_in_model`` works); ``None``: read from ``shared_containers``.
        extra_containers: Containers of companion layers a config may add beside the method's own layers (LoRA's
            ``trainable_tokens_delta``).
        nested_containers: Dotted paths below an adapted module that hold such companion tensors (LoRA's
            ``token_adapter.trainable_tokens_delta``, PEFT's layout), so ``deltatune inspect`` names the module
            adapted, not the companion.

    Training (``AdapterModel.regularization_loss`` / ``update_and_allocate``; the trainer's checkpoints):
        regulariser: ``(adapter_model) -> Tensor | None``: a term added to the training loss while an adapter of
            this method is trainable (AdaLoRA's orthogonality penalty ``orth_reg_weight · R``).
        step: ``(adapter_model, global_step) -> None``: per-optimizer-step work for a trainable adapter (AdaLoRA's
            rank allocation).
        training_state: ``(adapter_model) -> dict``: state a resumed run needs that is not in the adapter's
            tensors (AdaLoRA's allocator: importance averages); ``restore_training_state``:
            ``(adapter_model, dict) -> None`` puts it back.

    Files:
        before_save: ``(peft_model, adapter_name, file_state) -> file_state``: last change to the tensors before
            they are written (AdaLoRA slices them to the kept ranks).
        convert_on_save: ``(configs, names, initial_dir) -> convert``: PEFT's
            ``path_initial_model_for_weight_conversion`` (LoRA: PiSSA/OLoRA/CorDA/LoRA-GA to a plain LoRA). It checks
            the adapters ``names`` of ``configs`` (warnings at ``stacklevel=3``: ``save_pretrained``'s caller) and
            returns ``convert: (name, file_state, config) -> (file_state, config)``, applied to each before writing.
        save_beside: ``(peft_model, adapter_name, adapter_dir, safe_serialization) -> None``: what a method files
            beside an adapter's own pair, after it is written (X-LoRA: its LoRA experts in ``<adapter_dir>/<i>``,
            PEFT's layout).
        fit_config_to_file: ``(config, file tensors) -> None``: before an adapter is loaded, correct config
            fields the file contradicts (BOFT files from PEFT without its CUDA kernel).
        from_file: ``(config, file tensors) -> file tensors``: the inverse of ``before_save``, applied to every
            state dict with file keys before it is checked and loaded (files, ``load_adapter``,
            ``set_peft_model_state_dict``): RandLoRA drops PEFT's per-layer copies of its shared bases; VB-LoRA turns
            ``save_only_topk_weights`` files back into logits.
        saves_initial: ``(config) -> bool``: whether ``deltatune train`` must also save the adapter as created, so
            that ``convert_on_save`` can write the trained one for the original base (LoRA's PiSSA/OLoRA/CorDA/LoRA-GA).
        rewrites_base_on_load: ``(config) -> bool``: whether loading the adapter as saved rewrites the base it is
            loaded onto (LoRA's PiSSA/OLoRA/CorDA/LoRA-GA residual, LoftQ's ``Q``), so it cannot share that base
            with other adapters (``deltatune serve`` refuses it).
        loading: ``(config) -> context manager``: held while a saved adapter is built, before its tensors are
            loaded (LoRA: skip initialisations the file overwrites).
        after_load: ``(model, adapter_name) -> None``: once the tensors are loaded (LoRA: rebuild the residual
            base PiSSA/OLoRA/LoftQ adapters were trained on).

    Running and combining:
        activate: ``(peft_model, args, kwargs, adapter_names) -> context manager``: held around each forward and
            generate call (LoRA's aLoRA: where each row's invocation sequence starts).
        task_count: ``(config) -> int``: how many tasks an adapter of this config serves, for a method whose
            forward and generate need ``task_ids`` (one task id per batch row: multitask prompt tuning, Poly); the
            CLI then trains task 0 and ``deltatune generate --task-id`` picks one (:func:`task_count`).
        add_weighted_adapter: ``(peft_model, adapters, weights, adapter_name, combination_type, **kwargs) ->
            None``: a new adapter, a weighted combination of existing ones (LoRA's ``add_weighted_adapter``).
        create_with_data: ``(model, config, batches, adapter_name) -> PeftModel``: creation with a data-driven
            initialisation (LoRA's EVA, CorDA, LoRA-GA, LoftQ).
        data_init: ``(config) -> str | None``: the data-driven initialisation ``config`` asks for, by name (LoRA's
            ``init_lora_weights``: ``"eva"``, ``"corda"``, ``"lora_ga"``, ``"loftq"``), else ``None``; ``deltatune
            train`` then creates the adapter with ``create_with_data`` from its first training batches.
        make_prompt_encoder: ``(config, word_embeddings) -> nn.Module``: a virtual-token method's trainable
            encoder.
        peft_tuner: The class a ``PeftModel`` whose first adapter is of this method delegates to, when it is not
            the weight adapters' ``deltatune.core.weight_tuner.WeightTuner`` (the virtual-token methods'
            ``PromptTuner``): ``build(peft_model, model, config, adapter_name, autocast_adapter_dtype)`` and
            ``WeightTuner``'s interface.

    Inspecting and the CLI:
        inspect_size: ``(adapter_config, {file key: shape}) -> text``: the "size" line of ``deltatune inspect``
            for methods whose size is not a LoRA-style ``r`` (OFT's block size, BOFT's butterfly factors).
        rank_container: The container whose tensors' first dimension is the rank (LoRA's ``lora_A``:
            ``(r, in)``); ``deltatune inspect`` counts the ranks in a file from it. Empty: no such count.
        cli_shared_skip: Config fields that settings meant for every method (a built-in data set's recipe,
            ``deltatune compare``'s options) do not pass to this method, because the name means something else
            here (OFT's ``r`` counts blocks). Set on the command line for this method alone they still apply.
        cli_refusal: Why ``--method <name>`` cannot build this method from a recipe's options (X-LoRA needs trained
            LoRA experts), and what to do instead: the method is left out of the CLI's method table and
            ``--method <name>`` is a ``UsageError`` with this text. Empty: the CLI offers it.
        serve_refusal: ``(config) -> text``: why ``deltatune serve`` cannot batch an adapter of this config with
            other requests, and what to use instead (``deltatune generate --adapter``); the server refuses it at
            load with a 4xx ``adapter_not_servable`` error carrying this text and keeps serving the others (X-LoRA,
            ShadowPEFT, Lily; LoRA's aLoRA). Empty text, or no hook: served (one forward per step for all rows of
            the method, ``adapter_names``, over the engine's own key/value cache). Prompt learning is refused
            without it; ``tests/serve/test_every_method.py`` checks every registered method is served or refused.
        inspect_targets: ``(adapter_config) -> text``: the "targets" line of ``deltatune inspect`` for an adapter
            whose file names no adapted layer and that is not virtual tokens (X-LoRA's classifier).
        peft_table_cls: The class PEFT's ``PEFT_TYPE_TO_TUNER_MAPPING`` gives for this method where it is not the
            tuner class made from ``layer_cls`` (a virtual-token method's prompt encoder, X-LoRA's model).
    """

    prepare_config: Callable[[nn.Module, PeftConfig], None] | None = None
    find_targets: Callable[[nn.Module, PeftConfig], list[str]] | None = None
    init_shared: Callable[..., dict[str, Any]] | None = None
    after_inject: Callable[[nn.Module, str, PeftConfig], None] | None = None
    shared_containers: tuple[str, ...] = ()
    uses_shared_state: bool | None = None
    extra_containers: tuple[str, ...] = ()
    nested_containers: tuple[str, ...] = ()
    regulariser: Callable[[nn.Module], Any] | None = None
    step: Callable[[nn.Module, int], None] | None = None
    training_state: Callable[[nn.Module], dict[str, Any]] | None = None
    restore_training_state: Callable[[nn.Module, dict[str, Any]], None] | None = None
    before_save: Callable[[nn.Module, str, dict[str, Any]], dict[str, Any]] | None = None
    convert_on_save: Callable[..., tuple[dict[str, Any], PeftConfig]] | None = None
    save_beside: Callable[[nn.Module, str, str, bool], None] | None = None
    fit_config_to_file: Callable[[PeftConfig, dict[str, Any]], None] | None = None
    from_file: Callable[[PeftConfig, dict[str, Any]], dict[str, Any]] | None = None
    saves_initial: Callable[[PeftConfig], bool] | None = None
    rewrites_base_on_load: Callable[[PeftConfig], bool] | None = None
    loading: Callable[[PeftConfig], Any] | None = None
    after_load: Callable[[nn.Module, str], None] | None = None
    activate: Callable[..., Any] | None = None
    task_count: Callable[[PeftConfig], int] | None = None
    add_weighted_adapter: Callable[..., None] | None = None
    create_with_data: Callable[..., nn.Module] | None = None
    data_init: Callable[[PeftConfig], str | None] | None = None
    make_prompt_encoder: Callable[[PeftConfig, nn.Module], nn.Module] | None = None
    peft_tuner: type | None = None
    inspect_size: Callable[[dict[str, Any], dict[str, list[int]]], str] | None = None
    rank_container: str = ""
    cli_shared_skip: tuple[str, ...] = ()
    cli_refusal: str = ""
    serve_refusal: Callable[[PeftConfig], str] | None = None
    inspect_targets: Callable[[dict[str, Any]], str] | None = None
    peft_table_cls: type | None = None


NO_HOOKS = Hooks()


@dataclass(frozen=True)
class Method:
    """How one method plugs into the shared machinery: what every weight method gives, plus its :class:`Hooks`.

    Attributes:
        peft_type: The name in ``adapter_config.json``.
        config_cls: Its config dataclass.
        prefix: Substring of every trainable adapter parameter name (``"lora_"``).
        layer_cls: Base class of its wrapper layers (to find them in a model); ``None`` for a virtual-token method
            (prompt tuning & co.: ``PeftModel`` feeds its vectors to the inputs or the key/value cache).
        create_or_update: ``(target, adapter_name, config, module_name, **shared) -> wrapper``: wrap ``target`` (or
            add an adapter to an existing wrapper of this method). Returns ``None`` if the type is unsupported.
        supported_types: ``() -> types``: layer types the method can adapt (targeting and error messages).
        default_targets: ``model_type -> target_modules`` used when the config gives none.
        file_suffixes: ``{internal suffix: file suffix}`` for keys PEFT renames in files.
        cli_names: Names the CLI accepts for ``--method``, with fixed config overrides.
        mergeable: ``False`` for methods whose update cannot be folded into the weights (bottleneck adapters add a
            non-linear path); ``merge_adapter``/``merge_and_unload`` then refuse before changing anything.
        mixed: Whether its adapters may share a layer with other methods' in a ``PeftMixedModel`` chain (its layer
            adds its update to whatever its ``base_layer`` returns; PEFT's ``COMPATIBLE_TUNER_TYPES``).
        lr_scale: The CLI multiplies its default learning rate by this when the user sets none, measured per
            method: methods that move a few vectors want a larger step than weight adapters (PEFT's examples: 3e-2
            for prompt tuning, 1e-3 for LoRA); some want a smaller one (FRoD and OSF train whole spectra: 0.1).
        hooks: The optional extension points (:class:`Hooks`).
    """

    peft_type: PeftType
    config_cls: type[PeftConfig]
    prefix: str = ""
    layer_cls: type[nn.Module] | None = None
    create_or_update: Callable[..., nn.Module | None] | None = None
    supported_types: Callable[[], tuple[type, ...]] = tuple
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    file_suffixes: dict[str, str] = field(default_factory=dict)
    cli_names: dict[str, dict] = field(default_factory=dict)
    mergeable: bool = True
    mixed: bool = False
    lr_scale: float = 1.0
    hooks: Hooks = NO_HOOKS

    @property
    def family(self) -> str:
        """``"weight"`` (wraps layers; ``core/tuner.py``) or ``"prompt"`` (virtual tokens; ``deltatune/prompt``),
        read off ``layer_cls``."""
        return "weight" if self.layer_cls is not None else "prompt"

    @property
    def uses_shared_state(self) -> bool:
        """PEFT's ``uses_shared_state`` of this method's tuner (``inject_adapter_in_model`` refuses such methods)."""
        if self.hooks.uses_shared_state is not None:
            return self.hooks.uses_shared_state
        return bool(self.hooks.shared_containers)

    @property
    def containers(self) -> tuple[str, ...]:
        """Every attribute name whose per-adapter entries are saved (layer tensors, then model-wide ones)."""
        layer_names = tuple(self.layer_cls.adapter_layer_names) if self.layer_cls is not None else ()
        return layer_names + self.hooks.shared_containers + self.hooks.extra_containers


METHODS: dict[PeftType, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table (and its config class to :data:`deltatune.config.CONFIG_CLASSES`, which
    ``PeftConfig.from_dict`` reads); returns it. A later entry for the same ``peft_type`` replaces the earlier."""
    METHODS[method.peft_type] = method
    CONFIG_CLASSES[method.peft_type] = method.config_cls
    return method


_loaded = False


def load_builtins() -> None:
    """Import each package of :data:`BUILTIN` and register the :class:`Method` entries it defines (module
    attributes, in definition order). Runs once; ``import deltatune`` calls it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        module = importlib.import_module(name)
        seen: set[int] = set()
        for value in vars(module).values():
            if isinstance(value, Method) and id(value) not in seen:
                seen.add(id(value))
                register(value)


def method_for(peft_type: PeftType | str | None) -> Method:
    """The registered method named ``peft_type``.

    Raises:
        ConfigError: no such method (the message lists the known ones).
    """
    config_class_for(peft_type)  # raises ConfigError naming the known methods
    return METHODS[PeftType(str(peft_type).upper())]


def hook_for(name: str, peft_types: Iterable[PeftType | str]) -> Callable[..., Any] | None:
    """The :class:`Hooks` entry ``name`` of the first of ``peft_types``' methods that has one, else of the first
    registered method that has one (it then validates the request, and its error names what is wrong with these
    adapters: e.g. LoRA's ``add_weighted_adapter`` refusing a LoHa adapter), else ``None``. Unknown names in
    ``peft_types`` are skipped."""
    load_builtins()
    for peft_type in peft_types:
        method = METHODS.get(peft_type)  # PeftType is a str enum: "LORA" finds PeftType.LORA
        hook = getattr(method.hooks, name) if method is not None else None
        if hook is not None:
            return hook
    return next((getattr(m.hooks, name) for m in METHODS.values() if getattr(m.hooks, name) is not None), None)


def task_count(configs: Iterable[PeftConfig]) -> int:
    """The most tasks any of ``configs`` serves (its method's ``Hooks.task_count``); 0 when none of them routes by
    task, i.e. no call needs ``task_ids``."""
    load_builtins()
    counts = [hook(c) for c in configs
              if (m := METHODS.get(c.peft_type)) is not None and (hook := m.hooks.task_count) is not None]
    return max(counts, default=0)


class MethodTable(Mapping):
    """A read-only ``{PeftType: value}`` view of the registered methods (PEFT's ``PEFT_TYPE_TO_*_MAPPING``
    tables), read from :data:`METHODS` at each access, so it lists every method registered so far.

    Args:
        value: ``Method -> value`` (the config class, the tuner class...).
        include: ``Method -> bool``: which methods the table lists.
    """

    def __init__(self, value: Callable[[Method], Any], include: Callable[[Method], bool] = lambda m: True) -> None:
        self._value, self._include = value, include

    def _methods(self) -> dict[PeftType, Method]:
        load_builtins()
        return {t: m for t, m in METHODS.items() if self._include(m)}

    def __getitem__(self, peft_type: PeftType | str) -> Any:
        methods = self._methods()
        try:
            key = PeftType(str(peft_type).upper())
        except ValueError:
            key = None
        if key not in methods:
            raise KeyError(peft_type)
        return self._value(methods[key])

    def __iter__(self) -> Iterator[PeftType]:
        return iter(self._methods())

    def __len__(self) -> int:
        return len(self._methods())

    def __repr__(self) -> str:
        return repr(dict(self))


__all__ = ["BUILTIN", "METHODS", "Hooks", "Method", "MethodTable", "config_class_for", "hook_for", "load_builtins",
           "method_for", "register", "task_count"]
