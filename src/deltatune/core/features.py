"""``in_features`` / ``out_features`` of a wrapped layer, as PEFT's layers expose them.

PEFT's adapter layers (LN tuning, trainable tokens, ...) carry these two attributes of their base layer, read by
code that inspects a model generically. The conventions are PEFT's, not always the obvious ones: an embedding
reports ``(num_embeddings, embedding_dim)``, a transformers ``Conv1D`` its weight's ``(in, out)``, a convolution
its channels, ``nn.MultiheadAttention`` ``(embed_dim, 3 * embed_dim)`` (the packed q/k/v projection); a layer
without a notion of features (``LayerNorm``) reports ``(None, None)``.
"""

from __future__ import annotations

import warnings

from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; plain-torch models still work without it
    Conv1D = None


def in_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """``(in_features, out_features)`` of ``module`` by PEFT's rules, ``(None, None)`` when it has none."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if Conv1D is not None and isinstance(module, Conv1D):
        rows, cols = module.weight.shape  # Conv1D stores W as (in, out)
        return rows, cols
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, 3 * module.embed_dim
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(inf, int) and isinstance(outf, int):  # quantised linears and user layers
        return inf, outf
    return None, None


def follow_fan_in_fan_out(layer, config, module_name: str, stacklevel: int = 5) -> None:
    """PEFT's rule for ``fan_in_fan_out``: it follows the layer's type (``Conv1D`` stores ``(in, out)``). Where
    ``config`` says otherwise, PEFT's warning is given and the config is corrected, so the saved
    adapter_config.json says what the file holds."""
    if layer.fan_in_fan_out == config.fan_in_fan_out:
        return
    if layer.fan_in_fan_out:
        message = "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
    else:
        message = ("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                   "fan_in_fan_out to False.")
    warnings.warn(f"{message} ({module_name})", stacklevel=stacklevel)  # create_or_update's caller's caller
    config.fan_in_fan_out = layer.fan_in_fan_out
