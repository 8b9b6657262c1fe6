"""Old import path of :mod:`support.models` (``from helpers import tiny_llama``), kept for tests written
before ``tests/support``; new tests import from ``support``."""

from support.models import (  # noqa: F401
    FACTORIES,
    VOCAB,
    Holder,
    TinyNet,
    assert_same_state,
    kind_of,
    make_inputs,
    output,
    params_snapshot,
    perturb_trainable,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_net,
    tiny_t5,
)
