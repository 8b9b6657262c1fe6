"""Smoke test of ``bench/serve.py`` on a tiny random Llama: all four workloads run (server with one adapter, server
with the requests spread over adapters, naive deltatune and naive peft generate() loops), every request
generates its tokens, and the server's greedy texts equal the naive loops' request by request."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


def test_every_workload_runs_and_the_texts_agree(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        out = tmp_path / "serve.json"
        bench.main(["--model", "tiny", "--clients", "2", "--requests", "3", "--max-tokens", "3", "--adapters", "2",
                    "--threads", "1", "--json", str(out)])
    finally:
        sys.modules.pop(spec.name, None)
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert [name[:3] for name in results] == ["(a)", "(b)", "(c)", "(d)"]
    for name, r in results.items():
        assert r["tokens"] == 9, name  # 3 requests x 3 tokens (max_tokens reached)
        assert r["tok_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"] and 0 < r["ttft_p50_s"] <= r["p95_s"], name
    assert payload["texts_agree"] == {"b = c": 3, "c = d": 3}
    printed = capsys.readouterr().out
    assert "| (b) serve, 2 adapters |" in printed and "(b)/(a) throughput" in printed
