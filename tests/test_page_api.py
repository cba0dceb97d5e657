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
