"""A built-in data set's recipe holds LoRA-shaped method options (``r``, ``lora_alpha``, ``target_modules=
"all-linear"``). Every ``--method`` must still build a sensible adapter from them: a method whose
``target_modules`` names another kind of layer (norms, the embedding, block outputs) must not get
``"all-linear"``."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune import get_peft_model
from deltatune.c3a import C3AConfig
from deltatune.cli import options as cli_options
from deltatune.cli import settings as cli_settings
from deltatune.registry import task_count

RECIPE = cli_settings.RECIPES["bbc-news"]["method_options"]
METHODS = sorted(cli_options.method_table())
# The kind of module each method must adapt on a Llama, when it gets only the recipe's options.
OWN_TARGETS = {"ln_tuning": {"input_layernorm", "post_attention_layernorm", "norm"},
               "trainable_tokens": {"embed_tokens", "lm_head"}}  # the tied head follows the embedding


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_from_the_bbc_news_recipe(method, llama_dir):
    config_cls = cli_options.method_table()[method][0]
    options = cli_options.shared_options_for(method, RECIPE)
    examples = [{"input_ids": [5, 6, 7, 5, 9]}, {"input_ids": [5, 11]}]
    options = cli_options.fill_method_defaults(config_cls, options, total_steps=10, model_path=llama_dir,
                                          train_examples=examples)
    config = cli_options.build_peft_config(method, options, "CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable > 0
    ids = torch.tensor([[5, 6, 7, 8]])
    extra = {"task_ids": torch.tensor([0])} if task_count([config]) else {}  # MPT, Poly: one task id per row
    assert torch.isfinite(peft_model(input_ids=ids, **extra).logits).all()
    if method in OWN_TARGETS:
        assert "target_modules" not in options
        wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "base_layer")}
        assert wrapped <= OWN_TARGETS[method] and wrapped, wrapped


@pytest.mark.parametrize("method", ["bottleneck", "houlsby", "parallel_adapter", "ln_tuning", "trainable_tokens"])
def test_recipe_target_modules_do_not_reach_methods_with_other_targets(method):
    assert "target_modules" not in cli_options.shared_options_for(method, RECIPE)


def test_c3a_block_size_from_the_cli_divides_every_linear_width(llama_dir):
    # C3A's default block (256) divides no layer of a small model; the CLI fills the largest divisor of its widths
    options = cli_options.fill_method_defaults(C3AConfig, {}, total_steps=10, model_path=llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    widths = {w for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head
              for w in (m.in_features, m.out_features)}
    assert all(w % options["block_size"] == 0 for w in widths)
    assert not any(all(w % d == 0 for w in widths) for d in range(options["block_size"] + 1, 257))  # the largest
    given = cli_options.fill_method_defaults(C3AConfig, {"block_size": 4}, total_steps=10, model_path=llama_dir)
    assert given["block_size"] == 4  # a block size the user gave stays


def test_cpt_context_from_the_cli_is_the_first_training_examples(llama_dir):
    from deltatune import CPTConfig

    examples = [{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    options = cli_options.fill_method_defaults(CPTConfig, {}, total_steps=10, model_path=llama_dir,
                                               train_examples=examples)
    assert options["cpt_token_ids"] == [5, 6, 7, 8, 9]
    assert options["cpt_tokens_type_mask"] == [2, 2, 4, 6, 8]  # example j: input 4j+2, label 4j+4 (PEFT's types)
    assert options["cpt_mask"] == [1] * 5
    long = [{"input_ids": list(range(300)), "labels": [-100] * 299 + [299]}]
    options = cli_options.fill_method_defaults(CPTConfig, {}, total_steps=10, model_path=llama_dir,
                                               train_examples=long)
    assert options["cpt_token_ids"] == list(range(300 - cli_options.CPT_CONTEXT_TOKENS, 300))  # the end: the answer
    given = cli_options.fill_method_defaults(CPTConfig, {"cpt_token_ids": [3]}, total_steps=10, model_path=llama_dir,
                                             train_examples=examples)
    assert given["cpt_token_ids"] == [3] and "cpt_tokens_type_mask" not in given
