"""The page's server side without a browser: its documents and their Content-Security-Policy, the Host, Origin,
content-type and API-key rules applied to it unchanged, the memory snapshot (a fact's status and where it came
from) and correcting an item. The page in a real browser is tests/test_page.py."""
import re
import time

import pytest
from fastapi.testclient import TestClient

from localpers import names
from localpers.serve.page import CSP, FAILED, IN_USE, LEARNING, STORED, STATIC, fact_status
from localpers.serve.server import create_app
from localpers.store.store import Store

LOCAL = "http://localhost"
KEY = "k3y"


@pytest.fixture(scope="module")
def engine():
    from localpers.engine.engine import Engine

    return Engine(n_ctx=256, n_threads=1)


def test_the_page_has_a_strict_csp_and_no_inline_code_or_foreign_asset(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path), api_key=KEY), base_url=LOCAL)
    page = client.get("/")  # no key needed: the page holds no data; everything it reads needs the key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "'unsafe-inline'" not in CSP and "form-action 'none'" in CSP
    html = page.text
    assert not re.search(r"<script(?![^>]*\ssrc=)", html)  # every script is a file of this origin
    assert not re.search(r"\s(style|on[a-z]+)\s*=", html)   # no inline style attribute, no inline handler
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets)
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
    js = (STATIC / "page.js").read_text()
    assert "innerHTML" not in js and "eval(" not in js and "http://" not in js and "https://" not in js
    assert client.get("/static/../page.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/v1/page").status_code == 401
    assert client.get("/v1/page", headers={"Authorization": f"Bearer {KEY}"}).json() == {
        "owner": None, "model": engine.model_name}


