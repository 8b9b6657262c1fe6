"""VB-LoRA: the config, the layer, the shared vector bank, the top-k file form, and the registry entry."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.registry import Hooks, Method
from deltatune.vblora.config import VBLoRAConfig
from deltatune.vblora.layer import VBLoRALayer, supported_types

Linear = VBLoRALayer  # PEFT's name of the layer class (peft.tuners.vblora.Linear)

# PEFT's table for VB-LoRA
VBLORA_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
LOGITS = ("vblora_logits_A", "vblora_logits_B")


def init_shared(adapter_model: nn.Module, adapter_name: str, config: VBLoRAConfig,
                target_names: list[str]) -> dict[str, nn.ParameterDict]:
    """Create ``adapter_name``'s bank ``(num_vectors, vector_length)`` (fp32, on the model's device) in the model's
    ``vblora_vector_bank`` container (made on first use); returns the container for the layers. The values are drawn
    per target in :func:`create_or_update`, as PEFT draws them."""
    container = adapter_model._modules.get("vblora_vector_bank")
    if container is None:
        container = nn.ParameterDict()
        adapter_model.vblora_vector_bank = container
    param = next(adapter_model.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    container[adapter_name] = nn.Parameter(torch.zeros(config.num_vectors, config.vector_length, device=device))
    return {"vector_bank": container}


def create_or_update(target: nn.Module, adapter_name: str, config: VBLoRAConfig, module_name: str,
                     vector_bank: nn.ParameterDict) -> VBLoRALayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a VB-LoRA layer already).

    The bank is drawn ``U(±init_vector_bank_bound)`` again before each target's logits, so under one seed the
    bank and logits are PEFT's (whose bank is the last target's draw)."""
    if isinstance(target, VBLoRALayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = VBLoRALayer(target, vector_bank)
        if layer.fan_in_fan_out and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True.", stacklevel=4)
        elif not layer.fan_in_fan_out and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.", stacklevel=4)
    else:
        return None
    with torch.no_grad():
        vector_bank[adapter_name].uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
    layer.update_layer(adapter_name, r=config.r, topk=config.topk, num_vectors=config.num_vectors,
                       vector_length=config.vector_length, vblora_dropout=config.vblora_dropout,
                       init_logits_std=config.init_logits_std)
    return layer


def _index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's: the smallest integer type that holds a bank index."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32 if num_vectors < 2**31 else torch.int64


def save_topk(peft_model: nn.Module, adapter_name: str, file_state: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """``save_only_topk_weights``: each ``<m>.vblora_logits_X: (..., N)`` is filed as
    ``<m>.vblora_logits_X_topk_indices: (..., k)`` (smallest integer type) and ``<m>.vblora_logits_X_topk_weights:
    (..., k-1)`` (the softmax of the top ``k`` logits, the last one implied by the sum 1), PEFT's keys and layout."""
    config = peft_model.peft_config[adapter_name]
    if not config.save_only_topk_weights:
        return file_state
    out = {}
    for key, value in file_state.items():
        if not key.endswith(LOGITS):
            out[key] = value
            continue
        top, index = value.topk(config.topk)
        out[key + "_topk_indices"] = index.to(_index_dtype(config.num_vectors))
        out[key + "_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
    return out


def load_topk(config: VBLoRAConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`save_topk`, before a file or state dict is loaded: the logits become ``log w`` at the
    kept indices and ``-inf`` elsewhere (so ``topk`` and the softmax give the saved mix back exactly; training such
    an adapter is refused, as PEFT)."""
    weights = dict(weights)
    for key in [k for k in weights if k.endswith(tuple(name + "_topk_indices" for name in LOGITS))]:
        stem = key.removesuffix("_topk_indices")
        index = weights.pop(key).to(torch.long)
        kept = weights.pop(stem + "_topk_weights")
        mix = torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], dim=-1)
        logits = torch.full((*mix.shape[:-1], config.num_vectors), float("-inf"), dtype=mix.dtype, device=mix.device)
        weights[stem] = logits.scatter(-1, index, torch.log(mix))
    return weights


VBLORA = Method(
    peft_type=PeftType.VBLORA,
    config_cls=VBLoRAConfig,
    prefix="vblora_",
    layer_cls=VBLoRALayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=VBLORA_TARGETS,
    cli_names={"vblora": {}},
    # measured (README, issue 22's table): 12 bbc-news steps at 1e-3 give 0.375 -> 0.325 accuracy, at 1e-2
    # 0.375 -> 0.775 (+0.26 nats forgetting); PEFT's MetaMathQA run also trains VB-LoRA at 5x its LoRA rate
    lr_scale=10.0,
    hooks=Hooks(
        shared_containers=("vblora_vector_bank",),
        init_shared=init_shared,
        before_save=save_topk,
        from_file=load_topk,  # the top-k form back to logits before the checked load (files, state dicts)
        rank_container="vblora_logits_A",  # (r, in/ℓ, N): deltatune inspect counts the ranks
    ),
)
VBLoRAModel = tuner_class(VBLORA)  # PEFT's tuner class (isinstance of base_model)


def get_nb_savable_parameters(self: nn.Module, adapter: str = "default") -> tuple[int, int]:
    """PEFT's count of what a save writes, in float32 equivalents: ``(VB-LoRA values, other trainable values)``.
    With ``save_only_topk_weights`` each sub-vector's ``N`` logits count as ``k - 1`` weights plus ``k`` indices at
    their integer size (uint8 a quarter of a float32, int16 a half, ...)."""
    logits = bank = other = 0
    for name, param in self.named_parameters():
        if "vblora_logits" in name:
            logits += param.numel()
        elif "vblora_vector_bank" in name:
            bank += param.numel()
        elif param.requires_grad:
            other += param.numel()
    config = self.peft_config[adapter]
    if not config.save_only_topk_weights:
        return bank + logits, other
    index_bytes = torch.empty(0, dtype=_index_dtype(config.num_vectors)).element_size()
    sub_vectors = logits / config.num_vectors
    return int(bank + sub_vectors * (config.topk - 1) + sub_vectors * config.topk * index_bytes / 4), other


def print_savable_parameters(self: nn.Module) -> None:
    """PEFT's line: the VB-LoRA values a save writes (float32 equivalents) and the total."""
    vblora, other = self.get_nb_savable_parameters()
    print(f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} || total params to-be-saved: "
          f"{(vblora + other):,d}")


VBLoRAModel.get_nb_savable_parameters = get_nb_savable_parameters  # PEFT's VBLoRAModel methods
VBLoRAModel.print_savable_parameters = print_savable_parameters

__all__ = ["VBLORA", "Linear", "VBLoRAConfig", "VBLoRALayer", "VBLoRAModel"]
