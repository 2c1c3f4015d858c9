"""`picollm serve` as a user runs it: its own process on a loopback port, driven by the official `openai`
client and by plain HTTP: completions, streaming, logprobs, a client that hangs up, a bounded load test
(64 concurrent requests, /health timed throughout) and memory over 500 requests. Loopback only."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import MODEL_IDS, process_server, rss_kib, tiny_study

from picollm.checkpoint import load
from picollm.generation import generate


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_path):
    return tiny_study(tmp_path_factory, sample_path)


@pytest.fixture(scope="module")
def server(study):
    with process_server(str(study), "--workers", "2", "--queue", "8", "--threads", "1") as (url, proc, log):
        yield url, proc, log


def test_openai_client_completions_streaming_and_logprobs(server, study):
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    assert [m.id for m in client.models.list()] == MODEL_IDS

    runs = {p.name.rsplit("-", 1)[0]: p for p in (study / "runs").iterdir()}
    model = load(runs["transformer-pico"])
    want = generate(model, "Once upon a time", strategy="greedy", max_new_tokens=10)[0]
    done = client.completions.create(model="transformer-pico", prompt="Once upon a time", max_tokens=10,
                                     temperature=0)
    assert done.choices[0].text == want and done.usage.completion_tokens == len(model.tokenizer.encode(want))

    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model="transformer-pico", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
        if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces) == want

    scored = client.completions.create(model="lstm-pico", prompt="The cat sat.", max_tokens=0, echo=True,
                                       logprobs=3)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "The cat sat." and "".join(lp.tokens) == "The cat sat."
    assert all(v < 0 for v in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)

    with pytest.raises(openai.NotFoundError, match="is not loaded"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be at most 1024"):
        client.completions.create(model="lstm-pico", prompt="x", max_tokens=5000)


def test_a_client_that_hangs_up_stops_its_generation(server):
    url, _, _ = server
    before = httpx.get(f"{url}/health").json()["jobs"]["cancelled"]
    body = {"model": "transformer-pico", "prompt": "Once", "max_tokens": 1024, "n": 8, "temperature": 2.0,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # one chunk, then hang up long before 8 x 1024 tokens
    deadline = time.monotonic() + 10
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["queue"]["active"] == 0:
            break
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    assert health["jobs"]["cancelled"] == before + 1


def test_load_64_concurrent_requests_and_health_stays_fast(server):
    """64 requests at once across both models: each succeeds or is refused with 503 + Retry-After,
    and /health answers within a second all along. Bounded: 64 requests, stops by itself."""
    url, _, _ = server
    stop = threading.Event()
    health_times: list[float] = []
    # clients made (and connected) before the flood, so that only the server's answer is timed
    health = httpx.Client(timeout=5)
    load = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
    assert health.get(f"{url}/health").status_code == 200

    def watch_health() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            assert health.get(f"{url}/health").status_code == 200
            health_times.append(time.perf_counter() - started)
            time.sleep(0.02)

    def one(i: int) -> httpx.Response:
        body = {"model": MODEL_IDS[i % 2], "prompt": f"Story {i}: once upon a time", "max_tokens": 16,
                "temperature": 1.0, "seed": i}
        return load.post(f"{url}/v1/completions", json=body)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            responses = list(pool.map(one, range(64)))
    finally:
        stop.set()
        watcher.join(10)
        health.close()
        load.close()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= 10  # the workers and the queue's 8 places, at least
    for r in responses:
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] is not None
        else:
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
    assert health_times and max(health_times) < 1.0, max(health_times)


def test_memory_is_flat_over_500_requests(server):
    url, proc, _ = server
    with httpx.Client(timeout=30) as c:
        def requests(count: int, offset: int) -> None:
            for i in range(offset, offset + count):
                body = {"model": MODEL_IDS[i % 2], "prompt": f"The dog {i}", "max_tokens": 4, "temperature": 1.0,
                        "seed": i, "logprobs": 2}
                assert c.post(f"{url}/v1/completions", json=body).status_code == 200

        requests(50, 0)
        after_50 = rss_kib(proc.pid)
        requests(450, 50)
        after_500 = rss_kib(proc.pid)
    assert abs(after_500 - after_50) <= 0.10 * after_50, (after_50, after_500)