def test_the_page_obeys_the_host_origin_and_json_rules(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    with Store.open(tmp_path) as store:
        item = store.add("ann", "I'm vegetarian.", kind=names.PREFERENCE)
    assert client.get("/", headers={"host": "evil.example"}).status_code == 403  # DNS rebinding
    path = f"/v1/users/ann/memories/{item}"
    assert client.patch(path, json={"text": "x"}, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.patch(path, content="text=x", headers={"content-type": "application/x-www-form-urlencoded"}
                        ).status_code == 415
    assert client.patch(path, content='{"text": "x"}', headers={"content-type": "text/plain"}).status_code == 415
    assert client.patch(path, json={"text": "I'm vegan."}, headers={"origin": "http://localhost"}).status_code == 200


def test_memory_snapshot_and_correcting_a_fact(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    assert client.get("/v1/users/ann/memory").status_code == 404
    chat = {"messages": [{"role": "user", "content": "Hi! I'm vegetarian."}], "user": "ann", "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    snapshot = client.get("/v1/users/ann/memory").json()
    [fact] = snapshot["facts"]
    assert (fact["text"], fact["status"], fact["source"]["text"]) == ("I'm vegetarian.", LEARNING, chat["messages"][0]["content"])
    assert snapshot["jobs"][0]["state"] == names.QUEUED and snapshot["jobs"][0]["duration_s"] is None
    assert snapshot["items"] == 1 and snapshot["artifacts"] == []

    r = client.patch(f"/v1/users/ann/memories/{fact['id']}", json={"text": "I'm vegan."})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["text"] == "I'm vegan." and new["kind"] == names.PREFERENCE and new["id"] != fact["id"]
    assert new["meta"]["attribute"] == fact["meta"]["attribute"] and new["meta"]["value"] == "vegan"
    [after] = client.get("/v1/users/ann/memory").json()["facts"]
    assert after["id"] == new["id"] and after["source"]["text"] == "I'm vegan."  # the correction is its source
    # the corrected fact is in the facts index: a later statement of the same attribute replaces it
    later = {**chat, "messages": [{"role": "user", "content": "I'm pescatarian now."}]}
    assert client.post("/v1/chat/completions", json=later).status_code == 200
    [latest] = client.get("/v1/users/ann/memory").json()["facts"]
    assert latest["meta"]["value"] == "pescatarian"
    [new] = [f for f in client.get("/v1/users/ann/memories").json()["data"] if f["id"] == latest["id"]]
    for body, status in (({"text": ""}, 400), ({"text": 3}, 400), ({"text": "a", "kind": "x"}, 400), ([], 400)):
        assert client.patch(f"/v1/users/ann/memories/{new['id']}", json=body).status_code == status
    assert client.patch(f"/v1/users/ann/memories/{fact['id']}", json={"text": "a"}).status_code == 404  # gone
    assert client.patch(f"/v1/users/bob/memories/{new['id']}", json={"text": "a"}).status_code == 404
    with Store.open(tmp_path) as store:
        store.add("bob", "a note")
    assert client.patch(f"/v1/users/bob/memories/{new['id']}", json={"text": "a"}).status_code == 404  # not bob's
    assert [i["text"] for i in client.get("/v1/users/ann/memories").json()["data"]] == [
        chat["messages"][0]["content"], "I'm vegan.", "I'm pescatarian now.", "I'm pescatarian now."]  # message, fact


def _job(id_, kind=names.EDIT, state=names.DONE, started=10.0, reason=None):
    return {"id": id_, "kind": kind, "state": state, "reason": reason, "started": started,
            "finished": None if state in (names.QUEUED, names.RUNNING) else started + 1}


def test_invariant_a_fact_is_in_use_exactly_when_a_loadable_artifact_was_made_from_it():
    fact = {"id": 7, "ts": 5.0}
    adapter = {"sources": [7, 8], "meta": {}}
    assert fact_status(fact, [adapter], [_job(1, state=names.FAILED, reason="x")]) == (IN_USE, None)
    assert fact_status(fact, [], []) == (STORED, None)
    assert fact_status(fact, [], [_job(2, state=names.QUEUED, started=None), _job(1)]) == (LEARNING, None)
    assert fact_status(fact, [], [_job(2, kind=names.PERCE, state=names.RUNNING)]) == (LEARNING, None)
    assert fact_status(fact, [], [_job(2, state=names.FAILED, reason="no model")]) == (FAILED, "no model")
    status, reason = fact_status(fact, [], [_job(3)])
    assert status == FAILED and "job 3" in reason
    status, reason = fact_status(fact, [{"sources": [7], "meta": {"broken": "truncated"}}], [_job(3)])
    assert status == FAILED and "truncated" in reason
    assert fact_status(fact, [], [_job(1, started=1.0)]) == (STORED, None)  # a job older than the fact
    assert fact_status(fact, [{"sources": [8], "meta": {}}], [_job(4, kind="other")]) == (STORED, None)


def test_job_durations_in_the_snapshot(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    with Store.open(tmp_path) as store:
        store.add("ann", "I like tea.", kind=names.PREFERENCE)
        job = store.claim_job()
        time.sleep(0.01)
        store.finish_job(job["id"], names.DONE, result={"artifact": None, "edited": 0, "failed": 1, "retired": 0})
    [shown] = client.get("/v1/users/ann/memory").json()["jobs"]
    assert shown["duration_s"] == pytest.approx(shown["finished"] - shown["started"], abs=1e-3)
    assert shown["result"]["failed"] == 1
    [fact] = client.get("/v1/users/ann/memory").json()["facts"]
    assert fact["status"] == FAILED and f"job {job['id']}" in fact["reason"]


def _lyon(tmp_path):
    """u said "I'm vegetarian and I live in Lyon." (as in chat): one message, two facts. Returns their ids."""
    from localpers.serve.learn import learn_from_text

    with Store.open(tmp_path) as store:
        learned = learn_from_text(store, "u", "I'm vegetarian and I live in Lyon.", source="chat")
        facts = {f["meta"]["attribute"]: f["id"] for f in store.items("u", kind=names.PREFERENCE)}
    return learned["messages"][0], facts


def _state(client):
    return sorted((i["kind"], i["text"]) for i in client.get("/v1/users/u/memories").json()["data"])


def test_invariant_a_refused_fact_correction_changes_nothing(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    _, facts = _lyon(tmp_path)
    before = _state(client)
    for text in ("I don't live in Rome anymore.", "I'm not vegetarian anymore.",  # retirements, not facts
                 "My sister is vegan.", "What is my diet?", "hi"):                    # nothing about the user
        for fact_id in facts.values():
            r = client.patch(f"/v1/users/u/memories/{fact_id}", json={"text": text})
            assert r.status_code == 400, (text, r.text)
            assert "must state a fact about you" in r.json()["error"]["message"]
            assert _state(client) == before
    r = client.patch(f"/v1/users/u/memories/{facts['home']}", json={"text": "I live in Rome."})
    assert r.status_code == 200 and r.json()["meta"]["value"] == "Rome" and r.json()["kind"] == names.PREFERENCE
    # a correction that states a fact already held elsewhere returns the fact that holds it
    r = client.patch(f"/v1/users/u/memories/{r.json()['id']}", json={"text": "I'm vegetarian."})
    assert r.status_code == 200 and r.json()["id"] == facts["diet"]
    assert [i["meta"]["value"] for i in client.get("/v1/users/u/memories?kind=preference").json()["data"]] == [
        "vegetarian"]


def test_a_corrected_message_is_relearned(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    message, _ = _lyon(tmp_path)
    r = client.patch(f"/v1/users/u/memories/{message}", json={"text": "I'm vegan and I live in Rome."})
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == names.MESSAGE and r.json()["text"] == "I'm vegan and I live in Rome."
    facts = client.get("/v1/users/u/memory").json()["facts"]
    assert sorted((f["attribute"], f["value"]) for f in facts) == [("diet", "vegan"), ("home", "Rome")]
    assert all(f["source"]["id"] == r.json()["id"] for f in facts)
    # a message that states nothing is stored as corrected, and what the old one taught goes with it
    r = client.patch(f"/v1/users/u/memories/{r.json()['id']}", json={"text": "hello there"})
    assert r.status_code == 200 and client.get("/v1/users/u/memory").json()["facts"] == []
    assert _state(client) == [(names.MESSAGE, "hello there")]


def test_memory_route_errors_say_what_is_wrong(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    _, facts = _lyon(tmp_path)
    path = f"/v1/users/u/memories/{facts['diet']}"
    json_type = {"content-type": "application/json"}

    def error(r):
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        return r.json()["error"]["message"]

    assert "not valid JSON" in error(client.patch(path, content="{nope", headers=json_type))
    assert "must be a JSON object" in error(client.patch(path, content="null", headers=json_type))
    assert "must be a JSON object" in error(client.patch(path, content="", headers=json_type))
    assert "must be a JSON object" in error(client.post("/v1/users/u/memories", content="null", headers=json_type))
    assert "unknown kind 'bogus'" in error(client.post("/v1/users/u/memories", json={"text": "hi", "kind": "bogus"}))
    assert "message, preference, document, review" in error(client.get("/v1/users/u/memories?kind=zzz"))
    for ts in (1e300, -1e300, -1, 1e12):
        assert "ts must be" in error(client.post("/v1/users/u/memories", json={"text": "hi", "ts": ts}))
    assert client.post("/v1/users/u/memories", json={"text": "hi", "ts": 0}).status_code == 201
    assert client.get("/v1/users/nobody/memories").json()["error"]["param"] is None  # 404, param present
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % value
        r = client.post("/v1/chat/completions", content=body, headers=json_type)
        assert error(r) == "'temperature': must be a finite number" and r.json()["error"]["param"] == "temperature"
    assert "must be a JSON object" in error(client.post("/v1/chat/completions", content="null", headers=json_type))
    assert client.post("/v1/chat/completions", json=chat).status_code == 200


@pytest.mark.parametrize("kind", [names.PREFERENCE, names.MESSAGE])
def test_a_correction_runs_the_fact_detector_once(tmp_path, monkeypatch, kind):
    """PATCH validates a corrected fact with the detector and learns from the same detection (it ran twice)."""
    from localpers.serve import learn, page
    from test_store_api import RecordingEngine

    calls = []

    def counted(text, limit, previous=None):  # detect_facts' signature (previous: the turn before, in a chat)
        calls.append(text)
        return detect_facts(text, limit, previous)

    from localpers.personalize.detect import detect_facts

    monkeypatch.setattr(page, "detect_facts", counted, raising=False)
    monkeypatch.setattr(learn, "detect_facts", counted)
    message, facts = _lyon(tmp_path)
    target = facts["home"] if kind == names.PREFERENCE else message
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    client = TestClient(create_app(engine=RecordingEngine(model), data_dir=str(tmp_path)), base_url=LOCAL)
    calls.clear()
    r = client.patch(f"/v1/users/u/memories/{target}", json={"text": "I live in Rome."})
    assert r.status_code == 200, r.text
    assert calls == ["I live in Rome."]
    assert ("home", "Rome") in {(f["attribute"], f["value"]) for f in client.get("/v1/users/u/memory").json()["facts"]}
