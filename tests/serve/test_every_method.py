"""Every registered method against one real server: an adapter of each (a small config on the tiny serve base) is
either served -- a 4-token greedy completion equal to in-process greedy generation with that adapter alone, the model
`deltatune generate --adapter` loads -- or refused at load with a 4xx ``adapter_not_servable`` naming why and what to
use instead, while the server keeps answering every other request (all of them are sent at once)."""

from __future__ import annotations

import copy
import os
import threading

import pytest
import tinyserve
import torch
from support.contract import CASES

from deltatune.registry import METHODS, load_builtins

load_builtins()
# Two prompts of different lengths per adapter, sent at once: their rows share a batch (left padding, joins).
PROMPTS = ["The team won", "Hello there, how are you doing on this"]
MAX_TOKENS = 4
# Serve-base specifics beside the contract rows (tests/support/contract.py, made for a vocab-100 tiny Llama): the
# X-LoRA experts on q/v only (the contract's also adapt the 100-token embedding).
OVERRIDES = {
    "XLORA": lambda root: {"hidden_size": 32, "adapters": _xlora_experts(root)},
}
# Configs of a served method that the server refuses (its Hooks.serve_refusal): {name: (peft_type, kwargs)}.
EXTRA = {
    "ALORA": ("LORA", lambda root: {"r": 4, "alora_invocation_tokens": _token_ids(" team")}),
}
TASK_ID = 1  # adapters that route by task (Poly, 2 tasks): the request's extra body field `task_id`


def _xlora_experts(root: str) -> dict[str, str]:
    from xlora.experts import write_experts

    return write_experts(os.path.join(root, "xlora-experts"), targets=("q_proj", "v_proj"))


def _token_ids(text: str) -> list[int]:
    return tinyserve.smollm2_tokenizer()(text, add_special_tokens=False)["input_ids"]


def adapter_names() -> list[str]:
    """One adapter per registered method (named by its ``peft_type``), then the :data:`EXTRA` ones."""
    return [str(t) for t in METHODS] + list(EXTRA)


def declared_refusal(config) -> str:
    """What the registry says the server refuses an adapter of ``config`` for; empty: it is served."""
    method = METHODS[config.peft_type]
    refusal = method.hooks.serve_refusal(config) if method.hooks.serve_refusal else ""
    return refusal or ("prompt learning" if method.family == "prompt" else "")


def _config(name: str, scratch: str):
    if name in EXTRA:
        peft_type, kwargs = EXTRA[name][0], EXTRA[name][1](scratch)
    else:
        peft_type, kwargs = name, dict(CASES[name].config)
    if peft_type in OVERRIDES:
        kwargs.update(OVERRIDES[peft_type](scratch))
    return METHODS[peft_type].config_cls(task_type="CAUSAL_LM", **kwargs)


