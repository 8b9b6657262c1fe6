"""The adaption-prompt layer: an attention module plus gated attention over learned prompt vectors (LLaMA-Adapter).

For a block's attention with ``H`` query heads, ``H_kv`` key/value heads of width ``d_h`` over hidden states
``x: (B, T, d)`` and one adapter's prompt ``P: (1, L, d)`` and gate ``g`` (a scalar, zero at init)::

    Q   = RoPE(norm_q(x W_qᵀ))                 (B, H, T, d_h)    the module's own queries (RoPE of the positions)
    Kₚ  = norm_k(P W_kᵀ + b_k),  Vₚ = P W_vᵀ + b_v   (1, H_kv, L, d_h)  the prompt through the module's projections,
                                                                    no RoPE (the prompt has no position)
    S   = softmax(Q Kₚᵀ / √d_h)                (B, H, T, L)      its own softmax, over the prompt only (fp32)
    out = Attn(x) + W_o · concat_heads(g · S Vₚ)  (B, T, d)

``norm_q``/``norm_k`` are Qwen3's per-head RMS norms (the identity elsewhere); the key/value heads are repeated to
``H`` as the module's own attention does (grouped-query attention). ``W_o`` adds no second bias: the prompt's heads
join the module's own input of ``o_proj``, so a zero gate leaves the output exactly the base's (PEFT calls
``o_proj`` on them separately, bias included: the same wherever ``o_proj`` has no bias, as in Mistral and Llama's
default; a Llama with ``attention_bias=True`` gets ``o_proj``'s bias twice in PEFT, even at init).
GPT-2 (PEFT's ``AdaptedAttentionGPT``): ``Q, Kₚ, Vₚ`` come from the packed ``c_attn``, there is no norm or RoPE,
``H_kv = H``, and the prompt's heads are added after ``c_proj``, without it, as PEFT computes them (its files mean
exactly that).

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
        added; in a mixed-adapter batch each row gets its own adapter's term (or none).

        The module runs as it is, with two hooks for the duration of the call: one keeps the output of its query
        projection (so the queries are not computed twice), the other adds the prompt's heads to the input of
        ``o_proj`` (so ``W_o`` is applied once, to the sum: ``W_o (a + h) = W_o a + W_o h``). Where a hook does not
        fire (GPT-2 has no ``o_proj``: its term is added after ``c_proj``), the term is computed here instead.
        """
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.row_adapters is not None:
            names = self._row_names(hidden.shape[0])
            groups = [n for n in dict.fromkeys(names) if n in self.adaption_prompt]
        else:
            names, groups = None, [a for a in self.active_adapters if a in self.adaption_prompt]
        if not groups:
            return self.base_layer(*args, **kwargs)
        attn, position = self.base_layer, kwargs.get("position_embeddings")
        seen: dict[str, Any] = {}

        def keep_query(module: nn.Module, inputs: tuple, projected: torch.Tensor) -> None:
            seen.setdefault("q", projected)

        def add_heads(module: nn.Module, inputs: tuple) -> tuple:
            heads = self.prompt_heads(names, groups, self.query_states(hidden, position, seen.get("q")))
            seen["added"] = True
            return (inputs[0] + heads.to(inputs[0].dtype), *inputs[1:])

        if self.layout == "gpt2":
            handles = [attn.c_attn.register_forward_hook(keep_query)]
        else:
            handles = [attn.q_proj.register_forward_hook(keep_query), attn.o_proj.register_forward_pre_hook(add_heads)]
        try:
            out = self.base_layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if seen.get("added"):
            return out
        heads = self.prompt_heads(names, groups, self.query_states(hidden, position, seen.get("q")))
        delta = heads if self.layout == "gpt2" else F.linear(heads, attn.o_proj.weight)
        attn_out = out[0] if isinstance(out, tuple) else out
        adapted = attn_out + delta.to(attn_out.dtype)
        return (adapted, *out[1:]) if isinstance(out, tuple) else adapted

    def prompt_heads(self, names: list[str] | None, groups: list[str], query: torch.Tensor) -> torch.Tensor:
        """The adapters' heads ``(B, T, H d_h)`` before ``W_o``: the sum over the active adapters ``groups``, or per
        row its own adapter's (``names``: one per row, a mixed-adapter batch; rows of no adapter get zeros)."""
        if names is None:
            return sum(self.prompt_attention(a, query) for a in groups)
        b, heads, t, d_h = query.shape
        out = query.new_zeros(b, t, heads * d_h)
        for name in groups:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=query.device)
            out = out.index_copy(0, rows, self.prompt_attention(name, query.index_select(0, rows)))
        return out

    def query_states(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                     projected: torch.Tensor | None = None) -> torch.Tensor:
        """The module's queries ``Q: (B, H, T, d_h)`` for ``hidden: (B, T, d)``: its query projection's output
        (``projected``, kept from the module's own call, else computed here), its query norm, and the rotary
        embedding ``(cos, sin): (B or 1, T, d_h)`` it was given.

        Raises:
            ConfigError: a RoPE model's attention called without ``position_embeddings``.
        """
        attn = self.base_layer
        b, t, _ = hidden.shape
        if self.layout == "gpt2":
            packed = projected if projected is not None else attn.c_attn(hidden)
            return packed[..., : self.hidden_size].view(b, t, -1, self.head_dim).transpose(1, 2)
        q = (projected if projected is not None else attn.q_proj(hidden)).view(b, t, -1, self.head_dim)
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

    def prompt_attention(self, adapter_name: str, query: torch.Tensor) -> torch.Tensor:
        """One adapter's heads ``concat_heads(g · softmax(Q Kₚᵀ / √d_h) Vₚ): (B, T, H d_h)`` for
        ``query: (B, H, T, d_h)``; ``W_o`` is applied by the caller (GPT-2: not at all, as PEFT)."""
        b, heads, t, _ = query.shape
        k, v = self.prompt_keys_values(adapter_name, query.dtype)
        if k.shape[1] != heads:  # grouped-query attention: each key/value head serves H / H_kv query heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scores = query @ k.transpose(2, 3) / math.sqrt(self.head_dim)                      # (B, H, T, L)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        gate = self.adaption_gate[adapter_name].to(query.dtype)
        return ((gate * probs) @ v).transpose(1, 2).reshape(b, t, -1)                      # (B, T, H d_h)

    # ---- merging: nothing to merge --------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Refused: a prompt attended to through its own softmax is no change of any weight."""
        raise MergeError(f"adaption prompt {adapter_name!r} cannot be merged: its gated attention over the prompt is "
                         "not a change of the base weights")
