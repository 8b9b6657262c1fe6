"""The one table ``tests/test_contract.py`` needs beyond the registry: each method's small config on the tiny
Llama (:func:`support.models.tiny_llama`: hidden 32, 2 layers, vocab 100).

Everything else the contract checks is read from ``deltatune.registry.METHODS`` (the family, ``mergeable``)
and from ``peft`` (whether it has the method). A method registered without a row here fails the contract
suite with a message saying to add one, so a new method is tested the moment it registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from xlora.experts import contract_experts

import deltatune
from deltatune.registry import method_for


@dataclass(frozen=True)
class ContractCase:
    """How one method runs on the tiny Llama.

    Attributes:
        config: Keyword arguments of the method's config class beside ``task_type="CAUSAL_LM"`` (only what
            the defaults do not give: default targets come from the registry's ``default_targets``).
        forward: Extra keyword arguments of every forward call (multitask prompt tuning's ``task_ids``),
            as lists with one entry per row of :func:`support.models.make_inputs`'s batch of 2.
        identity_at_init: Whether a fresh adapter leaves the logits as they were; ``None``: the family's rule
            (weight adapters start as the identity, virtual tokens change the input and do not).
        peft_interop: Why peft cannot run the method on the tiny Llama as the contract builds it (the generic
            interop checks are skipped with this reason; the method's own tests check interop instead); empty:
            they run.
    """

    config: dict = field(default_factory=dict)
    forward: dict = field(default_factory=dict)
    identity_at_init: bool | None = None
    peft_interop: str = ""


CASES: dict[str, ContractCase] = {
    "LORA": ContractCase({"r": 4}),
    "ADALORA": ContractCase({"init_r": 4, "target_r": 2, "total_step": 10}),  # AdaLoRA's schedule needs its length
    "LOHA": ContractCase({"r": 4}),
    "LOKR": ContractCase({"r": 4}),
    "VERA": ContractCase({"r": 4}),  # the shared projection is (r, 32): the default r=256 would be 8x the model
    "HIRA": ContractCase({"r": 4}),
    "SHIRA": ContractCase({"r": 4, "random_seed": 0}),  # r=32 (the default) trains more values than 32x32 has
    "HRA": ContractCase({"r": 4}),  # 4 reflections (2 equal pairs: the identity at init)
    "C3A": ContractCase({"block_size": 16}, identity_at_init=False),  # PEFT's default init is xavier, not zeros
    "MISS": ContractCase({"r": 4}),  # shards of width 4 of the 32/64-wide inputs (the default r=64 > 32)
    "IA3": ContractCase(),  # the registry's feedforward_modules for Llama (down_proj scales its input)
    "OFT": ContractCase(),
    "BOFT": ContractCase(),
    "LN_TUNING": ContractCase(),
    # Lily routes by a mean over the whole batch, so rows of a batch are coupled: a mixed batch can equal the
    # single-adapter runs only where a layer's input does not depend on earlier adapters. So q/k/v of the first
    # block alone; one regex target so k_proj and v_proj (same shape) share one A (stride_A=2) and the experts.
    "LILY": ContractCase({"r": 4, "stride_A": 2, "target_modules": r"model\.layers\.0\.self_attn\.[qkv]_proj"}),
    "BITFIT": ContractCase(),
    # Width 32/4 = 8: at the default 32/16 = 2 both ReLU units can be off for the whole batch (no gradient).
    "BOTTLENECK": ContractCase({"reduction_factor": 4}),
    # Ids present in make_inputs("llama")'s rows (27, 48 in the first, 70 in the second), so the rows see them.
    "TRAINABLE_TOKENS": ContractCase({"token_indices": [27, 48, 70]}),
    "PROMPT_TUNING": ContractCase({"num_virtual_tokens": 4}),
    "P_TUNING": ContractCase({"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    "PREFIX_TUNING": ContractCase({"num_virtual_tokens": 4}),
    "MULTITASK_PROMPT_TUNING": ContractCase({"num_virtual_tokens": 4, "num_tasks": 2}, forward={"task_ids": [0, 1]}),
    "GRALORA": ContractCase({"r": 4, "hybrid_r": 2}),  # 2x2 blocks of rank 2, plus the hybrid LoRA of rank 2
    # n_frequency <= 32 x 16 (v_proj); PEFT's default init draws the spectrum N(0, 1): not the identity
    "FOURIERFT": ContractCase({"n_frequency": 64}, identity_at_init=False),
    # 8 bases of rank 4 for the 32-wide q/v_proj (the default r=32: one); alpha = r: the default 640/r (160 here)
    # on perturbed λ, γ makes ΔW ~1e3 times W, beyond fp32's exact unmerge
    "RANDLORA": ContractCase({"r": 4, "randlora_alpha": 4}),
    "PVERA": ContractCase({"r": 4}),  # A is (2r, 32): the default r=256 would be 16x the model
    "PEANUT": ContractCase({"r": 4, "depth": 1}),  # one encoder/decoder pair: the residual path runs too
    "GLORA": ContractCase({"r": 4}),  # the tiny Llama has no biases: C, D, E are zeros (GPT-2/BERT in tests/glora)
    "WAVEFT": ContractCase({"n_frequency": 64}),  # v_proj is 16x32: the default 2592 exceeds its 512 entries
    # vector_length must divide 32 and 16 (the default 256 divides neither); PEFT's init is not the identity
    "VBLORA": ContractCase({"r": 4, "num_vectors": 16, "vector_length": 8}, identity_at_init=False),
    # Two random LoRA experts (q/v and the embedding) written once per process; they are not zero: no identity.
    "XLORA": ContractCase({"hidden_size": 32, "adapters": contract_experts()}, identity_at_init=False,
                          peft_interop="peft's XLoraModel refuses a model with config.use_cache=True (the tiny Llama's "
                                       "default); tests/xlora/test_layer.py checks interop with use_cache=False"),
    "ADAPTION_PROMPT": ContractCase({"adapter_len": 4, "adapter_layers": 2}),  # both blocks of the tiny Llama
    # every entry trained (the contract wants gradients on each prompt_encoder tensor); frozen ones: tests/cartridge
    "CARTRIDGE": ContractCase({"num_virtual_tokens": 4, "num_frozen_tokens": 0}),
    "ROAD": ContractCase({"group_size": 16}),  # must divide q_proj's 32 and v_proj's 16 outputs (default 64)
    "BEFT": ContractCase(),  # PEFT's default target, v_proj (bias-free in Llama: merging gives it one)
    "PSOFT": ContractCase({"r": 4}),  # the default r=32 is the full width of the tiny Llama's attention
    "OSF": ContractCase({"effective_rank": 0.75}),  # a quarter of each projection trains (k_proj is 16 wide)
    "FROD": ContractCase(),  # q/v (PEFT's table); S has ⌊32² · 0.01⌋ = 10 trained entries per role
    "DELORA": ContractCase({"r": 4}),
    "DEFT": ContractCase({"r": 4}),
    "SUPERTUNING": ContractCase({"sparsity": 0.9, "r": 2}),  # 10% of each weight, plus the Supra LoRA
    "CPT": ContractCase({"cpt_token_ids": [5, 6, 7, 8], "cpt_tokens_type_mask": [1, 2, 3, 4]}),
    "TINYLORA": ContractCase(),  # PEFT's defaults fit: r=2 SVD factors of the 32-wide q/v_proj, u=64
    # θ starts uniform, not zero (A and B both read it): bound 0.5 so the fresh adapter visibly moves the logits;
    # save_indices so the file names the adapted layers (deltatune inspect reads them there)
    "UNILORA": ContractCase({"init_theta_d_bound": 0.5, "save_indices": True}, identity_at_init=False),
    # r=4 bottleneck; the 1-layer mirror backbone reads the base embeddings (W_up = 0: the identity at init)
    "SHADOW": ContractCase({"r": 4}),
    # 2 tasks, one per row; 2 splits (Multi-Head Routing) of the 32/16-wide q/v_proj
    "POLY": ContractCase({"r": 4, "n_tasks": 2, "n_splits": 2}, forward={"task_ids": [0, 1]}),
    # PEFT's defaults fit (R = min(100, out, in), 5 clusters of output rows); peft clusters with scikit-learn
    "ADAMSS": ContractCase({}),
}


def case_for(peft_type: str) -> ContractCase:
    """The method's row, or fail the test naming the fix (a registered method must have one)."""
    if peft_type not in CASES:
        pytest.fail(f"{peft_type} is registered but has no row in tests/support/contract.py CASES: add "
                    f"ContractCase(<its config kwargs for the tiny Llama>) so the contract suite covers it")
    return CASES[peft_type]


def config_for(peft_type: str) -> deltatune.PeftConfig:
    """A fresh config of the method for the tiny Llama."""
    return method_for(peft_type).config_cls(task_type="CAUSAL_LM", **case_for(peft_type).config)


def forward_kwargs(peft_type: str) -> dict[str, torch.Tensor]:
    """The extra forward arguments of the method, as tensors."""
    return {k: torch.tensor(v) for k, v in case_for(peft_type).forward.items()}


def starts_as_identity(peft_type: str) -> bool:
    explicit = case_for(peft_type).identity_at_init
    return explicit if explicit is not None else method_for(peft_type).family == "weight"
