"""`picollm serve` through an in-process client: every endpoint, streaming, echo + logprobs against the
evaluation, every bad request, the Host/Origin/API-key guard, the bounded queue, cancellation when the
client goes away, and one model failing while the other keeps serving. Models: a tiny real study."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import re
import threading
import time

import numpy as np
import pytest
import torch
from serve_helpers import MODEL_IDS, make_broken, make_endless, sse_events, tiny_study
from starlette.testclient import TestClient

from picollm.evaluation import evaluate_tokens
from picollm.generation import generate, generate_ids
from picollm.serve.app import Settings, create_app
from picollm.serve.catalog import load_catalog

TEXT = ("Once upon a time, there was a little dog named Max. He liked to run in the park. One day he found a "
        "red ball under a tree, and he played with it until the sun went down.")


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_path):
    return tiny_study(tmp_path_factory, sample_path)


@pytest.fixture(scope="module")
def catalog(study):
    return load_catalog([str(study)])


def client_for(catalog, **settings) -> TestClient:
    return TestClient(create_app(catalog, Settings(**settings)), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def client(catalog):
    with client_for(catalog) as c:
        yield c


def completion(client, **body):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from the plain forward pass and a log-softmax."""
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        log_p = torch.log_softmax(model(x[:, :-1]).float(), dim=-1)[0]
    return log_p.gather(1, x[0, 1:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# endpoints


def test_health_models_table_and_report(client, catalog, study):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == 2 and health["queue"]["capacity"] == 18
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == MODEL_IDS
    assert client.get("/v1/models/lstm-pico").json()["id"] == "lstm-pico"
    table = client.get("/api/models").json()
    rows = {m["id"]: m for m in table["models"]}
    record = json.loads((study / "study.json").read_text())
    for info in record["runs"].values():
        row = rows[info["label"]]
        summary = json.loads((study / info["dir"] / "summary.json").read_text())
        model = catalog.models[info["label"]].model
        assert row["family"] == info["tags"]["family"] and row["size"] == "pico"
        assert row["parameters"] == model.num_parameters() == summary["num_parameters"]
        assert row["non_embedding_parameters"] == summary["num_parameters_non_embedding"]
        assert row["tokenizer"] == "bpe:512" and row["context_length"] == 32
        for split in ("val", "test"):
            assert row[f"{split}_nll"] == pytest.approx(summary[split]["nll"])
            assert row[f"{split}_bpb"] == pytest.approx(summary[split]["bpb"])
    assert table["studies"] == [{"index": 0, "title": "serve test study", "report": "/studies/0/report"}]
    report = client.get("/studies/0/report")
    assert report.status_code == 200 and report.text == (study / "report" / "index.html").read_text()
    assert client.get("/studies/1/report").status_code == 404


def test_page_is_static_offline_and_locked_down(client):
    from importlib import resources

    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in page.headers
    static = resources.files("picollm.serve") / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["app.js", "index.html", "style.css"]
    for name in names:
        served = client.get(f"/static/{name}")
        assert served.status_code == 200 and served.text == (static / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", served.text), f"{name} links elsewhere"
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load a CDN


def test_greedy_completion_is_the_librarys_generation(client, catalog):
    for model_id in MODEL_IDS:
        model = catalog.models[model_id].model
        out = completion(client, model=model_id, prompt="Once upon a time", max_tokens=12, temperature=0)
        want = generate(model, "Once upon a time", strategy="greedy", max_new_tokens=12)[0]
        choice = out["choices"][0]
        assert out["object"] == "text_completion" and out["model"] == model_id
        assert choice["text"] == want and choice["index"] == 0 and choice["logprobs"] is None
        new = len(model.tokenizer.encode(want))
        assert choice["finish_reason"] == ("length" if new == 12 else "stop")
        prompt_tokens = 1 + len(model.tokenizer.encode("Once upon a time"))  # the end-of-text token first
        assert out["usage"]["prompt_tokens"] == prompt_tokens
        assert out["usage"]["total_tokens"] == prompt_tokens + out["usage"]["completion_tokens"]


def test_prompt_forms_n_and_seed(client, catalog):
    tok = catalog.models["transformer-pico"].tokenizer
    ids = [tok.eot_id, *tok.encode("The cat")]
    body = dict(model="transformer-pico", max_tokens=8, temperature=1.0, seed=3)
    by_text = completion(client, prompt=["The cat", "A dog"], n=2, **body)
    assert [c["index"] for c in by_text["choices"]] == [0, 1, 2, 3]
    by_ids = completion(client, prompt=ids, n=2, **body)["choices"]
    by_id_lists = completion(client, prompt=[ids], n=2, **body)["choices"]
    # the same rows, sampled with the same seed: the same text, whichever way the prompt was given
    assert [c["text"] for c in by_ids] == [c["text"] for c in by_id_lists]
    assert completion(client, prompt=ids, n=2, **body)["choices"] == by_ids  # same seed, same text
    other = completion(client, prompt=ids, n=2, **{**body, "seed": 4})["choices"]
    assert [c["text"] for c in other] != [c["text"] for c in by_ids]
    expected = generate_ids(catalog.models["transformer-pico"].model, [ids], strategy="sample", max_new_tokens=8,
                            num_samples=2, seed=3)
    assert [c["text"] for c in by_ids] == [tok.decode(e) for e in expected]


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_echo_logprobs_are_the_evaluations(client, catalog, model_id):
    """`max_tokens: 0, echo: true, logprobs: 1` (lm-eval-harness's loglikelihood request): the
    log-probability of every prompt token, the first null, equal to the evaluation's within 1e-4 (fp32)."""
    served = catalog.models[model_id]
    tok, model = served.tokenizer, served.model
    ids = [tok.eot_id, *tok.encode(TEXT)][:served.context_length + 1]  # one evaluation window
    assert len(ids) == served.context_length + 1
    out = completion(client, model=model_id, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == len(ids)
    got = torch.tensor(lp["token_logprobs"][1:])
    assert torch.allclose(got, reference_logprobs(model, ids), atol=1e-4, rtol=0)
    evaluation = evaluate_tokens(model, np.array(ids), served.context_length, dtype="fp32")
    assert -got.mean().item() == pytest.approx(evaluation.nll, abs=1e-4)
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= value - 1e-6
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"]))

    # the same text as a string is read after an end-of-text token: every token of it has a value
    as_text = completion(client, model=model_id, prompt=tok.decode(ids[1:]), max_tokens=0, echo=True, logprobs=0)
    values = as_text["choices"][0]["logprobs"]["token_logprobs"]
    assert torch.allclose(torch.tensor(values), got, atol=1e-4, rtol=0)


def test_loglikelihood_request_as_lm_eval_harness_sends_it(client, catalog):
    """context + continuation as token ids, max_tokens 1, echo, logprobs 1, temperature 0; the harness
    sums token_logprobs[ctxlen:-1] and calls it greedy when each equals its top_logprobs maximum."""
    served = catalog.models["lstm-pico"]
    context = [served.tokenizer.eot_id, *served.tokenizer.encode("Once upon a time")]
    greedy = generate_ids(served.model, [context], max_new_tokens=3, stop_at_eot=False)[0]
    for continuation, is_greedy in ((greedy, True), ([greedy[0], greedy[1], (greedy[2] + 1) % 512], False)):
        out = completion(client, model="lstm-pico", prompt=context + continuation, max_tokens=1, echo=True,
                         logprobs=1, temperature=0, seed=1234)
        lp = out["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(context) + len(continuation) + 1
        values, tops = lp["token_logprobs"][len(context):-1], lp["top_logprobs"][len(context):-1]
        reference = reference_logprobs(served.model, context + continuation)[len(context) - 1:]
        assert sum(values) == pytest.approx(float(reference.sum()), abs=1e-4)
        assert all(v == max(t.values()) for v, t in zip(values, tops)) is is_greedy


def test_streamed_completion_equals_the_whole_one(client):
    body = dict(model="transformer-pico", prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=5,
                logprobs=2)
    whole = completion(client, **body)["choices"][0]
    response = client.post("/v1/completions", json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == whole["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks[:-2]]
    assert sum((s["token_logprobs"] for s in streamed), []) == whole["logprobs"]["token_logprobs"]
    assert sum((s["text_offset"] for s in streamed), []) == whole["logprobs"]["text_offset"]
    assert all(len(t) == 2 for s in streamed for t in s["top_logprobs"])


def test_stop_sequences_end_the_text_before_them(client):
    body = dict(model="lstm-pico", prompt="Once upon a time", max_tokens=24, temperature=0)
    full = completion(client, **body)["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    cut = full[:full.index(stop)]
    stopped = completion(client, **body, stop=[stop, "never appears"])["choices"][0]
    assert stopped["text"] == cut and stopped["finish_reason"] == "stop"
    events = sse_events(client.post("/v1/completions", json={**body, "stop": stop, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_page_generation_streams_each_model_with_alternatives(client, catalog):
    body = {"models": MODEL_IDS, "prompt": "Once upon a time", "strategy": "greedy", "max_tokens": 6}
    events = sse_events(client.post("/api/generate", json=body).text)
    assert events[-1] == {"done": True}
    for model_id in MODEL_IDS:
        served = catalog.models[model_id]
        tokens = [e["token"] for e in events if e.get("model") == model_id and "token" in e]
        want = generate_ids(served.model, [[served.tokenizer.eot_id, *served.tokenizer.encode("Once upon a time")]],
                            max_new_tokens=6)[0]
        assert [t["id"] for t in tokens] == want
        for t in tokens:
            top = t["top"]
            assert len(top) == 10 and top[0][2] == t["id"]  # greedy: the chosen token is the likeliest
            assert top[0][1] == pytest.approx(t["logprob"]) and [p[1] for p in top] == sorted(
                (p[1] for p in top), reverse=True)
            assert sum(math.exp(p[1]) for p in top) <= 1 + 1e-5
        done = [e for e in events if e.get("model") == model_id and "done" in e]
        assert done == [{"model": model_id, "done": "length" if len(want) == 6 else "stop", "tail": ""}]
    # the models take turns, so that their columns fill together
    order = [e["model"] for e in events if "token" in e]
    assert order[:4] == [MODEL_IDS[0], MODEL_IDS[1], MODEL_IDS[0], MODEL_IDS[1]]


def test_scoring_a_text(client, catalog):
    results = client.post("/api/score", json={"models": MODEL_IDS, "text": TEXT}).json()["results"]
    assert [r["model"] for r in results] == MODEL_IDS
    for r in results:
        served = catalog.models[r["model"]]
        ids = [served.tokenizer.eot_id, *served.tokenizer.encode(TEXT)]
        tokens = r["tokens"]
        assert "".join(t["text"] for t in tokens) == TEXT and [t["id"] for t in tokens] == ids[1:]
        window = ids[:served.context_length + 1]
        got = torch.tensor([t["logprob"] for t in tokens[:served.context_length]])
        assert torch.allclose(got, reference_logprobs(served.model, window), atol=1e-4, rtol=0)
        nll = -sum(t["logprob"] for t in tokens)
        assert r["nll"] == pytest.approx(nll) and r["num_tokens"] == len(ids) - 1
        assert r["bits"] == pytest.approx(nll / math.log(2))
        assert all(t["bits"] == pytest.approx(-t["logprob"] / math.log(2)) for t in tokens)
        assert r["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)))
        assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()))
        assert all(len(t["top"]) == 10 for t in tokens)
        # longer than one window: the evaluation's windows, so the mean is the evaluation's NLL
        evaluation = evaluate_tokens(served.model, np.array(ids), served.context_length, dtype="fp32")
        assert r["nll_per_token"] == pytest.approx(evaluation.nll, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# bad requests: one 4xx each, naming the field


X = {"model": "lstm-pico", "prompt": "x"}  # a good request, spoilt one field at a time below
# case: (body, status, words the message must hold, the field its "param" names)
BAD = {
    "not JSON": ("{model:", 400, ["not valid JSON"], None),
    "not an object": ([1, 2], 400, ["JSON object"], None),
    "no model": ({"prompt": "x"}, 400, ["'model' is required"], "model"),
    "unknown model": ({**X, "model": "gpt-4"}, 404, ["model 'gpt-4' is not loaded", "lstm-pico"], "model"),
    "a path for a model": ({**X, "model": "/etc/passwd"}, 404, ["is not loaded"], "model"),
    "no prompt": ({"model": "lstm-pico"}, 400, ["'prompt' is required"], "prompt"),
    "prompt a number": ({**X, "prompt": 5}, 400, ["'prompt' must be"], "prompt"),
    "token id outside the vocabulary": ({**X, "prompt": [1, 512]}, 400, ["'prompt' holds 512"], "prompt"),
    "mixed prompt list": ({**X, "prompt": ["a", 3.5]}, 400, ["'prompt[1]'"], "prompt[1]"),
    "prompt too long": ({**X, "prompt": "a b " * 1500}, 400, ["'prompt' is", "limit is 2048"], "prompt"),
    "prompt far too long": ({**X, "prompt": "a" * 40000}, 400, ["'prompt' is 40,000 characters"], "prompt"),
    "max_tokens over the limit": ({**X, "max_tokens": 1025}, 400, ["'max_tokens' must be at most 1024",
                                                                   "--max-tokens"], "max_tokens"),
    "max_tokens 0 without echo": ({**X, "max_tokens": 0}, 400, ["'max_tokens' must be at least 1", "echo"],
                                  "max_tokens"),
    "max_tokens negative": ({**X, "max_tokens": -1, "echo": True}, 400, ["'max_tokens' must be at least 0"],
                            "max_tokens"),
    "max_tokens a string": ({**X, "max_tokens": "5"}, 400, ["'max_tokens' must be an integer"], "max_tokens"),
    "n over 8": ({**X, "n": 9}, 400, ["'n' must be at most 8"], "n"),
    "temperature over 2": ({**X, "temperature": 2.5}, 400, ["'temperature' must be in [0.0, 2.0]"], "temperature"),
    "temperature negative": ({**X, "temperature": -0.1}, 400, ["'temperature'"], "temperature"),
    "top_p 0": ({**X, "top_p": 0}, 400, ["'top_p' must be in (0.0, 1.0]"], "top_p"),
    "top_p over 1": ({**X, "top_p": 1.5}, 400, ["'top_p'"], "top_p"),
    "top_p and top_k": ({**X, "top_p": 0.5, "top_k": 5}, 400, ["not both"], "top_k"),
    "logprobs over 20": ({**X, "logprobs": 21}, 400, ["'logprobs' must be at most 20"], "logprobs"),
    "seventeen stops": ({**X, "stop": [str(i) for i in range(17)]}, 400, ["'stop' must be"], "stop"),
    "negative seed": ({**X, "seed": -1}, 400, ["'seed' must be at least 0"], "seed"),
    "echo not a boolean": ({**X, "echo": "yes"}, 400, ["'echo' must be true or false"], "echo"),
    "unknown field": ({**X, "temprature": 1}, 400, ["unknown field 'temprature'"], "temprature"),
    "unsupported field": ({**X, "presence_penalty": 1}, 400, ["'presence_penalty' is not supported"],
                          "presence_penalty"),
    "too many completions": ({**X, "prompt": ["x"] * 8, "n": 5}, 400, ["40 completions"], "n"),
}




@pytest.mark.parametrize("case", list(BAD))
def test_bad_completion_requests_are_one_clear_4xx(client, case):
    body, status, words, param = BAD[case]
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text and "\n" not in error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/generate", {"models": ["nope"], "prompt": "x"}, 404, ["model 'nope' is not loaded"]),
    ("/api/generate", {"models": [], "prompt": "x"}, 400, ["'models' must be a non-empty list"]),
    ("/api/generate", {"models": ["lstm-pico"], "prompt": "x", "strategy": "beam"}, 400,
     ["'strategy' must be one of"]),
    ("/api/generate", {"models": ["lstm-pico"], "prompt": "x", "max_tokens": 5000}, 400,
     ["'max_tokens' must be at most"]),
    ("/api/generate", {"models": ["lstm-pico"], "prompt": "x", "temperature": 0}, 400, ["'temperature' must be in"]),
    ("/api/score", {"models": ["lstm-pico"], "text": ""}, 400, ["'text' is empty"]),
    ("/api/score", {"models": ["lstm-pico", "lstm-pico"], "text": "x"}, 400, ["names a model twice"]),
    ("/api/score", {"models": ["lstm-pico"]}, 400, ["'text' is required"]),
])
def test_bad_page_requests(client, path, body, status, words):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["error"]["message"]


def test_wrong_method_route_type_and_size(client):
    assert client.get("/v1/completions").json()["error"]["message"] == "GET is not allowed on /v1/completions"
    assert client.get("/v2/nothing").status_code == 404
    form = client.post("/v1/completions", data={"model": "lstm-pico", "prompt": "x"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
    big = client.post("/v1/completions", content=b"{" + b" " * (1 << 20) + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    assert client.get("/studies/x/report").status_code == 400


# ---------------------------------------------------------------------------------------------
# who may call


def test_host_and_origin_checks(client):
    ok = {"model": "lstm-pico", "prompt": "x", "max_tokens": 1}
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
    rebound = client.get("/v1/models", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403 and "Host 'attacker.example:8000' is not allowed" in rebound.text
    cross = client.post("/v1/completions", json=ok, headers={"Origin": "http://attacker.example"})
    assert cross.status_code == 403 and "cross-origin" in cross.json()["error"]["message"]
    assert client.post("/v1/completions", json=ok, headers={"Origin": "null"}).status_code == 403
    assert client.post("/v1/completions", json=ok, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    same = client.post("/v1/completions", json=ok, headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 200
    preflight = client.options("/v1/completions", headers={"Origin": "http://127.0.0.1:8000",
                                                          "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_allowed_host_and_api_key(catalog):
    with client_for(catalog, api_key="s3cret", allowed_hosts={"box.lan"}) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        missing = c.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "--api-key" in missing.json()["error"]["message"]
        assert c.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.get("/v1/models", headers={**good, "Host": "box.lan:8000"}).status_code == 200
        assert c.get("/v1/models", headers={**good, "Host": "other.lan"}).status_code == 403


# ---------------------------------------------------------------------------------------------
# the queue, cancellation, failures and memory


def test_full_queue_is_503_with_retry_after(catalog, monkeypatch):
    model = catalog.models["lstm-pico"].model
    release = threading.Event()
    prefill = model.prefill

    def blocked(tokens):
        release.wait(10)
        return prefill(tokens)

    monkeypatch.setattr(model, "prefill", blocked)
    body = {"model": "lstm-pico", "prompt": "x", "max_tokens": 2}
    with client_for(catalog, workers=1, queue_size=1) as c:
        engine = c.app.app.state.engine
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/completions", json=body)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 10
            while engine.active < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = c.post("/v1/completions", json=body)
            health = c.get("/health").json()  # health never waits for a worker
        finally:
            release.set()
            for t in threads:
                t.join(10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"]["message"]
        assert health["queue"]["active"] == 2
        assert [r.status_code for r in results] == [200, 200]
        assert engine.stats["refused"] == 1


async def _call_then_leave(app, path: str, body: dict, steps: dict) -> list[dict]:
    """Call the ASGI app as a server would, with a client that goes away once the model has taken five
    steps. Returns the messages the app sent."""
    sent: list[dict] = []
    state = {"body_sent": False}

    async def receive():
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        while steps["steps"] < 5:
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")]}
    await asyncio.wait_for(app(scope, receive, send), 20)
    return sent


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"models": ["transformer-pico"], "prompt": "Once", "max_tokens": 1000}),
    ("/v1/completions", {"model": "transformer-pico", "prompt": "Once", "max_tokens": 1000, "stream": True}),
    ("/v1/completions", {"model": "transformer-pico", "prompt": "Once", "max_tokens": 1000}),
    ("/api/score", {"models": ["transformer-pico"], "text": "Once upon a time " * 100}),
])
def test_a_client_that_disconnects_cancels_its_generation(catalog, monkeypatch, path, body):
    model = catalog.models["transformer-pico"].model
    if path == "/api/score":  # scoring has no steps: make each window slow instead
        steps = {"steps": 0}
        features = model.features

        def slow_features(tokens):
            steps["steps"] += 1
            time.sleep(0.05)
            return features(tokens)

        monkeypatch.setattr(model, "features", slow_features)
    else:
        steps = make_endless(monkeypatch, model, delay_s=0.005)
    app = create_app(catalog, Settings())
    engine = app.app.state.engine
    sent = asyncio.run(_call_then_leave(app, path, body, steps))
    deadline = time.monotonic() + 5
    while engine.active:
        assert time.monotonic() < deadline, "the cancelled job kept running"
        time.sleep(0.01)
    assert engine.stats["cancelled"] == 1 and engine.stats["finished"] == 0
    count = steps["steps"]
    assert 5 <= count < 100, count  # stopped within a few steps of the disconnect, far from the end
    time.sleep(0.1)
    assert steps["steps"] == count
    assert sent and sent[0]["type"] == "http.response.start"
    engine.shutdown()


def test_one_broken_model_does_not_take_the_others_down(client, catalog, monkeypatch):
    make_broken(monkeypatch, catalog.models["lstm-pico"].model)
    broken = client.post("/v1/completions", json={"model": "lstm-pico", "prompt": "x", "max_tokens": 3})
    assert broken.status_code == 500
    message = broken.json()["error"]["message"]
    assert message == "model 'lstm-pico' failed: RuntimeError: this model is broken on purpose"
    assert completion(client, model="transformer-pico", prompt="x", max_tokens=3)["choices"][0]["text"]
    events = sse_events(client.post("/api/generate", json={"models": MODEL_IDS, "prompt": "x", "max_tokens": 3}).text)
    assert [e for e in events if e.get("model") == "lstm-pico"] == [
        {"model": "lstm-pico", "error": "model 'lstm-pico' failed: RuntimeError: this model is broken on purpose"}]
    assert len([e for e in events if e.get("model") == "transformer-pico" and "token" in e]) >= 1
    scored = client.post("/api/score", json={"models": MODEL_IDS, "text": "A cat."}).json()["results"]
    assert "error" in scored[0] and scored[1]["num_tokens"] >= 1
    assert client.get("/health").json()["status"] == "ok"


def test_models_are_shared_not_copied(client, catalog):
    from picollm.models.base import LanguageModel

    pointers = {m: [p.data_ptr() for p in s.model.parameters()] for m, s in catalog.models.items()}
    gc.collect()
    before = sum(issubclass(type(o), LanguageModel) for o in gc.get_objects())
    for i in range(10):
        completion(client, model=MODEL_IDS[i % 2], prompt="The dog", max_tokens=4, temperature=1.0, seed=i)
        client.post("/api/score", json={"models": MODEL_IDS, "text": "The dog ran."})
    gc.collect()
    assert sum(issubclass(type(o), LanguageModel) for o in gc.get_objects()) == before
    assert {m: [p.data_ptr() for p in s.model.parameters()] for m, s in catalog.models.items()} == pointers
    assert all(not s.model.training for s in catalog.models.values())
