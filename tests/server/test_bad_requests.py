"""Every bad request gets a 4xx in OpenAI's error shape, and the server keeps serving; a client that
goes away mid-stream frees its batch slot; a full queue answers 429; --api-key is enforced."""

import json
import time

import httpx
import pytest

import edge_moe
from tests.server.conftest import Running

GOOD = {"prompt": "def main():\n    ", "max_tokens": 4}


def post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers or {}, timeout=60)


@pytest.mark.parametrize("path, body, status, param", [
    ("/completions", "{not json", 400, None),
    ("/completions", "[1, 2]", 400, None),
    ("/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("/completions", {**GOOD, "bits": 9}, 400, None),
    ("/completions", {**GOOD, "min_bits": 3}, 400, None),
    ("/completions", {**GOOD, "quality": "high"}, 400, "quality"),
    ("/completions", {**GOOD, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/completions", {**GOOD, "max_tokens": -1}, 400, None),
    ("/completions", {**GOOD, "temperature": -1}, 400, None),
    ("/completions", {**GOOD, "top_p": 0}, 400, None),
    ("/completions", {**GOOD, "n": 2}, 400, "n"),
    ("/completions", {**GOOD, "stop": [1]}, 400, "stop"),
    ("/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/chat/completions", {"messages": []}, 400, "messages"),
    ("/nowhere", GOOD, 404, None),
])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert post(server, "/completions", GOOD).status_code == 200


def wait_idle(model, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while model.batcher.active and time.monotonic() < deadline:
        time.sleep(0.01)


def test_client_leaving_mid_stream_frees_its_slot(server):
    """A closed connection ends the request long before its 1000 tokens (about a second of decoding
    here)."""
    metrics = server.app.state.metrics
    before = metrics.completion_tokens
    body = json.dumps({**GOOD, "max_tokens": 1000, "stream": True})
    with httpx.stream("POST", server.url + "/completions", content=body, timeout=60) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
        assert len(server.model.batcher.active) == 1
    wait_idle(server.model)
    assert not server.model.batcher.active
    assert metrics.completion_tokens - before < 900


@pytest.fixture
def one_slot():
    model = edge_moe.load(max_batch=1, max_queue=0)
    running = Running(model, api_key="sekret")
    yield running
    running.stop()
    model.close()


def test_full_queue_answers_429_and_api_key_is_required(one_slot):
    auth = {"Authorization": "Bearer sekret"}
    assert post(one_slot, "/completions", GOOD).status_code == 401
    assert httpx.get(one_slot.url + "/models", timeout=10).status_code == 401
    model = one_slot.model
    holder = model.generate_ids(model.encode("import os"), max_tokens=50)  # an in-process request
    next(holder)  # takes the one slot until closed
    busy = post(one_slot, "/completions", GOOD, auth)
    assert busy.status_code == 429 and busy.json()["error"]["type"] == "server_busy"
    holder.close()
    assert post(one_slot, "/completions", GOOD, auth).status_code == 200
    assert httpx.get(one_slot.url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
