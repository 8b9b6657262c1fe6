"""The ShadowPEFT layer: one frozen decoder block, the shadow injection before it and the shadow update after it.

For the block's input ``h: (B, T, d)``, its output ``h_out: (B, T, d)`` and the incoming shadow state
``s⁽ˡ⁻¹⁾: (B, T, d)`` (``s⁽⁰⁾`` comes from the shadow backbone; see :mod:`deltatune.shadow.model`), one adapter's
tensors are ``W_down: (r, d)``, ``W_up: (d, r)`` (``shadow_down``/``shadow_up``, no bias; ``W_up = 0`` at init) and
two MLPs ``T, G: d -> u -> d`` (``shadow_update_transform``/``shadow_update_gate``: Linear, GELU, Linear; ``u =
update_hidden_size or r``)::

    δ      = h - s⁽ˡ⁻¹⁾                                   (Eq. 2)
    δ̃      = W_up W_down Dropout(δ)                        (Eq. 3)
    h̃      = h + α δ̃                                       (Eq. 4)   the block runs on h̃
    t      = T(h_out),  g = σ(G(h_out))                    (Eq. 5, 6)
    s⁽ˡ⁾   = (1 - g) ⊙ s⁽ˡ⁻¹⁾ + g ⊙ t                      (Eq. 7)

The block's output is the model's hidden state unchanged (only its input moved); the new shadow state goes to the
next adapted block through the model's :class:`~deltatune.shadow.model.ShadowRuntime` (not through the decoder's
loop, so the base model only ever sees tensors). The adapter's tensors are in float32 over a half-precision base (the
correction is added back in the hidden states' dtype), as PEFT's with ``autocast_adapter_dtype``.

In a mixed-adapter batch each row is injected and updated with its own adapter (rows are independent: the block
itself runs once on the whole batch). Tensor names are PEFT's; the shared ``shadow_backbone``, ``shadow_projection``
and ``shadow_head`` containers are the model's (held here as references, so switching adapters switches their
gradients too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError

OWN_CONTAINERS = ("shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate", "shadow_dropout")
SHARED_CONTAINERS = ("shadow_backbone", "shadow_projection", "shadow_head")

MERGE_REFUSAL = ("ShadowPEFT cannot be merged into the base weights: the adaptation is an input-dependent, "
                 "layer-space trajectory (the shadow state evolves with the data), not a static weight-space delta. "
                 "Use `unload_shadow()` to obtain a standalone shadow model instead.")


def block_hidden_states(out: Any) -> torch.Tensor:
    """The hidden states in a decoder block's return value (a tensor, a tuple led by it, or a model output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    for attr in ("hidden_states", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise TypeError(f"Unsupported decoder block output type: {type(out)}. Expected a Tensor or a tuple.")


def with_hidden_states(out: Any, hidden: torch.Tensor) -> Any:
    """``out`` with its hidden states replaced by ``hidden`` (same container)."""
    if isinstance(out, torch.Tensor):
        return hidden
    if isinstance(out, tuple):
        return (hidden, *out[1:])
    raise TypeError(f"Unsupported decoder block output type: {type(out)}. Expected a Tensor or a tuple.")


