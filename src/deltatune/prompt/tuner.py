"""``PromptTuner``: the object that owns a ``PeftModel``'s virtual-token adapters (prompt tuning, P-tuning,
prefix tuning, multitask prompt tuning), with the interface ``AdapterModel`` has for weight adapters.

``PeftModel`` delegates every adapter operation to one tuner and never asks which kind it holds. The layout
PEFT users see stays PEFT's: ``peft_model.base_model`` is the user's model itself (never modified, apart from
``modules_to_save`` wrappers) and ``peft_model.prompt_encoder[adapter]`` holds each adapter's encoder. The tuner
holds the same two modules under the same names, so its ``state_dict()`` keys are ``PeftModel``'s and the files'
keys come out as PEFT writes them.

How the ``n = num_virtual_tokens`` tokens enter the model is the one thing that differs between the methods, and
it is chosen once per adapter (:func:`feed_for`): :class:`~deltatune.prompt.soft.SoftPrompt` puts them in front of
the input embeddings, :class:`~deltatune.prompt.prefix.Prefix` into every attention layer's key/value cache.

``generate`` runs the model's own ``generate`` with the extended mask and a forward pre-hook that, at the
prefill step only (empty cache), prepends the prompt or fills the cache. Position ids computed by
``generate`` from the extended mask then put every row's first real token at position ``n``, so a
left-padded row generates what it would alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.core.state_dict import adapter_state_dict as _aux_state_dict
from deltatune.core.state_dict import check_and_load, to_model_keys
from deltatune.core.tuner import validate_adapter_name
from deltatune.errors import AdapterLoadError, AdapterNameError, ConfigError, MergeError
from deltatune.prompt.config import PromptLearningConfig, fill_from_model
from deltatune.prompt.encoders import MultitaskPromptEmbedding, PromptTable
from deltatune.prompt.inputs import (
    as_kwargs,
    check_task_ids,
    extend_mask,
    find_word_embeddings,
    hooked,
    model_dtype,
)
from deltatune.prompt.prefix import Prefix
from deltatune.prompt.soft import SoftPrompt

_SOFT_PROMPT, _PREFIX = SoftPrompt(), Prefix()


def feed_for(config: PromptLearningConfig) -> SoftPrompt | Prefix:
    """How ``config``'s virtual tokens enter the model: the key/value cache (prefix tuning, cartridges:
    ``feeds_kv_cache``) or the input embeddings (every other prompt method)."""
    return _PREFIX if config.feeds_kv_cache else _SOFT_PROMPT


class PromptTuner(nn.Module):
    """The user's model plus named virtual-token adapters, one active at a time.

    Args:
        model: The user's model; it is frozen, and only ``modules_to_save`` copies are put into it.
        config: The first adapter's config (a ``PromptLearningConfig``).
        adapter_name: Its name; it is made active.
    """

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapter: str | None = None
        self.disabled = False  # inside PeftModel.disable_adapter(): forward/generate run the plain model
        self.inject_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    @staticmethod
    def build(peft_model: nn.Module, model: nn.Module, config: PromptLearningConfig, adapter_name: str,
              autocast_adapter_dtype: bool = True) -> PromptTuner:
        """The tuner of a new ``PeftModel`` (``WeightTuner.build``'s signature; the tuner needs nothing of
        ``peft_model``, and ``autocast_adapter_dtype`` does not apply to prompt encoders, as in PEFT)."""
        return PromptTuner(model, config, adapter_name)

    # ---- what it holds -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The user's model (``AdapterModel.model``'s counterpart)."""
        return self.base_model

    def peft_modules(self) -> dict[str, nn.Module]:
        """The modules ``PeftModel`` shows as attributes, in PEFT's layout: the user's model as ``base_model``
        and the encoders as ``prompt_encoder``."""
        return {"base_model": self.base_model, "prompt_encoder": self.prompt_encoder}

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    @property
    def targeted_module_names(self) -> list[str]:
        """No module of the model gets an adapter layer."""
        return []

    @property
    def adapters_enabled(self) -> bool:
        """False inside ``disable_adapter()``."""
        return not self.disabled

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Virtual tokens are no weight update: nothing LoRA could write."""
        return False

    def _active(self) -> tuple[PromptLearningConfig, PromptTable]:
        name = self.active_adapter
        if name is None:
            raise AdapterNameError("this PeftModel has no active adapter; add one and call set_adapter()")
        return self.peft_config[name], self.prompt_encoder[name]

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """``PeftModel.add_adapter``: the adapter is created, not made active (the active one keeps training).
        ``autocast_adapter_dtype`` is accepted for the common signature (see :meth:`cast_adapter_dtype`)."""
        self.inject_adapter(adapter_name, config)

    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Create ``adapter_name``'s encoder (and ``modules_to_save`` copies); everything of the base is frozen.

        Raises:
            ConfigError: a weight-adapter config, a model this method cannot drive (named in the message).
            AdapterNameError: the name is taken.
        """
        from deltatune.registry import method_for

        if not config.is_prompt_learning:
            raise ConfigError(
                f"this PeftModel holds prompt-learning adapters and cannot also hold a {config.peft_type} adapter "
                "(PEFT has the same rule); wrap a fresh base model for it"
            )
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"an adapter named {adapter_name!r} already exists; pick another name")
        model = self.base_model
        # While loading a file (see loading()) a config that does not fit is a load error.
        fill_from_model(config, getattr(model, "config", None),
                        AdapterLoadError if getattr(config, "_loading", False) else ConfigError)
        word_embeddings, device = feed_for(config).setup(model, config)
        encoder = method_for(config.peft_type).hooks.make_prompt_encoder(config, word_embeddings)
        encoder.to(device=device)
        model.requires_grad_(False)
        self.peft_config[adapter_name] = config
        try:
            self.prompt_encoder[adapter_name] = encoder
            self._wrap_modules_to_save(adapter_name, config.modules_to_save or [])
        except BaseException:
            self._remove_adapter(adapter_name)
            raise
        self._refresh()

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """Nothing to cast: the flag does not apply to prompt encoders (as in PEFT); their output is cast to the
        model's dtype on every call."""

    def _wrap_modules_to_save(self, adapter_name: str, names: list[str]) -> None:
        model = self.base_model

        def matches(key: str) -> bool:
            return any(key == n or key.endswith("." + n) for n in names)

        for key, module in list(model.named_modules()):
            if not key or ".modules_to_save." in f".{key}." or ".original_module" in f".{key}.":
                continue
            if isinstance(module, ModulesToSaveWrapper):
                if matches(key):
                    module.update(adapter_name)
            elif matches(key):
                parent_name, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _refresh(self) -> None:
        """Only the active adapter trains (unless loaded for inference); heads follow the active adapter."""
        active = self.active_adapter
        config = self.peft_config.get(active)
        trainable = config is not None and not config.inference_mode
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name == active)
        for _, wrapper in self._wrappers():
            wrapper.set_adapter([active] if active else [], trainable=trainable)
            wrapper.enable_adapters(not self.disabled)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active (and, unless loaded for inference, the trained) prompt.
        ``inference_mode`` is accepted for the common signature: the config's ``inference_mode`` decides."""
        if not isinstance(adapter_name, str):
            if len(adapter_name) != 1:
                raise ConfigError("prompt-learning adapters cannot be active together; set_adapter() takes one name")
            adapter_name = adapter_name[0]
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        self._refresh()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Raises TypeError, as PEFT: ``set_adapter`` chooses which prompt trains."""
        raise TypeError(f"Setting `requires_grad` is not supported for prompt learning methods like "
                        f"{self.peft_config[self.active_adapters[0]].peft_type}; set_adapter() chooses which prompt "
                        "trains")

    def mark_trainable(self, adapter_name: str) -> None:
        """A loaded adapter asked to be trainable: nothing to do now, it trains once it is made active."""

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block forward/generate run the plain base model."""
        self.disabled = True
        self._refresh()
        try:
            yield
        finally:
            self.disabled = False
            self._refresh()

    def _remove_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name`` everywhere (also used to roll back a failed add/load)."""
        self.peft_config.pop(adapter_name, None)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        for name, wrapper in list(self._wrappers()):
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapter_names():
                self._replace(name, wrapper.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self._remove_adapter(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._refresh()

    def unload(self) -> nn.Module:
        """The base model as it was: ``modules_to_save`` wrappers replaced by their original modules."""
        for name, wrapper in list(self._wrappers()):
            self._replace(name, wrapper.original_module)
        self.peft_config.clear()
        return self.base_model

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, child, new)

    # ---- what weight adapters do and virtual tokens cannot ------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Raises MergeError: virtual tokens have no weights to fold in."""
        raise MergeError(
            "prompt-learning adapters have no weights to merge: their virtual tokens are extra inputs (or cache "
            "entries) of every forward. Keep the PeftModel for inference, or call unload() for the base model"
        )

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Raises MergeError (see :meth:`merge_adapter`)."""
        self.merge_adapter(adapter_names, safe_merge)
        return self.base_model  # not reached

    def unmerge_adapter(self) -> None:
        """Nothing to do: virtual tokens are never merged."""

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Raises ConfigError: only LoRA adapters combine."""
        raise ConfigError("add_weighted_adapter combines LoRA adapters; prompt-learning adapters have no "
                          "weight deltas to combine")

    def update_and_allocate(self, global_step: int) -> None:
        """No per-step work (AdaLoRA's rank allocation is a weight method's)."""

    def regularization_loss(self) -> torch.Tensor | None:
        return None

    # ---- running the model --------------------------------------------------------------------
    @staticmethod
    def _no_mixed_batch(adapter_names: list[str] | None) -> None:
        if adapter_names is not None:
            raise ConfigError("adapter_names (mixed-adapter batches) is not supported for prompt-learning "
                              "adapters; run one adapter per batch (set_adapter)")

    def forward(self, args: tuple, kwargs: dict[str, Any], task_ids: torch.Tensor | None = None,
                adapter_names: list[str] | None = None) -> Any:
        """``PeftModel.forward``: the active adapter's virtual tokens go in (see :func:`feed_for`), then the
        model runs. ``task_ids`` picks MPT's per-row prompts."""
        self._no_mixed_batch(adapter_names)
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        model = self.base_model
        kwargs = as_kwargs(model.forward, args, kwargs)
        task_ids = kwargs.pop("task_ids", None)
        if self.disabled:
            return model(**kwargs)
        config, encoder = self._active()
        feed = feed_for(config)
        if model.training:
            feed.check_training(model, config)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return feed.forward_seq2seq(model, config, encoder, kwargs, task_ids)
        return feed.forward(model, config, encoder, kwargs, task_ids)

    @torch.no_grad()
    def generate(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None = None) -> Any:
        """``PeftModel.generate``: greedy, sampling, beams, padded batches, through the model's own
        ``generate``."""
        self._no_mixed_batch(adapter_names)
        model = self.base_model
        kwargs = dict(kwargs)
        task_ids = kwargs.pop("task_ids", None)
        if self.disabled:
            return model.generate(*args, **kwargs)
        config, encoder = self._active()
        ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
        if len(args) > 1:
            raise TypeError("generate() takes input_ids as its only positional argument; pass the rest by keyword")
        if ids is None or "inputs_embeds" in kwargs:
            raise ConfigError("generate() with a prompt-learning adapter needs input_ids (not inputs_embeds): the "
                              "adapter builds the embeddings itself")
        n = config.num_virtual_tokens
        word_embeddings = find_word_embeddings(model)
        dtype = model_dtype(model, word_embeddings)
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(ids) if mask is None else mask
        feed = feed_for(config)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return feed.generate_seq2seq(model, config, encoder, ids, mask, kwargs, task_ids, word_embeddings, dtype)
        feed.shift_generate_inputs(kwargs, n)
        if task_ids is not None:
            check_task_ids(task_ids, encoder, ids.shape[0], ids.device)  # fail before generating, not in the loop
        hook = feed.prefill_hook(config, encoder, dtype, seq2seq=False, word_embeddings=word_embeddings,
                                 task_ids=task_ids)
        with hooked(model, hook):
            return model.generate(ids, attention_mask=extend_mask(mask, n), **kwargs)

    # ---- files -----------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str, save_embedding_layers: bool | str = "auto"
                           ) -> dict[str, torch.Tensor]:
        """PEFT's file content: ``prompt_embeddings`` (the encoder's output; MPT: its shared prompt, plus
        ``prefix_task_cols``/``prefix_task_rows``) and any ``modules_to_save`` copies under their module's key.
        ``save_embedding_layers`` is accepted for the common signature (the embeddings are never trained)."""
        out = _aux_state_dict(self, adapter_name, containers=())
        encoder = self.prompt_encoder[adapter_name]
        out["prompt_embeddings"] = encoder.prompt_embeddings()
        if isinstance(encoder, MultitaskPromptEmbedding):
            out["prefix_task_cols"] = encoder.prefix_task_cols.detach().cpu()
            out["prefix_task_rows"] = encoder.prefix_task_rows.detach().cpu()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load a file's tensors into ``adapter_name``: every shape is checked before anything changes.

        Raises:
            AdapterLoadError: a missing ``prompt_embeddings``/task factor, or a shape that does not fit.
        """
        config = self.peft_config[adapter_name]
        encoder = self.prompt_encoder[adapter_name]
        weights = dict(weights)
        is_mpt = isinstance(encoder, MultitaskPromptEmbedding)
        needed = ["prompt_embeddings"] + (["prefix_task_cols", "prefix_task_rows"] if is_mpt else [])
        missing = [k for k in needed if k not in weights]
        if missing:
            raise AdapterLoadError(f"the adapter file lacks {missing}; it is not a {config.peft_type} adapter file")
        prompt = [weights.pop(k) for k in needed]
        expected = tuple(encoder.prompt_embeddings().shape)
        if tuple(prompt[0].shape) != expected:
            raise AdapterLoadError(
                f"prompt_embeddings in the file has shape {tuple(prompt[0].shape)}, this model needs {expected}: "
                f"the adapter was trained on another model ({config.base_model_name_or_path!r}?) or its "
                "num_virtual_tokens/token_dim/num_layers do not match; load it into the model it was trained on"
            )
        if is_mpt:
            for key, value in zip(needed[1:], prompt[1:]):
                own = getattr(encoder, key)
                if tuple(value.shape) != tuple(own.shape):
                    raise AdapterLoadError(f"{key} in the file has shape {tuple(value.shape)}, this adapter needs "
                                           f"{tuple(own.shape)}: num_tasks/num_ranks in adapter_config.json do not "
                                           "match")
        model_state = to_model_keys(self, weights, adapter_name, containers=())
        check_and_load(self, model_state, adapter_name, (), config.base_model_name_or_path)
        encoder.load_prompt_embeddings(prompt[0])
        if is_mpt:
            encoder.load_task_factors(prompt[1], prompt[2])
        self._refresh()

    @staticmethod
    @contextlib.contextmanager
    def loading(config: PeftConfig) -> Iterator[None]:
        """While loading a file: skip TEXT / SAMPLE_VOCAB / source-task initialisation (the file replaces it,
        and TEXT would need the tokenizer)."""
        init = getattr(config, "prompt_tuning_init", None)
        if init is not None:
            config.prompt_tuning_init = type(init)("RANDOM")
        config._loading = True
        try:
            yield
        finally:
            del config._loading
            if init is not None:
                config.prompt_tuning_init = init
