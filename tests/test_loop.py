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
from localpers.errors import UserError
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


def test_a_failing_job_reports_its_reason_and_the_worker_goes_on(engine, tmp_path, monkeypatch, capsys):
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
    log = capsys.readouterr().err  # the server's log: the job's id, kind and duration, never user text
    assert f"job {job['id']} (broken) started" in log and f"job {job['id']} (broken) failed in " in log
    assert "a note" not in log


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


# -- serving never fails because of learning ------------------------------------------------------------------

def random_adapter(engine, path, seed):
    """A random rank-4 LoRA on every ffn_down of the engine's model (its file differs with each seed)."""
    import numpy as np

    from localpers.model.gguf_write import write_lora

    meta = engine.llm.metadata
    arch = meta["general.architecture"]
    d_ff = int(meta[f"{arch}.feed_forward_length"])
    rng = np.random.default_rng(seed)
    factors = {f"blk.{il}.ffn_down": (rng.normal(0, 1 / np.sqrt(d_ff), (4, d_ff)), rng.normal(0, 1.0, (engine.n_embd, 4)))
               for il in range(engine.n_layer)}
    return write_lora(path, arch, factors, alpha=4)


def adapter_job(adapter_dir, seeds):
    """An `edit` job that registers a fresh random adapter for the user's preferences (none: retires it)."""
    def job(store, user, engine, job_id):
        prefs = store.items(user, kind=names.PREFERENCE)
        sha = model_sha256(engine.model_path)
        if not prefs:
            return {"retired": store.retire_artifacts(user, names.LORA, sha, names.EDIT)}
        path = random_adapter(engine, adapter_dir / f"job-{next(seeds)}.gguf", job_id)
        return {"artifact": store.register_artifact(user, names.LORA, path, sha, {
            "method": names.EDIT, "sources": [p["id"] for p in prefs]}, job=job_id)}
    return job


def read_stream(response) -> tuple[list[dict], list[str]]:
    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line[6:]) for line in lines if line != "data: [DONE]"], lines


@pytest.mark.parametrize("stream", [False, True])
def test_a_changed_preference_is_answered_while_its_old_adapter_is_retired(engine, tmp_path, monkeypatch, stream):
    """"I live in Lyon." -> its job done -> "Actually, I live in Paris now." retires the served adapter while the
    request that stated it holds it: the reply is served (plain: 200; streamed: every chunk, then [DONE])."""
    import itertools

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, adapter_job(tmp_path, itertools.count()))
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path / "home"), jobs=True), base_url=LOCAL) as client:
        said = [{"role": "user", "content": "I live in Lyon."}]
        assert chat(client, {"messages": said, "user": "gil", "max_tokens": 4}).status_code == 200
        [job] = wait_for_jobs(client, "gil")
        assert job["state"] == names.DONE and job["result"]["artifact"]
        said += [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Actually, I live in Paris now."}]
        body = {"messages": said, "user": "gil", "max_tokens": 6, "stream": stream, "localpers": {"explain": True}}
        r = chat(client, body)
        assert r.status_code == 200, r.text
        if stream:
            chunks, lines = read_stream(r)
            assert lines[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
            explained = chunks[-1]["localpers"]
        else:
            explained = r.json()["localpers"]
        # served with the adapter it was composed with, although storing the message retired it
        assert explained["artifacts"] == [{"method": names.EDIT, "kind": names.LORA, "id": job["result"]["artifact"]}]
        with Store.open(tmp_path / "home") as store:
            assert all(a["id"] != job["result"]["artifact"] for a in store.artifacts("gil"))
        assert engine.adapter_stats()["pinned"] == 0


def test_invariant_learning_never_fails_a_reply(tmp_path_factory, tmp_path, monkeypatch):
    """Hundreds of plain and streamed requests of several users race changed preferences (statements whose
    job replaces the adapter), adapters replaced and preferences deleted under them, and users forgotten: every
    reply is served (200, a message, or chunks ending with [DONE]) and no request keeps an adapter pinned."""
    import itertools
    import random
    import threading

    import httpx

    from localpers.engine.engine import Engine
    from tests.helpers_models import random_model_path
    from tests.serve_helpers import live_server

    model = random_model_path(tmp_path_factory, "llama")
    engine = Engine(model, n_ctx=512, n_threads=1)
    size = random_adapter(engine, tmp_path / "size.gguf", 0).stat().st_size
    engine.adapter_cache_bytes = 3 * size  # 4 users, 3 adapters: eviction races too
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, adapter_job(tmp_path, itertools.count()))
    users, cities = ["ann", "bob", "cy", "dee"], ["Lyon", "Paris", "Rome", "Oslo", "Lima"]
    app = create_app(engine=engine, data_dir=str(tmp_path / "home"), jobs=True)
    failures, served, done = [], [], threading.Event()
    with live_server(app) as url:
        def client_loop(seed, n):
            try:
                requests(seed, n)
            except Exception as e:  # a client error (a timeout on a saturated machine) is reported, not lost
                failures.append((seed, "client", type(e).__name__, str(e)[:300]))

        def requests(seed, n):
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=300) as http:
                for i in range(n):
                    user, stream = rng.choice(users), rng.random() < 0.5
                    text = (f"I live in {rng.choice(cities)}." if rng.random() < 0.4 else "Where do I live?")
                    body = {"messages": [{"role": "user", "content": f"{text} ({seed}.{i})"}], "user": user,
                            "max_tokens": 3, "temperature": 0, "stream": stream}
                    if stream:
                        with http.stream("POST", "/v1/chat/completions", json=body) as r:
                            chunks, lines = read_stream(r) if r.status_code == 200 else ([], [r.read().decode()])
                        ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
                    else:
                        r = http.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
                        lines = [r.text]
                    (served if ok else failures).append((user, stream, r.status_code, lines[-1][:300]))

        def churn(seed):
            rng, seeds = random.Random(seed), itertools.count(10_000)
            store = app.state.store
            with httpx.Client(base_url=url, timeout=60) as http:
                while not done.is_set():
                    user, action = rng.choice(users), rng.random()
                    try:
                        if action < 0.5:  # an adapter replaced under the requests (as a job finishing does)
                            prefs = store.items(user, kind=names.PREFERENCE)
                            path = random_adapter(engine, tmp_path / f"churn-{next(seeds)}.gguf", next(seeds))
                            store.register_artifact(user, names.LORA, path, model_sha256(model), {
                                "method": names.EDIT, "sources": [p["id"] for p in prefs]})
                        elif action < 0.85:  # a preference deleted: its adapter retired at once
                            prefs = store.items(user, kind=names.PREFERENCE)
                            if prefs:
                                http.delete(f"/v1/users/{user}/memories/{rng.choice(prefs)['id']}")
                        else:
                            http.delete(f"/v1/users/{user}")
                    except UserError:  # a user forgotten meanwhile
                        pass
                    time.sleep(0.01)

        clients = [threading.Thread(target=client_loop, args=(seed, 60)) for seed in range(4)]
        churner = threading.Thread(target=churn, args=(99,))
        churner.start()
        for t in clients:
            t.start()
        for t in clients:
            t.join(1800)  # a hang guard, not a timing assertion
        done.set()
        churner.join(60)
    assert failures == [] and len(served) == 240
    assert engine.adapter_stats()["pinned"] == 0
    engine.close()


