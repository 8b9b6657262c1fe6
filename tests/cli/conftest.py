"""Fixtures for CLI tests: a tiny random Llama and BERT saved as model directories, and small data files."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from support import tinymodels  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return tinymodels.make_llama(str(tmp_path_factory.mktemp("models") / "llama"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> str:
    return tinymodels.make_bert(str(tmp_path_factory.mktemp("models") / "bert"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    tinymodels.write_jsonl(str(d / "cls.jsonl"), tinymodels.classification_records(48))
    tinymodels.write_csv(str(d / "cls.csv"), tinymodels.classification_records(48))
    tinymodels.write_jsonl(str(d / "pc.jsonl"), tinymodels.prompt_records(24))
    tinymodels.write_jsonl(str(d / "chat.jsonl"), tinymodels.chat_records(12))
    tinymodels.write_text(str(d / "text.txt"), tinymodels.corpus())
    return d
