"""Make ``tinymodels`` importable, keep torch to one thread (tiny models gain nothing from more), no hub."""

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
torch.set_num_threads(1)