def _routes_by_task(config) -> bool:
    from deltatune.registry import task_count

    return task_count([config]) > 0


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """``(dirs, configs, responses, plain, tokenizer, running, client)``: one adapter per registered method (and
    the :data:`EXTRA` ones) saved on the tiny serve base (``dirs``, ``configs``), one server over them, and two
    requests per adapter (``responses[(name, prompt)]``), all sent at once through one HTTP ``client``, so rows of
    many lanes and adapters run together and a failure in one lane must stay there."""
    import httpx
    from support.server import Running, free_port
    from transformers import AutoModelForCausalLM

    from deltatune import get_peft_model
    from deltatune.cli.serve import build_server

    d = tmp_path_factory.mktemp("every")
    base_dir = tinyserve.make_base(str(d / "base"))
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    root = d / "adapters"
    dirs: dict[str, str] = {}
    configs = {name: _config(name, str(d)) for name in adapter_names()}
    for i, (name, config) in enumerate(configs.items()):
        model = get_peft_model(copy.deepcopy(plain), config)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():  # random adapter tensors: each adapter changes the output
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(p + torch.randn(p.shape, generator=gen) * 0.5)
        dirs[name] = str(root / name.lower())
        model.save_pretrained(dirs[name])
    # Room for every adapter and row at once: one wave of prefills, then one decoding step per lane.
    app, engine, registry = build_server(base_dir, [str(root)], max_loaded=len(dirs),
                                         max_batch=len(dirs) * len(PROMPTS), max_tokens=16, device="cpu")
    running = Running(app, engine, registry, free_port())
    responses: dict[tuple[str, str], httpx.Response] = {}
    limits = httpx.Limits(max_connections=len(dirs) * len(PROMPTS))
    client = httpx.Client(base_url=running.url, timeout=60, limits=limits)  # one client: thread-safe, no TLS setup

    def ask(name: str, prompt: str) -> None:
        body = {"model": name.lower(), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        if _routes_by_task(configs[name]):
            body["task_id"] = TASK_ID
        responses[name, prompt] = client.post("/v1/completions", json=body)

    threads = [threading.Thread(target=ask, args=(t, p)) for t in dirs for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield dirs, configs, responses, plain, engine.tokenizer, running, client
    client.close()
    running.stop()


def greedy(plain, tokenizer, adapter_dir: str) -> dict[str, str]:
    """``{prompt: completion}``: greedy decoding of each prompt alone with the adapter, as `deltatune generate
    --adapter` loads and runs it (``--task-id`` for an adapter that routes by task)."""
    from deltatune import PeftConfig, PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(plain), adapter_dir, is_trainable=False).eval()
    kwargs = {"task_ids": torch.tensor([TASK_ID])} if _routes_by_task(PeftConfig.from_pretrained(adapter_dir)) else {}
    texts = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
        texts[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return texts


@pytest.mark.parametrize("name", adapter_names())
def test_every_method_is_served_exactly_or_refused_cleanly(every_method, name):
    """Served: both completions equal greedy generation alone. Refused: exactly the adapters the registry declares
    (prompt learning, ``Hooks.serve_refusal``), with a 4xx ``adapter_not_servable`` saying why and what to use."""
    dirs, configs, responses, plain, tokenizer, _running, _client = every_method
    refusal = declared_refusal(configs[name])
    expected = greedy(plain, tokenizer, dirs[name]) if not refusal else {}
    for prompt in PROMPTS:
        response = responses[name, prompt]
        body = response.json()
        if not refusal:
            assert response.status_code == 200, body
            assert body["choices"][0]["text"] == expected[prompt], prompt
            continue
        assert 400 <= response.status_code < 500, body
        error = body["error"]
        assert error["code"] == "adapter_not_servable", error
        assert refusal in error["message"] and "deltatune generate --adapter" in error["message"], error["message"]


@pytest.mark.parametrize("failing", ["prefill", "decode"])
def test_a_failing_lane_fails_only_its_own_requests(every_method, failing):
    """An exception while running one lane's rows (here IA3's model raising in the prefill, or in a decoding step
    after its rows joined the batch) becomes a 500 for those requests only: a LoRA request running at the same time
    completes as before, and the failing adapter serves again once its model works."""
    _dirs, _configs, responses, _plain, _tokenizer, running, client = every_method
    prompt = PROMPTS[1]
    model = running.engine.lanes["IA3"].model
    forward = model.forward

    def broken(*args, **kwargs):
        if failing == "prefill" or kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    results = {}

    def ask(name: str) -> None:
        results[name] = client.post("/v1/completions", json={"model": name, "prompt": prompt,
                                                             "max_tokens": MAX_TOKENS, "temperature": 0})

    model.forward = broken
    try:
        threads = [threading.Thread(target=ask, args=(name,)) for name in ("ia3", "lora")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del model.forward
    error = results["ia3"].json()["error"]
    assert results["ia3"].status_code == 500 and error["code"] == "internal_error", error
    assert "RuntimeError: injected failure" in error["message"]
    assert results["lora"].json()["choices"][0]["text"] == responses["LORA", prompt].json()["choices"][0]["text"]
    ask("ia3")
    assert results["ia3"].json()["choices"][0]["text"] == responses["IA3", prompt].json()["choices"][0]["text"]


def test_task_id_picks_the_task_of_an_adapter_that_routes_by_task(every_method):
    """`task_id` (not OpenAI's: the openai client sends it with ``extra_body``) is `deltatune generate --task-id`:
    Poly's completion for task 1 equals generation with ``task_ids=[1]``; an id out of range, or one for an adapter
    without tasks, is a 400 naming ``task_id``."""
    import openai

    _dirs, _configs, responses, _plain, _tokenizer, running, _client = every_method
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model="poly", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"task_id": TASK_ID})
    assert out.choices[0].text == responses["POLY", PROMPTS[0]].json()["choices"][0]["text"]
    for model, task_id, says in (("poly", 2, "out of range"), ("lora", 0, "has no tasks"), ("poly", -1, "between")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=1, extra_body={"task_id": task_id})
        error = info.value.body
        assert error["param"] == "task_id" and says in error["message"], error
