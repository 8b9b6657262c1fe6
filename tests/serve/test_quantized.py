"""deltatune serve --quantize nf4: adapters over a 4-bit base answer as `deltatune generate --quantize nf4` does."""

from __future__ import annotations

import pytest
from support.server import API_KEY, Running, free_port
from test_server import PROMPTS, generate_cli

pytest.importorskip("bitsandbytes")


def test_a_4bit_base_serves_lora_and_ia3_adapters_as_generate_does(files, capsys):
    import openai

    from deltatune.cli.serve import build_server

    base, root, adapters, _extra, _outside = files
    app, engine, registry = build_server(base, [root], quantize="nf4", max_loaded=2, max_tokens=64, api_key=API_KEY,
                                         device="cpu")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in engine.base.modules())  # the served base really is 4-bit
    running = Running(app, engine, registry, free_port())
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        for adapter in ("lora-r4", "ia3", None):
            got = client.completions.create(model=adapter or "base", prompt=PROMPTS[1], max_tokens=8, temperature=0)
            want = generate_cli(capsys, base, PROMPTS[1], adapters[adapter] if adapter else None,
                                "--quantize", "nf4", "--max-new-tokens", "8")
            assert got.choices[0].text == want, adapter
    finally:
        running.stop()
