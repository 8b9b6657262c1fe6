"""TRL's trainers for deltatune models: ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``.

Drop-in subclasses: they take a deltatune ``PeftModel`` as ``model``, or ``peft_config=<deltatune config>``
where TRL's take a PEFT one, and otherwise the same arguments. TRL recognises a PEFT model only as
``peft.PeftModel``, so instead of pretending to be one, these trainers give TRL the *base* model (a
``PreTrainedModel`` that deltatune adapted in place; TRL treats it as a plain model and patches its fused LM
head onto it) and keep the deltatune wrapper for adapter files (see :mod:`deltatune.integrations.transformers`).

DPO's reference (and GRPO's, with ``beta > 0``) is the same model with its adapter disabled,
:class:`AdapterDisabledReference`: no second copy of the base model is loaded.
"""

from __future__ import annotations

from typing import Any

import trl
from torch import nn
from trl.trainer.utils import add_fused_lm_head

from deltatune.config import PeftConfig
from deltatune.errors import ConfigError
from deltatune.integrations.transformers import AdapterTrainerMixin, foreign_config_error, needs_wrapper_forward
from deltatune.peft_model import PeftModel


class AdapterDisabledReference(nn.Module):
    """A reference model that is the policy with its adapter disabled (shares every weight; holds none).

    It keeps the policy out of its children, so TRL's ``disable_dropout_in_model`` / ``prepare_model`` on the
    reference leave the policy alone. ``forward`` runs the policy's base model (TRL's fused LM head included)
    under ``disable_adapter()``; ``base_model`` is its backbone, likewise, for TRL's fused head on this module.
    """

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)  # not a submodule (see above)

    @property
    def config(self):  # noqa: ANN201 - the base model's PretrainedConfig
        return self._policy.get_base_model().config

    @property
    def base_model(self):  # noqa: ANN201 - a callable backbone
        backbone = self._policy.get_base_model().base_model
        policy = self._policy

        def run(*args: Any, **kwargs: Any) -> Any:
            with policy.disable_adapter():
                return backbone(*args, **kwargs)

        return run

    def get_output_embeddings(self) -> nn.Module:
        return self._policy.get_base_model().get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._policy.disable_adapter():
            return self._policy.get_base_model()(*args, **kwargs)


class _TRLAdapterMixin(AdapterTrainerMixin):
    def __init__(self, model: Any = None, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("peft_config")
        if config is not None and isinstance(config, PeftConfig):
            kwargs.pop("peft_config")
            if isinstance(model, PeftModel):
                raise ConfigError("model already is a deltatune PeftModel; pass peft_config=None (or the base model)")
            if isinstance(model, str):
                from transformers import AutoModelForCausalLM

                train_args = kwargs.get("args") or next((a for a in args if hasattr(a, "model_init_kwargs")), None)
                init_kwargs = dict(getattr(train_args, "model_init_kwargs", None) or {})
                model = AutoModelForCausalLM.from_pretrained(model, **init_kwargs)
            from deltatune.mapping import get_peft_model

            model = get_peft_model(model, config)
        elif config is not None and isinstance(model, PeftModel):
            raise foreign_config_error(config) or ConfigError("pass peft_config=None with a deltatune PeftModel")
        if isinstance(model, PeftModel) and needs_wrapper_forward(model):
            raise ConfigError(f"{type(self).__name__} trains weight adapters (LoRA, DoRA, IA3, ...); prompt-learning "
                              "adapters and AdaLoRA need the wrapper's forward, which TRL's fused LM head bypasses: "
                              "use deltatune.integrations.transformers.AdapterTrainer")
        if isinstance(model, PeftModel):
            args, kwargs = self._before_trl_init(model, args, kwargs)
        super().__init__(model, *args, **kwargs)

    def _before_trl_init(self, model: PeftModel, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs


class SFTTrainer(_TRLAdapterMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` for a deltatune model (or ``peft_config=deltatune.LoraConfig(...)``)."""


class DPOTrainer(_TRLAdapterMixin, trl.DPOTrainer):
    """``trl.DPOTrainer``; with a deltatune model and no ``ref_model``, the reference is the adapter disabled."""

    def __init__(self, model: Any = None, ref_model: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, ref_model, *args, **kwargs)

    def _before_trl_init(self, model: PeftModel, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args and args[0] is None:  # ref_model, positional second as in TRL
            args = (AdapterDisabledReference(model), *args[1:])
        return args, kwargs


class GRPOTrainer(_TRLAdapterMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer``: generation runs the policy with its adapter on; with ``beta > 0`` the reference is the
    policy with its adapter disabled (:class:`AdapterDisabledReference`), not a second model loaded from the hub.
    """

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: Any = None, *rest: Any,
                 **kwargs: Any) -> None:
        ours = isinstance(model, PeftModel) or isinstance(kwargs.get("peft_config"), PeftConfig)
        beta = float(getattr(args, "beta", 0.0) or 0.0) if ours else 0.0
        if ours and getattr(args, "sync_ref_model", False):
            raise ConfigError("sync_ref_model=True needs a second reference model; with a deltatune adapter the "
                              "reference is the adapter disabled: pass sync_ref_model=False")
        # TRL builds its reference by loading the model again from config.name_or_path whenever beta != 0 and the
        # model is not a peft.PeftModel. Hide beta while TRL's __init__ runs (nothing else there reads it), then
        # install the adapter-disabled reference the way TRL installs its own (fused LM head, no dropout to turn
        # off: it holds no modules of its own, and no accelerator.prepare: it holds no parameters).
        if beta:
            args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, *rest, **kwargs)
        finally:
            if beta:
                args.beta = beta
        if beta and self.deltatune_model is not None:
            self.beta = beta
            self.ref_model = AdapterDisabledReference(self.deltatune_model)
            add_fused_lm_head(self.ref_model, temperature=self.temperature,
                              cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)


__all__ = ["AdapterDisabledReference", "DPOTrainer", "GRPOTrainer", "SFTTrainer"]
