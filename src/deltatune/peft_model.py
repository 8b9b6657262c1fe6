"""``PeftModel``: a model with named adapters, saved and loaded in Hugging Face PEFT's file format.

The attribute layout is PEFT's (``peft_model.base_model.model`` is the user's model), so the
state-dict keys, and with them the files, are the same in both libraries. Prompt-learning adapters
(virtual tokens) keep PEFT's other layout: ``base_model`` is the user's model itself and
``prompt_encoder[name]`` the adapters.

``PeftModel`` does no adapter work itself: it delegates every operation (add, switch, delete, disable, merge,
unload, forward, generate, state dict, load) to one tuner, ``_tuner``, and never asks which kind it holds:
:class:`deltatune.core.weight_tuner.WeightTuner` (the method's ``AdapterModel`` in ``base_model``, plus the
per-call work around it: mixed-adapter batches, the methods' ``activate`` hooks, embedding layers in files) or
:class:`deltatune.prompt.tuner.PromptTuner` (virtual tokens). What is left here is the shared part: files and
directories, the Hub, the model card, parameter counts, and the task subclasses (``PeftModelForCausalLM``...).
What a method adds to saving and loading (LoRA: PiSSA & co. converted on save, their residual base rebuilt on
load) comes from its registry hooks; this module names no method.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from deltatune.config import PeftConfig, PeftWarning, TaskType
from deltatune.core.io import (
    check_adapter_pair,
    load_adapter_weights,
    resolve_adapter_dir,
    save_adapter_files,
    sweep_stale_temp_files,
)
from deltatune.core.state_dict import remap_keys
from deltatune.core.tuner import validate_adapter_name
from deltatune.core.weight_tuner import WeightTuner
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.registry import hook_for, method_for
from deltatune.status import get_layer_status, get_model_status, parameter_counts


def _warn_if_ungathered(state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """PEFT's warning for LoRA factors that are not matrices: ``lora_A: (r, in)`` / ``lora_B: (out, r)`` saved
    1-D or empty mean DeepSpeed ZeRO-3 / FSDP left each rank its flat shard (the gather was forgotten). The file
    is still written, as PEFT's: a caller may skip the gather on purpose."""
    bad = [(k, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)
           and (".lora_A" in k or ".lora_B" in k) and (v.dim() < 2 or v.numel() == 0)]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        warnings.warn(
            f"Adapter {adapter_name!r}: {len(bad)} LoRA tensor(s) have invalid shape: "
            f"{', '.join(f'{k}:{shape}' for k, shape in bad[:3])}{more}. A 1-D or zero-sized lora_A / lora_B tensor "
            "indicates that DeepSpeed ZeRO-3 / FSDP shards were not gathered before save_pretrained() and are "
            "therefore incomplete. Save inside deepspeed.zero.GatheredParameters([...], modifier_rank=None) "
            "(ZeRO-3) or FullyShardedDataParallel.summon_full_params(model) (FSDP).", PeftWarning, stacklevel=3)


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
        validate_adapter_name(adapter_name)
        self._add_task_heads(peft_config)
        tuner = tuner_cls_for(peft_config).build(self, model, peft_config, adapter_name, autocast_adapter_dtype)
        for name, module in tuner.peft_modules().items():  # PEFT's attribute layout (base_model, prompt_encoder)
            setattr(self, name, module)
        self.__dict__["_tuner"] = tuner  # not a submodule: its modules are registered above, under PEFT's names

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
            if name == "_tuner":  # a subclass that built base_model itself (PeftMixedModel): weight adapters
                tuner = self.__dict__["_tuner"] = WeightTuner(self, self.base_model)
                return tuner
            return getattr(self.base_model, name)

    # ---- what it holds -----------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._tuner.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self._tuner.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self._tuner.active_adapters

    @property
    def _is_prompt_learning(self) -> bool:
        """PEFT's attribute, which its utilities (and ``deltatune.status``) read: whether the adapters are virtual
        tokens (a tuner other than the weight adapters'). ``PeftModel`` itself never asks; its tuner knows."""
        return not isinstance(self._tuner, WeightTuner)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (within the user's model, e.g. ``model.layers.0.self_attn.q_proj``) of the modules that got adapter
        layers, in the order adapters first adapted them; PEFT's attribute of the same name. Empty for
        prompt-learning adapters."""
        return list(self._tuner.targeted_module_names)

    def get_layer_status(self) -> list[Any]:
        """PEFT's ``TunerLayerStatus`` of every adapter layer (see :func:`deltatune.status.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """PEFT's ``TunerModelStatus`` of the model (see :func:`deltatune.status.get_model_status`)."""
        return get_model_status(self)

    def get_base_model(self) -> nn.Module:
        return self._tuner.model

    # ---- PEFT's PeftModel attributes (tuner-level API) -----------------------------------------
    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter (the first one when several are active)."""
        return self.peft_config[self.active_adapters[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether any adapter acts on the output now: one is active and adapters are not disabled
        (``disable_adapter()``)."""
        return bool(self.active_adapters) and self._tuner.adapters_enabled

    @property
    def modules_to_save(self) -> set[str] | None:
        """Every adapter's ``modules_to_save`` names together; ``None`` when there are none (PEFT's)."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The wrapped model's ``dtype`` (a ``transformers`` model's attribute); ``None`` for a plain module."""
        return getattr(self.get_base_model(), "dtype", None)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on (or off) for exactly the tensors of ``adapter_names`` (see
        ``AdapterModel.set_requires_grad``).

        Raises:
            TypeError: prompt-learning adapters (as PEFT; use ``set_adapter`` to choose the trained prompt).
        """
        self._tuner.set_requires_grad(adapter_names, requires_grad)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapter layers hold additive updates plain LoRA can write (``False`` for prompt learning)."""
        return self._tuner.supports_lora_conversion(adapter_name)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the input embeddings' output require grad, so activation checkpointing of a frozen model has
        something to backpropagate through (transformers' ``enable_input_require_grads`` when the model has it,
        else a forward hook on ``get_input_embeddings()``). Quantised models are left as they are (their
        preparation is ``prepare_model_for_kbit_training``). Returns ``model``."""
        if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
        return model

    # ``transformers.Trainer`` reads this in ``__init__``. Given the wrapper, Trainer would train it as an unknown
    # ``nn.Module`` and checkpoint a full ``model.safetensors`` of internal key names (or crash on tied
    # embeddings), so refuse there, in one line, before any training (deltatune.integrations takes the wrapper).
    @property
    def is_distributed_loading_by_transformers(self) -> bool:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("transformers.trainer") and not self.__dict__.get("_claimed_by_trainer", False):
            raise ConfigError(
                "transformers.Trainer (and trl's trainers) would save this deltatune model as a full model with "
                "internal key names; use deltatune.integrations.transformers.AdapterTrainer or "
                "deltatune.integrations.trl.SFTTrainer/DPOTrainer/GRPOTrainer, which save adapter files")
        return bool(getattr(self.get_base_model(), "is_distributed_loading_by_transformers", False))

    def forward(self, *args: Any, task_ids: torch.Tensor | None = None, adapter_names: list[str] | None = None,
                **kwargs: Any) -> Any:
        """The wrapped model's forward, with the same arguments (``input_ids``, ``attention_mask``, ``labels``,
        ...; positional ones pass through in the model's own order).

        ``task_ids`` (one per row) picks multitask prompt-tuning prompts and Poly's mixtures; other methods ignore
        them (as PEFT), so one training loop can feed every method the same batch (``generate`` takes them too).
        ``adapter_names`` (one per batch row, ``"__base__"`` for none) runs each row through its own adapter in one
        batched pass (inference only).
        """
        return self._tuner.forward(args, kwargs, task_ids=task_ids, adapter_names=adapter_names)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        return self._tuner.generate(args, kwargs, adapter_names=adapter_names)

    # ---- training hooks -------------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """Per-step work of the trained method, e.g. AdaLoRA's rank allocation (a no-op for LoRA).

        Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (AdaLoRA reads the
        gradients), with ``global_step`` = optimizer steps taken so far, this one included.
        """
        self._tuner.update_and_allocate(global_step)

    def regularization_loss(self) -> torch.Tensor | None:
        """The trained method's regulariser (AdaLoRA's orthogonality penalty), or ``None``.

        ``forward`` already adds it to ``outputs.loss`` in training mode; a training loop that computes
        its own loss from the logits adds this instead.
        """
        return self._tuner.regularization_loss()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; tied parameters are counted once, a 4-bit parameter as two
        values per stored byte."""
        return parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / max(total, 1)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # ---- adapters ----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add another adapter (not made active: call :meth:`set_adapter`).

        ``autocast_adapter_dtype`` (PEFT's flag): ``True`` keeps the new adapter's tensors in float32 over a
        float16/bfloat16 base (small adapters train badly in half precision); ``False`` stores them in the base
        layer's dtype.

        Raises:
            ConfigError: an adapter of the other family (virtual tokens beside weight adapters, or the reverse).
        """
        validate_adapter_name(adapter_name)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _model_name_or_path(self.get_base_model())
        self._add_task_heads(peft_config)
        self._tuner.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """See :meth:`deltatune.core.weight_tuner.WeightTuner.cast_adapter_dtype` (``PeftMixedModel`` calls it
        after building its tuner)."""
        self._tuner.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter and trainable, as PEFT's (even if its config is in inference
        mode); ``inference_mode=True`` keeps it frozen."""
        self._tuner.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Delete ``adapter_name``, or each of a list of names (PEFT's mixed model takes a list: all names are
        checked first, so an unknown one deletes nothing)."""
        if not isinstance(adapter_name, str):
            names = list(adapter_name)
            if missing := sorted(set(names) - set(self.peft_config)):
                raise ValueError(f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
            for name in names:
                self.delete_adapter(name)
            return
        self._tuner.delete_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total", svd_from_factors: bool = False) -> None:
        """Add LoRA adapter ``adapter_name``, a weighted combination of ``adapters`` (not made active).

        ``combination_type``: ``linear``, ``cat``, ``svd``, ``ties``, ``ties_svd``, ``dare_linear``,
        ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``, ``magnitude_prune_svd``;
        the math is in :mod:`deltatune.lora.arithmetic`. ``svd_from_factors`` (deltatune only): for ``svd``, the SVD
        of the stacked factors instead of the dense update (same result up to rounding, much faster).
        """
        self._tuner.add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank=svd_rank,
                                         svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                                         svd_driver=svd_driver, density=density,
                                         majority_sign_method=majority_sign_method, svd_from_factors=svd_from_factors)

    def _remove_adapter(self, adapter_name: str) -> None:
        """Undo a half-done add/load of ``adapter_name``."""
        self._tuner._remove_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this block the model computes exactly the base model's output."""
        with self._tuner.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active adapters (or ``adapter_names``) into the base weights; unmerge_adapter() undoes it.

        Adapters already merged are skipped with a :class:`PeftWarning`, as PEFT does.

        Raises:
            MergeError: prompt-learning adapters (nothing to merge).
        """
        self._tuner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._tuner.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the adapters into the weights and return the plain base model (no adapter layers left)."""
        return self._tuner.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self._tuner.unload()

    # ---- files -------------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str | None = None,
                               save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys PEFT's files use.

        ``save_embedding_layers``: also file the full input/output embeddings (needed after resizing the
        vocabulary). ``"auto"`` does so when ``target_modules`` names ``embed_tokens`` or ``lm_head``, as PEFT.
        """
        return self._tuner.adapter_state_dict(adapter_name or self.active_adapters[0], save_embedding_layers)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **kwargs: Any) -> None:
        """Write each adapter as ``adapter_model.safetensors`` + ``adapter_config.json``.

        The ``"default"`` adapter goes into ``save_directory`` itself, any other into
        ``save_directory/<name>``, as PEFT does. The two files are replaced as a pair (``core.io.save_adapter_files``):
        a reader sees the old adapter or the new one, also after a crash in the middle.

        Sharded with FSDP2 (``fully_shard``): call this on every rank (``is_main_process=rank == 0``); the
        shards are gathered into full tensors and only the main process writes.

        ``path_initial_model_for_weight_conversion`` (PEFT's name): the directory where a PiSSA/OLoRA adapter was
        saved right after initialisation; the adapter is then written as a plain LoRA of twice the rank that
        works on the *original* base model (:mod:`deltatune.lora.conversion`), not only on the residual one.
        """
        from deltatune.distributed import full_state, is_dtensor

        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:  # each becomes a directory name below: nothing may point outside save_directory
            validate_adapter_name(name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"cannot save adapters {unknown}: this model has {sorted(self.peft_config)}")
        convert = None
        if path_initial_model_for_weight_conversion is not None:
            # The method's convert_on_save hook checks ``names`` (LoRA's refuses other methods' adapters by name)
            # and returns the converter applied to each adapter's file state below.
            make = hook_for("convert_on_save", [self.peft_config[n].peft_type for n in names])
            if make is None:
                raise ConfigError("path_initial_model_for_weight_conversion: no registered method converts adapters")
            convert = make(self.peft_config, names, path_initial_model_for_weight_conversion)
        states: dict[str, dict[str, torch.Tensor]] = {}
        if any(is_dtensor(p) for p in self.parameters()):  # FSDP: a collective, so before the rank check
            for name in names:
                states[name] = full_state(self.get_adapter_state_dict(name, kwargs.get("save_embedding_layers",
                                                                                        "auto")))
        if not is_main_process:
            return
        for name in names:
            out_dir = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out_dir, exist_ok=True)
            state = states.get(name)
            if state is None:
                state = self.get_adapter_state_dict(name, kwargs.get("save_embedding_layers", "auto"))
            config = self.peft_config[name]
            if convert is not None:
                state, config = convert(name, state, config)
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = _model_name_or_path(self.get_base_model())
            if config.task_type is None and config.auto_mapping is None:
                # Without a task type, PEFT records which class to rebuild the base model with.
                cls = type(self.get_base_model())
                config.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
            _warn_if_ungathered(state, name)
            data = config.to_dict()
            data["inference_mode"] = True  # PEFT's files say so; loading decides trainability
            # Weights and config replaced as one pair (a reader never sees one file of each save).
            save_adapter_files(out_dir, state, data, safe_serialization=safe_serialization)
            sweep_stale_temp_files(out_dir)  # leftovers of saves killed over an hour ago
            save_beside = method_for(config.peft_type).hooks.save_beside  # e.g. X-LoRA's experts, PEFT's layout
            if save_beside is not None:
                save_beside(self, name, out_dir, safe_serialization)
        # PEFT writes README.md too; after the adapters, so that a crash or a full disk here costs the card only.
        os.makedirs(save_directory, exist_ok=True)
        self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write ``output_dir/README.md`` (or update the user's) by PEFT's rules: ``library_name: peft``,
        ``base_model`` and tags in the metadata, a ``- deltatune <version>`` framework line (see
        :mod:`deltatune.model_card`)."""
        from deltatune import __version__
        from deltatune.model_card import hub_base_model, update_model_card

        base = self.get_base_model()
        configs = list(self.peft_config.values())
        name = next((c.base_model_name_or_path for c in configs if c.base_model_name_or_path), None)
        # A plain torch module has no Hub identity (PEFT writes no base_model for it, whatever the config says).
        base_model = hub_base_model(name or _model_name_or_path(base)) if getattr(base, "config", None) else None
        tags = {"deltatune", *(getattr(base, "model_tags", None) or [])}
        tags.update(str(c.peft_type).lower() for c in configs)
        if type(base).__module__.startswith("transformers."):
            tags.add("transformers")
        if base_model:
            tags.add(f"base_model:adapter:{base_model}")  # the Hub lists the adapter under its base model
        update_model_card(output_dir, base_model=base_model, tags=sorted(tags),
                          peft_types=[str(c.peft_type) for c in configs],
                          causal_lm=isinstance(self, PeftModelForCausalLM), version=__version__)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, create_pr: bool = False, revision: str | None = None,
                    commit_description: str | None = None, tags: list[str] | None = None,
                    safe_serialization: bool = True, **save_kwargs: Any) -> Any:
        """Save the adapters (``save_pretrained``, model card included) to a temporary directory and upload it as one
        commit to the Hub repository ``repo_id`` (created if missing), as PEFT's ``push_to_hub``. Returns
        huggingface_hub's commit info.

        Raises:
            ConfigError: huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``), so nothing can be pushed.
        """
        import tempfile

        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"cannot push to {repo_id!r}: huggingface_hub is offline (HF_HUB_OFFLINE=1); unset it, "
                              "or save_pretrained(dir) now and upload the directory later")
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, **save_kwargs)
            if tags:  # PEFT's push_to_hub(tags=...): added to the card's metadata
                from deltatune.model_card import add_card_tags

                add_card_tags(tmp, tags)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload model",
                                     commit_description=commit_description)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **kwargs: Any) -> PeftModel:
        """Load an adapter directory (written by deltatune or PEFT) onto ``model``.

        Raises:
            AdapterLoadError: missing/corrupt files, or tensors that do not fit ``model``. ``model`` is left
                as it was.
        """
        validate_adapter_name(adapter_name)
        directory = resolve_adapter_dir(model_id, kwargs.get("subfolder"))
        pair = config is None  # the directory's own config: it must be the one the weights were saved with
        config = config or PeftConfig.from_pretrained(directory)
        key_mapping = kwargs.get("key_mapping")
        if key_mapping is None and not config.is_prompt_learning:  # as PEFT: the model's own renames, if any
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        weights = remap_keys(load_adapter_weights(directory, device=_device_of(model)), key_mapping)
        _fit_config_to_file(config, weights, directory)
        config.inference_mode = not is_trainable
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type]
        with tuner_cls_for(config).loading(config):
            peft_model = target_cls(model, config, adapter_name,
                                    autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
        try:
            peft_model._load_weights(weights, adapter_name)
            if pair:  # after the shape checks, whose messages are more specific; catches what fits but differs
                check_adapter_pair(directory)
            after_load = method_for(config.peft_type).hooks.after_load  # e.g. LoRA: PiSSA's residual base
            if after_load is not None:  # last: it restores the base itself if it fails
                after_load(peft_model, adapter_name)
        except BaseException:
            peft_model._remove_adapter(adapter_name)
            raise
        peft_model.set_adapter(adapter_name, inference_mode=not is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     config: PeftConfig | None = None, **kwargs: Any) -> Any:
        """Load another adapter directory under ``adapter_name`` (not made active).

        Returns PEFT's load result, torch's ``(missing_keys, unexpected_keys)`` named tuple. deltatune loads
        strictly (a file that lacks tensors or has extra ones is refused with an ``AdapterLoadError`` and nothing
        changes), so after a load both lists are empty: code that checks them, as PEFT users do, keeps working.
        """
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"an adapter named {adapter_name!r} is already loaded; pick another name")
        directory = resolve_adapter_dir(model_id, kwargs.get("subfolder"))
        pair = config is None
        config = config or PeftConfig.from_pretrained(directory)
        weights = remap_keys(load_adapter_weights(directory, device=_device_of(self)), kwargs.get("key_mapping"))
        _fit_config_to_file(config, weights, directory)
        config.inference_mode = not is_trainable
        with tuner_cls_for(config).loading(config):
            self.add_adapter(adapter_name, config,
                             autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
        try:
            self._load_weights(weights, adapter_name)
            if pair:
                check_adapter_pair(directory)
            after_load = method_for(config.peft_type).hooks.after_load  # e.g. LoRA: PiSSA's residual base
            if after_load is not None:  # last: it restores the base itself if it fails
                after_load(self, adapter_name)
        except BaseException:
            self._remove_adapter(adapter_name)
            raise
        # As PEFT: the other tensors keep their requires_grad (add_adapter keeps them), and the new adapter, not
        # made active, trains only when asked to (is_trainable=True).
        if is_trainable:
            self._tuner.mark_trainable(adapter_name)
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        self._tuner.load_weights(weights, adapter_name)


def tuner_cls_for(config: PeftConfig) -> type:
    """The tuner a ``PeftModel`` whose first adapter is ``config`` delegates to, the one choice of kind: the method's
    ``peft_tuner`` hook (the virtual-token methods' ``PromptTuner``), else :class:`WeightTuner`."""
    return method_for(config.peft_type).hooks.peft_tuner or WeightTuner


def _fit_config_to_file(config: PeftConfig, weights: dict[str, torch.Tensor], directory: str) -> None:
    """The method's ``fit_config_to_file`` hook, where it has one (see the registry); then, before anything is
    built from the config, its sizes are checked against the file's shapes (``r: 1000000000`` would otherwise
    allocate its tensors before the mismatch is found)."""
    from deltatune.core.checks import check_config_fits_file

    fit = method_for(config.peft_type).hooks.fit_config_to_file
    if fit is not None:
        fit(config, weights)
    check_config_fits_file(config, weights, directory)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ``transformers.Trainer`` keeps only the dataset columns named in ``model.forward``'s signature (it looks
# through ``peft.PeftModel`` alone), so the signature names the usual batch keys, in PEFT's positional order.
PeftModel.forward.__signature__ = inspect.Signature([
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    *(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
      for name in ("input_ids", "attention_mask", "inputs_embeds", "labels")),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
      for name in ("token_type_ids", "position_ids", "decoder_input_ids", "decoder_attention_mask",
                   "decoder_inputs_embeds", "pixel_values", "task_ids", "adapter_names")),
    inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
])


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


# PEFT's table (``peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING``; ``deltatune.mapping`` re-exports it): the class
# ``get_peft_model`` and ``PeftModel.from_pretrained`` build for a config's ``task_type``.
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def _check_task(task_type: TaskType | None) -> None:
    if task_type is not None and not isinstance(task_type, TaskType):
        raise ConfigError(f"task_type={task_type!r} is not a TaskType")
