"""``XLoraModel``: LoRA experts loaded from their folders, one classifier per X-LoRA adapter, and the two passes.

PEFT's layout, so the state-dict names are PEFT's: ``base_model.lora_model`` is a deltatune ``LoraModel`` over the
user's model holding the experts (LoRA adapters ``"0"``, ``"1"``, ...), ``base_model.internal_xlora_classifier``
the classifiers (one per X-LoRA adapter, by name: the file keys drop the name, PEFT's
``base_model.internal_xlora_classifier.layers.<i>.weight``).

A forward (:meth:`XLoraModel.mixing`, held by ``PeftModel.forward`` / ``generate``) runs the user's model twice,
through a forward pre-hook on it (so ``generate`` gets both passes at every step):

1. the scaling pass, without gradients: every expert weighted ``scaling_pass_value`` (PEFT's dummy scalings, top-k
   applied as to real ones); its last hidden state ``h: (batch, seq, hidden)`` goes through the classifier, giving
   ``g: (batch, seq, n_layers, n_experts)``;
2. the real pass, each LoRA layer weighing its experts per token by ``g`` (:class:`deltatune.xlora.layer.XLoraGate`).

The key/value cache is off in both (``use_cache=False``): the scaling pass reads the whole sequence at every step
and must not grow the cache the real pass uses. PEFT refuses a model whose ``config.use_cache`` is on; deltatune
switches it off per call instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.core.io import load_adapter_weights, resolve_adapter_dir
from deltatune.core.state_dict import check_and_load, to_model_keys
from deltatune.errors import AdapterNameError, ConfigError, MergeError
from deltatune.lora import LORA, LoraEmbedding, LoraLinear, LoraModel
from deltatune.lora.config import LoraConfig
from deltatune.lora.variants import variants_of
from deltatune.xlora.classifier import XLoraClassifier
from deltatune.xlora.config import XLoraConfig
from deltatune.xlora.layer import _MERGE_REFUSAL, Mixture, XLoraGate, select


def _check_expert(config: PeftConfig, directory: str) -> LoraConfig:
    """The expert's LoRA config, or a refusal naming what X-LoRA cannot mix.

    Raises:
        ConfigError: not a LoRA adapter, or one whose update is not ``s · B A x`` on a Linear/Embedding layer.
    """
    if config.peft_type != PeftType.LORA:
        raise ConfigError(f"X-LoRA mixes LoRA adapters; {directory} holds a {config.peft_type} adapter")
    assert isinstance(config, LoraConfig)
    variants = variants_of(config)  # a variant's own forward would replace the gate (one variant per adapter)
    if variants:  # PEFT's words for DoRA (it raises at the first forward), then what to do
        raise ConfigError(f"X-LoRA currently does not support LoRA layers with {variants[0].label} ({directory}); "
                          "use plain LoRA experts")
    if config.lora_bias:  # the bias would be added whatever the token's weight
        raise ConfigError(f"X-LoRA mixes plain LoRA experts; {directory} has lora_bias=True")
    if LORA.hooks.rewrites_base_on_load(config):
        raise ConfigError(f"{directory} was initialised with {config.init_lora_weights!r}, which rewrites the base "
                          "weights it is loaded onto, so it cannot share them with other experts; convert it to plain "
                          "LoRA first (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if config.modules_to_save or config.trainable_token_indices or config.target_parameters:
        raise ConfigError(f"{directory} trains modules_to_save, tokens or parameters besides its LoRA layers; X-LoRA "
                          "weighs LoRA layers only")
    return config


class XLoraModel(nn.Module):
    """The user's model with X-LoRA adapters (PEFT's ``XLoraModel``): ``peft_model.base_model``.

    Args:
        model: The user's model (changed in place: its targeted layers become LoRA layers holding the experts).
        config: The first X-LoRA adapter's config, or PEFT's ``{adapter_name: config}``.
        adapter_name: Its name (it is made active).

    Raises:
        ConfigError: no experts, an expert X-LoRA cannot mix, or ``hidden_size`` is not the model's.
    """

    def __init__(self, model: nn.Module, config: XLoraConfig | dict[str, XLoraConfig],
                 adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(config, dict):
            config = config[adapter_name]
        self.__dict__["_user_model"] = model  # reached through lora_model once the first expert is in
        self.lora_model: LoraModel | None = None
        self.internal_xlora_classifier = nn.ModuleDict()
        self.peft_config: dict[str, XLoraConfig] = {}
        self.experts: dict[str, list[str]] = {}  # X-LoRA adapter -> its experts' LoRA adapter names, in order
        self.mixtures: dict[str, Mixture] = {}
        self.active_adapter: str = adapter_name
        self.trainable = not config.inference_mode  # whether the active adapter trains
        self.disabled = False  # inside disable_adapter(): the base model alone
        self.internal_xlora_scalings: torch.Tensor | None = None
        self.scalings_logging = False
        self.log_scalings: list[torch.Tensor] = []
        self.add_adapter(adapter_name, config)
        self.refresh()

    # ---- what it holds -----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The user's model (with its LoRA layers)."""
        return self.__dict__["_user_model"]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter in self.peft_config else []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("lora_model", "internal_xlora_classifier"):  # not built yet: no recursion
                raise
            return getattr(self.model, name)

    def layers_of(self, adapter_name: str) -> list[nn.Module]:
        """The LoRA layers holding ``adapter_name``'s experts, in model order (PEFT's layer numbering)."""
        experts = set(self.experts[adapter_name])
        return [layer for _, layer in self.lora_model.adapter_layers() if experts & set(layer.adapter_names())]

    # ---- adapters -------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: XLoraConfig) -> None:
        """Load ``config.adapters`` as LoRA experts and create the classifier of X-LoRA adapter ``adapter_name`` (not
        made active, frozen). On any error nothing of it is left.

        Raises:
            ConfigError: see the class; AdapterNameError: the name is taken.
        """
        if not isinstance(config, XLoraConfig):
            raise ConfigError(f"this PeftModel holds X-LoRA adapters and cannot also hold a {config.peft_type} "
                              "adapter; wrap a fresh base model for it")
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if not config.adapters:
            raise ConfigError("X-LoRA needs LoRA experts to mix: pass adapters={'0': 'path/to/lora', '1': ...} "
                              "(folders written by save_pretrained of a LoRA adapter, deltatune's or PEFT's)")
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if hidden is not None and hidden != config.hidden_size:
            raise ConfigError(f"hidden_size={config.hidden_size} but the model's hidden size is {hidden}: the "
                              f"classifier reads the last hidden state; pass hidden_size={hidden}")
        taken = [int(n) for names in self.experts.values() for n in names]
        first = max(taken) + 1 if taken else 0  # the first adapter's experts are "0", "1", ... as in PEFT
        names = [str(first + i) for i in range(len(config.adapters))]
        self.peft_config[adapter_name] = config
        self.experts[adapter_name] = []
        try:
            for name, path in zip(names, config.adapters.values()):
                self._load_expert(name, os.fspath(path))
                self.experts[adapter_name].append(name)
            layers = self.layers_of(adapter_name)
            kinds = sorted({type(layer).__name__ for layer in layers if type(layer) not in (LoraLinear, LoraEmbedding)})
            if kinds:
                raise ConfigError(f"X-LoRA weighs each token's update; the experts adapt layers without a token axis "
                                  f"({', '.join(kinds)}): use experts on Linear/Embedding layers only")
            mixture = Mixture(config)
            for number, layer in enumerate(layers):
                for index, name in enumerate(names):
                    if name in layer.adapter_names():
                        layer.lora_variant[name] = XLoraGate(mixture, number, index)
            self.mixtures[adapter_name] = mixture
            weight = next(iter(self.model.parameters()))
            classifier = XLoraClassifier(config, len(names), len(layers))
            self.internal_xlora_classifier[adapter_name] = classifier.to(weight.device, weight.dtype)
        except BaseException:
            self._remove_adapter(adapter_name)
            self.refresh()
            raise
        # The LoRA layers made the new experts active where they were alone: only the active adapter's run.
        self.refresh()

    def _load_expert(self, name: str, path: str) -> None:
        """LoRA adapter ``name`` from the folder ``path``, into ``lora_model`` (created with the first expert)."""
        directory = resolve_adapter_dir(path)
        config = _check_expert(PeftConfig.from_pretrained(directory), directory)
        config.inference_mode = True
        device = next(iter(self.model.parameters())).device
        weights = {k.removeprefix("base_model."): v for k, v in load_adapter_weights(directory, device).items()}
        with LORA.hooks.loading(config):  # LoRA's: skip initialisations the file overwrites
            if self.lora_model is None:
                self.lora_model = LoraModel(self.model, config, name)
            else:
                self.lora_model.inject_adapter(name, config)
        state = to_model_keys(self.lora_model, weights, name, LORA.containers, LORA.file_suffixes)
        check_and_load(self.lora_model, state, name, LORA.containers, config.base_model_name_or_path)

    def _remove_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s experts, classifier and config (also rolls back a failed add)."""
        self.peft_config.pop(adapter_name, None)
        self.mixtures.pop(adapter_name, None)
        if adapter_name in self.internal_xlora_classifier:
            del self.internal_xlora_classifier[adapter_name]
        for name in self.experts.pop(adapter_name, []):
            if self.lora_model is not None and name in self.lora_model.peft_config:
                self.lora_model._remove_adapter(name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self._remove_adapter(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), "")
        self.refresh()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active X-LoRA adapter; its classifier trains unless ``inference_mode``."""
        if not isinstance(adapter_name, str):
            if len(adapter_name) != 1:
                raise ConfigError("X-LoRA adapters cannot be active together; set_adapter() takes one name")
            adapter_name = adapter_name[0]
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        self.trainable = not inference_mode
        self.refresh()

    def refresh(self) -> None:
        """Apply who is active and what trains: the LoRA layers run the active adapter's experts (off while
        disabled); its classifier trains when the adapter does, its experts too with ``use_trainable_adapters``.
        Everything else is frozen."""
        for p in self.parameters():
            p.requires_grad_(False)
        name = self.active_adapter
        if name not in self.peft_config or self.lora_model is None:
            return
        experts = self.experts[name]
        self.lora_model.set_adapter(experts, inference_mode=True)
        self.lora_model.enable_adapter_layers(not self.disabled)
        for p in self.lora_model.adapter_parameters():  # enabling re-marks the active ones: set them here
            p.requires_grad_(False)
        if self.trainable and not self.disabled:
            self.internal_xlora_classifier[name].requires_grad_(True)
            if self.peft_config[name].use_trainable_adapters:
                self.lora_model.set_requires_grad(experts, True)

    def mark_trainable(self, adapter_name: str) -> None:
        """A loaded, not active, adapter asked to be trainable: its classifier (and experts, with
        ``use_trainable_adapters``) get gradients now."""
        self.internal_xlora_classifier[adapter_name].requires_grad_(True)
        if self.peft_config[adapter_name].use_trainable_adapters:
            self.lora_model.set_requires_grad(self.experts[adapter_name], True)

    # ---- PEFT's XLoraModel API -----------------------------------------------------------------------------
    def _active_config(self) -> XLoraConfig:
        return self.peft_config[self.active_adapter]

    def set_topk_lora(self, value: int | None) -> None:
        """Keep the ``value`` largest expert weights per token (``None``: all); written into the config."""
        self._active_config().top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """``global_scaling_weight``: a factor on every expert's output; written into the config."""
        self._active_config().global_scaling_weight = weight

    def get_global_scaling_weight(self) -> float:
        return self._active_config().global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The experts' weight in the scaling pass; ``None``: ``1 / n_experts``. Written into the config."""
        n = len(self.experts[self.active_adapter])
        self._active_config().scaling_pass_value = 1 / n if value is None else value

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last forward's weights ``(batch, seq, n_layers, n_experts)`` (before top-k), or ``None``."""
        return self.internal_xlora_scalings

    def enable_scalings_logging(self) -> None:
        self.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self.log_scalings.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged weights (the tensors themselves are shared)."""
        return list(self.log_scalings)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log by sequence length: ``seq_len -> (positions in the log, weights)``."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, scalings in enumerate(self.log_scalings):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(i)
            tensors.append(scalings)
        return buckets

    # ---- merging: refused --------------------------------------------------------------------------------
    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Raises MergeError: the update depends on the input."""
        raise MergeError(_MERGE_REFUSAL)

    merge_and_unload = merge_adapter

    def unload(self) -> nn.Module:
        """The user's model without the experts' LoRA layers (the classifiers are dropped)."""
        model = self.lora_model.unload() if self.lora_model is not None else self.model
        self.peft_config.clear()
        return model

    # ---- the two passes -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def mixing(self) -> Iterator[None]:
        """Held around one ``forward`` or ``generate``: every call of the user's model runs the scaling pass first
        (see the module docstring). Nothing to do while disabled."""
        if self.disabled or not self.active_adapters:
            yield
            return
        handle = self.model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)
        try:
            yield
        finally:
            # The weights stay set until the next call: activation checkpointing recomputes the experts' layers
            # during backward, after this returns, and must see the same mixture (PEFT's recompute sees none).
            handle.remove()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """PEFT's ``XLoraModel.forward``: the user's model through both passes."""
        with self.mixing():
            return self.model(*args, **kwargs)

    def _scaling_pass(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The forward pre-hook: run the scaling pass, set the experts' weights, return the real pass's arguments
        (the cache off)."""
        name = self.active_adapter
        config, mixture = self.peft_config[name], self.mixtures[name]
        classifier = self.internal_xlora_classifier[name]
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids if ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ConfigError("X-LoRA needs input_ids or inputs_embeds (the classifier weighs every token)")
        weight = classifier.layers[-1].weight
        batch, seq = tokens.shape[:2]
        mixture.gates = select(torch.full((batch, seq, classifier.n_layers, classifier.n_classes),
                                          config.scaling_pass_value, device=weight.device, dtype=weight.dtype), config)
        if hasattr(getattr(model, "config", None), "use_cache"):
            kwargs["use_cache"] = False
        scaling_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}  # its loss would be thrown away
        scaling_kwargs.update(output_hidden_states=True, return_dict=True)
        with torch.no_grad():
            hidden = model.forward(*args, **scaling_kwargs).hidden_states[-1]
        scalings = classifier(hidden.to(weight.dtype))
        self.internal_xlora_scalings = scalings
        if self.scalings_logging:
            self.log_scalings.append(scalings)
        mixture.gates = select(scalings, config)
        return args, kwargs


__all__ = ["XLoraModel"]
