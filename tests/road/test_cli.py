"""``deltatune train --method road``: PEFT's ``group_size=64`` divides no layer of a small model, so the CLI fills
the largest even divisor (up to 64) of the model's layer widths; a group size the user gave stays.
(``tests/cli/test_recipe_options.py`` builds RoAd from the bbc-news recipe with it on a tiny Llama.)"""

import pytest
from transformers import LlamaConfig

from deltatune import RoadConfig
from deltatune.cli import options as cli_options


@pytest.mark.parametrize(("widths", "expected"), [
    ({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}, 16),
    # SmolLM2-135M's widths: 576, 1536, 9 x 64 and 3 x 64 (gcd 192): PEFT's 64 fits it, and stays
    ({"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}, 64),
    ({"hidden_size": 30, "intermediate_size": 45, "num_attention_heads": 3, "num_key_value_heads": 3}, None),
])
def test_group_size_from_the_model_widths(tmp_path, widths, expected):
    LlamaConfig(**widths).save_pretrained(tmp_path)  # the filler reads the config alone
    options = cli_options.fill_method_defaults(RoadConfig, {}, total_steps=10, model_path=str(tmp_path))
    assert options.get("group_size") == expected  # None: an odd gcd has no even divisor; PEFT's default stays
    given = cli_options.fill_method_defaults(RoadConfig, {"group_size": 4}, total_steps=10, model_path=str(tmp_path))
    assert given["group_size"] == 4
    config = cli_options.build_peft_config("road", options, "CAUSAL_LM")
    assert config.group_size == (expected or 64)
