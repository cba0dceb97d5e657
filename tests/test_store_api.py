"""The mem0-like memory endpoints, on a small app that mounts the router the way `localpers serve` does."""
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from localpers.store.store import Store


@pytest.fixture
def client(memory_client):
    return memory_client


def assert_error(response, status, code, message):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and message in error["message"]


def test_add_list_search_delete(client):
    r = client.post("/v1/users/alice/memories", json={"text": "I like to dance at the club.", "kind": "preference",
                                                     "meta": {"topic": "test"}})
    assert r.status_code == 201
    [created] = r.json()["data"]
    r = client.post("/v1/users/alice/memories", json={"messages": [
        {"role": "user", "content": "My sister lives in Lisbon."}, {"role": "assistant", "content": "Nice city!"}]})
    assert [d["id"] for d in r.json()["data"]] == [created["id"] + 1] and r.json()["left_out"] == 1

    items = client.get("/v1/users/alice/memories").json()["data"]
    assert [(i["text"], i["kind"], i["meta"]) for i in items] == [
        ("I like to dance at the club.", "preference", {"topic": "test"}),
        ("My sister lives in Lisbon.", "message", {"role": "user", "source": "memories"}),
    ]
    assert len(client.get("/v1/users/alice/memories", params={"kind": "preference"}).json()["data"]) == 1

    hits = client.get("/v1/users/alice/memories/search", params={"q": "where does my sister live", "k": 2}).json()
    assert hits["data"][0]["text"] == "My sister lives in Lisbon." and hits["data"][0]["score"] > 0

    assert client.delete(f"/v1/users/alice/memories/{created['id']}").json() == {"id": created["id"], "deleted": True}
    assert len(client.get("/v1/users/alice/memories").json()["data"]) == 1
    assert_error(client.delete(f"/v1/users/alice/memories/{created['id']}"), 404, "not_found", "has no item")


@pytest.mark.parametrize("key", ["attribute", "attribute_type", "value", "message", "source", "superseded_by",
                                 "supersedes"])
def test_invariant_a_clients_meta_never_states_a_facts_own_keys(client, key):
    """A client-supplied meta made a second current single-valued fact ({"attribute": "job", "value": "king"} on
    "I love jazz" beside the learned job=dentist): the store's own meta keys are refused, naming the key, before
    anything is written; the user's facts stay one per slot."""
    client.post("/v1/users/fay/memories", json={"messages": [{"role": "user", "content": "I live in Lyon."}]})
    before = client.get("/v1/users/fay/memories").json()["data"]
    assert [(f["attribute"], f["value"]) for f in client.get("/v1/users/fay/facts").json()["data"]] == [("home", "Lyon")]
    meta = {"attribute": "home", "value": "Paris", "note": "x"} if key == "attribute" else {"note": "x", key: "home"}
    for kind in ("preference", "message"):
        r = client.post("/v1/users/fay/memories", json={"text": "I love jazz", "kind": kind, "meta": meta})
        assert_error(r, 400, "invalid_request", f'meta key "{key}"')
    assert client.get("/v1/users/fay/memories").json()["data"] == before
    assert [(f["attribute"], f["value"]) for f in client.get("/v1/users/fay/facts").json()["data"]] == [("home", "Lyon")]
    r = client.post("/v1/users/fay/memories", json={"text": "I love jazz", "kind": "preference", "meta": {"note": "x"}})
    assert r.status_code == 201   # other keys are the client's


def test_export_and_forget(client):
    client.post("/v1/users/alice/memories", json={"text": "alice's note"})
    client.post("/v1/users/bob/memories", json={"text": "bob's note"})
    exported = client.get("/v1/users/alice/export").json()
    assert exported["user"] == "alice" and [i["text"] for i in exported["items"]] == ["alice's note"]
    assert exported["artifacts"] == []
    assert client.delete("/v1/users/alice").json() == {"user": "alice", "deleted": True}
    assert_error(client.get("/v1/users/alice/memories"), 404, "not_found", "unknown user 'alice'")
    assert [i["text"] for i in client.get("/v1/users/bob/memories").json()["data"]] == ["bob's note"]


@pytest.mark.parametrize(
    "method, path, kwargs, status, message",
    [
        ("get", "/v1/users/ghost/memories", {}, 404, "unknown user"),
        ("get", "/v1/users/ghost/export", {}, 404, "unknown user"),
        ("delete", "/v1/users/ghost", {}, 404, "unknown user"),
        ("get", "/v1/users/ghost/memories/search?q=x", {}, 404, "unknown user"),
        ("post", "/v1/users/alice/memories", {"json": {"text": ""}}, 400, "text is empty"),
        ("post", "/v1/users/alice/memories", {"json": {"text": "x" * 70000}}, 400, "limit is 65536 bytes"),
        ("post", "/v1/users/alice/memories", {"content": b'{"text": "a\\udc80b"}', "headers": {
            "content-type": "application/json"}}, 400, "not valid UTF-8"),  # a lone surrogate, escaped
        ("post", "/v1/users/alice/memories", {"json": {"note": "hi"}}, 400, 'needs "text" or "messages"'),
        ("post", "/v1/users/alice/memories", {"json": ["not", "an", "object"]}, 400, "body"),
        ("post", "/v1/users/alice/memories", {"content": b'{"text": "unterminated', "headers": {
            "content-type": "application/json"}}, 400, "body"),
        ("post", "/v1/users/alice/memories", {"content": b'{"text": "caf\xe9"}', "headers": {
            "content-type": "application/json"}}, 400, "body"),
        ("post", "/v1/users/alice/memories", {"json": {"messages": [{"role": "user", "content": "ok"},
                                                                    {"role": "user", "content": ""}]}},
         400, "messages[1]: text is empty"),
        ("post", "/v1/users/bad%0Auser/memories", {"json": {"text": "hi"}}, 400, "control character U+000A"),
        ("post", "/v1/users/%20/memories", {"json": {"text": "hi"}}, 400, "is blank"),
        ("post", "/v1/users/alice/memories", {"json": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}}, 400, "messages[0]: content[0] is not a text part"),
        ("post", "/v1/users/alice/memories", {"json": {"text": []}}, 400, "non-empty list of text parts"),
        ("get", "/v1/users/alice/memories/search?q=", {}, 400, "query is empty"),
        ("get", "/v1/users/alice/memories/search?q=x&k=0", {}, 400, "k must be"),
        ("get", "/v1/users/alice/memories/search?q=x&k=many", {}, 400, "k"),
        ("get", "/v1/users/alice/memories/search?q=x&mode=magic", {}, 400, "unknown search mode"),
        ("post", "/v1/users/alice/memories", {"json": {"text": "hi", "kind": "bogus"}}, 400,
         "unknown kind 'bogus': use one of message, preference, document, review"),
        ("get", "/v1/users/alice/memories?kind=zzz", {}, 400, "unknown kind 'zzz'"),
        ("post", "/v1/users/alice/memories", {"json": {"text": "hi", "ts": 1e300}}, 400, "ts must be"),
        ("post", "/v1/users/alice/memories", {"json": {"text": "hi", "ts": -1e300}}, 400, "ts must be"),
        ("post", "/v1/users/alice/memories", {"content": b"null", "headers": {"content-type": "application/json"}},
         400, "the request body must be a JSON object"),
        ("post", "/v1/users/alice/memories", {"content": b"", "headers": {"content-type": "application/json"}},
         400, "the request body must be a JSON object"),
        ("post", "/v1/users/alice/memories", {"content": b"{x", "headers": {"content-type": "application/json"}},
         400, "the request body is not valid JSON"),
    ],
)
def test_bad_requests_get_openai_style_errors_and_store_nothing(client, method, path, kwargs, status, message):
    client.post("/v1/users/alice/memories", json={"text": "already here"})
    response = getattr(client, method)(path, **kwargs)
    assert_error(response, status, "not_found" if status == 404 else "invalid_request", message)
    assert "param" in response.json()["error"]  # as in chat errors (null when no one field is at fault)
    assert [i["text"] for i in client.get("/v1/users/alice/memories").json()["data"]] == ["already here"]


# Ids that OpenAI clients send as `user`, and ids that hold the URL's own syntax ('/', '%', '?', '#', '..').
API_USERS = ["john doe", "josé", "bob@example.com", "x" * 200, "alice ", "../etc", "a/b", "a/memories/5",
             "100%", "what?#frag", "名前", "alice"]


def test_memory_endpoints_take_any_user_id_url_encoded(client):
    """Each id, percent-encoded as one path segment, reaches its own user on every route; in particular ids
    holding '/' route as one segment (DELETE of user "a/memories/5" never deletes item 5 of user "a")."""
    created = {}
    for n, user in enumerate(API_USERS):
        path = f"/v1/users/{quote(user, safe='')}"
        r = client.post(f"{path}/memories", json={"text": f"note {n} about tea"})
        assert r.status_code == 201, (user, r.text)
        created[user] = r.json()["data"][0]
        assert created[user]["user"] == user
    for n, user in enumerate(API_USERS):
        path = f"/v1/users/{quote(user, safe='')}"
        assert [i["text"] for i in client.get(f"{path}/memories").json()["data"]] == [f"note {n} about tea"]
        hits = client.get(f"{path}/memories/search", params={"q": "tea"}).json()["data"]
        assert [h["id"] for h in hits] == [created[user]["id"]]
        assert client.get(f"{path}/export").json()["user"] == user
    r = client.delete(f"/v1/users/{quote('a/memories/5', safe='')}")
    assert r.json() == {"user": "a/memories/5", "deleted": True}
    assert client.get("/v1/users/a%2Fmemories%2F5/memories").status_code == 404
    item = created["a/b"]["id"]
    assert client.delete(f"/v1/users/a%2Fb/memories/{item}").json() == {"id": item, "deleted": True}
    assert client.get("/v1/users/a%2Fb/memories").json()["data"] == []
    for user in API_USERS:  # every other user still has their note
        if user not in ("a/memories/5", "a/b"):
            assert len(client.get(f"/v1/users/{quote(user, safe='')}/memories").json()["data"]) == 1, user


def test_memories_take_content_as_text_parts_like_chat(client):
    parts = [{"type": "text", "text": "I am vegetarian"}, {"type": "text", "text": " and I love mangoes."}]
    r = client.post("/v1/users/alice/memories", json={"messages": [
        {"role": "user", "content": parts}, {"role": "assistant", "content": "Noted."}]})
    assert r.status_code == 201, r.text
    r = client.post("/v1/users/alice/memories", json={"text": [{"type": "text", "text": "I drink oolong."}],
                                                     "kind": "preference"})
    assert r.status_code == 201, r.text
    items = client.get("/v1/users/alice/memories").json()["data"]
    assert [(i["text"], i["kind"], i["meta"].get("role"), i["meta"].get("value")) for i in items] == [
        ("I am vegetarian and I love mangoes.", "message", "user", None),
        ("I am vegetarian.", "preference", None, "vegetarian"),  # learned from the chat as a served chat is
        ("I love mangoes.", "preference", None, "mangoes"),
        ("I drink oolong.", "message", "user", None),           # a preference without meta is learned as said
        ("I drink oolong.", "preference", None, "oolong")]


def test_a_posted_chat_keeps_only_the_users_messages_and_learns_their_facts_as_chat_does(client):
    """POST .../memories {"messages"}: the assistant's reply is never an item (it may misquote the user), and
    the user's "I live in Rome." becomes the fact home = Rome, as the same chat served would."""
    r = client.post("/v1/users/rosa/memories", json={"messages": [
        {"role": "user", "content": "I live in Rome."}, {"role": "assistant", "content": "Nice, you live in Milan"}]})
    assert r.status_code == 201, r.text
    assert r.json()["left_out"] == 1 and [f["attribute"] for f in r.json()["facts"]] == ["home"]
    items = client.get("/v1/users/rosa/memories").json()["data"]
    assert [i["text"] for i in items if i["kind"] == "message"] == ["I live in Rome."]
    facts = client.get("/v1/users/rosa/facts").json()["data"]
    assert [(f["attribute"], f["value"]) for f in facts] == [("home", "Rome")]
    assert all("Milan" not in i["text"] for i in items)


class Held:
    """Stands in for engine.Pinned: the artifacts a request was composed with."""

    def __init__(self, artifacts):
        self.artifacts = artifacts

    def claim(self):
        return True

    def release(self):
        pass


class RecordingEngine:
    """Stands in for the engine behind `localpers serve`: records the artifacts each chat request is served with."""

    model_name, chat_template, n_vocab = "fake", None, 100

    def __init__(self, model_path):
        self.model_path, self.served = model_path, []

    def pin(self, artifacts):
        return Held(artifacts), []

    def chat_tokens(self, messages, tools=None):
        return [1, 2, 3]

    def complete(self, messages, artifacts=None, **kwargs):
        self.served.append(artifacts.artifacts)
        return {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "tokens": 1, "logprobs": None}],
                "prompt_tokens": 3, "completion_tokens": 1}

    def chat_response(self, out, tools=False):
        return {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                          "message": {"role": "assistant", "content": "ok"}}]}


def test_chat_user_field_takes_any_client_string(tmp_path, monkeypatch):
    """OpenAI's `user` holds display names and e-mail addresses: each is served with its own adapter; only ids
    the store cannot hold (control characters) get a 400, never a 500."""
    from localpers.engine.engine import model_sha256
    from localpers.serve.server import create_app

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    engine = RecordingEngine(model)
    users = ["john doe", "josé", "bob@example.com", "x" * 200, "alice ", "../etc", "a/b"]
    with Store.open(tmp_path / "home") as store:
        for n, user in enumerate(users):
            adapter = tmp_path / f"adapter{n}.gguf"
            adapter.write_bytes(b"adapter %d" % n)
            store.add(user, "hello")  # the registry registers artifacts for known users only
            store.register_artifact(user, "lora", adapter, model_sha256(model), {"method": "edit"})
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path / "home")), base_url="http://localhost") as client:
        for n, user in enumerate(users + ["nobody yet"]):
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": user})
            assert r.status_code == 200, (user, r.text)
            served = engine.served[-1]
            if n < len(users):
                assert open(served.lora[0][0], "rb").read() == b"adapter %d" % n
            else:
                assert served is None or not served.lora
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": "a\nb"})
        assert r.status_code == 400 and "control character" in r.json()["error"]["message"]


def test_history_shows_an_item_whose_time_no_calendar_holds(tmp_path):
    """A store written before ts was range-checked may hold ts=1e300: `localpers history` lists it anyway."""
    from localpers.cli.store_cli import _line

    for ts in (1e300, -1e300, 0.0):
        assert _line({"id": 1, "ts": ts, "kind": "message", "text": "hi"}).endswith("message  hi")


def test_a_posted_chat_reads_each_message_after_the_one_before_as_chat_does(client):
    """"Just kidding, I'm not." after "I'm vegetarian." withdraws it, posted as served."""
    r = client.post("/v1/users/kim/memories", json={"messages": [
        {"role": "user", "content": "I'm vegetarian."}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Just kidding, I'm not."}]})
    assert r.status_code == 201, r.text
    assert client.get("/v1/users/kim/facts").json()["data"] == []