class ShadowLayer(AdapterLayer):
    """ShadowPEFT around one decoder block (``base_layer``), any number of named adapters (one active).

    Attributes:
        shadow_down, shadow_up: Per adapter, ``nn.Linear(d, r)`` and ``nn.Linear(r, d)`` without bias.
        shadow_update_transform, shadow_update_gate: Per adapter, ``T`` and ``G``.
        shadow_dropout: Per adapter, ``nn.Dropout`` (``nn.Identity`` at 0).
        shadow_r, shadow_alpha: Per adapter, ``r`` and ``α``.
        hidden_size: ``d``, the base model's width (the shadow state's width).
        runtime: The model's :class:`~deltatune.shadow.model.ShadowRuntime` (the current shadow state).
    """

    adapter_layer_names = OWN_CONTAINERS + SHARED_CONTAINERS
    other_param_names = ("shadow_r", "shadow_alpha")
    peft_package = "shadow"
    peft_class_name = "ShadowLayer"

    def __init__(self, base_layer: nn.Module, hidden_size: int, runtime: Any, shared: dict[str, nn.ModuleDict]
                 ) -> None:
        super().__init__(base_layer)
        self.hidden_size = int(hidden_size)
        self.shadow_r: dict[str, int] = {}
        self.shadow_alpha: dict[str, float] = {}
        self.shadow_down = nn.ModuleDict()
        self.shadow_up = nn.ModuleDict()
        self.shadow_update_transform = nn.ModuleDict()
        self.shadow_update_gate = nn.ModuleDict()
        self.shadow_dropout = nn.ModuleDict()
        # the model's containers and runtime: references, not submodules (saved once, under base_model)
        for name in SHARED_CONTAINERS:
            self.__dict__[name] = shared[name]
        self.__dict__["runtime"] = runtime
        # adapters whose last adapted block this is: their s⁽ᴸ⁾ reaches nothing, so T and G are filed, not trained
        self.final_adapters: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        # The decoder's loop reads attributes of the block it calls (Qwen3: `decoder_layer.attention_type`): what the
        # wrapper lacks is the block's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "runtime") or name.startswith("__"):
                raise
            return getattr(self._modules["base_layer"], name)

    @property
    def weight(self) -> torch.Tensor:
        """The block's first parameter (its device and dtype; a block has no ``weight`` of its own)."""
        return next(self.base_layer.parameters())

    def adapter_names(self) -> list[str]:
        """The adapters with tensors in this block (the shared containers also hold adapters of other blocks)."""
        return list(self.shadow_down.keys())

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, shadow_alpha: float, shadow_dropout: float,
                     update_hidden_size: int | None, init_weights: bool) -> None:
        """Create ``adapter_name``'s tensors in PEFT's order (same draws under one seed): ``W_down``, ``W_up``
        (zeroed with ``init_weights``), then ``T`` and ``G``, each ``nn.Linear``'s default init."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        d, u = self.hidden_size, update_hidden_size or r
        self.shadow_r[adapter_name] = r
        self.shadow_alpha[adapter_name] = shadow_alpha
        self.shadow_down[adapter_name] = nn.Linear(d, r, bias=False)
        self.shadow_up[adapter_name] = nn.Linear(r, d, bias=False)
        self.shadow_dropout[adapter_name] = nn.Dropout(p=shadow_dropout) if shadow_dropout else nn.Identity()
        if init_weights:
            nn.init.zeros_(self.shadow_up[adapter_name].weight)
        self.shadow_update_transform[adapter_name] = nn.Sequential(nn.Linear(d, u), nn.GELU(), nn.Linear(u, d))
        self.shadow_update_gate[adapter_name] = nn.Sequential(nn.Linear(d, u), nn.GELU(), nn.Linear(u, d))
        weight = self.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in OWN_CONTAINERS:
            getattr(self, attr)[adapter_name].to(weight.device, dtype)
        self.set_adapter(self.active_adapters or [adapter_name])

    def make_final(self, adapter_name: str) -> None:
        """Mark this block as ``adapter_name``'s last adapted one: the state it would leave (``s⁽ᴸ⁾``) is read by no
        later block, and the auxiliary loss reads ``s⁽⁰⁾``, so ``T`` and ``G`` here can never get a gradient (in PEFT
        neither; it keeps them as parameters that never move). They stay in the files (PEFT's keys), as buffers
        that keep their values; the update is skipped."""
        self.final_adapters.add(adapter_name)
        for attr in ("shadow_update_transform", "shadow_update_gate"):
            for module in getattr(self, attr)[adapter_name].modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    delattr(module, name)
                    module.register_buffer(name, param.detach())

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        """Make one adapter active (the shadow state follows one backbone).

        Raises:
            ConfigError: several adapters (PEFT's sentence).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ConfigError(f"ShadowPEFT requires exactly one active adapter, but got {len(names)} adapters. "
                              "(Switch with set_adapter(name); a mixed batch takes adapter_names per row.)")
        super().set_adapter(names, trainable)
        self.runtime.freeze_pretrained_embeddings()

    # ---- the equations -----------------------------------------------------------------------
    def shadow_inject(self, hidden_states: torch.Tensor, shadow_states: torch.Tensor, adapter_name: str
                      ) -> torch.Tensor:
        """Eq. 2-4: ``h̃ = h + α W_up W_down Dropout(h - s)``, all ``(B, T, d)``; in ``h``'s dtype."""
        down = self.shadow_down[adapter_name]
        delta = (hidden_states - shadow_states).to(down.weight.dtype)                  # Eq. 2
        delta = self.shadow_up[adapter_name](down(self.shadow_dropout[adapter_name](delta)))  # Eq. 3
        return hidden_states + (self.shadow_alpha[adapter_name] * delta).to(hidden_states.dtype)  # Eq. 4

    def shadow_update(self, hidden_states: torch.Tensor, shadow_states: torch.Tensor, adapter_name: str
                      ) -> torch.Tensor:
        """Eq. 5-7: ``s' = (1 - σ(G(h))) ⊙ s + σ(G(h)) ⊙ T(h)`` for the block output ``h``; in ``s``'s dtype."""
        transform = self.shadow_update_transform[adapter_name]
        dtype = transform[0].weight.dtype
        hidden = hidden_states.to(dtype)
        candidate = transform(hidden)                                                    # Eq. 5
        gate = torch.sigmoid(self.shadow_update_gate[adapter_name](hidden))             # Eq. 6
        return ((1.0 - gate) * shadow_states.to(dtype) + gate * candidate).to(shadow_states.dtype)  # Eq. 7

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The block on the injected input; the shadow state advanced in the runtime. The plain block when the
        adapters are off, no shadow state was seeded for this call (the runtime's model hook did not run), or the
        active adapter has no tensors here."""
        shadow = self.runtime.shadow
        if self.disable_adapters or shadow is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        groups = self._groups(hidden_states.shape[0])
        if not groups:
            return self.base_layer(hidden_states, *args, **kwargs)
        if groups[0][1] is None:  # one adapter for the whole batch
            name = groups[0][0]
            out = self.base_layer(self.shadow_inject(hidden_states, shadow, name), *args, **kwargs)
            if name not in self.final_adapters:
                self.runtime.shadow = self.shadow_update(block_hidden_states(out), shadow, name)
            return out
        injected = hidden_states
        for name, rows in groups:
            injected = injected.index_copy(0, rows, self.shadow_inject(hidden_states[rows], shadow[rows], name))
        out = self.base_layer(injected, *args, **kwargs)
        hidden_out, new_shadow = block_hidden_states(out), shadow
        for name, rows in groups:
            if name in self.final_adapters:
                continue
            new_shadow = new_shadow.index_copy(0, rows, self.shadow_update(hidden_out[rows], shadow[rows], name))
        self.runtime.shadow = new_shadow
        return out

    def _groups(self, batch: int) -> list[tuple[str, torch.Tensor | None]]:
        """``[(adapter, rows)]`` to apply here: the active adapter for every row (``rows`` ``None``), or per row of
        a mixed-adapter batch its own (rows of ``"__base__"`` or of an adapter not in this block: none)."""
        if self.row_adapters is None:
            name = self.active_adapters[0] if self.active_adapters else None
            return [(name, None)] if name in self.shadow_down else []
        names = self._row_names(batch)
        device = self.weight.device
        return [(name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
                for name in dict.fromkeys(names) if name in self.shadow_down]

    # ---- merging: refused --------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Refused: the update depends on the input (see :data:`MERGE_REFUSAL`)."""
        raise MergeError(MERGE_REFUSAL)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MergeError(MERGE_REFUSAL)

    def unloaded(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The plain block (unload); the model's shadow hooks go once no shadow layer is left."""
        if merge:
            raise MergeError(MERGE_REFUSAL)
        self.runtime.release(self)
        return self.base_layer

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s tensors here (the shared containers are the model's to drop)."""
        for attr in OWN_CONTAINERS + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.final_adapters.discard(adapter_name)
        if adapter_name in self.active_adapters:
            self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if not self.adapter_names():
            self.runtime.release(self)


__all__ = ["MERGE_REFUSAL", "ShadowLayer", "block_hidden_states"]
