"""The table of methods: adding a method means adding one :class:`Method` entry here (from its module).

The rest of the library (``get_peft_model``, loading files, the CLI, ``compare``) looks methods up here
and knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """How one weight-adapter method plugs into the shared machinery.

    Attributes:
        peft_type: The name in ``adapter_config.json``.
        config_cls: Its config dataclass.
        prefix: Substring of every trainable adapter parameter name (``"lora_"``).
        layer_cls: Base class of its wrapper layers (to find them in a model).
        create_or_update: ``(target, adapter_name, config, module_name) -> wrapper``: wrap ``target`` (or
            add an adapter to an existing wrapper of this method). Returns ``None`` if the type is unsupported.
        supported_types: Layer types the method can adapt (for error messages and target checks).
        default_targets: ``model_type -> target_modules`` used when the config gives none.
        file_suffixes: ``{internal suffix: file suffix}`` for keys PEFT renames in files.
        cli_names: Names the CLI accepts for ``--method``, with fixed config overrides.
        prepare_config: ``(model, config) -> None``: fill config defaults that depend on the model (run
            before targeting), e.g. IA3's ``feedforward_modules`` per architecture.
        shared_containers: Attribute names of per-adapter containers held once per model (on the
            ``AdapterModel``, so their keys read ``base_model.<name>.<adapter>``), e.g. VeRA's frozen shared
            projections. Saved and loaded like layer tensors; deleted with the adapter.
        init_shared: ``(adapter_model, adapter_name, config, target_names) -> kwargs``: create the adapter's
            entries in ``shared_containers`` before any layer is wrapped; the returned keyword arguments are
            passed on to every ``create_or_update`` call of that injection.
        loss_hook: ``(adapter_model) -> Tensor | None``: a regulariser added to the training loss while an
            adapter of this method is trainable (AdaLoRA's orthogonality penalty); see
            ``PeftModel.regularization_loss``.
        step_hook: ``(adapter_model, global_step) -> None``: per-optimizer-step work for a trainable adapter
            of this method (AdaLoRA's rank allocation); see ``PeftModel.update_and_allocate``.
        save_hook: ``(peft_model, adapter_name, file_state) -> file_state``: last change to the tensors
            before they are written (AdaLoRA slices them to the kept ranks).
        family: ``"weight"`` (wraps layers; ``core/tuner.py``) or ``"prompt"`` (virtual tokens fed to the
            inputs or the key/value cache; ``deltatune/prompt``, which ``PeftModel`` hands such adapters to).
        make_prompt_encoder: ``(config, word_embeddings) -> nn.Module``: a prompt method's trainable encoder.
        after_inject: ``(adapter_model, adapter_name, config) -> None``: work once every target is wrapped, e.g.
            trainable tokens also wrap the output layer tied to the wrapped input embedding, and LoRA's
            ``trainable_token_indices`` adds a trainable-tokens layer beside its own.
        extra_containers: Containers of companion layers a config may add beside the method's own layers (LoRA's
            ``trainable_tokens_delta``); saved, loaded and deleted with the adapter.
        cli_shared_skip: Config fields that settings meant for every method (a built-in data set's recipe,
            ``deltatune compare``'s options) do not pass to this method, because the name means something else
            here (OFT's ``r`` counts blocks, while the recipes mean LoRA's rank). Set on the command line for
            this method alone (``deltatune train --method oft --r 8 --oft-block-size 0``) they still apply.
        inspect_size: ``(adapter_config, {file key: shape}) -> text``: the "size" line of ``deltatune inspect`` for
            methods whose size is not a LoRA-style ``r`` (OFT's block size, BOFT's butterfly factors).
        rank_container: The container whose tensors' first dimension is the rank (LoRA's ``lora_A``: ``(r, in)``);
            ``deltatune inspect`` counts the ranks in a file from it ("in the file: r=8 x12"). Empty: no such count.
        nested_containers: Dotted paths below an adapted module that hold this method's tensors besides
            ``containers``, when a companion layer sits one module down (LoRA's ``trainable_token_indices``:
            ``token_adapter.trainable_tokens_delta``, PEFT's layout), so ``deltatune inspect`` names the module
            adapted (the embedding), not the companion.
        fit_config_to_file: ``(config, file tensors) -> None``: before an adapter is loaded, correct config
            fields the file contradicts (BOFT files from PEFT without its CUDA kernel hold one butterfly factor
            whatever their config says).
        mergeable: ``False`` for methods whose update cannot be folded into the weights (bottleneck adapters add a
            non-linear path); ``merge_adapter``/``merge_and_unload`` then refuse before changing anything.
        lr_scale: The CLI multiplies its default learning rate by this when the user sets none: methods that
            move a few input vectors want a larger step than weight adapters (PEFT's examples: 3e-2 for
            prompt tuning, 1e-3 for LoRA).
    """

    peft_type: PeftType
    config_cls: type[PeftConfig]
    # Weight adapters need these four; virtual-token methods (family "prompt") leave them unset.
    prefix: str = ""
    layer_cls: type[nn.Module] | None = None
    create_or_update: Callable[..., nn.Module | None] | None = None
    supported_types: Callable[[], tuple[type, ...]] = tuple
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    file_suffixes: dict[str, str] = field(default_factory=dict)
    cli_names: dict[str, dict] = field(default_factory=dict)
    prepare_config: Callable[[nn.Module, PeftConfig], None] | None = None
    shared_containers: tuple[str, ...] = ()
    init_shared: Callable[..., dict[str, Any]] | None = None
    loss_hook: Callable[[nn.Module], Any] | None = None
    step_hook: Callable[[nn.Module, int], None] | None = None
    save_hook: Callable[[nn.Module, str, dict[str, Any]], dict[str, Any]] | None = None
    family: str = "weight"
    make_prompt_encoder: Callable[[PeftConfig, nn.Module], nn.Module] | None = None
    lr_scale: float = 1.0
    after_inject: Callable[[nn.Module, str, PeftConfig], None] | None = None
    extra_containers: tuple[str, ...] = ()
    mergeable: bool = True
    cli_shared_skip: tuple[str, ...] = ()
    inspect_size: Callable[[dict[str, Any], dict[str, list[int]]], str] | None = None
    rank_container: str = ""
    nested_containers: tuple[str, ...] = ()
    fit_config_to_file: Callable[[PeftConfig, dict[str, Any]], None] | None = None

    @property
    def tuner_cls(self) -> type[nn.Module]:
        """PEFT's tuner class for this method (``LoraModel``...): ``PeftModel.base_model`` is one; made once from
        this entry (:func:`deltatune.core.tuner.tuner_class`). Weight methods only."""
        from deltatune.core.tuner import tuner_class  # core.tuner imports this module

        return tuner_class(self)

    @property
    def containers(self) -> tuple[str, ...]:
        """Every attribute name whose per-adapter entries are saved (layer tensors, then model-wide ones)."""
        layer_names = tuple(self.layer_cls.adapter_layer_names) if self.layer_cls is not None else ()
        return layer_names + self.shared_containers + self.extra_containers


METHODS: dict[PeftType, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.peft_type] = method
    return method


def method_for(peft_type: PeftType | str | None) -> Method:
    try:
        key = PeftType(str(peft_type).upper())
    except ValueError:
        key = None
    if key not in METHODS:
        known = ", ".join(sorted(m.value for m in METHODS))
        raise ConfigError(f"peft_type={peft_type!r} is not a method deltatune implements; known: {known}")
    return METHODS[key]


def config_class_for(peft_type: PeftType | str | None) -> type[PeftConfig]:
    return method_for(peft_type).config_cls


class MethodTable(Mapping):
    """A read-only ``{PeftType: value}`` view of the registered methods (PEFT's ``PEFT_TYPE_TO_*_MAPPING``
    tables), read from :data:`METHODS` at each access, so it lists every method whatever the import order.

    Args:
        value: ``Method -> value`` (the config class, the tuner class...).
        include: ``Method -> bool``: which methods the table lists.
    """

    def __init__(self, value: Callable[[Method], Any], include: Callable[[Method], bool] = lambda m: True) -> None:
        self._value, self._include = value, include

    def _methods(self) -> dict[PeftType, Method]:
        import deltatune  # noqa: F401  (registers every built-in method)

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
