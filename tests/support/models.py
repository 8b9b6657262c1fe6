"""Tiny, seeded models (from ``transformers`` config classes, and a plain torch net) and the small utilities
every adapter test uses: fixed inputs, logits, seeded noise on adapter tensors, state snapshots.

Every factory builds its model from a config class with a fixed seed, so two calls give bit-identical
weights: the "fresh copy of the same base" that an adapter is loaded into. Models are returned in
``eval()`` mode (no dropout) so outputs can be compared exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 100


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(seed: int = 0) -> nn.Module:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 100."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel: n_embd 32, 2 layers, 4 heads (its projections are transformers ``Conv1D``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    """BertForSequenceClassification with 2 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    _seeded(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    """T5ForConditionalGeneration with d_model 32."""
    from transformers import T5Config, T5ForConditionalGeneration

    _seeded(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


class Holder(nn.Module):
    """A model holding one layer, so any layer type can be targeted by the name ``"layer"``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TwoLinear(nn.Module):
    """Two seeded ``nn.Linear(8, 8)`` in a row, ``a`` then ``b``: the smallest model with two targets.

    ``forward(x: (..., 8)) -> (..., 8)``.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class TinyNet(nn.Module):
    """A plain ``nn.Module`` (no transformers) with every layer type LoRA supports.

    ``forward(ids: (B, T), img: (B, 3, 8, 8), vol: (B, 2, 4, 4, 4)) -> (B, 17)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.conv1d = nn.Conv1d(16, 16, kernel_size=3, padding=1)
        self.lin1 = nn.Linear(16, 16)
        self.conv2d = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv3d = nn.Conv3d(2, 4, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(16 + 8 + 4)
        self.head = nn.Linear(16 + 8 + 4, 17)

    def forward(self, ids: torch.Tensor, img: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)                            # (B, 16, T)
        h = torch.relu(self.conv1d(h)).mean(-1)                     # (B, 16)
        h = torch.relu(self.lin1(h))                                # (B, 16)
        g = torch.relu(self.conv2d(img)).mean((-1, -2))             # (B, 8)
        v = torch.relu(self.conv3d(vol)).mean((-1, -2, -3))         # (B, 4)
        return self.head(self.norm(torch.cat([h, g, v], dim=-1)))   # (B, 17)


def tiny_net(seed: int = 0) -> nn.Module:
    _seeded(seed)
    return TinyNet().eval()


FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5, "net": tiny_net,
}


def make_inputs(kind: str, batch: int = 2, seq: int = 7, seed: int = 123) -> dict[str, torch.Tensor]:
    """Fixed inputs for a model kind (keyword arguments of its forward)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if kind == "net":
        return {"ids": ids, "img": torch.randn(batch, 3, 8, 8, generator=g),
                "vol": torch.randn(batch, 2, 4, 4, 4, generator=g)}
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (batch, 5), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or plain output tensor) for ``inputs``, without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def kind_of(model_factory: Callable) -> str:
    return next(k for k, f in FACTORIES.items() if f is model_factory)


def perturb_trainable(model: nn.Module, seed: int = 7, std: float = 0.1) -> list[str]:
    """Add seeded noise to every trainable parameter (adapter tensors, biases, saved heads).

    After this, an adapter is far from the identity, so "the loaded model gives the same output"
    actually checks that every tensor was carried over. Returns the names perturbed.
    """
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
                names.append(name)
    return names


def params_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, by name (state_dict keeps shared tensors under each name)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The model's state dict has exactly the keys of ``before`` and bit-identical values."""
    after = model.state_dict()
    assert sorted(after) == sorted(before), (
        f"keys changed: added {sorted(set(after) - set(before))[:5]}, removed {sorted(set(before) - set(after))[:5]}"
    )
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
