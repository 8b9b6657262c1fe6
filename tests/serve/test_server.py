"""deltatune serve end to end: the official openai client and raw HTTP against a real server (tests/serve/conftest)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from support.server import API_KEY

from deltatune.cli import main as cli_main

PROMPTS = ["The team won", "Hello there, how are", "Software update fixes bugs in the"]


def generate_cli(capsys, base, prompt, adapter=None, *extra):
    """What `deltatune generate --raw` prints for ``prompt`` (greedy unless ``extra`` says otherwise)."""
    argv = ["generate", prompt, "--model", base, "--raw", "--device", "cpu", *extra]
    if adapter:
        argv += ["--adapter", adapter]
    capsys.readouterr()
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


@pytest.fixture(scope="module")
def reference(files):
    """``generate_lib(prompt, adapter, max_new_tokens, temperature=0, top_p=1, seed=0)``: what `deltatune generate
    --raw` prints, computed in process with the CLI's own loader (each model loaded once): the same
    tokenisation, seeding and generate() arguments as the CLI, without a model load per comparison."""
    import copy

    from deltatune.cli.loading import attach_adapter, load_with_adapter, resolve_model

    base, _root, adapters, _extra, _ = files
    plain, tokenizer = load_with_adapter(None, base, torch.device("cpu"))[:2]
    loaded: dict = {None: plain}

    def generate_lib(prompt, adapter, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        if adapter not in loaded:  # the CLI's attach on a copy of the one loaded base (no reload per adapter)
            loaded[adapter] = attach_adapter(copy.deepcopy(plain), adapters[adapter], base, resolve_model(base), {})
        model = loaded[adapter].eval()
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        torch.manual_seed(seed)
        kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                  "pad_token_id": tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=None)
        else:  # greedy: silence the sampling defaults a generation config may carry, as the CLI does
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate_lib


def test_models_lists_the_base_and_every_adapter_folder(http, files):
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids[0] == "base"
    assert {"lora-r4", "lora-r8", "dora", "ia3", "misfit", "spare"} <= set(ids)


def test_completions_equal_deltatune_generate_for_every_adapter_concurrently(client, files, capsys, reference):
    """Six concurrent requests (five adapters of three methods, and the base): each equals greedy generation of
    its prompt alone -- the real `deltatune generate` CLI for one of them, the same thing in process for the rest."""
    base, _root, adapters, _extra, _ = files
    jobs = [(PROMPTS[0], a) for a in [None, "lora-r4", "lora-r8", "dora", "ia3"]] + [(PROMPTS[1], "lora-r4")]
    results: dict[int, object] = {}

    def ask(i, prompt, adapter):
        results[i] = client.completions.create(model=adapter or "base", prompt=prompt, max_tokens=12,
                                               temperature=0)

    threads = [threading.Thread(target=ask, args=(i, p, a)) for i, (p, a) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(jobs)
    texts = set()
    for i, (prompt, adapter) in enumerate(jobs):
        if adapter == "lora-r8":
            expected = generate_cli(capsys, base, prompt, adapters[adapter], "--max-new-tokens", "12")
        else:
            expected = reference(prompt, adapter, 12)
        choice = results[i].choices[0]
        assert choice.text == expected, (prompt, adapter)
        assert results[i].usage.completion_tokens == 12 and choice.finish_reason == "length"
        texts.add(choice.text)
    assert len(texts) == len(jobs)  # every adapter changes the output: the rows really ran through their own


def test_chat_equals_generate_chat(client, files, capsys):
    base, _root, adapters, _extra, _ = files
    reply = client.chat.completions.create(model="lora-r8", messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=10, temperature=0)
    expected = generate_cli(capsys, base, "Hi there", adapters["lora-r8"], "--chat", "--max-new-tokens", "10")
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"


def test_sampling_with_a_seed_equals_generate_with_that_seed_and_n_uses_seed_plus_index(client, reference):
    out = client.completions.create(model="dora", prompt=PROMPTS[0], max_tokens=8, temperature=0.9, top_p=0.8,
                                    seed=5, n=2)
    for i in range(2):  # as `deltatune generate --temperature 0.9 --top-p 0.8 --seed 5+i` (in process)
        assert out.choices[i].text == reference(PROMPTS[0], "dora", 8, temperature=0.9, top_p=0.8, seed=5 + i)
    assert out.choices[0].text != out.choices[1].text


def test_streaming_sends_the_same_text_in_pieces(client):
    whole = client.completions.create(model="lora-r4", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="lora-r4", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True)]
    assert len([p for p in pieces if p]) > 2
    assert "".join(pieces) == whole.choices[0].text
    chat = client.chat.completions.create(model="ia3", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, stream=True)
    chunks = list(chat)
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    plain = client.chat.completions.create(model="ia3", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                           temperature=0)
    assert text == plain.choices[0].message.content


def test_stop_string_cuts_the_text_before_it(client):
    full = client.completions.create(model="lora-r8", prompt=PROMPTS[2], max_tokens=16, temperature=0).choices[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = client.completions.create(model="lora-r8", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lora-r8", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


def test_bad_requests_get_400_with_an_openai_error_body(http, server):
    post = lambda body: http.post("/v1/completions", content=body if isinstance(body, str) else json.dumps(body))
    assert "not valid JSON" in error_of(post("{not json"), 400)["message"]
    assert error_of(post({"prompt": "hi"}), 400)["param"] == "model"
    assert error_of(post({"model": "base"}), 400)["param"] == "prompt"
    err = error_of(post({"model": "base", "prompt": "hi", "max_tokens": 65}), 400)
    assert "limit of 64" in err["message"] and err["code"] == "max_tokens_exceeded"
    long_prompt = "word " * 300  # beyond the tiny model's 256-token context
    assert error_of(post({"model": "base", "prompt": long_prompt, "max_tokens": 4}), 400)["code"] == \
        "context_length_exceeded"
    assert error_of(http.post("/v1/chat/completions", json={"model": "base"}), 400)["param"] == "messages"
    assert error_of(post({"model": "base", "prompt": "hi", "temperature": "hot"}), 400)["param"] == "temperature"


def test_unknown_adapter_is_404_listing_close_names(http):
    err = error_of(http.post("/v1/completions", json={"model": "lora-r5", "prompt": "hi"}), 404)
    assert "lora-r4" in err["message"] and "lora-r8" in err["message"] and err["code"] == "model_not_found"


def test_an_adapter_that_does_not_fit_is_refused_with_module_and_shapes_and_the_server_keeps_serving(client, http):
    err = error_of(http.post("/v1/completions", json={"model": "misfit", "prompt": "hi", "max_tokens": 2}), 400)
    assert "q_proj" in err["message"] and "48" in err["message"], err["message"]
    assert client.completions.create(model="lora-r4", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_an_adapter_that_rewrites_the_base_is_refused_and_the_shared_base_is_untouched(client, http):
    before = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
    err = error_of(http.post("/v1/completions", json={"model": "pissa", "prompt": "hi", "max_tokens": 2}), 400)
    assert err["code"] == "adapter_not_servable" and "path_initial_model_for_weight_conversion" in err["message"]
    after = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
    assert after == before


def test_api_key_is_required(server):
    import httpx

    assert error_of(httpx.get(server.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_lru_keeps_at_most_max_loaded_adapters_and_reloads_evicted_ones_equal(client, server):
    before = client.completions.create(model="lora-r4", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    for name in ("lora-r8", "dora", "ia3"):
        client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=2, temperature=0)
        assert len(server.engine.loaded) <= 2
    assert "lora-r4" not in server.engine.loaded
    again = client.completions.create(model="lora-r4", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert again.choices[0].text == before.choices[0].text
    assert server.engine.metrics.adapter_evictions >= 2


def test_metrics_count_requests_tokens_and_batches(http, client):
    client.completions.create(model="lora-r4", prompt="hi", max_tokens=3, temperature=0)
    text = http.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['deltatune_requests_total{status="ok"}'] >= 1
    assert values["deltatune_generation_tokens_total"] >= 3
    assert values["deltatune_prompt_tokens_total"] >= 1
    assert values["deltatune_running_rows"] == 0 and values["deltatune_queued_rows"] == 0
    assert 1 <= values["deltatune_adapters_loaded"] <= 2
    assert values['deltatune_batch_size_bucket{le="+Inf"}'] == values["deltatune_batch_size_count"] > 0


def test_runtime_load_and_unload_stay_inside_the_roots(http, client, files):
    _base, root, adapters, extra, outside = files
    err = error_of(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": outside}), 403)
    assert err["code"] == "path_not_allowed"
    escape = f"{extra}/../outside"
    assert error_of(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": escape}), 403)
    assert error_of(http.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": f"{root}/ia3"}),
                    400)["code"] == "invalid_adapter_name"
    ok = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": f"{root}/lora-r4"})
    assert ok.status_code == 200, ok.text
    late = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    same = client.completions.create(model="lora-r4", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert late.choices[0].text == same.choices[0].text
    misfit = http.post("/v1/load_lora_adapter", json={"lora_name": "late2", "lora_path": f"{root}/misfit"})
    assert "q_proj" in error_of(misfit, 400)["message"]
    assert "late2" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert error_of(http.post("/v1/completions", json={"model": "late", "prompt": "hi"}), 404)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(server, stream, monkeypatch):
    import time

    import httpx

    decode = server.engine._decode
    monkeypatch.setattr(server.engine, "_decode", lambda lane: (time.sleep(0.03), decode(lane)))  # 64 steps: ~2 s

    body = {"model": "lora-r8", "prompt": "hi", "max_tokens": 64, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    engine = server.engine
    tokens_before = engine.metrics.generation_tokens
    with httpx.Client(base_url=server.url, headers=headers, timeout=0.3) as c:
        try:
            with c.stream("POST", "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    break
        except httpx.ReadTimeout:
            pass
    deadline = time.monotonic() + 10
    while engine.running_rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running_rows() == 0
    assert engine.metrics.generation_tokens - tokens_before < 64  # freed before it ran to max_tokens


def test_decoding_steps_reuse_the_lora_slots(client, server, monkeypatch):
    """Once an adapter's rows ran, later requests' prefill and decoding steps gather from the layers' adapter slots
    without refilling them (no per-step restacking of the adapters' A/B)."""
    from support.layers import count_slot_fills

    from deltatune.lora.layer import LoraLayer

    first = client.completions.create(model="lora-r4", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    fills = count_slot_fills(monkeypatch)
    again = client.completions.create(model="lora-r4", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert again.usage.completion_tokens == 8 and again.choices[0].text == first.choices[0].text
    assert fills == []
    key, internal = server.engine.loaded["lora-r4"]
    layers = [m for m in server.engine.lanes[key].model.modules() if isinstance(m, LoraLayer) and internal in m.r]
    assert layers and all(m._slots is not None and internal in m._slots.slot for m in layers)  # the slot path ran
