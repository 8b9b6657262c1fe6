"""The adaption-prompt layer: an attention module plus gated attention over learned prompt vectors (LLaMA-Adapter).

For a block's attention with ``H`` query heads, ``H_kv`` key/value heads of width ``d_h`` over hidden states
``x: (B, T, d)`` and one adapter's prompt ``P: (1, L, d)`` and gate ``g`` (a scalar, zero at init)::

    Q   = RoPE(norm_q(x W_qᵀ))                 (B, H, T, d_h)    the module's own queries (RoPE of the positions)
    Kₚ  = norm_k(P W_kᵀ + b_k),  Vₚ = P W_vᵀ + b_v   (1, H_kv, L, d_h)  the prompt through the module's projections,
                                                                    no RoPE (the prompt has no position)
    S   = softmax(Q Kₚᵀ / √d_h)                (B, H, T, L)      its own softmax, over the prompt only (fp32)
    out = Attn(x) + W_o · concat_heads(g · S Vₚ)  (B, T, d)

``norm_q``/``norm_k`` are Qwen3's per-head RMS norms (the identity elsewhere); the key/value heads are repeated to
``H`` as the module's own attention does (grouped-query attention). ``W_o`` is applied without its bias, so a
zero gate leaves the output exactly the base's (PEFT calls ``o_proj`` with its bias: the same for every model it
supports, whose ``o_proj`` has none). GPT-2 (PEFT's ``AdaptedAttentionGPT``): ``Q, Kₚ, Vₚ`` come from the packed
``c_attn``, there is no norm or RoPE, ``H_kv = H``, and the prompt's output is added without ``c_proj``, as PEFT
computes it (its files mean exactly that).

The base attention runs unchanged (the cache, masks and attention kernel are transformers' own); the prompt term
depends on each row's own hidden states only, so a mixed-adapter batch runs the base once and adds each row's
adapter term. Tensor names are PEFT's: ``adaption_prompt: (1, L, d)``, ``adaption_gate: (1,)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(AdapterLayer):
    """Adaption prompts around one attention module (``base_layer``), any number of named adapters.

    Attributes:
        adaption_prompt: ``adapter -> (1, L, d)`` prompt vectors, N(0, 1) at init (the official repo's embedding).
        adaption_gate: ``adapter -> (1,)`` gate, zero at init ("zero-init attention").
        layout: ``"qkvo"`` (Llama, Mistral, Qwen2/3) or ``"gpt2"``.
    """

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    peft_package = ""  # PEFT prints the wrapper as "AdaptedAttention"
    peft_class_name = "AdaptedAttention"

    def __init__(self, base_layer: nn.Module, layout: str) -> None:
        super().__init__(base_layer)
        self.layout = layout
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.head_dim: int = base_layer.head_dim
        if layout == "gpt2":
            self.hidden_size = base_layer.c_attn.weight.shape[0]  # Conv1D stores (in, 3 d)
        else:
            self.hidden_size = base_layer.q_proj.in_features
        self.in_features = self.out_features = self.hidden_size

    @property
    def weight(self) -> torch.Tensor:
        """The query projection's weight (device and dtype of the module; an attention module has no ``weight``)."""
        return (self.base_layer.c_attn if self.layout == "gpt2" else self.base_layer.q_proj).weight

    def _place_adapter(self, adapter_name: str) -> None:
        weight = self.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in self.adapter_layer_names:
            item = getattr(self, attr)[adapter_name]
            getattr(self, attr)[adapter_name] = nn.Parameter(item.data.to(weight.device, dtype),
                                                             requires_grad=item.requires_grad)

    def update_layer(self, adapter_name: str, adapter_len: int) -> None:
        """Create adapter ``adapter_name``: ``L = adapter_len`` N(0, 1) prompt vectors and a zero gate."""
        self.adaption_prompt[adapter_name] = nn.Parameter(torch.randn(1, adapter_len, self.hidden_size))
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1))
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The attention module's output (``(attn_output, attn_weights)``) with the active adapters' prompt terms
        added to ``attn_output``; in a mixed-adapter batch each row gets its own adapter's term (or none)."""
        out = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return out
        attn_out = out[0] if isinstance(out, tuple) else out
        batch = attn_out.shape[0]
        if self.row_adapters is not None:
            names = self._row_names(batch)
            groups = [n for n in dict.fromkeys(names) if n in self.adaption_prompt]
        else:
            names, groups = None, [a for a in self.active_adapters if a in self.adaption_prompt]
        if not groups:
            return out
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        query = self.query_states(hidden, kwargs.get("position_embeddings"))
        if names is None:
            delta = sum(self.prompt_output(a, query) for a in groups)
        else:
            delta = torch.zeros_like(attn_out, dtype=query.dtype)
            for name in groups:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=attn_out.device)
                delta = delta.index_copy(0, rows, self.prompt_output(name, query.index_select(0, rows)))
        adapted = attn_out + delta.to(attn_out.dtype)
        return (adapted, *out[1:]) if isinstance(out, tuple) else adapted

    def query_states(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> torch.Tensor:
        """The module's queries ``Q: (B, H, T, d_h)`` for ``hidden: (B, T, d)`` (recomputed: the module does not
        return them), with its query norm and the rotary embedding ``(cos, sin): (B or 1, T, d_h)`` it was given.

        Raises:
            ConfigError: a RoPE model's attention called without ``position_embeddings``.
        """
        attn = self.base_layer
        b, t, _ = hidden.shape
        if self.layout == "gpt2":
            q = attn.c_attn(hidden)[..., : self.hidden_size]
            return q.view(b, t, -1, self.head_dim).transpose(1, 2)
        q = attn.q_proj(hidden).view(b, t, -1, self.head_dim)
        norm = getattr(attn, "q_norm", None)
        q = (norm(q) if norm is not None else q).transpose(1, 2)
        if position_embeddings is None:
            raise ConfigError(f"{type(attn).__name__} was called without position_embeddings; adaption prompts need "
                              "the rotary embedding of the positions, which transformers' decoder layers pass")
        cos, sin = (e.unsqueeze(1) for e in position_embeddings)
        return q * cos + _rotate_half(q) * sin  # transformers' apply_rotary_pos_emb, queries only

    def prompt_keys_values(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Kₚ, Vₚ)``, each ``(1, H_kv, L, d_h)``: the prompt through the module's key/value projections."""
        attn = self.base_layer
        prompt = self.adaption_prompt[adapter_name].to(dtype)  # (1, L, d)
        length = prompt.shape[1]
        if self.layout == "gpt2":
            _, k, v = attn.c_attn(prompt).split(self.hidden_size, dim=2)
        else:
            k, v = attn.k_proj(prompt), attn.v_proj(prompt)
        k = k.view(1, length, -1, self.head_dim)
        norm = getattr(attn, "k_norm", None)
        if norm is not None:
            k = norm(k)
        return k.transpose(1, 2), v.view(1, length, -1, self.head_dim).transpose(1, 2)

    def prompt_output(self, adapter_name: str, query: torch.Tensor) -> torch.Tensor:
        """One adapter's term ``W_o · concat_heads(g · softmax(Q Kₚᵀ / √d_h) Vₚ): (B, T, d)`` for
        ``query: (B, H, T, d_h)`` (GPT-2: without ``W_o``)."""
        b, heads, t, _ = query.shape
        k, v = self.prompt_keys_values(adapter_name, query.dtype)
        if k.shape[1] != heads:  # grouped-query attention: each key/value head serves H / H_kv query heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scores = query @ k.transpose(2, 3) / math.sqrt(self.head_dim)                      # (B, H, T, L)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        gate = self.adaption_gate[adapter_name].to(query.dtype)
        heads_out = ((gate * probs) @ v).transpose(1, 2).reshape(b, t, -1)                # (B, T, H d_h)
        if self.layout == "gpt2":
            return heads_out
        return F.linear(heads_out, self.base_layer.o_proj.weight)

    # ---- merging: nothing to merge --------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Refused: a prompt attended to through its own softmax is no change of any weight."""
        raise MergeError(f"adaption prompt {adapter_name!r} cannot be merged: its gated attention over the prompt is "
                         "not a change of the base weights")
