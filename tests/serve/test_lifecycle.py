"""Queue limit, and SIGTERM draining a real `deltatune serve` subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from support.server import free_port


def test_more_queued_work_than_max_queue_is_429_with_retry_after(http, server, monkeypatch):
    monkeypatch.setattr(server.engine, "max_queue", 0)
    r = http.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


@pytest.mark.slow  # a real `deltatune serve` subprocess: its imports and model load take tens of seconds
def test_sigterm_drains_the_stream_in_flight_then_exits(files):
    import httpx

    base, root, _adapters, _extra, _ = files
    port = free_port()
    env = {**os.environ, "DELTATUNE_API_KEY": ""}
    env.pop("DELTATUNE_API_KEY")
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", base, "--adapters", root,
                             "--port", str(port), "--device", "cpu", "--max-tokens", "40"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        body = {"model": "lora-r4", "prompt": "hi", "max_tokens": 40, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # after the first chunk: the rest must still arrive
                lines.append(line)
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        usage = [ln for ln in lines if '"usage"' in ln][-1]
        assert '"completion_tokens": 40' in usage or '"finish_reason": "stop"' in "".join(lines)
        # uvicorn re-raises the signal once drained, so the exit status says "ended by SIGTERM", as it should.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        try:  # and it no longer accepts connections
            httpx.get(url + "/health", timeout=2)
            raise AssertionError("still serving after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
