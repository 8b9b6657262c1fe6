"""Keep torch to one thread (tiny models gain nothing from more), no hub; the tiny Llama directory and its
tokenizer, built once per test module."""

import os

import pytest
import torch
from support import tinymodels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A saved 2-layer random Llama with its tokenizer (``support.tinymodels.make_llama``)."""
    return tinymodels.make_llama(str(tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def tok(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)
