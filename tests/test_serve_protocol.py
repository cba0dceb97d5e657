"""The serving protocol of issue #13 and the server tests of issue #17, over real HTTP on loopback with the
embedded model: cancellation, concurrency (the engine lock), users' adapters and control vectors, every OpenAI
field honoured or refused, any `user` string, browser attacks, errors."""
import json
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from localpers.engine.engine import Artifacts, Engine
from localpers.serve.server import create_app
from localpers.store.store import Store
from serve_helpers import eog_ids, live_server, make_users

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    return Engine(n_ctx=1024, n_threads=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-data")


@pytest.fixture(scope="module")
def users(engine, data_dir, tmp_path_factory):
    with Store.open(data_dir) as store:
        return make_users(engine, store, tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def url(engine, data_dir, users):
    with live_server(create_app(engine=engine, data_dir=str(data_dir))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url, body, **kw):
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=kw.pop("timeout", 120), **kw)


def content(response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def endless(engine, **extra) -> dict:
    """A request that never ends by itself (every end-of-generation token banned) before its max_tokens."""
    return {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 800, "temperature": 0,
            "logit_bias": {str(t): -100 for t in eog_ids(engine)}, **extra}


def wait_idle(engine, limit_s=60):
    deadline = time.monotonic() + limit_s
    while engine._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._lock.locked(), "the engine is still held"


# -- cancellation ---------------------------------------------------------------------------------------------

def test_abandoned_stream_stops_and_frees_the_engine(url, engine):
    """Issue #13 item 1: close a stream after a few chunks; its generation stops (far short of its 800 tokens)
    and the next request is served."""
    before = engine.generated
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=endless(engine, stream=True), timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip((l for l in lines if l.startswith("data: ")), range(4))]
    assert len(got) == 4
    wait_idle(engine)
    assert engine.generated - before < 200
    r = post(url, {"messages": HELLO, "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200


def test_openai_client_breaking_out_of_a_stream(url, engine, client):
    before = engine.generated
    body = endless(engine)
    stream = client.chat.completions.create(model="localpers", messages=body["messages"], stream=True,
                                            max_tokens=800, temperature=0, logit_bias=body["logit_bias"])
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_idle(engine)
    assert engine.generated - before < 200
    assert client.chat.completions.create(messages=HELLO, max_tokens=4, model="localpers").choices


def test_abandoned_plain_request_stops(url, engine):
    """A non-streamed request whose client gives up (read timeout) stops generating too."""
    before = engine.generated
    with pytest.raises(httpx.ReadTimeout):
        post(url, endless(engine), timeout=httpx.Timeout(60, read=1.0))
    wait_idle(engine)
    assert engine.generated - before < 400


def test_a_request_abandoned_while_waiting_never_runs(url, engine):
    """B waits for the engine behind A; B's client leaves; when A is abandoned too, nothing generates B."""
    before = engine.generated
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=endless(engine, stream=True), timeout=60) as r:
        next(l for l in r.iter_lines() if l.startswith("data: "))
        with pytest.raises(httpx.ReadTimeout):
            post(url, {**endless(engine), "max_tokens": 50}, timeout=httpx.Timeout(60, read=0.5))
        time.sleep(0.5)  # B's handler notices its client left
    wait_idle(engine)
    n_after_a = engine.generated
    time.sleep(0.5)
    assert engine.generated == n_after_a and n_after_a - before < 400


def test_closing_the_engines_stream_stops_it(engine):
    """The library API: Engine.chat_stream generates on its own thread; closing the iterator cancels it."""
    before = engine.generated
    body = endless(engine)
    stream = engine.chat_stream(body["messages"], max_tokens=800,
                                logit_bias=tuple((int(t), -100.0) for t in body["logit_bias"]))
    assert next(stream)["choices"][0]["delta"]["role"] == "assistant"
    next(stream)
    stream.close()
    wait_idle(engine)
    assert engine.generated - before < 200


# -- concurrency: users, adapters, control vectors, the engine lock (#17) -----------------------------------

def run_concurrently(fns):
    barrier, results = threading.Barrier(len(fns)), [None] * len(fns)

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as e:  # reported by the caller's assertion
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def streamed_text(url, body, stop_after=None):
    pieces = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
            if stop_after is not None and len(pieces) >= stop_after:
                return None  # disconnects early
    return "".join(pieces)


def test_concurrent_users_get_the_replies_they_get_alone(url, users):
    """8 clients at once, 4 users (base, adapter, control vector, both), streamed and plain, two disconnecting
    early: every completed greedy reply is byte-identical to the same request sent alone. Fails if the engine's
    lock is a no-op (two decodes in one llama context) or if artifacts leak between requests."""
    prompts = ["Write one sentence about the sea.", "Name three fruits."]
    requests = [(user, prompts[i // 4], i % 2 == 0, i in (2, 7)) for i, user in enumerate(sorted(users) * 2)]

    def call(user, prompt, stream, drop):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0, "user": user}
        if stream:
            return streamed_text(url, body, stop_after=2 if drop else None)
        return content(post(url, body))

    alone = {(u, p): call(u, p, False, False) for u, p, _, _ in requests}
    assert len({alone[(u, prompts[0])] for u in users}) == 4  # each user's artifacts change the reply
    together = run_concurrently([lambda r=r: call(*r) for r in requests])
    for (user, prompt, stream, drop), got in zip(requests, together):
        assert not isinstance(got, Exception), got
        if not drop:
            assert got == alone[(user, prompt)], (user, prompt, stream)


def test_server_serves_a_users_control_vector(url, engine, users):
    """The control-vector-only user's reply is the engine's reply under that control vector, not the base one."""
    body = {"messages": HELLO, "max_tokens": 16, "temperature": 0}
    served = content(post(url, {**body, "user": "cai"}))
    direct = engine.chat(HELLO, artifacts=Artifacts(control_vectors=((str(users["cai"]["cvec"]), 1.0),)),
                         max_tokens=16)["choices"][0]["message"]["content"]
    assert served == direct != content(post(url, body))


# -- OpenAI fields, with the openai client ----------------------------------------------------------------------

def test_n_choices(client):
    reply = client.chat.completions.create(model="localpers", messages=HELLO, max_tokens=6, n=3, temperature=1.0,
                                           seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens <= 18 and all(c.message.content for c in reply.choices)
    streamed = client.chat.completions.create(model="localpers", messages=HELLO, max_tokens=6, n=2, stream=True,
                                              temperature=0)
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts[0] == texts[1] and texts[0]


def test_stream_options_include_usage(client):
    chunks = list(client.chat.completions.create(model="localpers", messages=HELLO, max_tokens=6, stream=True,
                                                 temperature=0, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_response_format_json_object_and_schema(client):
    reply = client.chat.completions.create(model="localpers", messages=HELLO, max_tokens=80, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="localpers", messages=HELLO, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"city", "population"} and isinstance(answer["population"], int)


def test_logprobs(client):
    reply = client.chat.completions.create(model="localpers", messages=HELLO, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    items = reply.choices[0].logprobs.content
    assert len(items) == reply.usage.completion_tokens
    assert "".join(i.token for i in items) == reply.choices[0].message.content
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_penalties_logit_bias_seed_stop_max_tokens(client, engine):
    def ask(**kw):
        kw = {"model": "localpers", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
              "max_tokens": 40, "temperature": 0, **kw}
        return client.chat.completions.create(**kw).choices[0]

    plain = ask().message.content
    assert ask(frequency_penalty=2.0).message.content != plain
    assert ask(presence_penalty=2.0).message.content != plain
    x = engine.tokenize("x", add_bos=False, special=False)[0]
    assert ask(logit_bias={x: 100}, max_tokens=5).message.content == "xxxxx"
    hot = dict(temperature=1.5, max_tokens=12)
    assert ask(seed=11, **hot).message.content == ask(seed=11, **hot).message.content
    assert len({ask(seed=s, **hot).message.content for s in range(4)}) > 1
    word = plain.split()[2]
    stopped = ask(stop=[word])
    assert stopped.finish_reason == "stop" and word not in stopped.message.content
    assert plain.startswith(stopped.message.content)
    for field in ("max_tokens", "max_completion_tokens"):
        choice = ask(**{field: 3})
        assert choice.finish_reason == "length"
        assert len(engine.tokenize(choice.message.content, add_bos=False)) <= 4


def test_unknown_fields_are_ignored_and_tools_served_on_this_template(url):
    r = post(url, {"messages": HELLO, "max_tokens": 2, "service_tier": "auto", "store": False,
                   "prompt_cache_key": "k", "a_field_nobody_knows": 1})
    assert r.status_code == 200, r.text
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    # greedy and room to close the call: a sampled call cut at the token limit has no tool_calls (flaky before)
    r = post(url, {"messages": HELLO, "tools": tools, "tool_choice": "required", "max_tokens": 80, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert post(url, {"messages": HELLO, "tools": tools, "tool_choice": "none", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 9), ("n", "2"), ("temperature", -0.1), ("temperature", 2.5), ("top_p", 1.5),
    ("presence_penalty", 3), ("frequency_penalty", -2.5), ("logprobs", "yes"), ("top_logprobs", 21),
    ("top_logprobs", 2), ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}),
    ("seed", 1.5), ("seed", True), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [1]), ("max_tokens", 0),
    ("max_completion_tokens", -1), ("response_format", {"type": "xml"}), ("response_format", {"type": "json_schema"}),
    ("stream_options", {"include_usage": True}), ("stream", "yes"), ("user", 5), ("tool_choice", "sometimes"),
    ("messages", [{"role": "user", "content": None}]), ("messages", [{"role": "tool", "content": "42"}]),
])
def test_bad_values_are_400_naming_the_field(url, field, value):
    r = post(url, {"messages": HELLO, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("user", ["john doe", "josé", "a" * 200, "alice ", "alice@example.com", "../../etc",
                                  "名前", ""])
def test_any_user_string_is_served(url, user):
    r = post(url, {"messages": HELLO, "max_tokens": 2, "user": user})
    assert r.status_code == 200, r.text


def test_prompt_safety_on_the_served_path(url, engine):
    """The Zorblax input is served with the prompt-safe tokens (their count is the usage's prompt_tokens)."""
    from test_chat_tokens import ZORBLAX

    messages = [{"role": "user", "content": ZORBLAX}]
    r = post(url, {"messages": messages, "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == len(engine.chat_tokens(messages))
    assert len(engine.chat_tokens(messages)) != len(engine.tokenize(engine.format_chat(messages)))


# -- broken artifacts and server faults ---------------------------------------------------------------------------

def test_broken_artifact_is_skipped_and_marked(engine, tmp_path):
    """eve's adapter is garbage, ben's file was deleted while still registered: both are served without it and
    marked broken in the store (a later Store sees it, as export does); a working control vector is not."""
    from localpers import names
    from localpers.engine.engine import model_sha256

    with Store.open(tmp_path) as store:
        make = make_users(engine, store, tmp_path)
        assert make
        sha = model_sha256(engine.model_path)
        bad = tmp_path / "garbage.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 64)
        store.add("eve", "I like the sea.")  # the registry registers artifacts for known users only
        store.register_artifact("eve", names.LORA, bad, sha, meta={"method": names.EDIT, "sources": []})
        store.register_artifact("eve", names.CONTROL_VECTOR, make["cai"]["cvec"], sha,
                                meta={"method": names.EDIT, "sources": []})
        missing = store.artifacts("ben", names.LORA)[0]["path"]
    import os

    os.unlink(missing)
    c = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url="http://localhost")
    body = {"messages": HELLO, "max_tokens": 12, "temperature": 0}
    base = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    for user in ("ben", "eve"):
        r = c.post("/v1/chat/completions", json={**body, "user": user})
        assert r.status_code == 200 and str(tmp_path) not in r.text
    assert content(c.post("/v1/chat/completions", json={**body, "user": "ben"})) == base
    eve = content(c.post("/v1/chat/completions", json={**body, "user": "eve"}))
    direct = engine.chat(HELLO, artifacts=Artifacts(control_vectors=((str(make["cai"]["cvec"]), 1.0),)),
                         max_tokens=12)["choices"][0]["message"]["content"]
    assert eve == direct  # served with the control vector that works, without the broken adapter
    with Store.open(tmp_path) as store:
        assert "broken" in store.artifacts("eve", names.LORA)[0]["meta"]
        assert "broken" in store.artifacts("ben", names.LORA)[0]["meta"]
        assert "broken" not in store.artifacts("eve", names.CONTROL_VECTOR)[0]["meta"]
        assert "broken" in json.dumps(store.export("eve"))
        assert str(tmp_path) not in json.dumps([a["meta"] for a in store.artifacts("eve")])  # nor a server path


def test_a_server_fault_is_an_openai_500(engine, tmp_path, monkeypatch):
    c = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url="http://localhost",
                   raise_server_exceptions=False)

    def fail(*a, **kw):
        raise RuntimeError("/secret/path exploded")
    monkeypatch.setattr(engine, "complete", fail)
    r = c.post("/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "/secret/path" not in r.text


# -- the browser is an attacker -------------------------------------------------------------------------------

def test_dns_rebinding_host_is_refused(url):
    for path in ("/v1/users/alice/export", "/v1/models", "/health"):
        r = httpx.get(f"{url}{path}", headers={"host": "evil.example:8000"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = post(url, {"messages": HELLO}, headers={"host": "evil.example"})
    assert r.status_code == 403
    for host in ("localhost:1234", "127.0.0.1", "[::1]:8000"):
        assert httpx.get(f"{url}/health", headers={"host": host}).status_code == 200


def test_simple_cross_site_posts_are_refused(url):
    """What a page's <form> or fetch(no-cors) sends: text/plain, form-encoded or multipart bodies."""
    body = json.dumps({"messages": HELLO, "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        for path in ("/v1/chat/completions", "/v1/users/alice/memories"):
            r = httpx.post(f"{url}{path}", content=body, headers=headers)
            assert r.status_code == 415, (path, ctype, r.text)
    assert httpx.get(f"{url}/v1/users/alice/memories").status_code == 404


def test_cross_origin_requests_are_refused_unless_allowed(url, engine, tmp_path):
    evil = {"origin": "https://evil.example"}
    assert httpx.get(f"{url}/v1/models", headers=evil).status_code == 403
    assert post(url, {"messages": HELLO, "max_tokens": 2}, headers=evil).status_code == 403
    same = {"origin": url}
    assert httpx.get(f"{url}/v1/models", headers=same).status_code == 200
    app = create_app(engine=engine, data_dir=str(tmp_path), allowed_origins=["http://localhost:3000"])
    c = TestClient(app, base_url="http://localhost")
    ok = {"origin": "http://localhost:3000"}
    r = c.get("/v1/models", headers=ok)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    pre = c.options("/v1/chat/completions", headers={**ok, "access-control-request-method": "POST",
                                                    "access-control-request-headers": "content-type"})
    assert pre.status_code == 200
    assert c.get("/v1/models", headers=evil).status_code == 403


def test_allowed_host_option(engine, tmp_path):
    c = TestClient(create_app(engine=engine, data_dir=str(tmp_path), allowed_hosts=["assistant.lan"]),
                   base_url="http://assistant.lan:8000")
    assert c.get("/v1/models").status_code == 200
    assert c.get("/v1/models", headers={"host": "other.lan"}).status_code == 403
    bound = TestClient(create_app(engine=engine, data_dir=str(tmp_path), host="192.168.1.5"),
                       base_url="http://192.168.1.5:8000")
    assert bound.get("/v1/models").status_code == 200


def test_chunked_bodies_are_bounded_too(url):
    """A body without Content-Length (chunked) is held to the same 1 MiB limit, and a small one is served."""
    from localpers.serve.server import MAX_BODY_BYTES

    def chunks(body: bytes):
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(big), headers={"content-type": "application/json"})
    assert r.status_code == 413
    small = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(small), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_json_strings_never_hold_raw_control_characters(url, engine):
    """JSON mode with a schema (OpenAI's json_object + schema, json_schema, Ollama's format): however much the
    model wants a newline, a JSON string gets none raw (JSON forbids U+0000-U+001F in strings), so every reply
    that ends by itself parses with Python's strict JSON reader and none holds a raw control character."""
    newline = {str(t): 30 for t in range(engine.n_vocab)
               if "\n" in engine.llm.detokenize([t]).decode("utf-8", "ignore")}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    formats = [{"type": "json_object", "schema": schema},
               {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}]
    for fmt in formats:
        reply = post(url, {"messages": HELLO, "max_tokens": 30, "temperature": 0, "logit_bias": newline,
                           "response_format": fmt}).json()["choices"][0]
        assert not any(ord(c) < 32 for c in reply["message"]["content"]), reply
        if reply["finish_reason"] == "stop":
            assert isinstance(json.loads(reply["message"]["content"]), dict)
        else:
            assert reply["finish_reason"] == "length"  # cut by max_tokens, said so (as OpenAI)
    reply = httpx.post(f"{url}/api/chat", json={"model": "localpers", "messages": HELLO, "stream": False,
                                                "format": schema, "options": {"num_predict": 30, "temperature": 0}},
                       timeout=120).json()
    assert not any(ord(c) < 32 for c in reply["message"]["content"]), reply


def test_user_header_is_utf8_then_percent_decoded_and_junk_makes_no_user(url, data_dir):
    """X-Localpers-User: raw UTF-8 bytes and their percent-encoding name one user ("zoë", not latin-1's "zoÃ«");
    bytes that are not UTF-8, raw or percent-encoded, are a 400 naming the header, and no user is made."""
    def ask(header: bytes):
        return httpx.post(f"{url}/v1/chat/completions", headers=[(b"X-Localpers-User", header)], timeout=120,
                          json={"messages": [{"role": "user", "content": "I live in Lisbon."}], "max_tokens": 1})

    with Store.open(data_dir) as store:
        before = set(store.users())
    assert ask("zoë".encode()).status_code == 200
    assert ask(b"zo%C3%AB").status_code == 200
    for junk in (b"%ff%fe", b"zo\xeb", b"%0a"):
        r = ask(junk)
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Localpers-User", r.text
    with Store.open(data_dir) as store:
        assert set(store.users()) - before == {"zoë"}
