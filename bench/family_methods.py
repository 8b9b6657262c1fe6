"""LN tuning, trainable tokens, LoRA + trainable tokens, (IA)³, LoHa, LoKr, VeRA, BitFit, bottleneck adapters and
the methods of issue 22 (HiRA ... AdaMSS): one training step each, against peft.

On SmolLM2-135M (fp32, CPU unless CUDA is there), one fixed batch of ``--batch-size`` x ``--seq-len`` random
token ids, causal-LM loss, ``AdamW`` step. Each case interleaves two variants in one process (alternating
order, median of ``--rounds`` timed steps after one warm-up step), each on its own copy of the weights:

* ``ln_tuning``        -- deltatune vs ``peft`` (``LNTuningConfig()``: the 61 RMSNorms);
* ``trainable_tokens`` -- deltatune vs ``peft`` (64 token rows; the tied ``lm_head`` follows);
* ``lora_tokens``      -- deltatune vs ``peft`` (LoRA r=16 on q/v + ``trainable_token_indices`` of 64 rows);
* ``ia3``, ``loha``, ``lokr``, ``vera`` -- deltatune vs ``peft`` ((IA)³ on its default k/v/down_proj; LoHa and
                        LoKr r=16 alpha 32 all-linear; VeRA r=256 on q/v);
* ``hira``, ``shira``, ``miss``, ``lily``, ``hra``, ``c3a`` -- deltatune vs ``peft`` (HiRA r=16 and MiSS r=64
                        all-linear; SHiRA r=16 on q/v; Lily r=16, stride_A 2, 4 experts on q/v/down_proj; HRA r=8
                        on q/v; C3A block 64 on q/v);
* ``bitfit``           -- deltatune vs deltatune LoRA r=16 all-linear (the usual floor; PEFT has no BitFit);
* ``bottleneck``       -- deltatune (after each MLP, reduction 16) vs the same LoRA;
* ``gralora``          -- deltatune vs ``peft`` (GraLoRA r=16, gralora_k=2, hybrid_r=0 on q/v);
* ``fourierft``        -- deltatune vs ``peft`` (FourierFT n_frequency=1000, scaling 300 on q/v, spectrum from zeros).
* ``randlora``         -- deltatune vs ``peft`` (RandLoRA r=32, its default, on q/v: 18 bases per layer);
* ``pvera``            -- deltatune vs ``peft`` (PVeRA r=256 on q/v, as VeRA's case).
* ``peanut``, ``glora`` -- deltatune vs ``peft`` (PEANuT r=16, depth 1 on q/v; GLoRA r=16, PEFT's default
                        parametrisations, on q/v).
* ``waveft``           -- deltatune vs ``peft`` (WaveFT with PEFT's defaults: 2592 Haar coefficients on q/v);
* ``vblora``           -- deltatune vs ``peft`` (VB-LoRA r=4, 256 vectors of length 64, top-2, on q/v).
* ``xlora``            -- deltatune vs ``peft`` (two LoRA r=16 q/v experts, copies of one random expert, so the
                        mixture starts at the same loss whatever each library's classifier init; the cache off).
* ``adaption_prompt``  -- deltatune vs ``peft`` (LLaMA-Adapter: 10 prompt vectors and a gate in all 30 attention
                        layers);
* ``cartridge``        -- deltatune vs ``peft`` (a 20-entry key/value cache prefix, 1 frozen; peft's copies
                        deltatune's random table, so both start from the same loss).
* ``road``             -- deltatune vs ``peft`` (RoAd road_1, group 64, on q/v);
* ``beft``             -- deltatune vs ``peft`` (BEFT on its default v_proj).
* ``psoft``            -- deltatune vs ``peft`` (PSOFT r=32 on q/v: Cayley solve, both magnitude vectors);
* ``osf``              -- deltatune vs ``peft`` (OSF on q/v, the top 3/4 of the singular directions frozen).
* ``frod``             -- deltatune vs ``peft`` (FRoD on q/v, sparse_rate 0.01: 576 + 3317 values per layer);
* ``delora``           -- deltatune vs ``peft`` (DeLoRA r=16 on q/v).
* ``deft``             -- deltatune vs ``peft`` (DEFT r=16 on q/v, relu decomposition, identity init);
* ``supertuning``      -- deltatune vs ``peft`` (Super-Tuning, PEFT's default sparsity 0.99, no LoRA, on q/v).
* ``cpt``              -- deltatune vs ``peft`` (CPT: a 64-token context of 8 examples, decayed loss).
* ``tinylora``         -- deltatune vs ``peft`` (TinyLoRA's defaults r=2, u=64 on q/v: a vector per layer);
* ``unilora``          -- deltatune vs ``peft`` (Uni-LoRA's defaults r=4, theta_d_length=256 on q/v).
* ``shadow``           -- deltatune vs ``peft`` (ShadowPEFT's defaults: r=8 in all 30 blocks, a 1-layer mirror
                        backbone on the shared embeddings, the auxiliary loss). deltatune trains 19,600 fewer values:
                        the last block's T and G, which no gradient reaches (it files them as buffers).
* ``poly``             -- deltatune vs ``peft`` (Poly/MHR r=8, 4 skills, 2 splits, 2 tasks on q/v; task 0 rows).
* ``adamss``           -- deltatune vs ``peft`` (AdaMSS's defaults r=100, 5 subspaces of rank 1 on q/v).

Memory: with CUDA the peak allocated bytes of a step; on CPU the bytes autograd saves for the backward pass
(counted with ``saved_tensors_hooks``) plus gradients and AdamW state of the trainable tensors. Before timing,
each pair is checked to start from the same loss (every method is the identity at init) and, against
``peft``, to have the same number of trainable parameters. Prints a markdown table with the ratios.

Usage: ``python bench/family_methods.py [--cases ln_tuning,bitfit --rounds 5 --batch-size 2 --seq-len 64]``
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time

import torch

import deltatune as dt
from deltatune.builtin.models import load_builtin_model
from deltatune.registry import task_count

TOKENS = list(range(1000, 1064))


def configs(lib, case: str):
    """The adapter config of ``case`` in ``lib`` (``peft`` or deltatune)."""
    if case == "ln_tuning":
        return lib.LNTuningConfig(task_type="CAUSAL_LM")
    if case == "trainable_tokens":
        return lib.TrainableTokensConfig(token_indices=TOKENS)
    if case == "lora_tokens":
        return lib.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                              trainable_token_indices=TOKENS, task_type="CAUSAL_LM")
    if case == "lora":
        return lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if case == "ia3":
        return lib.IA3Config(task_type="CAUSAL_LM")  # k_proj, v_proj, down_proj (feed-forward)
    if case == "loha":
        return lib.LoHaConfig(r=16, alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if case == "lokr":
        return lib.LoKrConfig(r=16, alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if case == "vera":
        return lib.VeraConfig(r=256, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "hira":
        return lib.HiraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
    if case == "shira":
        return lib.ShiraConfig(r=16, target_modules=["q_proj", "v_proj"], random_seed=0, task_type="CAUSAL_LM")
    if case == "miss":
        return lib.MissConfig(r=64, target_modules="all-linear", task_type="CAUSAL_LM")
    if case == "hra":
        return lib.HRAConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "c3a":
        return lib.C3AConfig(block_size=64, init_weights=True, target_modules=["q_proj", "v_proj"],  # zeros: identity
                             task_type="CAUSAL_LM")
    if case == "lily":
        return lib.LilyConfig(r=16, stride_A=2, num_B=4, target_modules=["q_proj", "v_proj", "down_proj"],
                              task_type="CAUSAL_LM")
    if case == "bitfit":
        return dt.BitFitConfig(task_type="CAUSAL_LM")
    if case == "bottleneck":
        return dt.BottleneckConfig(reduction_factor=16, task_type="CAUSAL_LM")
    if case == "gralora":
        return lib.GraloraConfig(r=16, gralora_k=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "fourierft":
        return lib.FourierFTConfig(n_frequency=1000, scaling=300.0, init_weights=True,  # zeros: identity
                                   target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "randlora":
        return lib.RandLoraConfig(r=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "pvera":
        return lib.PveraConfig(r=256, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "peanut":
        return lib.PeanutConfig(r=16, depth=1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "glora":
        return lib.GloraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "waveft":
        return lib.WaveFTConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "vblora":  # a zero bank: the identity (PEFT's random init would differ between the two libraries)
        return lib.VBLoRAConfig(r=4, num_vectors=256, vector_length=64, init_vector_bank_bound=0.0,
                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "xlora":
        expert = _xlora_expert()
        return lib.XLoraConfig(hidden_size=576, adapters={"0": expert, "1": expert}, task_type="CAUSAL_LM")
    if case == "adaption_prompt":
        return lib.AdaptionPromptConfig(adapter_len=10, adapter_layers=30, task_type="CAUSAL_LM")
    if case == "cartridge":
        return lib.CartridgeConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    if case == "road":
        return lib.RoadConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "beft":
        return lib.BeftConfig(task_type="CAUSAL_LM")
    if case == "psoft":
        return lib.PsoftConfig(r=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "osf":
        return lib.OSFConfig(effective_rank=0.75, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "frod":
        return lib.FrodConfig(target_modules=["q_proj", "v_proj"], progressbar=False, task_type="CAUSAL_LM")
    if case == "delora":
        return lib.DeloraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "deft":
        return lib.DeftConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "supertuning":
        return lib.SupertuningConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "cpt":  # a 64-token context (8 examples of input template, input, output template, label)
        return lib.CPTConfig(cpt_token_ids=list(range(2000, 2064)), cpt_tokens_type_mask=[
            4 * (i // 8) + k for i in range(64) for k in [(1, 2, 2, 2, 2, 3, 4, 4)[i % 8]]], task_type="CAUSAL_LM",
            opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95)
    if case == "tinylora":
        return lib.TinyLoraConfig(r=2, u=64, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "unilora":
        return lib.UniLoraConfig(r=4, theta_d_length=256, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if case == "shadow":
        return lib.ShadowConfig(task_type="CAUSAL_LM")
    if case == "poly":
        return lib.PolyConfig(r=8, n_tasks=2, n_skills=4, n_splits=2, target_modules=["q_proj", "v_proj"],
                              task_type="CAUSAL_LM")
    if case == "adamss":
        return lib.AdamssConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    raise SystemExit(f"unknown case {case!r}")


_EXPERT: list[str] = []


def _xlora_expert() -> str:
    """One random LoRA r=16 q/v expert for SmolLM2, written once to a temporary folder (X-LoRA mixes two copies)."""
    if not _EXPERT:
        import atexit
        import shutil
        import tempfile

        root = tempfile.mkdtemp(prefix="xlora-bench-")
        atexit.register(shutil.rmtree, root, True)
        torch.manual_seed(0)
        expert = dt.get_peft_model(load_builtin_model("smollm2-135m")[0],
                                   dt.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
        expert.save_pretrained(root)
        _EXPERT.append(root)
    return _EXPERT[0]


AGAINST_PEFT = (  # the cases run against peft's same method
    "ln_tuning", "trainable_tokens", "lora_tokens", "ia3", "loha", "lokr", "vera", "hira", "shira", "miss", "lily",
    "hra", "c3a", "gralora", "fourierft", "randlora", "pvera", "peanut", "glora", "waveft", "vblora", "xlora",
    "adaption_prompt", "cartridge", "road", "beft", "psoft", "osf", "frod", "delora", "deft", "supertuning", "cpt",
    "tinylora", "unilora", "shadow", "poly", "adamss",
)
PAIRS = {  # case -> ((label, lib name, config case), (label, lib name, config case))
    **{case: (("deltatune", "dt", case), ("peft", "peft", case)) for case in AGAINST_PEFT},
    "bitfit": (("deltatune", "dt", "bitfit"), ("deltatune LoRA r16", "dt", "lora")),
    "bottleneck": (("deltatune", "dt", "bottleneck"), ("deltatune LoRA r16", "dt", "lora")),
}
COPY_TABLE = {"cartridge"}  # random key/value tables (no identity at init): peft's starts from deltatune's
# cases whose trainable count is not peft's, and why
TRAINABLE_DIFFERS = {"shadow": "peft also trains the last block's T and G, which no gradient ever reaches"}


class Variant:
    def __init__(self, label: str, model, batch, device) -> None:
        self.label, self.model, self.batch, self.device = label, model.train(), batch, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.times: list[float] = []
        self.memory = 0

    def loss(self) -> float:
        with torch.no_grad():
            return self.model(**self.batch).loss.item()

    def step(self, timed: bool) -> None:
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - start)
        if self.device.type == "cuda":
            self.memory = torch.cuda.max_memory_allocated()
        else:
            state = sum(p.numel() * p.element_size() for p in self.params) * 3  # grad + exp_avg + exp_avg_sq
            self.memory = saved[0] + state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(PAIRS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, _ = load_builtin_model("smollm2-135m")
    base = base.to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    ids[:, ::4] = torch.tensor(TOKENS[: args.seq_len // 4 + 1], device=device)[: ids[:, ::4].shape[1]]
    batch = {"input_ids": ids, "labels": ids}
    libs = {"dt": dt, "peft": peft}
    rows = []
    for case in args.cases.split(","):
        variants = []
        for label, lib, cfg_case in PAIRS[case]:
            model = copy.deepcopy(base)
            if case == "xlora":  # peft's XLoraModel refuses a model with the cache on
                model.config.use_cache = False
            torch.manual_seed(0)  # the same random init in both (Uni-LoRA's θ is not zero at the start)
            model = libs[lib].get_peft_model(model, configs(libs[lib], cfg_case))
            variants.append(Variant(label, model, batch, device))
        a, b = variants
        if task_count(a.model.peft_config.values()):  # Poly routes by task: every row is task 0
            for v in variants:
                v.batch = {**batch, "task_ids": torch.zeros(len(ids), dtype=torch.long, device=device)}
        if case in COPY_TABLE:
            b.model.prompt_encoder["default"].load_prompt_embeddings(a.model.prompt_encoder["default"].prompt_embeddings())
        if b.label == "peft" and case not in TRAINABLE_DIFFERS:
            assert len(a.params) and sum(p.numel() for p in a.params) == sum(p.numel() for p in b.params), case
        la, lb = a.loss(), b.loss()
        assert abs(la - lb) < 1e-4, f"{case}: initial losses differ ({la} vs {lb})"
        for v in variants:
            v.step(timed=False)
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                v.step(timed=True)
        ta, tb = statistics.median(a.times), statistics.median(b.times)
        rows.append((case, a, b, ta, tb))
        print(f"{case}: {a.label} {ta * 1e3:.0f} ms, {b.label} {tb * 1e3:.0f} ms", file=sys.stderr, flush=True)
        del variants, a, b

    print(f"\nSmolLM2-135M, {device.type}, batch {args.batch_size} x {args.seq_len}, median of {args.rounds} steps "
          f"(forward + backward + AdamW)\n")
    print("| case | variant | step ms | memory MiB | trainable params | step ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for case, a, b, ta, tb in rows:
        na, nb = sum(p.numel() for p in a.params), sum(p.numel() for p in b.params)
        print(f"| {case} | {a.label} | {ta * 1e3:.0f} | {a.memory / 2**20:.0f} | {na:,} | "
              f"{ta / tb:.2f} | {a.memory / max(b.memory, 1):.2f} |")
        print(f"| {case} | {b.label} | {tb * 1e3:.0f} | {b.memory / 2**20:.0f} | {nb:,} | 1.00 | 1.00 |")
    print(f"\nratios: deltatune / the second row of each case. Command: python bench/family_methods.py "
          f"{shlex.join(argv if argv is not None else sys.argv[1:])}")


if __name__ == "__main__":
    main()
