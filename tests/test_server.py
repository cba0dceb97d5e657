"""The OpenAI-compatible server: real model, real HTTP on loopback, and every user mistake answered with a 4xx."""
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from localpers.serve.server import MAX_BODY_BYTES, create_app


@pytest.fixture(scope="module")
def engine():
    from localpers.engine.engine import Engine

    return Engine(n_ctx=1024, n_threads=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def client(engine, data_dir):
    return TestClient(create_app(engine=engine, data_dir=data_dir), base_url=LOCAL)


LOCAL = "http://localhost"  # TestClient's default Host, "testserver", is refused like any foreign host


def chat(client, body, **kw):
    return client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}, **kw)


HELLO = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
         "temperature": 0}


def test_chat_completion_shape_and_determinism(client, engine):
    r = chat(client, HELLO)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == engine.model_name
    text = body["choices"][0]["message"]["content"]
    assert text.strip()
    assert body["usage"]["completion_tokens"] <= 12
    assert chat(client, HELLO).json()["choices"][0]["message"]["content"] == text  # greedy is deterministic


def test_stream_matches_plain(client):
    plain = chat(client, HELLO).json()["choices"][0]["message"]["content"]
    r = chat(client, {**HELLO, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain


def test_models_and_health(client, engine):
    assert client.get("/health").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == engine.model_name and "localpers" in ids  # the served model's names first


@pytest.mark.parametrize("raw, status, fragment", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ("{}", 400, "'messages'"),
    (json.dumps({"messages": []}), 400, "'messages'"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "'messages.0.role'"),
    (json.dumps({"messages": [{"role": "user"}]}), 400, "'messages.0.content'"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400, "messages.0.content"),
    (json.dumps({**HELLO, "temperature": 7}), 400, "'temperature'"),
    (json.dumps({**HELLO, "max_tokens": 0}), 400, "'max_tokens'"),
    (json.dumps({**HELLO, "max_tokens": "ten"}), 400, "'max_tokens'"),
    (json.dumps({**HELLO, "stream": "yes"}), 400, "'stream'"),
    (json.dumps({**HELLO, "stop": [1]}), 400, "'stop'"),
    (json.dumps({**HELLO, "user": 5}), 400, "'user'"),
    (json.dumps({**HELLO, "n": 0}), 400, "'n'"),
    (json.dumps({**HELLO, "n": 9}), 400, "'n'"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}), 400, "maximum context length"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]}), 413, "over the limit"),
])
def test_user_mistakes_get_openai_style_4xx(client, raw, status, fragment):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    assert error["type"]


def test_streamed_prompt_errors_are_4xx_before_the_stream(client):
    r = chat(client, {"messages": [{"role": "user", "content": "word " * 3000}], "stream": True})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_api_key(engine, data_dir):
    c = TestClient(create_app(engine=engine, api_key="s3cret", data_dir=data_dir), base_url=LOCAL)
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200  # health stays open for supervisors


def test_health_is_503_while_loading(monkeypatch, tmp_path):
    import localpers.engine.engine

    release = threading.Event()

    class SlowEngine:
        model_name = "slow"

        def __init__(self, path, **options):
            release.wait(10)

    monkeypatch.setattr(localpers.engine.engine, "Engine", SlowEngine)
    c = TestClient(create_app("unused.gguf", data_dir=str(tmp_path)), base_url=LOCAL)
    assert c.get("/health").status_code == 503
    r = chat(c, HELLO)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    release.set()
    for _ in range(100):
        if c.get("/health").status_code == 200:
            break
        time.sleep(0.05)
    assert c.get("/health").json() == {"status": "ok", "model": "slow"}


def test_failed_load_is_reported(monkeypatch, tmp_path):
    import localpers.engine.engine

    class BrokenEngine:
        def __init__(self, path, **options):
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(localpers.engine.engine, "Engine", BrokenEngine)
    c = TestClient(create_app("unused.gguf", data_dir=str(tmp_path)), base_url=LOCAL)
    for _ in range(100):
        if c.get("/health").status_code != 503:
            break
        time.sleep(0.05)
    r = c.get("/health")
    assert r.status_code == 500 and "failed to load" in r.json()["error"]["message"]


def test_user_field_selects_that_users_adapter(client, engine, data_dir, tmp_path):
    """A request with `user` is served with that user's newest adapter for this model; others get the base model."""
    from localpers.engine.engine import model_sha256
    from localpers.store.store import Store
    from test_engine import random_ffn_down_lora

    adapter = random_ffn_down_lora(tmp_path / "alice.gguf", engine)
    with Store.open(data_dir) as store:
        store.add("alice", "I am vegetarian.", kind="preference")
        store.register_artifact("alice", "lora", adapter, model_sha256(engine.model_path), {"method": "edit"})
        store.add("bob", "I love jazz.")
        store.register_artifact("bob", "lora", adapter, "0" * 64, {"method": "edit"})  # another base model: never applied

    def answer(**extra):
        return chat(client, {**HELLO, **extra}).json()["choices"][0]["message"]["content"]

    base = answer()
    assert answer(user="alice") != base
    assert answer(user="bob") == base
    assert answer(user="nobody") == base
    assert answer() == base  # the KV cache never carries alice's adapter into the next request


def test_memory_endpoints_are_served(client):
    r = client.post("/v1/users/carol/memories", json={"text": "I love jazz.", "kind": "preference"})
    assert r.status_code == 201, r.text
    hits = client.get("/v1/users/carol/memories/search", params={"q": "jazz"}).json()
    assert "I love jazz." in json.dumps(hits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_over_real_http(engine, data_dir):
    """The official `openai` client, plain and streamed, against uvicorn on loopback."""
    import uvicorn
    from openai import OpenAI

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, data_dir=data_dir), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=engine.model_name, max_tokens=12, temperature=0,
                                               messages=HELLO["messages"])
        text = reply.choices[0].message.content
        assert text.strip()
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="localpers", max_tokens=12, temperature=0, messages=HELLO["messages"], stream=True))
        assert streamed == text
        import openai

        assert client.chat.completions.create(model="gpt-4", messages=HELLO["messages"], max_tokens=2).choices  # any name
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-4", messages=HELLO["messages"], store=True)
    finally:
        server.should_exit = True
        thread.join(10)
