"""PiSSA / OLoRA adapters as plain LoRA on the original base model.

PiSSA and OLoRA start from ``A0, B0`` taken out of the base weight, which becomes the residual
``W_res = W - s B0 A0``; the trained adapter ``A, B`` only makes sense on top of ``W_res``. Written as a change of
the *original* ``W`` it is ``W_res + s B A - W = s (B A - B0 A0) = s [B, -B0] [A; A0]``: a LoRA of twice the rank
with the same scaling, which any base model, ``peft`` included, can load. The initial factors come from the
adapter saved right after initialisation (PEFT's ``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import copy
import math

import torch

from deltatune.errors import AdapterLoadError, ConfigError
from deltatune.lora.config import LoraConfig

MUTATING_INITS = ("pissa", "olora")


def mutates_base(config: object) -> bool:
    """Whether ``config`` is a LoRA config whose initialisation rewrote the base weights (PiSSA, OLoRA)."""
    init = getattr(config, "init_lora_weights", True)
    return isinstance(config, LoraConfig) and isinstance(init, str) and init.startswith(MUTATING_INITS)


def expects_rewritten_base(init: object) -> bool:
    """Whether an adapter saved as created with this ``init_lora_weights`` works only on the base its initialisation
    rewrote: PiSSA/OLoRA/CorDA/LoRA-GA (the residual ``W - s B0 A0``) and LoftQ (its quantised ``Q``). Loading one
    rewrites the base it is loaded onto, so it cannot share a base with other adapters."""
    from deltatune.lora.init import RESIDUAL_BASE_INITS

    return init in RESIDUAL_BASE_INITS or (isinstance(init, str) and init.startswith(MUTATING_INITS))


def converts_to_plain_lora(config: object) -> bool:
    """Whether ``save_pretrained(path_initial_model_for_weight_conversion=...)`` can write ``config``'s adapter as
    plain LoRA: every init that moved ``s B0 A0`` out of the base (PEFT's list: PiSSA, OLoRA, CorDA, LoRA-GA)."""
    return mutates_base(config) or getattr(config, "init_lora_weights", True) in ("corda", "lora_ga")


def _factor(key: str) -> str | None:
    """``"A"`` / ``"B"`` for a LoRA factor's key (Linear/Conv ``lora_A.weight``, Embedding ``lora_embedding_A``)."""
    for factor in ("A", "B"):
        if key.endswith((f".lora_{factor}.weight", f".lora_embedding_{factor}")):
            return factor
    return None


def to_plain_lora(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: LoraConfig,
                  initial_dir: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The trained ``state`` of a PiSSA/OLoRA adapter and its ``initial`` state (same keys) -> a rank-``2r``
    plain LoRA state and config for the original base: ``A' = [A; A0]: (2r, in)``, ``B' = [B, -B0]: (out, 2r)``,
    ``lora_alpha`` doubled (``sqrt(2)``-fold under rsLoRA) so the scaling stays; everything else is kept.

    Raises:
        ConfigError: DoRA or ``lora_bias`` adapters (their magnitude/bias are not a low-rank difference).
        AdapterLoadError: ``initial`` is not this adapter's initial state (other keys or shapes).
    """
    if config.use_dora or config.lora_bias:
        raise ConfigError("converting a PiSSA/OLoRA adapter to plain LoRA is not defined with use_dora or lora_bias "
                          "(the magnitude/bias is not a low-rank difference); keep the residual base instead")
    factors = {k for k in state if _factor(k)}
    mismatch = sorted(factors ^ {k for k in initial if _factor(k)}) or sorted(
        k for k in factors if initial[k].shape != state[k].shape)
    if mismatch:
        raise AdapterLoadError(f"{initial_dir} does not hold this adapter's initial state (e.g. {mismatch[:2]}); "
                               "pass the directory saved right after get_peft_model(), before training")
    out = dict(state)
    for key in factors:
        now, start = state[key], initial[key].to(state[key].device, state[key].dtype)
        out[key] = torch.cat([now, start]) if _factor(key) == "A" else torch.cat([now, -start], dim=1)
    grow = math.sqrt(2) if config.use_rslora else 2.0  # alpha / r (or / sqrt(r)) unchanged at rank 2r
    plain = copy.deepcopy(config)
    plain.init_lora_weights = True
    plain.r = 2 * config.r
    plain.lora_alpha = grow * config.lora_alpha
    plain.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    plain.alpha_pattern = {k: grow * v for k, v in (config.alpha_pattern or {}).items()}
    return out, plain


def rebuild_residual(model: torch.nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """After loading a PiSSA/OLoRA adapter saved as it is (not converted), turn the original base weights of its
    layers into the residual ``W - s B0 A0`` the adapter was trained on, as PEFT does on load (it re-runs the init on
    the base it is given; the loaded ``A, B`` then replace ``A0, B0``). ``"pissa"`` and ``"olora"`` are deterministic,
    so the reloaded model gives the saved model's outputs. ``"pissa_niter_N"`` starts from a randomised SVD, which
    deltatune draws from a fixed seed: exact again for adapters deltatune created, only approximate for ones PEFT
    created (PEFT draws from the global RNG, at training and at load alike), which a warning says;
    ``path_initial_model_for_weight_conversion`` gives an exact file for either. On any error the base weights are
    restored.

    Only LoRA ``Linear``/``Conv1D`` layers are rebuilt: PEFT's PiSSA/OLoRA init leaves other layer types' bases as
    they are (and deltatune refuses those inits there when creating an adapter).
    """
    import warnings

    from deltatune.lora.layer import LoraLinear

    init = config.init_lora_weights
    if not mutates_base(config):
        return
    if init.startswith("pissa_niter_"):
        warnings.warn(
            f"adapter {adapter_name!r} was initialised with {init!r} (a randomised SVD): its residual base is rebuilt "
            "with deltatune's fixed-seed draw, exact for adapters deltatune created but only approximate for ones "
            "PEFT created (PEFT draws from the global RNG); save with path_initial_model_for_weight_conversion for "
            "an exact plain-LoRA file", stacklevel=3)
    done: list[tuple[LoraLinear, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLinear) and adapter_name in module.r:
                    a, b = module.rebuild_residual(adapter_name, init)
                    done.append((module, a, b))
    except BaseException:
        with torch.no_grad():
            for module, a, b in reversed(done):
                module.restore_base(adapter_name, a, b)
        raise
