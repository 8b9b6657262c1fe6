"""``LoraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError, ConfigTypeError

# Every value PEFT 0.21 accepts loads (issue 19); the data-driven ones are refused only when *creating* an adapter
# (deltatune.lora.init.check_creatable), since after training they are plain A and B.
_INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "orthogonal", "eva", "corda", "loftq", "lora_ga",
                "mica")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Value of the first key of ``patterns`` that matches the end of ``module_name`` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation (Hu et al., 2021): ``W x + (lora_alpha / r) · B A x`` with ``B: (out, r)``,
    ``A: (r, in)`` trained and ``W`` frozen.

    Args:
        r: Rank of the update; must be positive.
        lora_alpha: Numerator of the scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: Dropout on the adapter's input (the base path never sees it).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        rank_pattern, alpha_pattern: ``{regex: value}`` overriding ``r``/``lora_alpha`` per module.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: the output is unchanged), ``False`` (both
            random, for tests), ``"gaussian"``, ``"pissa"``/``"pissa_niter_N"``, ``"olora"`` or ``"orthogonal"``
            (A, B non-zero with ``B A = 0``; even ``r``), ``"mica"`` (B = the minor left singular vectors of the
            base weight, frozen; A = 0; Linear and Embedding). The data-driven ones, each in its module
            ``deltatune.lora.<init>``: ``"eva"`` (after ``get_peft_model``: ``initialize_lora_eva_weights``),
            ``"corda"`` (before: ``preprocess_corda``), ``"lora_ga"`` (before: ``preprocess_loraga``), ``"loftq"``
            (with ``loftq_config``; quantises the base); ``deltatune.lora.init.get_peft_model_with_data`` runs any.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
        use_dora: Weight-decomposed LoRA (Liu et al., 2024) on Linear and Conv layers.
        lora_bias: Give ``lora_B`` a trainable bias.
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # Written by PEFT 0.21 into every LoRA adapter_config.json. The init sub-configs (loftq/eva/corda/lora_ga) are
    # kept and saved back as read; the others change the forward and are refused with the reason when set.
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    target_parameters: list[str] | None = None  # LoRA on nn.Parameter (MoE experts): deltatune.lora.param
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LORA
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}; try r=8 or r=16")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}]={value!r}: every rank must be a positive integer")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}; 0.05 is usual")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'lora_only'")
        init = self.init_lora_weights
        if init not in _INIT_CHOICES and not (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_N', 'olora', 'orthogonal', 'mica', 'eva', 'corda', 'loftq' or 'lora_ga'"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str. Put the layer "
                              "indices into the regex, or pass target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(layers_pattern only names where the layer index is; set both or neither)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "`layers_to_transform` cannot be used when `target_modules` is a str. Put the layer indices "
                "into the regex, or pass target_modules as a list of names"
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):  # PEFT refuses both at config time
            raise ConfigError("The argument lora_bias=True is only supported with init_lora_weights=True or False, "
                              f"got init_lora_weights={self.init_lora_weights} instead. (Set lora_bias=False, or "
                              "init_lora_weights=True or False.)")
        if self.lora_bias and self.use_dora:
            raise ConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        # Each of these changes what the adapter computes (or its tensors' shapes), so loading one as plain LoRA
        # would give another model: refused with the reason. eva/corda/lora_ga/loftq_config only describe how the
        # adapter was initialised; they are kept and saved back unchanged.
        unsupported = {
            "megatron_config": "megatron_config (Megatron tensor-parallel LoRA layers) is not implemented",
            "velora_config": "VeLoRA (velora_config) changes the backward/forward and is not implemented yet",
            "use_qalora": "QA-LoRA (use_qalora) pools the adapter's input in groups; not implemented yet",
            "monteclora_config": "MonteCLoRA (monteclora_config) samples the adapter; not implemented yet",
            "layer_replication": "layer_replication (duplicated decoder layers) is not implemented yet",
            "use_bdlora": "block-diagonal LoRA (use_bdlora) is not implemented yet",
            "arrow_config": "Arrow routing (arrow_config) is not implemented yet",
            "kasa_config": "KaSA (kasa_config) adds a singular-value diagonal; not implemented yet",
        }
        for name, reason in unsupported.items():
            if getattr(self, name) not in (None, False, [], {}, ()):
                raise ConfigError(f"LoraConfig.{name}={getattr(self, name)!r}: {reason} in deltatune, so this "
                                  "adapter cannot be loaded or created as plain LoRA; remove it or use PEFT")
        if self.alora_invocation_tokens is not None:  # aLoRA: the adapter acts from the invocation tokens on
            from deltatune.lora.alora import check_config

            check_config(self)
        if self.target_parameters:
            from deltatune.lora.param import check_target_parameters

            if isinstance(self.target_parameters, str):
                raise ConfigTypeError(f"`target_parameters` must be a list of strings or None. Got the string "
                                      f"{self.target_parameters!r}; write [{self.target_parameters!r}]")
            self.target_parameters = list(self.target_parameters)
            check_target_parameters(self)
        for name in ("eva_config", "corda_config", "lora_ga_config", "loftq_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict) and not is_dataclass(value):
                raise ConfigError(f"LoraConfig.{name} must be a dict (as PEFT saves it) or None, got {value!r}")
        if is_dataclass(self.loftq_config):  # LoftQConfig(...) -> the dict PEFT keeps and saves (vars)
            self.loftq_config = dict(vars(self.loftq_config))
        if self.loftq_config and self.init_lora_weights != "loftq":
            self.loftq_config = {}  # as PEFT: only init_lora_weights='loftq' reads it
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          stacklevel=3)
        if self.corda_config is not None or init == "corda":  # PEFT's CordaConfig from a dict, default if None
            from deltatune.lora.corda import as_corda_config

            self.corda_config = as_corda_config(self.corda_config, init)
        if self.eva_config is not None or init == "eva":  # PEFT's EvaConfig from a dict, default if None
            from deltatune.lora.eva import as_eva_config

            self.eva_config = as_eva_config(self.eva_config, init)
        if self.trainable_token_indices is not None:
            from deltatune.trainable_tokens.config import check_token_indices

            indices = self.trainable_token_indices
            for key, ids in (indices.items() if isinstance(indices, dict) else [("", indices)]):
                check_token_indices(ids, f"LoraConfig.trainable_token_indices{f'[{key!r}]' if key else ''}")

    @property
    def merge_refusal(self) -> str | None:
        """Why this adapter cannot be merged into the base weights (its variant's ``merge_refusal``, e.g. aLoRA's),
        else ``None``."""
        from deltatune.lora.variants import variants_of  # torch-side module: loaded when a model is merged

        return next((v.merge_refusal for v in variants_of(self) if v.merge_refusal is not None), None)

    @staticmethod
    def variant_labels(saved: dict[str, Any]) -> list[str]:
        """The LoRA variants a saved ``adapter_config.json`` uses (:mod:`deltatune.lora.variants`: DoRA...), then
        ``rsLoRA`` where it scales by ``alpha / sqrt(r)``: what ``inspect`` shows beside the method's name."""
        from deltatune.lora.variants import variants_of  # torch-side module: loaded when a file is inspected

        return [v.label for v in variants_of(saved)] + (["rsLoRA"] if saved.get("use_rslora") else [])

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
