"""The assistant loop on the served path: the composer serves what `localpers eval` measures, the explanation
object, learning from the chat, the job endpoints and the worker, and deletion that retires an adapter at once.

Fast tests: the embedded model, an adapter of random weights standing in for a trained one, and a job kind that
writes it (no torch training). The north-star scenario with real edits is test_north_star.py (slow)."""
import json
import time

import pytest
from fastapi.testclient import TestClient

from localpers import names
from localpers.personalize import editing
from localpers.serve import jobs
from localpers.serve.compose import DEFAULT_SPEC, Composer, served_user
from localpers.personalize.datasets import read_upqa
from localpers.engine.engine import model_sha256
from localpers.personalize.methods import apply
from localpers.serve.server import create_app
from tests.serve_helpers import wait_until
from localpers.store.store import Store, read_import

UPQA_ITEM = {"input_attribute": "I like to dance at the club.", "attribute_type": "hobby",
             "question": "What's my hobby?", "target": "Dancing at clubs",
             "question_paraphrased": "What do I do for fun?", "implicit_question": "Plan my Saturday night."}
QUERY = "Which club should I go dancing at tonight?"

LOCAL = "http://localhost"  # the server refuses foreign Host headers, TestClient's "testserver" too


@pytest.fixture(scope="module")
def engine():
    from localpers.engine.engine import Engine

    return Engine(n_ctx=1024, n_threads=2)


@pytest.fixture(scope="module")
def adapter(engine, tmp_path_factory):
    from test_engine import random_ffn_down_lora

    return random_ffn_down_lora(tmp_path_factory.mktemp("adapter") / "edit.gguf", engine)


def chat(client, body):
    return client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("spec", ["prompt+rag", "edit+rag", "edit+prompt+rag", "base", "facts", "edit+facts+rag"])
