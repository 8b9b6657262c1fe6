"""X-LoRA's classifier: the last hidden state of the scaling pass -> per-token expert weights.

``h: (batch, seq, hidden_size)`` goes through ``layers`` (PEFT's ``nn.Sequential``, same indices, so the files'
keys ``internal_xlora_classifier.layers.<i>.weight`` are PEFT's) to logits ``z``; without ``layerwise_scalings``
the ``n_experts`` logits are repeated for every LoRA layer. Then ``g = softmax(z / T)`` over the experts
(``enable_softmax``), shaped ``(batch, seq, n_layers, n_experts)``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.xlora.config import XLoraConfig


class XLoraClassifier(nn.Module):
    """The classifier of one X-LoRA adapter (PEFT's ``XLoraClassifier``; its layers and their order).

    Args:
        config: The adapter's config (depth, width, dropout, softmax, layer-wise output).
        n_experts: Experts mixed (PEFT's ``n_classes``).
        n_layers: LoRA layers the experts adapt, in model order (the layer axis of the weights).
    """

    def __init__(self, config: XLoraConfig, n_experts: int, n_layers: int) -> None:
        super().__init__()
        self.config = config
        self.n_classes = n_experts
        self.n_layers = n_layers
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):  # hidden layers: Linear, ReLU, Dropout (p > 0), as PEFT's
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0.0:
                layers.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """``hidden_state: (batch, seq, hidden_size)`` -> weights ``(batch, seq, n_layers, n_experts)`` (after the
        temperature softmax when ``enable_softmax``; top-k is applied per layer later, see
        :func:`deltatune.xlora.layer.select`)."""
        batch, seq = hidden_state.shape[:2]
        logits = self.layers(hidden_state)
        if not self.config.layerwise_scalings:  # the same weights in every layer
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings
