"""The server's guard, route by route, and the chat protocol at each field's bounds (issue 28).

Every test here fails on a realistic break: a route left without the API key, the Host allow-list matched by
prefix, an Origin compared loosely, a bound of `n`/`temperature`/... moved by one, `logprobs` ignored without
`top_logprobs`. The route list is generated from `app.routes`, so a new route is covered (or must be named
public) without editing this file."""
import json
import re

import pytest
from fastapi.testclient import TestClient

from localpers.serve.server import MAX_N, MAX_STOP, create_app

KEY = "s3cret-key"
LOCAL = "http://localhost"
# answered without the key, by design: no user data (the page's HTML and static files ask for the key themselves)
PUBLIC = {"/health", "/", "/static/page.js"}  # /openapi.json needs the key when one is set (it describes the API)


@pytest.fixture(scope="module")
def engine():
    from localpers.engine.engine import Engine

    return Engine(n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def keyed(engine, tmp_path_factory):
    app = create_app(engine=engine, data_dir=str(tmp_path_factory.mktemp("keyed")), api_key=KEY)
    return app, TestClient(app, base_url=LOCAL)


@pytest.fixture(scope="module")
def open_client(engine, tmp_path_factory):
    app = create_app(engine=engine, data_dir=str(tmp_path_factory.mktemp("open")), allowed_origins=["http://app.example"])
    return TestClient(app, base_url=LOCAL)


def flat_routes(routes):
    """Every route, routers included by FastAPI (>= 0.13x wraps them in an _IncludedRouter) opened up."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from flat_routes(inner.routes) if inner is not None else [route]


def routes(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every HTTP route of the app (app.routes, and every path of its OpenAPI schema,
    so that no route hides from the walk); path parameters filled in."""
    found = {(method, route.path) for route in flat_routes(app.routes) for method in getattr(route, "methods", None) or ()}
    found |= {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    out = []
    for method, path in sorted(found - {("HEAD", p) for _, p in found}):
        concrete = re.sub(r"\{item_id[^}]*\}", "1", re.sub(r"\{user[^}]*\}", "alice", path))
        concrete = re.sub(r"\{name[^}]*\}", "page.js", concrete)
        concrete = re.sub(r"\{model_id[^}]*\}", "localpers", concrete)
        assert "{" not in concrete, f"a path parameter this test does not fill: {path}"
        out.append((method, concrete))
    return out


def send(client, method, path, headers=None):
    headers = {"content-type": "application/json", **(headers or {})}
    body = "{}" if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, path, content=body, headers=headers)


def test_invariant_every_route_but_the_public_ones_needs_the_api_key(keyed):
    app, client = keyed
    seen = routes(app)
    assert ("POST", "/v1/chat/completions") in seen and ("GET", "/v1/users/alice/export") in seen
    assert len(seen) >= 10
    for method, path in seen:
        if path in PUBLIC:
            assert send(client, method, path).status_code != 401, path
            continue
        assert path.startswith(("/v1", "/api/")) or path == "/openapi.json", \
            f"{method} {path}: a new route outside /v1 and /api is not guarded"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                        {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY.upper()}"}):
            r = send(client, method, path, headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"


def test_every_route_answers_with_the_bearer_key(keyed):
    app, client = keyed
    for method, path in routes(app):
        r = send(client, method, path, {"authorization": f"Bearer {KEY}"})
        assert r.status_code != 401, (method, path, r.text)


# The scheme is case-insensitive (RFC 9110 11.1).
def test_the_auth_scheme_is_case_insensitive(keyed):
    app, client = keyed
    for method, path in routes(app):
        r = send(client, method, path, {"authorization": f"bearer {KEY}"})
        assert r.status_code != 401, (method, path)


@pytest.mark.parametrize("host", [
    "localhost.evil.example", "localhost.evil.example:8000", "127.0.0.1.nip.io", "127.0.0.1.nip.io:8000",
    "evil.example", "localhostevil", "127.0.0.2.evil", "127.0.0.1.", "",
    # no browser sends these (not a valid URL authority); a lax Host parser would take their loopback part
    "[::1].evil.example",
    "localhost:8000.evil.example",
])
def test_look_alike_hosts_are_refused(open_client, host):
    r = open_client.get("/v1/users/alice/memories", headers={"host": host})
    assert r.status_code == 403, (host, r.status_code)
    assert r.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:9",
                                  "[::1]:8000", "[::1]"])
