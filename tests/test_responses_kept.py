"""/v1/responses' previous_response_id: a user's response conversations are kept in their store (across restarts,
in their export, deleted by forget, the newest names.MAX_KEPT_RESPONSES), readable by that user only; with their
history off, or for a request naming no user, in the server's memory as before. On a stand-in engine."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from localpers import names
from localpers.store.store import DB_FILE, Store
from test_route_validation import TextEngine


class PromptEngine(TextEngine):
    """Records the messages of each generation."""

    def __init__(self, model_path):
        super().__init__(model_path)
        self.prompts = []

    def complete(self, messages, **kwargs):
        self.prompts.append(messages)
        return super().complete(messages, **kwargs)


@pytest.fixture
def serve(tmp_path, monkeypatch):
    """serve(**create_app options) -> (engine, client): a fresh server over the same data folder (a restart)."""
    from localpers.serve import responses
    from localpers.serve.server import create_app

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(responses, "_kept", type(responses._kept)())  # this test's memory only
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    opened = []

    def start(**options):
        engine = PromptEngine(model)
        client = TestClient(create_app(engine=engine, data_dir=str(tmp_path / "home"), **options),
                            base_url="http://localhost")
        opened.append(client.app.state.store)
        return engine, client

    yield start
    for store in opened:
        store.close()


def respond(client, **body):
    r = client.post("/v1/responses", json={"max_output_tokens": 4, **body})
    return r


def texts(messages) -> list[str]:
    return [m.get("content") for m in messages]


@pytest.mark.parametrize("stream", [False, True])
def test_a_users_response_is_continued_after_a_restart_by_that_user_only(serve, stream, monkeypatch):
    from localpers.serve import responses

    _, client = serve()
    r = respond(client, input="Remember the word tangerine.", user="rita", stream=stream)
    assert r.status_code == 200, r.text
    rid = r.json()["id"] if not stream else next(
        line for line in r.text.splitlines() if line.startswith("data: ") and '"response.completed"' in line
    ).split('"id": "', 1)[1].split('"', 1)[0]
    monkeypatch.setattr(responses, "_kept", type(responses._kept)())  # the server's memory is gone (a restart)
    engine, client = serve()
    r = respond(client, input="Which word?", user="rita", previous_response_id=rid)
    assert r.status_code == 200, r.text
    assert texts(engine.prompts[-1]) == ["Remember the word tangerine.", "ok", "Which word?"]
    r = respond(client, input="Which word?", user="sam", previous_response_id=rid)
    assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    r = respond(client, input="Which word?", previous_response_id=rid)  # naming nobody
    assert r.status_code == 404
    # the continuation is kept too, and continued in turn
    later = respond(client, input="Which word?", user="rita", previous_response_id=rid)
    r = respond(client, input="And again?", user="rita", previous_response_id=later.json()["id"])
    assert texts(engine.prompts[-1]) == ["Remember the word tangerine.", "ok", "Which word?", "ok", "And again?"]


def test_kept_responses_are_in_the_export_and_forget_deletes_them(serve):
    _, client = serve()
    rid = respond(client, input="My locker code is 4711.", user="rita").json()["id"]
    respond(client, input="Hello.", user="sam")
    exported = client.get("/v1/users/rita/export").json()
    assert [(k["id"], texts(k["messages"])) for k in exported["responses"]] == [
        (rid, ["My locker code is 4711.", "ok"])]
    assert client.delete("/v1/users/rita").status_code == 200
    assert respond(client, input="Code?", user="rita", previous_response_id=rid).status_code == 404
    with Store.open(client.app.state.store.directory) as store:
        assert store.response_conversation("rita", rid) is None
        assert len(store.export("sam")["responses"]) == 1
    for path in client.app.state.store.directory.glob(DB_FILE + "*"):  # the database and its WAL
        assert rid.encode() not in path.read_bytes()


@pytest.mark.parametrize("off", ["request", "server"])
def test_with_history_off_a_response_is_kept_in_memory_only(serve, off):
    options, extra = ({"history": False}, {}) if off == "server" else ({}, {"localpers": {"history": False}})
    engine, client = serve(**options)
    rid = respond(client, input="A secret.", user="rita", **extra).json()["id"]
    assert respond(client, input="Again?", user="rita", previous_response_id=rid).status_code == 200
    with Store.open(client.app.state.store.directory) as store:
        assert store.response_conversation("rita", rid) is None
    from localpers.serve import responses

    responses._kept.clear()  # a restart
    assert respond(client, input="Again?", user="rita", previous_response_id=rid).status_code == 404


def test_a_response_naming_nobody_is_kept_in_memory(serve):
    engine, client = serve()
    rid = respond(client, input="Hi.").json()["id"]
    assert respond(client, input="Again?", previous_response_id=rid).status_code == 200
    assert texts(engine.prompts[-1]) == ["Hi.", "ok", "Again?"]
    assert client.app.state.store.users() == []


def test_store_false_keeps_nothing(serve):
    _, client = serve()
    rid = respond(client, input="Hi.", user="rita", store=False).json()["id"]
    assert respond(client, input="Again?", user="rita", previous_response_id=rid).status_code == 404


def test_only_the_newest_responses_of_a_user_are_kept(tmp_path):
    with Store.open(tmp_path) as store:
        for k in range(5):
            store.keep_response("rita", f"resp_{k}", [{"role": "user", "content": f"turn {k}"}], keep=3)
        store.keep_response("sam", "resp_s", [{"role": "user", "content": "sam's"}], keep=3)
        assert [r["id"] for r in store.export("rita")["responses"]] == ["resp_2", "resp_3", "resp_4"]
        assert store.response_conversation("rita", "resp_1") is None
        assert store.response_conversation("rita", "resp_4") == [{"role": "user", "content": "turn 4"}]
        assert store.response_conversation("sam", "resp_4") is None and store.response_conversation("x", "resp_s") is None
    assert names.MAX_KEPT_RESPONSES >= 100


def test_deleting_a_message_deletes_the_kept_responses_that_hold_it(serve):
    """What the user deletes from their history is not sent to the model again by a previous_response_id."""
    engine, client = serve()
    secret = respond(client, input="My locker code is 4711.", user="rita").json()["id"]
    other = respond(client, input="Hello there.", user="rita").json()["id"]
    [item] = [i for i in client.get("/v1/users/rita/memories").json()["data"] if i["text"] == "My locker code is 4711."]
    assert client.delete(f"/v1/users/rita/memories/{item['id']}").status_code == 200
    assert respond(client, input="Code?", user="rita", previous_response_id=secret).status_code == 404
    assert respond(client, input="Again?", user="rita", previous_response_id=other).status_code == 200
    assert all("4711" not in str(k) for k in client.get("/v1/users/rita/export").json()["responses"])
