"""deltatune serve throughput: C concurrent streaming clients send a fixed workload to a base model with N LoRA
adapters (random, saved to a temp dir), four ways:

* (a) ``deltatune serve``, every request to one adapter;
* (b) ``deltatune serve``, requests spread over N adapters (continuous batching across adapters: the rows' adapters
  go to one forward as ``adapter_names``, gathered from each layer's adapter slots);
* (c) naive deltatune: one ``generate()`` per request after ``set_adapter``, one request at a time;
* (d) the same naive loop on ``peft`` (a test dependency; skipped when it is not installed).

Requests are greedy. Before (a)/(b) one 1-token request per adapter loads every adapter (as (c)/(d) load them all
before timing). Latency counts from when a client sends; in (c)/(d) all requests are taken to arrive at once, so a
request's latency includes the requests before it, and its first token arrives with its last (no streaming).
The texts of (b), (c) and (d) are compared request by request (greedy: they should agree).

    .venv/bin/python bench/serve.py --clients 8 --requests 16 --max-tokens 16           # SmolLM2-135M
    .venv/bin/python bench/serve.py --model tiny --clients 2 --requests 4 --max-tokens 4  # a tiny random Llama
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "serve"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_adapters(base: str, n: int, rank: int, targets: list[str], out: str) -> list[str]:
    """``n`` LoRA adapters ``a00``.. on ``base`` (one model load), random A and B, saved under ``out``."""
    from deltatune import LoraConfig, get_peft_model
    from deltatune.cli.loading import load_model, resolve_model

    model, _ = load_model(resolve_model(base))
    names = [f"a{i:02d}" for i in range(n)]
    peft = None
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights="gaussian")
        if peft is None:
            peft = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft.add_adapter(name, cfg)
        with torch.no_grad():  # non-zero B so every adapter changes the output
            for key, p in peft.named_parameters():
                if f"lora_B.{name}." in key:
                    p.normal_(std=0.05)
    peft.save_pretrained(out)  # each non-default-named adapter goes to out/<name>
    return names


def summary(tokens: int, wall: float, latencies: list[float], ttfts: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"tok_s": tokens / wall, "p50_s": statistics.median(latencies), "p95_s": q[18],
            "ttft_p50_s": statistics.median(ttfts), "tokens": tokens, "wall_s": wall}


def run_clients(url: str, prompts: list[str], adapter_of: Callable[[int], str], clients: int, max_tokens: int,
                timeout: float) -> tuple[dict, dict[int, str]]:
    """``clients`` threads stream ``len(prompts)`` completions; returns the summary and each request's text."""
    import httpx

    latencies, ttfts, tokens, texts = [], [], [0], {}
    todo = list(range(len(prompts)))[::-1]
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=timeout) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                body = {"model": adapter_of(i), "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                first, pieces, used = None, [], 0
                try:
                    with c.stream("POST", url, json=body) as r:
                        if r.status_code != 200:
                            r.read()
                            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
                        for line in r.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            event = json.loads(line[6:])
                            if event.get("usage") and not event.get("choices"):
                                used = event["usage"]["completion_tokens"]
                            for choice in event.get("choices") or []:
                                if choice.get("text"):
                                    first = first or time.perf_counter() - t0
                                    pieces.append(choice["text"])
                except Exception as exc:  # noqa: BLE001 -- reported, and the run fails below
                    with lock:
                        errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    return
                done = time.perf_counter() - t0
                with lock:
                    latencies.append(done)
                    ttfts.append(first or done)
                    tokens[0] += used
                    texts[i] = "".join(pieces)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    return summary(tokens[0], time.perf_counter() - t0, latencies, ttfts), texts


def run_naive(model, tokenizer, prompts: list[str], adapter_of: Callable[[int], str],
              max_tokens: int) -> tuple[dict, dict[int, str]]:
    """One greedy ``generate()`` per request after ``set_adapter``, in arrival order."""
    latencies, texts, tokens = [], {}, 0
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        model.set_adapter(adapter_of(i))
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        tokens += new.shape[0]
        texts[i] = tokenizer.decode(new, skip_special_tokens=True)
        latencies.append(time.perf_counter() - t0)
    return summary(tokens, time.perf_counter() - t0, latencies, list(latencies)), texts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="a model deltatune can load (built-in name or directory), or 'tiny': a 2-layer random Llama "
                         "with SmolLM2's tokenizer (seconds, for smoke tests)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target modules, or all-linear")
    ap.add_argument("--workloads", default="abcd", help="which of a, b, c, d to run")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one request may take before the run fails")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")

    tmp = tempfile.mkdtemp()
    base = args.model
    if base == "tiny":
        import tinyserve

        base = tinyserve.make_base(os.path.join(tmp, "base"))
    root = os.path.join(tmp, "adapters")
    log(f"making {args.adapters} adapters on {args.model}")
    names = make_adapters(base, args.adapters, args.rank, targets, root)
    prompts = [f"Write a short note number {i} about the weather:" for i in range(args.requests)]
    spread = lambda i: names[i % len(names)]  # noqa: E731
    results: dict[str, dict] = {}
    texts: dict[str, dict[int, str]] = {}

    if "a" in args.workloads or "b" in args.workloads:
        import socket

        import uvicorn

        from deltatune.cli.serve import build_server

        app, _engine, _reg = build_server(base, [root], max_loaded=args.adapters, max_tokens=args.max_tokens,
                                          device="cpu", max_batch=args.max_batch)
        with socket.socket() as sock:  # a free port on 127.0.0.1
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            log("loading every adapter in the server (one 1-token request each)")
            run_clients(url, ["hi"] * len(names), lambda i: names[i], len(names), 1, args.timeout)
            if "a" in args.workloads:
                log("(a) server, one adapter")
                results["(a) serve, 1 adapter"], texts["a"] = run_clients(
                    url, prompts, lambda i: names[0], args.clients, args.max_tokens, args.timeout)
            if "b" in args.workloads:
                log(f"(b) server, {len(names)} adapters")
                results[f"(b) serve, {len(names)} adapters"], texts["b"] = run_clients(
                    url, prompts, spread, args.clients, args.max_tokens, args.timeout)
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    if "c" in args.workloads:
        from deltatune import PeftModel
        from deltatune.cli.loading import load_model, resolve_model

        log("(c) naive deltatune generate() per request")
        model, tokenizer = load_model(resolve_model(base))
        ours = PeftModel.from_pretrained(model, os.path.join(root, names[0]), adapter_name=names[0])
        for name in names[1:]:
            ours.load_adapter(os.path.join(root, name), adapter_name=name)
        ours.eval()
        results[f"(c) naive generate(), deltatune, {len(names)} adapters"], texts["c"] = run_naive(
            ours, tokenizer, prompts, spread, args.max_tokens)
        del ours, model

    if "d" in args.workloads:
        try:
            import peft
        except ImportError:
            log("(d) skipped: peft is not installed")
        else:
            from deltatune.cli.loading import load_model, resolve_model

            log("(d) naive peft generate() per request")
            model, tokenizer = load_model(resolve_model(base))
            theirs = peft.PeftModel.from_pretrained(model, os.path.join(root, names[0]), adapter_name=names[0])
            for name in names[1:]:
                theirs.load_adapter(os.path.join(root, name), adapter_name=name)
            theirs.eval()
            results[f"(d) naive generate(), peft, {len(names)} adapters"], texts["d"] = run_naive(
                theirs, tokenizer, prompts, spread, args.max_tokens)

    agree = {f"{x} = {y}": sum(texts[x][i] == texts[y][i] for i in range(len(prompts)))
             for x, y in (("b", "c"), ("c", "d")) if x in texts and y in texts}
    load = os.getloadavg()
    print(f"\n{args.model}, {args.requests} requests x {args.max_tokens} tokens (greedy), {args.clients} clients, "
          f"{len(names)} LoRA adapters r={args.rank} on {args.targets}, torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.1f} / {os.cpu_count()} CPUs\n")
    print("| workload | generated tok/s | p50 latency (s) | p95 latency (s) | TTFT p50 (s) | tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tok_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ttft_p50_s']:.2f} | "
              f"{r['tokens']} |")
    keys = list(results)
    by = {k[1]: results[k] for k in keys}
    if "a" in by and "b" in by:
        print(f"\n(b)/(a) throughput: {by['b']['tok_s'] / by['a']['tok_s']:.2f}")
    if "b" in by and "c" in by:
        print(f"(b)/(c) throughput: {by['b']['tok_s'] / by['c']['tok_s']:.2f}")
    for pair, same in agree.items():
        print(f"texts {pair}: {same}/{len(prompts)} requests")
    print(f"\ncommand: python {shlex.join(['bench/serve.py', *(sys.argv[1:] if argv is None else argv)])}")
    payload = {"results": results, "texts_agree": agree, "load_average": load[0], "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return payload


if __name__ == "__main__":
    main()