def test_loopback_hosts_on_any_port_are_served(open_client, host):
    assert open_client.get("/v1/users/alice/memories", headers={"host": host}).status_code != 403


@pytest.mark.parametrize("origin", [
    "null", "http://localhost:9000", "http://localhost", "https://localhost:8000.evil.example",
    "http://localhost.evil.example:8000", "http://127.0.0.1.nip.io:8000", "http://evil.example",
    "http://app.example.evil", "http://app.example:81", "https://app.example", "http://127.0.0.1:8000",
])
def test_look_alike_origins_are_refused(open_client, origin):
    r = open_client.get("/v1/users/alice/memories", headers={"host": "localhost:8000", "origin": origin})
    assert r.status_code == 403, (origin, r.status_code)
    assert r.json()["error"]["code"] == "origin_not_allowed"


@pytest.mark.parametrize("origin", ["http://localhost:8000", "http://app.example"])
def test_same_and_allowed_origins_are_served(open_client, origin):
    r = open_client.get("/v1/models", headers={"host": "localhost:8000", "origin": origin})
    assert r.status_code == 200, r.text


# -- the protocol at each field's bounds ---------------------------------------------------------------------

def chat(client, **fields):
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "temperature": 0.0, **fields}
    return client.post("/v1/chat/completions", content=json.dumps(body),
                       headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def client(open_client):
    return open_client


@pytest.mark.parametrize("field, inside, outside", [
    ("n", [1, MAX_N], [0, MAX_N + 1, -1]),
    ("temperature", [0.0, 2.0], [-0.01, 2.01]),
    ("top_p", [0.0, 1.0], [-0.01, 1.01]),
    ("max_tokens", [1], [0, -1]),
    ("max_completion_tokens", [1], [0]),
    ("presence_penalty", [-2.0, 2.0], [-2.01, 2.01]),
    ("frequency_penalty", [-2.0, 2.0], [-2.01, 2.01]),
    ("seed", [-(1 << 63), (1 << 64) - 1], [-(1 << 63) - 1, 1 << 64]),
    ("stop", [["x"] * MAX_STOP], [["x"] * (MAX_STOP + 1)]),
])
def test_invariant_fields_are_served_at_their_bounds_and_refused_past_them(client, field, inside, outside):
    for value in inside:
        r = chat(client, **{field: value})
        assert r.status_code == 200, (field, value, r.text)
        if field == "n":
            assert [c["index"] for c in r.json()["choices"]] == list(range(value))
    for value in outside:
        r = chat(client, **{field: value})
        assert r.status_code == 400, (field, value, r.status_code)
        assert field in r.json()["error"]["message"], r.text


def test_logit_bias_bounds(client, engine):
    last = engine.n_vocab - 1
    assert chat(client, logit_bias={str(last): 100, "0": -100}).status_code == 200
    for bias in ({str(last + 1): 1}, {"-1": 1}, {"0": 100.5}, {"0": -101}):
        r = chat(client, logit_bias=bias)
        assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], (bias, r.text)


def test_top_logprobs_bounds_and_logprobs_alone(client):
    r = chat(client, logprobs=True)  # without top_logprobs: each token's own logprob, no alternatives
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 1 and content[0]["logprob"] <= 0 and content[0]["top_logprobs"] == []
    assert chat(client).json()["choices"][0]["logprobs"] is None  # not asked: none
    r = chat(client, logprobs=True, top_logprobs=20)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    for fields in ({"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1},
                   {"top_logprobs": 2}, {"top_logprobs": 0}, {"logprobs": False, "top_logprobs": 2}):
        r = chat(client, **fields)
        assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"], (fields, r.text)
