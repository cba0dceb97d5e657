"""localpers/serve/server.py on a stand-in engine, in seconds: each app is made by its own test (create_app, its
guard, its composing and learning closures, its error handlers, its model loading), then the request helpers
(validation messages, messages and sampling handed to the engine, Host names) and `serve`/`bind` with uvicorn
and the job worker stood in. Written for the mutation survivors of server.py (docs/history/mutation/); the cases
test behaviour a client or an operator sees, the real-model cases stay in test_server.py and test_security.py."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from localpers import names
from localpers.engine.engine import ContextOverflow, model_sha256
from localpers.errors import UserError
from localpers.serve import server as S
from test_route_validation import Embedder, TextEngine
from test_store_api import Held

JSON = {"content-type": "application/json"}
LOCAL = "http://localhost"
HI = [{"role": "user", "content": "hi"}]


class Engine(TextEngine):
    """TextEngine recording the messages of each chat; `broken`: (path, reason) pairs pin() reports unusable."""

    def __init__(self, model_path, broken=(), fail=None):
        super().__init__(model_path)
        self.messages, self.broken, self.fail = [], list(broken), fail

    def pin(self, artifacts):
        bad = {p for p, _ in self.broken}
        kept = type(artifacts)(lora=tuple(x for x in artifacts.lora if x[0] not in bad),
                               control_vectors=artifacts.control_vectors)
        return Held(kept), [(p, r) for p, r in self.broken if p in {x[0] for x in artifacts.lora}]

    def complete(self, messages, artifacts=None, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.messages.append(messages)
        return super().complete(messages, artifacts=artifacts, **kwargs)


class Worker:
    """Stands in for localpers.serve.jobs.Worker: records how the app made it, its wakes and its stop."""

    def __init__(self, store, engine, **kwargs):
        self.kwargs, self.wakes, self.stopped, self.problem, self.current = kwargs, 0, None, None, None

    def start(self):
        return self

    def wake(self):
        self.wakes += 1

    def chat_request(self):
        pass

    def stop(self, timeout=None):
        self.stopped = timeout


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.delenv("LOCALPERS_USER", raising=False)
    monkeypatch.setattr(S, "Worker", Worker)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not really a model")
    return path


def make(model, tmp_path, engine=None, **kwargs):
    app = S.create_app(engine=engine or Engine(model), data_dir=str(tmp_path / "home"), **kwargs)
    app.state.store.embedder = Embedder()
    return app


def chat(client, headers=None, **fields):
    return client.post("/v1/chat/completions", content=json.dumps({"messages": HI, **fields}),
                       headers={**JSON, **(headers or {})})


# -- the app: its state, guard, worker ------------------------------------------------------------------------

def test_the_owner_is_the_option_else_the_environment_else_nobody(model, tmp_path, monkeypatch):
    assert make(model, tmp_path, owner="bob").state.owner == "bob"
    assert make(model, tmp_path).state.owner is None
    monkeypatch.setenv("LOCALPERS_USER", "carol")
    assert make(model, tmp_path).state.owner == "carol"
    assert make(model, tmp_path, owner="bob").state.owner == "bob"
    monkeypatch.setenv("LOCALPERS_USER", "")
    assert make(model, tmp_path).state.owner is None


def test_the_job_worker_runs_as_asked_and_stops_with_the_app(model, tmp_path):
    assert make(model, tmp_path).state.worker is None
    threaded = make(model, tmp_path, jobs=True).state.worker
    assert threaded.kwargs["process"] is False and threaded.kwargs["warm"] is False
    app = make(model, tmp_path, jobs="process", warm_jobs=True)
    assert app.state.worker.kwargs["process"] is True and app.state.worker.kwargs["warm"] is True
    with TestClient(app, base_url=LOCAL):
        assert app.state.worker.stopped is None
    assert app.state.worker.stopped == 2


@pytest.mark.parametrize("host, allowed, served, refused", [
    ("127.0.0.1", (), ["localhost", "127.0.0.1:80", "[::1]:8000"], ["example.com", "0.0.0.0"]),
    ("192.168.1.5", ["[FE80::1]", "My.Host"], ["192.168.1.5:8000", "[fe80::1]", "my.host", "MY.HOST:1"],
     ["192.168.1.6", "host", "my.host.evil"]),
    ("0.0.0.0", (), ["localhost:8000"], ["0.0.0.0", "0.0.0.0:8000", ""]),
    ("[::]", ["*"], ["anything.example", "0.0.0.0"], []),
])
def test_hosts_served_are_loopback_the_bound_address_and_the_allowed_ones(model, tmp_path, host, allowed, served,
                                                                          refused):
    client = TestClient(make(model, tmp_path, host=host, allowed_hosts=allowed), base_url=LOCAL)
    for name in served:
        assert client.get("/health", headers={"host": name}).status_code == 200, name
    for name in refused:
        r = client.get("/health", headers={"host": name})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", name


def test_allowed_origins_get_their_preflight_answered(model, tmp_path):
    client = TestClient(make(model, tmp_path, allowed_origins=["http://app.example"]), base_url=LOCAL)
    ask = {"origin": "http://app.example", "access-control-request-method": "POST"}
    r = client.options("/v1/chat/completions", headers=ask)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    assert chat(client, {"origin": "http://app.example"}).status_code == 200
    closed = TestClient(make(model, tmp_path), base_url=LOCAL)
    assert "access-control-allow-origin" not in closed.options("/v1/chat/completions", headers=ask).headers


def test_invariant_each_refusal_of_the_guard_has_its_status_type_and_code(model, tmp_path):
    client = TestClient(make(model, tmp_path, api_key="k"), base_url=LOCAL)
    key = {"authorization": "Bearer k"}
    cases = [
        (client.get("/v1/models", headers={"host": "evil.example"}), 403, "host_not_allowed"),
        (client.get("/v1/models", headers={**key, "origin": "http://evil.example"}), 403, "origin_not_allowed"),
        (client.get("/v1/models"), 401, "invalid_api_key"),
        (client.get("/api/tags"), 401, "invalid_api_key"),
        (client.get("/openapi.json"), 401, "invalid_api_key"),
        (client.post("/v1/chat/completions", content=json.dumps({"messages": HI}), headers=key), 415,
         "unsupported_media_type"),
        (client.post("/v1/chat/completions", content="{}", headers={**key, "content-type": "text/plain"}), 415,
         "unsupported_media_type"),
        (client.post("/v1/chat/completions", content="{}",
                     headers={**key, **JSON, "content-length": str(S.MAX_BODY_BYTES + 1)}), 413, "body_too_large"),
        (client.post("/v1/chat/completions", content="{}", headers={**key, **JSON, "content-length": "1e3"}), 413,
         "body_too_large"),
    ]
    for r, status, code in cases:
        error = r.json()["error"]
        assert (r.status_code, error["code"]) == (status, code), r.text
        assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    assert "'text/plain'" in cases[6][0].json()["error"]["message"]
    assert "'none'" in cases[5][0].json()["error"]["message"]
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    ok = client.post("/v1/chat/completions", content=json.dumps({"messages": HI}),
                     headers={**key, "content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_a_chunked_body_is_bounded_then_read_whole(model, tmp_path):
    client = TestClient(make(model, tmp_path), base_url=LOCAL)
    r = client.post("/v1/chat/completions", content=iter([b"x" * S.MAX_BODY_BYTES, b"y"]), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    body = json.dumps({"messages": HI}).encode()
    r = client.post("/v1/chat/completions", content=iter([body[:10], body[10:]]), headers=JSON)
    assert r.status_code == 200, r.text
    for method in ("PUT", "PATCH"):  # any route, before routing
        r = client.request(method, "/v1/users/alice/anything", content=iter([b"x" * S.MAX_BODY_BYTES, b"y"]),
                           headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", method


@pytest.mark.parametrize("headers, refused", [
    ({}, None), ({"host": "localhost"}, None), ({"host": "localhost", "content-length": "12"}, None),
    ({"host": "localhost.evil.example"}, 403), ({"host": "localhost", "origin": "null"}, 403),
    ({"host": "localhost:8000", "origin": "http://LOCALHOST:8000"}, None),
    ({"host": "localhost", "origin": "http://app.example"}, None),
    ({"host": "localhost", "origin": "http://evil.example://localhost"}, 403),
])
def test_guard_refusal_of_one_request(headers, refused):
    guard = S.Guard(None, api_key=None, allowed_hosts={"localhost", ""}, allowed_origins={"http://app.example"})
    scope = {"type": "http", "method": "GET", "path": "/v1/models",
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    got = guard.refusal(scope)
    assert (got if got is None else got[0]) == refused
    everywhere = S.Guard(None, api_key=None, allowed_hosts={"*"}, allowed_origins={"*"})
    assert everywhere.refusal(scope) is None


# -- loading the model ------------------------------------------------------------------------------------------

def loaded(app):
    for _ in range(1000):  # the load thread ends at once with the stand-in engines below
        if app.state.engine is not None or app.state.load_error:
            return app
        time.sleep(0.01)
    raise AssertionError("the model never loaded nor failed")


def test_the_model_loads_in_the_background_and_its_failures_are_reported(model, tmp_path, monkeypatch, capsys):
    import localpers.engine.engine as engine_module

    gate = threading.Event()
    made = []

    class SlowEngine(Engine):
        def __init__(self, model_path, adapter_cache_bytes):
            gate.wait(30)
            super().__init__(model_path)
            self.adapter_cache_bytes, self.closed = adapter_cache_bytes, False
            made.append(self)

        def usable(self, artifacts):
            return artifacts, []

    monkeypatch.setattr(engine_module, "Engine", SlowEngine)
    app = S.create_app(model, data_dir=str(tmp_path / "home"), adapter_cache_bytes=12345)
    client = TestClient(app, base_url=LOCAL)
    [loader] = [t for t in threading.enumerate() if t.name == "localpers-load"]
    assert loader.daemon  # a load never keeps the process alive
    for r in (client.get("/health"), chat(client)):
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading", r.text
        assert "the model is still loading" in r.json()["error"]["message"]
    gate.set()
    loaded(app)
    assert client.get("/health").json() == {"status": "ok", "model": "fake"}
    assert made[0].model_path == model and made[0].adapter_cache_bytes == 12345

    class NoLora(SlowEngine):
        def usable(self, artifacts):
            return artifacts, [(artifacts.lora[0][0], "not a LoRA adapter of this model")]

        def close(self):
            self.closed = True

    monkeypatch.setattr(engine_module, "Engine", NoLora)
    app = loaded(S.create_app(model, data_dir=str(tmp_path / "home"), lora=[tmp_path / "a.gguf"]))
    assert app.state.engine is None and made[-1].closed
    assert app.state.load_error == f"--lora {tmp_path / 'a.gguf'}: not a LoRA adapter of this model"
    assert "the model failed to load: --lora" in capsys.readouterr().err
    client = TestClient(app, base_url=LOCAL)
    for r in (client.get("/health"), chat(client)):
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "failed to load" in r.json()["error"]["message"]
    monkeypatch.setattr(engine_module, "Engine", SlowEngine)
    app = loaded(S.create_app(model, data_dir=str(tmp_path / "home"), lora=[tmp_path / "b.gguf"]))
    assert app.state.engine is made[-1] and app.state.load_error is None


def test_health_reports_the_job_workers_problem(model, tmp_path):
    app = make(model, tmp_path, jobs=True)
    client = TestClient(app, base_url=LOCAL)
    assert client.get("/health").json() == {"status": "ok", "model": "fake"}
    app.state.worker.problem = "the disk is full"
    assert client.get("/health").json() == {"status": "ok", "model": "fake", "jobs_error": "the disk is full"}


# -- composing and learning for a user ------------------------------------------------------------------------

def explained(client, user=None, content="hi", history=True):
    r = chat(client, messages=[{"role": "user", "content": content}], localpers={"explain": True, "history": history},
             **({"user": user} if user else {}))
    assert r.status_code == 200, r.text
    return r.json().get("localpers")


def test_a_user_is_served_their_artifacts_for_the_served_model_and_a_broken_one_is_marked(model, tmp_path, capsys):
    good, bad, other = (tmp_path / f"{n}.gguf" for n in ("good", "bad", "other"))
    for f in (good, bad, other):
        f.write_bytes(f.name.encode())
    engine = Engine(model)
    app = make(model, tmp_path, engine=engine, history=False)
    store = app.state.store
    store.add("alice", "hello")
    store.add("bob", "hello")
    store.register_artifact("alice", "lora", good, model_sha256(model), {"method": "edit"})
    store.register_artifact("alice", "lora", other, "f" * 64, {"method": "edit"})  # another base model's, newer
    store.register_artifact("bob", "lora", bad, model_sha256(model), {"method": "edit"})
    engine.broken = [(store.artifacts("bob")[0]["path"], f"cannot load {store.directory}/x")]
    client = TestClient(app, base_url=LOCAL)
    shown = explained(client, "alice")
    assert [open(x[0], "rb").read() for x in engine.served[-1].lora] == [b"good.gguf"]
    assert [a["kind"] for a in shown["artifacts"]] == ["lora"]
    assert explained(client) == {"composition": names.BASE, "artifacts": [], "retrieved": []}
    assert not engine.served[-1].lora
    explained(client, "bob")
    assert not engine.served[-1].lora
    [marked] = store.artifacts("bob")
    assert marked["meta"]["broken"] == "cannot load <server>/x"
    assert "'bob'" in capsys.readouterr().err
    assert all("broken" not in a["meta"] for a in store.artifacts("alice"))


def test_invariant_learning_reports_what_changed_and_wakes_the_worker_only_then(model, tmp_path):
    app = make(model, tmp_path, jobs=True)
    client = TestClient(app, base_url=LOCAL)
    worker = app.state.worker
    shown = explained(client, "dana", "I'm vegetarian.")
    learned = shown["learned"]
    assert set(learned) == {"facts", "replaced", "retired"}
    assert [f["attribute"] for f in learned["facts"]] == ["diet"] and learned["replaced"] == learned["retired"] == []
    assert worker.wakes == 1
    assert "learned" not in explained(client, "dana", "What's the weather like?") and worker.wakes == 1
    assert "learned" not in explained(client, "dana", "I'm vegan.", history=False)
    replaced = explained(client, "dana", "I'm vegan.")["learned"]
    assert [f["attribute"] for f in replaced["facts"]] == ["diet"] and len(replaced["replaced"]) == 1
    assert worker.wakes == 2
    assert [f["value"] for f in app.state.store.facts("dana")] == ["vegan"]
    off = make(model, tmp_path / "off", history=False)
    assert "learned" not in explained(TestClient(off, base_url=LOCAL), "erin", "I'm vegetarian.")
    from localpers.store.store import NotFoundError

    with pytest.raises(NotFoundError):  # nothing stored: no such user
        off.state.store.facts("erin")


def test_a_message_the_store_refuses_is_served_and_logged(model, tmp_path, monkeypatch, caplog):
    def full(store, user, messages):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "learn_from_chat", full)
    client = TestClient(make(model, tmp_path), base_url=LOCAL)
    with caplog.at_level(logging.WARNING, logger=S.log.name):
        assert chat(client, user="frank").status_code == 200
    assert "not stored in 'frank''s history: OSError" in caplog.text and "No space left" in caplog.text


# -- error handlers -----------------------------------------------------------------------------------------------

def test_invariant_every_error_is_an_openai_error_body_with_its_param_and_code(model, tmp_path, monkeypatch, capsys):
    engine = Engine(model)
    client = TestClient(make(model, tmp_path, engine=engine), base_url=LOCAL, raise_server_exceptions=False)
    r = chat(client, logprobs=False, top_logprobs=2)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "'top_logprobs': needs 'logprobs': true", "type": "invalid_request_error",
        "param": "top_logprobs", "code": "unsupported_parameter"}
    r = chat(client, user="a\nb")
    assert r.status_code == 400 and "control character" in r.json()["error"]["message"]
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.get("/v1/nothing-here").json()["error"]["type"] == "invalid_request_error"
    r = client.delete("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"

    def overflow(messages, tools=None):
        raise ContextOverflow(5000, 1024)

    monkeypatch.setattr(engine, "chat_tokens", overflow)
    r = chat(client)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    monkeypatch.undo()
    monkeypatch.setattr(S, "Worker", Worker)
    engine.fail = RuntimeError("boom in the engine")
    r = chat(client)
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "internal server error (the server's log has the details)", "type": "server_error",
        "param": None, "code": None}
    assert "RuntimeError: boom in the engine" in capsys.readouterr().err
    engine.fail = OSError(28, "No space left on device")
    r = chat(client)
    assert r.status_code == 507 and r.json()["error"]["code"] == "disk_full"
    engine.fail = UserError(f"cannot read {tmp_path / 'home'}/adapter.gguf")
    r = chat(client)
    assert r.status_code == 400 and r.json()["error"]["message"] == "cannot read <server>/adapter.gguf"
    r = chat(client, stream=True)  # the stream has begun: it ends with the error event
    [last] = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1:]
    assert last["error"]["type"] == "invalid_request_error" and "cannot read" in last["error"]["message"]


def test_a_user_error_on_a_route_is_a_400_or_404_without_the_servers_paths(model, tmp_path):
    app = make(model, tmp_path)
    client = TestClient(app, base_url=LOCAL)

    @app.get("/v1/raise/{kind}")
    def raise_(kind: str):
        from localpers.store.store import NotFoundError

        raise (NotFoundError if kind == "missing" else UserError)(f"{app.state.store.directory}/f: {kind}")

    assert client.get("/v1/raise/missing").status_code == 404
    r = client.get("/v1/raise/bad")
    assert r.status_code == 400 and r.json()["error"]["message"] == "<server>/f: bad"


@pytest.mark.parametrize("body, message, param", [
    ("{not json", "the request body is not valid JSON", None),
    ("", "the request body must be a JSON object", None),
    ("[1, 2]", "the request body must be a JSON object", None),
    ('"text"', "the request body must be a JSON object", None),
    ("{}", "'messages': Field required", "messages"),
    ('{"messages": [{"role": "user", "content": 5}]}', "'messages.0.content': Input should be a valid string",
     "messages.0.content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "'temperature': must be a finite number",
     "temperature"),
    ('{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "'n': Input should be greater than or equal to 1",
     "n"),
])
def test_invalid_requests_are_one_line_naming_the_fields(model, tmp_path, body, message, param):
    client = TestClient(make(model, tmp_path), base_url=LOCAL)
    r = client.post("/v1/chat/completions", content=body, headers=JSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(message) and r.json()["error"]["param"] == param
    r = client.post("/v1/chat/completions", content='{"messages": [{"role": "user", "content": "hi"}], "n": 0, '
                                                    '"top_p": 2.0, "stop": 1}', headers=JSON)
    parts = r.json()["error"]["message"].split("; ")
    assert sorted({p.split("'")[1] for p in parts}) == ["n", "stop", "top_p"] and "\n" not in r.text
    assert r.json()["error"]["param"] == parts[0].split("'")[1]


def test_invariant_validation_messages_drop_pydantics_union_member_tags():
    class Body(BaseModel):
        a: StrictInt | StrictStr
        b: StrictFloat | StrictBool
        c: list[StrictInt] | StrictStr

    with pytest.raises(ValidationError) as e:
        Body.model_validate({"a": [], "b": "x", "c": {}})
    message, first = S._describe_validation([{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()])
    assert first == "a"
    fields = [part.split("'")[1] for part in message.split("; ")]
    assert set(fields) == {"a", "b", "c"}, message


# -- the request handed to the engine --------------------------------------------------------------------------

def request(**fields) -> S.ChatRequest:
    return S.ChatRequest.model_validate({"messages": HI, **fields})


def test_invariant_messages_reach_the_engine_with_their_roles_tool_calls_and_names():
    req = S.ChatRequest.model_validate({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
        {"role": "user", "content": "Weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "raw", "arguments": "not json"}}]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1"}]})
    assert S.engine_messages(req, True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "AB"},
        {"role": "user", "content": "Weather?", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "raw", "arguments": "not json"}}]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1"}]
    for i, role in enumerate(("system", "developer", "user")):
        bad = S.ChatRequest.model_validate({"messages": HI * i + [{"role": role}]})
        with pytest.raises(S.APIError) as e:
            S.engine_messages(bad, True)
        assert (e.value.status, e.value.param) == (400, f"messages.{i}.content") and role in e.value.message


def test_invariant_sampling_takes_each_field_and_openais_defaults():
    from localpers.engine.engine import Sampling

    assert S.sampling_of(request(), 100) == Sampling(max_tokens=S.DEFAULT_MAX_TOKENS, temperature=0.7, top_p=1.0)
    got = S.sampling_of(request(max_tokens=5, max_completion_tokens=7, temperature=0.0, top_p=0.5, seed=-1,
                                stop=["a", "", "b"], presence_penalty=1.5, frequency_penalty=-0.5,
                                logit_bias={"3": 2.0, "99": -100.0}, logprobs=True, top_logprobs=3,
                                response_format={"type": "json_object"}), 100)
    assert (got.max_tokens, got.temperature, got.top_p, got.seed, got.stop) == (7, 0.0, 0.5, 2 ** 32 - 1, ("a", "b"))
    assert (got.presence_penalty, got.frequency_penalty, got.logit_bias) == (1.5, -0.5, ((3, 2.0), (99, -100.0)))
    assert got.top_logprobs == 3 and got.grammar and "root" in got.grammar
    assert S.sampling_of(request(max_tokens=5), 100).max_tokens == 5
    one = S.sampling_of(request(stop="x", seed=2 ** 32 + 5, logprobs=True), 100)
    assert (one.stop, one.seed, one.top_logprobs) == (("x",), 5, 0)
    assert S.sampling_of(request(logprobs=False), 100).top_logprobs is None
    for fields, param in [({"stop": ["x"] * (S.MAX_STOP + 1)}, "stop"), ({"logit_bias": {"100": 1.0}}, "logit_bias"),
                          ({"logit_bias": {"1e2": 1.0}}, "logit_bias"), ({"logit_bias": {"²": 1.0}}, "logit_bias"),
                          ({"logit_bias": {"0": 100.5}}, "logit_bias"), ({"logit_bias": {"0": -100.5}}, "logit_bias"),
                          ({"top_logprobs": 1}, "top_logprobs"),
                          ({"response_format": {"type": "json_schema"}}, "response_format.json_schema")]:
        with pytest.raises(S.APIError) as e:
            S.sampling_of(request(**fields), 100)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_parameter"), fields
        if "logit_bias" in fields and param == "logit_bias" and "100." not in str(fields):
            assert "(0..99)" in e.value.message and repr(next(iter(fields["logit_bias"]))) in e.value.message
    assert S.sampling_of(request(stop=["x"] * S.MAX_STOP, logit_bias={"99": 100.0, "0": -100.0}), 100)


def test_response_formats_ask_for_their_schema():
    fmt = S.ResponseFormat.model_validate
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert S.schema_of(None) == (None, "response_format") == S.schema_of(fmt({"type": "text"}))
    assert S.schema_of(fmt({"type": "json_object"})) == ({}, "response_format.schema")
    assert S.schema_of(fmt({"type": "json_object", "schema": schema})) == (schema, "response_format.schema")
    assert S.schema_of(fmt({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})) == \
        (schema, "response_format.json_schema.schema")
    assert S.grammar_of(fmt({"type": "text"})) is None
    assert S.grammar_of(fmt({"type": "json_object", "schema": schema})) != S.grammar_of(fmt({"type": "json_object"}))
    with pytest.raises(S.APIError) as e:
        S.grammar_of(None, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "json_schema")
    assert e.value.param == "json_schema" and "cannot turn this JSON schema" in e.value.message


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("LOCALHOST", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("10.0.0.1", False), ("::", False), ("localhost.evil", False), ("", False)])
def test_is_loopback(host, loopback):
    assert S.is_loopback(host) is loopback


@pytest.mark.parametrize("header, name", [
    ("localhost:8000", "localhost"), (" Example.COM ", "example.com"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
    ("[::1]x", "[::1]x"), ("[::1]:", "[::1]:"), ("[::1]]", "[::1]]"), ("[::1]:80]", "[::1]:80]"), ("[::1", "[::1"), ("host:8000.evil.example", "host:8000.evil.example"),
    ("::1", "::1"), ("a:b", "a:b"), ("127.0.0.1:80", "127.0.0.1"), ("", "")])
def test_the_host_of_a_host_header(header, name):
    assert S._host_name(header) == name


def test_client_text_hides_the_servers_folders(tmp_path):
    inner = tmp_path / "data"
    inner.mkdir()
    text = f"{inner}/a and {tmp_path}/b and /elsewhere"
    assert S.client_text(text, inner, tmp_path) == "<server>/a and <server>/b and /elsewhere"
    assert S.client_text("/x/y", "/") == "/x/y"  # the root folder is no folder to hide


def test_client_text_hides_a_relative_folder_in_both_its_forms(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert S.client_text(f"{tmp_path}/data/x and data/y", "data") == "<server>/x and <server>/y"


# -- serve and bind -------------------------------------------------------------------------------------------------

def test_bind_listens_or_says_in_one_line_why_not():
    sock = S.bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert sock.get_inheritable() and sock.family == socket.AF_INET
        with pytest.raises(UserError, match=rf"port {port} on 127.0.0.1 is already in use; .*--port"):
            S.bind("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(UserError, match="cannot listen on 192.0.2.1:1"):
        S.bind("192.0.2.1", 1)


@pytest.mark.parametrize("error, said", [
    (OSError(98, "Address already in use"), "^port 9 on 127.0.0.1 is already in use; .* --port$"),  # Linux
    (OSError(48, "Address already in use"), "^port 9 on 127.0.0.1 is already in use; .* --port$"),  # macOS, BSD
    (OSError(99, "Cannot assign requested address"), "cannot listen on 127.0.0.1:9: Cannot assign"),
])
def test_bind_reads_the_reason_on_every_platform(monkeypatch, error, said):
    closed = []

    class Socket:
        def __init__(self, *a):
            pass

        def setsockopt(self, *a):
            pass

        def bind(self, address):
            raise error

        def close(self):
            closed.append(True)

    monkeypatch.setattr(S.socket, "socket", Socket)
    with pytest.raises(UserError, match=said):
        S.bind("127.0.0.1", 9)
    assert closed == [True]


def test_bind_takes_a_bracketed_ipv6_address():
    try:
        six = S.bind("[::1]", 0)
    except UserError:
        pytest.skip("no IPv6 loopback here")
    assert six.family == socket.AF_INET6 and six.getsockname()[0] == "::1"
    six.close()


@pytest.fixture
def uvicorn_runs(monkeypatch):
    """serve() up to uvicorn's run, which records its app and sockets and returns (the app's worker and engine
    stood in too: nothing loads, no job runs)."""
    import uvicorn

    import localpers.engine.engine as engine_module

    ran = []

    class Server:
        def __init__(self, config):
            self.config = config

        def run(self, sockets):
            ran.append((self.config.app, sockets))
            for s in sockets:
                s.close()

    class NoEngine:
        def __init__(self, *a, **k):
            ran.append(("engine", a, k))
            raise UserError("no model in this test")

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(engine_module, "Engine", NoEngine)
    monkeypatch.setattr(S, "Worker", Worker)
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    return ran


def test_serve_refuses_a_reachable_server_without_a_key_before_it_listens(uvicorn_runs, tmp_path):
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(UserError) as e:
            S.serve(host=host, port=0, data_dir=str(tmp_path))
        assert str(e.value) == (f"--host {host} lets other machines reach every user's history: give --api-key KEY "
                                "(or --insecure-no-api-key to accept that risk)")
    with pytest.raises(UserError, match="--adapter-cache-mb"):
        S.serve(port=0, data_dir=str(tmp_path), adapter_cache_mb=-1)
    with pytest.raises(UserError):
        S.serve(port=0, data_dir=str(tmp_path), personalize="no-such-method")
    with pytest.raises(UserError):
        S.serve(model=str(tmp_path / "missing.gguf"), port=0, data_dir=str(tmp_path))
    assert uvicorn_runs == []


def test_serve_runs_the_app_with_its_options_and_job_processes_on_its_socket(uvicorn_runs, tmp_path, capsys,
                                                                            monkeypatch):
    protocols, bounded = [], S.limits.bounded_protocol
    monkeypatch.setattr(S.limits, "bounded_protocol", lambda *a: protocols.append(a) or bounded(*a))
    S.serve(host="0.0.0.0", port=0, data_dir=str(tmp_path / "a"), insecure_no_api_key=True)
    S.serve(host="127.0.0.1", port=0, data_dir=str(tmp_path / "b"), allowed_hosts=["my.host"], owner="zoe",
            api_key="k", history=False, adapter_cache_mb=3, max_request_tokens=999, aliases=["gpt-4o"],
            strict_model_names=True, max_connections=7, header_timeout=1.5, body_timeout=2.5,
            allowed_origins=["http://app.example"])
    engines = [r for r in uvicorn_runs if r[0] == "engine"]
    (open_app, [open_sock]), (app, [sock]) = [r for r in uvicorn_runs if r[0] != "engine"]
    assert open_sock.family == socket.AF_INET
    for a in (open_app, app):
        assert a.state.worker.kwargs["process"] is True and a.state.worker.kwargs["warm"] is True
    assert app.state.owner == "zoe" and str(app.state.store.directory) == str(tmp_path / "b")
    assert (app.state.history, app.state.max_request_tokens, app.state.aliases, app.state.strict_model_names) == \
        (False, 999, ("gpt-4o",), True)
    assert (open_app.state.history, open_app.state.strict_model_names, open_app.state.owner) == (True, False, None)
    assert [e[2]["adapter_cache_bytes"] for e in engines] == [names.ADAPTER_CACHE_BYTES, 3 * 2 ** 20]
    cap = S.limits.connection_cap(S.limits.raise_fd_limit())
    assert protocols == [(cap, names.HEADER_TIMEOUT_S, names.BODY_TIMEOUT_S), (7, 1.5, 2.5)]
    out = capsys.readouterr()
    assert "on http://0.0.0.0:0/v1" in out.out and "on http://127.0.0.1:0/v1" in out.out
    assert out.err.count("add --allowed-host NAME") == 1  # the wildcard address without --allowed-host
    client = TestClient(app, base_url=LOCAL)
    assert client.get("/health", headers={"host": "my.host"}).status_code != 403
    assert client.get("/health", headers={"host": "other.host"}).status_code == 403
    assert client.get("/v1/models").status_code == 401
    ask = {"origin": "http://app.example", "access-control-request-method": "POST"}
    assert client.options("/v1/chat/completions", headers=ask).headers["access-control-allow-origin"] == ask["origin"]
    try:  # another loopback address (all of 127/8 on Linux): served under its own name
        S.serve(host="127.0.0.2", port=0, data_dir=str(tmp_path / "d"))
    except UserError:  # a system where only 127.0.0.1 is configured
        pass
    else:
        bound = TestClient(uvicorn_runs[-1][0], base_url=LOCAL)
        assert bound.get("/health", headers={"host": "127.0.0.2:8000"}).status_code != 403
    try:
        S.serve(host="::1", port=0, data_dir=str(tmp_path / "c"))
    except UserError:  # no IPv6 loopback on this machine
        return
    assert "on http://[::1]:0/v1" in capsys.readouterr().out


def test_serve_leaves_at_once_when_a_job_still_runs_in_its_thread(uvicorn_runs, tmp_path, monkeypatch):
    """A job running in the worker's thread when uvicorn stops: os._exit(0), not an interpreter shutdown under
    torch or llama.cpp (the job is queued again at the next start); none running: serve returns."""
    exits = []

    class Busy(Worker):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.current = {"id": 1}

    monkeypatch.setattr(S.os, "_exit", lambda code: exits.append(code))
    S.serve(port=0, data_dir=str(tmp_path / "a"))
    assert exits == []
    monkeypatch.setattr(S, "Worker", Busy)
    S.serve(port=0, data_dir=str(tmp_path / "b"))
    assert exits == [0]
