"""One real server (uvicorn in a background thread, a free 127.0.0.1 port) on a tiny Llama with SmolLM2's tokenizer
and four adapters (LoRA r=4, LoRA r=8, DoRA, IA3), shared by the module's tests."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tinyserve  # noqa: E402
from support.server import API_KEY, Running, free_port  # noqa: E402


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """``(base_dir, adapter_root, {name: dir})``, plus ``spare/`` (an adapter for runtime loading), ``bad/``
    (one whose shapes do not fit) and ``outside/`` (an adapter outside every root)."""
    d = tmp_path_factory.mktemp("serve")
    base = tinyserve.make_base(str(d / "base"))
    root = d / "adapters"
    adapters = tinyserve.make_adapters(base, str(root))
    extra = d / "runtime"
    shutil.copytree(adapters["lora-r4"], extra / "spare")
    other = tinyserve.make_base(str(d / "other"), seed=1, hidden=48)
    from deltatune import LoraConfig

    tinyserve.save_adapter(other, str(root / "misfit"), LoraConfig(r=4, target_modules=["q_proj"]), seed=9)
    # PiSSA saved as created: it needs its own residual base, which serving would have to write into the shared one
    tinyserve.save_adapter(base, str(root / "pissa"), LoraConfig(r=4, target_modules=["q_proj"],
                                                                 init_lora_weights="pissa"), seed=10)
    shutil.copytree(adapters["ia3"], d / "outside")
    return base, str(root), adapters, str(extra), str(d / "outside")


@pytest.fixture(scope="session")
def server(files):
    from deltatune.cli.serve import build_server

    base, root, _adapters, extra, _outside = files
    app, engine, registry = build_server(base, [root, extra], max_loaded=2, max_tokens=64, api_key=API_KEY,
                                         allow_runtime_loading=True, device="cpu", max_queue=64)
    running = Running(app, engine, registry, free_port())
    yield running
    running.stop()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
