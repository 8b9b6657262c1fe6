"""``IA3Config``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError

# PEFT's defaults by ``model.config.model_type``: attention keys/values and the MLP's output projection
# (target_modules), and which of those are "feedforward" (scaled on the input, not the output).
DEFAULT_IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(PeftConfig):
    """(IA)³ (Liu et al., 2022): learned vectors that rescale activations, ``y = l ⊙ (W x + b)``, or for a
    feedforward module the input, ``y = W (l ⊙ x) + b``. ``l`` starts at ones, so the model is unchanged.

    Args:
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (keys, values and the MLP output, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        feedforward_modules: Which targets scale their *input* (one value per input feature) rather than
            their output. A regex string (full match) or names; a name matches a module whose name ends
            with it (PEFT's rule, no dot boundary). Must be a subset of ``target_modules`` when both are
            lists. ``None`` picks the architecture's default.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_ia3_weights: ``True`` initialises every vector to ones (identity); ``False`` leaves them random
            (for tests only).
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    feedforward_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    # PEFT's IA3Config has no layer selection; the shared targeting reads these, so they exist as
    # plain class attributes (not fields: they must not appear in adapter_config.json).
    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.IA3
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        self._validate()

    def _validate(self) -> None:
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, set) and isinstance(targets, set) and not ff <= targets:
            # PEFT's exact sentence, nothing after it: PEFT's tests match it whole (pytest reads notes too), and
            # it names the fix
            raise ConfigError("`feedforward_modules` should be a subset of `target_modules`")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")

    def is_feedforward(self, module_name: str) -> bool:
        """Whether the module named ``module_name`` scales its input (PEFT's matching rule)."""
        ff = self.feedforward_modules
        if not ff:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(name) for name in ff)
