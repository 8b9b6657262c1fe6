"""``ShadowConfig``: Hugging Face PEFT's field names, defaults and meaning (ShadowPEFT)."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError

MIRROR_OVERRIDES = ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                    "shadow_intermediate_size")


@dataclass
class ShadowConfig(PeftConfig):
    """ShadowPEFT: a small trainable *shadow* network running beside a frozen decoder-only model.

    A shadow backbone (a fresh 1-layer copy of the decoder by default) turns the input into the initial shadow state
    ``s⁽⁰⁾: (B, T, d)``; then, at every adapted decoder block ``l``, the gap between the block's input ``h`` and the
    shadow state is injected into the input (Eq. 2-4) and the shadow state follows the block's output through a gated
    update (Eq. 5-7)::

        h̃ = h + α · W_up W_down Dropout(h - s⁽ˡ⁻¹⁾)           (the block reads h̃ instead of h)
        s⁽ˡ⁾ = (1 - σ(G(h_out))) ⊙ s⁽ˡ⁻¹⁾ + σ(G(h_out)) ⊙ T(h_out)

    With ``labels`` the shadow path's own task loss on ``s⁽⁰⁾`` (through the frozen output head) is added to the
    loss, weighted by ``auxiliary_loss_weight`` (Eq. 8-9). Nothing can be merged into the base weights.

    Args:
        target_modules: The decoder blocks to adapt (whole blocks: names or a full-match regex); ``None``: every
            block of the decoder (filled in by name, as PEFT does).
        exclude_modules: Blocks to leave alone (names or a regex).
        r: Rank of the injection bottleneck ``W_down: (r, d)``, ``W_up: (d, r)``.
        shadow_alpha: ``α``, the strength of the injected correction (Eq. 4).
        shadow_dropout: Dropout on the gap ``h - s`` before ``W_down`` (Eq. 3).
        init_weights: ``True``: ``W_up = 0``, so a fresh adapter leaves the model's output unchanged.
        shadow_model: ``"mirror"``: build the backbone from the base decoder's own class and config with the
            ``shadow_*`` overrides below; else a local path (or hub id) of a transformers checkpoint loaded with
            ``AutoModel`` (the overrides must then be unset).
        shadow_num_hidden_layers: Depth of the mirrored backbone (``None``: 1).
        shadow_hidden_size: Width of the mirrored backbone (``None``: the base's); another width adds a projection
            ``shadow_projection: (d, d_shadow)``, no bias.
        shadow_num_attention_heads: Attention heads of the mirrored backbone (``None``: the base's).
        shadow_intermediate_size: Feed-forward width of the mirrored backbone (``None``: the base's).
        share_embeddings: Feed the backbone the base model's (frozen) input embeddings instead of its own table
            (only for a mirror of the base width; its own ``embed_tokens`` is then dropped).
        update_hidden_size: Hidden width of the two update MLPs ``T`` and ``G`` (``None``: ``r``).
        auxiliary_loss_weight: ``λ`` of the shadow loss (Eq. 9); 0 turns it off.
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>`` in the name).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. ``"lm_head"``).
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.SHADOW
        super().__post_init__()
        check_layer_selection(self)
        # PEFT's sentences first (code written for PEFT matches them), then what to do.
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(layers_pattern only names where the layer index is; set both or neither)")
        if self.shadow_model != "mirror":
            configured = [name for name in MIRROR_OVERRIDES if getattr(self, name) is not None]
            if configured:
                raise ConfigError("Explicit `shadow_model` checkpoints define their architecture; unset these "
                                  f"mirror-only overrides: {', '.join(configured)}.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}; try r=8")

    @property
    def merge_refusal(self) -> str:
        """Why the adapter cannot be merged (PEFT's sentence; ``merge_adapter``/``merge_and_unload`` give it)."""
        return ("ShadowPEFT cannot be merged into the base model: the adaptation is an input-dependent, layer-space "
                "trajectory, not a static weight-space delta. Use `unload()` to recover the plain base model, or "
                "`unload_shadow()` for a standalone shadow model")


__all__ = ["ShadowConfig"]
