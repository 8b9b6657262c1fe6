"""Keep torch to one thread (tiny models gain nothing from more), no hub."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