def test_invariant_serve_composes_what_eval_measures(engine, adapter, tmp_path, monkeypatch, spec):
    """One UPQA user, read by the evaluation from the file and by the server from the store it was imported into:
    the same spec gives the same artifacts, context and prompt tokens, and the HTTP reply is the eval's answer."""
    data = tmp_path / "upqa.json"
    data.write_text(json.dumps([UPQA_ITEM]))
    evaluated = read_upqa(data)[0].user
    home = tmp_path / "home"
    with Store.open(home) as store:
        [pref] = store.add_many("ann", read_import(data))
        artifact = store.register_artifact("ann", names.LORA, adapter, model_sha256(engine.model_path),
                                           {"method": names.EDIT, "sources": [pref]})
        served = served_user(store, "ann", model_sha256(engine.model_path))
        registered_path = served.registered[0].path
    # the evaluation trains its edit on demand: here it is the adapter the registry serves
    monkeypatch.setattr(editing, "user_adapter", lambda user, engine, config=None: registered_path)
    composer = Composer(spec)
    ours, theirs = composer(served, QUERY, engine), composer(evaluated, QUERY, engine)
    assert (ours.artifacts, ours.system, ours.user_prefix) == (theirs.artifacts, theirs.system, theirs.user_prefix)
    messages = [{"role": "user", "content": QUERY}]
    tokens = [engine.tokenize(engine.format_chat(apply(p, messages))) for p in (ours, theirs)]
    assert tokens[0] == tokens[1]
    expected = engine.chat(apply(theirs, messages), artifacts=theirs.artifacts, max_tokens=12)
    engine.llm.reset()  # decode the prompt again from scratch: a reused prefix may round differently

    client = TestClient(create_app(engine=engine, data_dir=str(home), personalize=spec), base_url=LOCAL)
    r = chat(client, {"messages": messages, "user": "ann", "max_tokens": 12, "temperature": 0,
                      "localpers": {"explain": True, "history": False}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert body["localpers"]["composition"] == spec
    assert body["localpers"]["artifacts"] == ([{"method": names.EDIT, "kind": names.LORA, "id": artifact}]
                                              if names.EDIT in spec else [])
    assert body["localpers"]["retrieved"] == ([pref] if names.RAG in spec else [])
    assert "dance" not in json.dumps(body["localpers"])  # ids, never text
    with Store.open(home) as store:
        assert len(store.items("ann")) == 1  # history: false stored nothing


def test_explanation_in_the_last_stream_chunk_and_only_when_asked(engine, tmp_path):
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    body = {"messages": [{"role": "user", "content": "Hello!"}], "user": "bo", "max_tokens": 6, "temperature": 0}
    assert "localpers" not in chat(client, body).json()
    r = chat(client, body | {"stream": True, "localpers": {"explain": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [("localpers" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"]
    assert chunks[-1]["localpers"] == {"composition": DEFAULT_SPEC, "artifacts": [], "retrieved": []}
    for bad in ({"explain": "yes"}, {"unknown": True}, ["explain"]):
        assert chat(client, body | {"localpers": bad}).status_code == 400


def test_chat_learns_history_and_preferences_unless_opted_out(engine, tmp_path):
    conversation = [{"role": "user", "content": "Hi! I'm vegetarian. Any ideas for dinner?"}]
    client = TestClient(create_app(engine=engine, data_dir=str(tmp_path)), base_url=LOCAL)
    chat(client, {"messages": conversation, "user": "cy", "max_tokens": 8})
    reply = {"role": "assistant", "content": "Try a lentil curry."}
    chat(client, {"messages": conversation + [reply, {"role": "user", "content": "Thanks!"}], "user": "cy",
                  "max_tokens": 8})
    chat(client, {"messages": [{"role": "user", "content": "I have a secret."}], "user": "cy", "max_tokens": 8,
                  "localpers": {"history": False}})
    with Store.open(tmp_path) as store:
        items = store.items("cy")
        assert [(i["kind"], i["text"]) for i in items] == [
            ("message", conversation[0]["content"]), (names.PREFERENCE, "I'm vegetarian."), ("message", "Thanks!")]
        assert [(j["kind"], j["state"]) for j in store.jobs("cy")] == [(names.EDIT, names.QUEUED)]
    too_long = {"messages": [{"role": "user", "content": "I love opera. " + "la " * 2000}], "user": "cy"}
    assert chat(client, too_long).status_code == 400  # refused: nothing stored
    with Store.open(tmp_path) as store:
        assert len(store.items("cy")) == 3
    quiet = TestClient(create_app(engine=engine, data_dir=str(tmp_path / "quiet"), history=False), base_url=LOCAL)
    chat(quiet, {"messages": conversation, "user": "cy", "max_tokens": 8})
    with Store.open(tmp_path / "quiet") as store:
        assert store.users() == []


def test_jobs_run_in_the_background_and_deletion_retires_the_adapter(engine, adapter, tmp_path, monkeypatch):
    """A stated preference -> an edit job (here writing a random adapter) -> the next request is served with it;
    deleting the preference retires it before the DELETE returns and queues the recomputation; forget cancels."""
    runs = []

    def fake_edit(store, user, engine, job):
        prefs = store.items(user, kind=names.PREFERENCE)
        runs.append(job)
        if not prefs:
            return {"retired": store.retire_artifacts(user, names.LORA, model_sha256(engine.model_path), names.EDIT)}
        return {"artifact": store.register_artifact(user, names.LORA, adapter, model_sha256(engine.model_path),
                                                    {"method": names.EDIT, "sources": [p["id"] for p in prefs]}, job=job)}

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, fake_edit)
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path), jobs=True), base_url=LOCAL) as client:
        question = {"messages": [{"role": "user", "content": "What is my diet?"}], "user": "di", "max_tokens": 10,
                    "temperature": 0, "localpers": {"explain": True, "history": False}}
        assert client.get("/v1/users/di/jobs").status_code == 404
        base = chat(client, question).json()
        chat(client, {"messages": [{"role": "user", "content": "I'm vegetarian."}], "user": "di", "max_tokens": 4})
        done = wait_for_jobs(client, "di")
        assert done[0]["state"] == names.DONE and done[0]["result"]["artifact"]
        served = chat(client, question).json()
        assert served["localpers"]["artifacts"] == [{"method": names.EDIT, "kind": names.LORA,
                                                     "id": done[0]["result"]["artifact"]}]
        assert served["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]

        [pref] = client.get("/v1/users/di/memories", params={"kind": names.PREFERENCE}).json()["data"]
        assert client.delete(f"/v1/users/di/memories/{pref['id']}").status_code == 200
        after = chat(client, question).json()  # at once, whatever the worker is doing
        assert after["localpers"]["artifacts"] == []
        assert after["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
        assert wait_for_jobs(client, "di")[0]["result"] == {"retired": 0}

        r = client.post("/v1/users/di/personalize", json={"method": "nope"})
        assert r.status_code == 400
        r = client.post("/v1/users/di/personalize", json={})  # JSON endpoints take application/json only
        assert r.status_code == 202 and r.json()["kind"] == names.EDIT
        assert client.delete("/v1/users/di").status_code == 200
        assert client.get("/v1/users/di/jobs").status_code == 404


def wait_for_jobs(client, user, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs_ = client.get(f"/v1/users/{user}/jobs").json()["data"]
        if jobs_ and all(j["state"] in (names.DONE, names.FAILED) for j in jobs_):
            return jobs_
        time.sleep(0.05)
    raise AssertionError(f"jobs still pending: {jobs_}")


def test_a_failing_job_reports_its_reason_and_the_worker_goes_on(engine, tmp_path, monkeypatch):
    def broken(store, user, engine, job):
        raise RuntimeError("out of cheese")

    monkeypatch.setitem(jobs.JOB_KINDS, "broken", broken)
    with Store.open(tmp_path) as store:
        store.add("ed", "a note")
        store.queue_job("ed", "broken")
        worker = jobs.Worker(store, lambda: engine)
        assert worker.run_one(engine) and not worker.run_one(engine)
        [job] = store.jobs("ed")
        assert job["state"] == names.FAILED and job["reason"] == "RuntimeError: out of cheese"


def test_a_job_finishing_after_forget_writes_nothing(engine, adapter, tmp_path, monkeypatch):
    import threading

    started, release, outcome = threading.Event(), threading.Event(), []

    def slow_edit(store, user, engine, job):
        started.set()
        release.wait(30)
        try:
            store.register_artifact(user, names.LORA, adapter, model_sha256(engine.model_path),
                                    {"method": names.EDIT}, job=job)
        except Exception as e:
            outcome.append(type(e).__name__)
            raise
        return {}

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, slow_edit)
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path), jobs=True), base_url=LOCAL) as client:
        client.post("/v1/users/fay/memories", json={"text": "I love jazz.", "kind": names.PREFERENCE})
        assert started.wait(30)
        assert client.delete("/v1/users/fay").status_code == 200
        release.set()
        wait_until(lambda: outcome, 30)
        assert outcome == ["NotFoundError"]
        assert client.get("/v1/users/fay/jobs").status_code == 404
    assert not list((tmp_path / "artifacts").glob("*/*"))  # no artifact file of fay's (or anyone's) is left


def test_serve_refuses_an_unknown_composition(tmp_path, capsys):
    from localpers.cli.cli import main

    assert main(["serve", "--personalize", "edit+nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "localpers.db").exists()
