"""deltatune serve throughput: C concurrent clients send a fixed workload to the built-in SmolLM2 with 16 LoRA
adapters (random, saved to a temp dir): (a) every request to one adapter, (b) spread over 16 adapters, through the
server's continuous batching; (c) naive: one generate() per request after set_adapter, one at a time.

    .venv/bin/python bench/serve.py --clients 16 --requests 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "serve"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16)
    args = ap.parse_args()
    import httpx
    import uvicorn
    from conftest import free_port

    from deltatune import LoraConfig, PeftModel, get_peft_model
    from deltatune.cli.common import load_model, resolve_model
    from deltatune.cli.serve import build_server

    tmp = tempfile.mkdtemp()
    spec = resolve_model("smollm2-135m")
    for i in range(args.adapters):
        model, _ = load_model(spec)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in peft.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        peft.save_pretrained(os.path.join(tmp, f"a{i:02d}"))
    prompts = [f"Write a short note number {i} about the weather:" for i in range(args.requests)]
    app, _engine, _reg = build_server("smollm2-135m", [tmp], max_loaded=args.adapters, max_tokens=args.max_tokens,
                                      device="cpu", max_batch=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def run(adapter_of) -> dict:
        latencies, ttfts, tokens = [], [], [0]
        todo = list(range(args.requests))
        lock = threading.Lock()

        def client():
            with httpx.Client(timeout=600) as c:
                while True:
                    with lock:
                        if not todo:
                            return
                        i = todo.pop()
                    body = {"model": adapter_of(i), "prompt": prompts[i], "max_tokens": args.max_tokens,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                    t0 = time.perf_counter()
                    first = None
                    with c.stream("POST", url, json=body) as r:
                        for line in r.iter_lines():
                            if first is None and line.startswith("data: {") and '"text": ""' not in line:
                                first = time.perf_counter() - t0
                            if '"usage"' in line and '"choices": []' in line:
                                import json

                                with lock:
                                    tokens[0] += json.loads(line[6:])["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - t0)
                    ttfts.append(first or latencies[-1])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return summary(tokens[0], wall, latencies, ttfts)

    def summary(tokens, wall, latencies, ttfts) -> dict:
        q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
        return {"tok/s": tokens / wall, "p50 s": statistics.median(latencies), "p95 s": q[18],
                "ttft p50 s": statistics.median(ttfts), "tokens": tokens, "wall s": wall}

    results = {"(a) one adapter": run(lambda i: "a00"),
               f"(b) {args.adapters} adapters": run(lambda i: f"a{i % args.adapters:02d}")}
    server.should_exit = True
    # (c) naive: one generate() per request, set_adapter before each, requests one after another (queueing
    # latency counted from the start, as if all C clients had sent at once).
    model, tokenizer = load_model(spec)
    peft = PeftModel.from_pretrained(model, os.path.join(tmp, "a00"), adapter_name="a00")
    for i in range(1, args.adapters):
        peft.load_adapter(os.path.join(tmp, f"a{i:02d}"), f"a{i:02d}")
    peft.eval()
    latencies, ttfts, tokens = [], [], 0
    t0 = time.perf_counter()
    for i in range(args.requests):
        peft.set_adapter(f"a{i % args.adapters:02d}")
        ids = tokenizer(prompts[i], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - t0)
        ttfts.append(latencies[-1])  # no streaming: the first token comes with the last
    results[f"(c) naive generate(), {args.adapters} adapters"] = summary(tokens, time.perf_counter() - t0,
                                                                          latencies, ttfts)
    print(f"smollm2-135m, {args.requests} requests x {args.max_tokens} tokens, {args.clients} clients, "
          f"torch threads {torch.get_num_threads()}")
    print("| workload | generated tok/s | p50 latency (s) | p95 latency (s) | TTFT p50 (s) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tok/s']:.1f} | {r['p50 s']:.2f} | {r['p95 s']:.2f} | {r['ttft p50 s']:.2f} |")


if __name__ == "__main__":
    main()