def test_job_scratch_lives_under_the_data_folder_and_is_swept_at_start_and_by_forget(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    with Store.open(tmp_path) as store:
        store.add("hal", "a note")
        store.add("ivy", "a note")
        with store.temp_dir("hal") as scratch:
            assert scratch.parent == tmp_path / "tmp" and scratch.is_dir()
            (scratch / "edit.gguf").write_bytes(b"x")
            assert store.sweep_temp() == 0  # its process is alive: left alone
        assert not scratch.exists()
        crashed = tmp_path / "tmp" / f"_user-1-{dead}-abc"  # hal's, left by a crash
        crashed.mkdir()
        (crashed / "edit.gguf").write_bytes(b"x")
        jobs.Worker(store, lambda: None).start().stop(timeout=5)  # a server's start sweeps it
        assert not crashed.exists()
        with store.temp_dir("ivy") as scratch:
            store.forget("ivy")
            assert not scratch.exists()


def test_one_writer_the_worker_runs_no_job_while_personalize_holds_the_data_folder(engine, tmp_path, monkeypatch):
    """`localpers personalize` (another process: here another Store on the folder) holds the job lock while it
    edits; the server's worker then claims nothing, and runs the queued job once the lock is free."""
    runs = []
    monkeypatch.setitem(jobs.JOB_KINDS, "noop", lambda store, user, engine, job: runs.append(job) or {})
    with Store.open(tmp_path) as store, Store.open(tmp_path) as other:
        store.add("kim", "a note")
        job = store.queue_job("kim", "noop")
        worker = jobs.Worker(store, lambda: engine)
        with other.job_lock() as held:
            assert held
            assert not worker.run_one(engine) and runs == []
            assert store.job(job["id"])["state"] == names.QUEUED
        assert worker.run_one(engine) and runs == [job["id"]]


def child_job(store, user, engine, job):
    """A job kind for the job-process test: what the child saw (its pid, the user's items)."""
    import os

    if user == "bad":
        raise UserError("no preferences to edit")
    return {"pid": os.getpid(), "items": len(store.items(user)), "model": engine.model_name}


def test_jobs_run_in_a_process_that_exits_when_idle(tmp_path_factory, tmp_path, monkeypatch):
    """`localpers serve`'s worker runs each job in a child process (what a job loads is given back when it
    exits), reports its result or its reason, and the child exits once idle, leaving no process behind."""
    import os

    from localpers.engine.engine import Engine
    from tests.helpers_models import random_model_path

    monkeypatch.setitem(jobs.JOB_KINDS, "childtest", "tests.test_loop:child_job")
    engine = Engine(random_model_path(tmp_path_factory, "llama"), n_ctx=256, n_threads=1)
    looked = []  # a job in another process retires files: the served engine is told to look soon
    monkeypatch.setattr(engine, "check_files_soon", lambda: looked.append(True))
    with Store.open(tmp_path) as store:
        store.add("lu", "a note")
        store.add("bad", "a note")
        first, second = store.queue_job("lu", "childtest"), store.queue_job("bad", "childtest")
        worker = jobs.Worker(store, lambda: engine, process=True, idle_exit_s=0.5, poll_s=0.1).start()
        try:
            assert wait_until(lambda: store.job(second["id"])["state"] in (names.DONE, names.FAILED), 120)
            done, failed = store.job(first["id"]), store.job(second["id"])
            assert done["state"] == names.DONE and done["result"]["items"] == 1
            assert done["result"]["pid"] != os.getpid() and done["result"]["model"] == engine.model_name
            assert failed["state"] == names.FAILED and failed["reason"] == "no preferences to edit"
            assert worker.child.started == 1  # one process for both jobs
            assert looked
            assert wait_until(lambda: not worker.child.alive, 30)  # idle: it exited
        finally:
            worker.stop(timeout=10)
    engine.close()
