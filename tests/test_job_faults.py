"""Learning-job faults a new-user tester found: a full disk (the worker survives and runs the queued jobs once
space is back; the memory routes answer 507, forget still works), a job process killed by the OOM killer (a
readable reason, one retry), forget stopping the user's running job, a restated fact whose edit failed, and one
user's jobs starving another's. Fakes stand in for the edit (no real edits here: test_north_star.py is slow)."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading

import pytest
from fastapi.testclient import TestClient

from localpers import names
from localpers.serve import jobs
from localpers.serve.learn import changed, learn_from_text
from localpers.store.store import Store, disk_full
from test_hardening import chat_app
from tests.serve_helpers import wait_until


def sqlite_full() -> sqlite3.OperationalError:
    """A genuine SQLITE_FULL error ("database or disk is full"), as SQLite raises it on a full disk."""
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA max_page_count = 1")
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as e:
        return e
    finally:
        conn.close()
    raise AssertionError("SQLite did not report a full database")


def test_sqlite_full_is_recognised_as_a_full_disk():
    error = sqlite_full()
    assert "database or disk is full" in str(error) and disk_full(error)
    assert disk_full(OSError(28, "No space left on device"))
    assert not disk_full(sqlite3.OperationalError("database is locked")) and not disk_full(OSError(13, "denied"))


def test_invariant_the_worker_survives_a_full_disk_and_runs_the_queued_job_once_space_is_back(tmp_path, monkeypatch):
    """The tester's disk filled: claim_job raised SQLITE_FULL and the worker thread died, so "I live in Madrid."
    stayed queued forever while /health said ok. The worker must live on, /health and /jobs say why jobs wait,
    and the job runs once the store works again."""
    ran = []
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, lambda store, user, engine, job: ran.append(job) or {"ok": 1})
    monkeypatch.setattr(jobs, "MAX_BACKOFF_S", 0.2)
    _, client = chat_app(tmp_path, jobs=True)
    store, full = client.app.state.store, threading.Event()
    full.set()
    claim = store.claim_job

    def claim_on_a_full_disk(*args, **kw):
        if full.is_set():
            raise sqlite_full()
        return claim(*args, **kw)

    monkeypatch.setattr(store, "claim_job", claim_on_a_full_disk)
    with client:
        worker = client.app.state.worker
        r = client.post("/v1/users/disk/memories", json={"text": "I live in Madrid.", "kind": names.PREFERENCE})
        assert r.status_code == 201, r.text
        assert wait_until(lambda: worker.problem is not None, 30)
        health = client.get("/health")
        assert health.status_code == 200 and "disk of the data folder is full" in health.json()["jobs_error"]
        listed = client.get("/v1/users/disk/jobs").json()
        assert "disk of the data folder is full" in listed["worker_error"]
        assert [j["state"] for j in listed["data"]] == [names.QUEUED] and listed["data"][0]["position"] == 1
        assert worker._thread.is_alive()  # noqa: SLF001 (the worker thread, which the full disk killed)
        full.clear()  # space is back
        assert wait_until(lambda: store.jobs("disk")[0]["state"] == names.DONE, 30)
        assert ran == [store.jobs("disk")[0]["id"]]
        assert wait_until(lambda: worker.problem is None, 10) and "jobs_error" not in client.get("/health").json()


def test_a_job_whose_end_a_full_disk_kept_from_being_recorded_runs_again(tmp_path, monkeypatch):
    """finish_job failing on a full disk left the job 'running' for good: it is queued again once the store
    works, and then recorded."""
    runs = []
    monkeypatch.setitem(jobs.JOB_KINDS, "noop", lambda store, user, engine, job: runs.append(job) or {})
    monkeypatch.setattr(jobs, "MAX_BACKOFF_S", 0.1)
    with Store.open(tmp_path) as store:
        store.add("kim", "a note")
        job = store.queue_job("kim", "noop")
        finish, fails = store.finish_job, [sqlite_full()]

        def finish_on_a_full_disk(*args, **kw):
            if fails:
                raise fails.pop()
            return finish(*args, **kw)

        monkeypatch.setattr(store, "finish_job", finish_on_a_full_disk)
        worker = jobs.Worker(store, lambda: object(), own_engine=False, poll_s=0.05).start()
        try:
            assert wait_until(lambda: store.job(job["id"])["state"] == names.DONE, 30)
        finally:
            worker.stop(timeout=10)
        assert runs == [job["id"], job["id"]] and worker.problem is None


def test_a_full_disk_is_a_507_naming_the_disk_never_a_500(tmp_path, monkeypatch):
    _, client = chat_app(tmp_path)
    store = client.app.state.store
    with client:
        store.add("disk", "a note")

        def full(*args, **kw):
            raise sqlite_full()

        monkeypatch.setattr(store, "_write", full)  # the one door of every write
        for text, kind in [("I'm vegetarian.", names.PREFERENCE), ("a note", names.MESSAGE)]:
            r = client.post("/v1/users/disk/memories", json={"text": text, "kind": kind})
            assert r.status_code == 507, r.text
            assert "disk of the data folder is full" in r.json()["error"]["message"] and r.json()["error"]["code"] == "disk_full"
        r = client.post("/v1/users/disk/personalize", json={})
        assert r.status_code == 507 and "disk of the data folder is full" in r.json()["error"]["message"]


class FullDiskConnection:
    """A store connection on a disk that is full until the WAL is truncated: the first delete of a user raises
    SQLITE_FULL (the WAL cannot grow), as does VACUUM (it needs the file's size free)."""

    def __init__(self, conn):
        self.conn, self.deletes, self.checkpoints = conn, 0, 0

    def execute(self, sql, *args):
        if sql.startswith("DELETE FROM users"):
            self.deletes += 1
            if self.checkpoints == 0:
                raise sqlite_full()
        if sql == "VACUUM":
            raise sqlite_full()
        if "wal_checkpoint" in sql:
            self.checkpoints += 1
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_forget_works_on_a_full_disk(tmp_path, monkeypatch):
    """DELETE /v1/users/NAME on a full disk was a 500: deleting frees space, so forget goes through (the WAL
    truncated for room; VACUUM, which needs free space, is skipped: secure_delete zeroed the rows already)."""
    _, client = chat_app(tmp_path)
    store = client.app.state.store
    with client:
        client.post("/v1/users/disk2/memories", json={"text": "I live in Madrid.", "kind": names.PREFERENCE})
        wrapped = {}
        conn = store._conn  # noqa: SLF001

        def full_disk_conn():
            real = conn()
            return wrapped.setdefault(id(real), FullDiskConnection(real))

        monkeypatch.setattr(store, "_conn", full_disk_conn)
        r = client.delete("/v1/users/disk2")
        assert r.status_code == 200, r.text
        monkeypatch.undo()
        assert store.users() == [] and client.get("/v1/users/disk2/memories").status_code == 404
        [faked] = [c for c in wrapped.values() if c.deletes]
        assert faked.deletes == 2  # refused once, then done after the WAL was truncated


def test_a_restated_fact_whose_edit_failed_is_edited_again(tmp_path):
    """'I'm vegetarian.' after a failed edit of that fact learned nothing and queued no job: each restatement
    now queues the edit again (once: an edit already queued is reused)."""
    with Store.open(tmp_path) as store:
        learned = learn_from_text(store, "vera", "I'm vegetarian.")
        assert changed(learned) and learned["retried"] == []
        job = store.claim_job()
        store.finish_job(job["id"], names.FAILED, reason="ValueError: out of cheese")
        again = learn_from_text(store, "vera", "I'm vegetarian.")
        assert changed(again) and again["facts"] == [] and again["retried"] == [
            {"id": learned["facts"][0]["id"], "attribute": learned["facts"][0]["attribute"]}]
        [queued, failed] = store.jobs("vera")
        assert queued["state"] == names.QUEUED and queued["kind"] == names.EDIT and failed["id"] == job["id"]
        learn_from_text(store, "vera", "I'm vegetarian.")  # said again while the retry waits: the same job
        assert [j["state"] for j in store.jobs("vera")] == [names.QUEUED, names.FAILED]
        store.finish_job(store.claim_job()["id"], names.DONE)
        assert not changed(learn_from_text(store, "vera", "I'm vegetarian."))  # edited: nothing to retry
        assert [j["state"] for j in store.jobs("vera")] == [names.DONE, names.FAILED]


def test_invariant_jobs_are_claimed_round_robin_over_users_in_the_order_their_positions_say(tmp_path):
    """One user's queued jobs made another's first job wait behind all of them: each user's oldest job comes
    first, the user due first first (queued earliest, or served longest ago); /jobs' `position` is the claim order."""
    with Store.open(tmp_path) as store:
        for user in ("ann", "bob"):
            store.add(user, "a note")
        ann = [store.queue_job("ann", kind)["id"] for kind in (names.EDIT, names.PERCE, names.CE)]
        bob = [store.queue_job("bob", kind)["id"] for kind in (names.EDIT, names.PERCE)]
        expected = [ann[0], bob[0], ann[1], bob[1], ann[2]]
        positions = {j["id"]: j["position"] for user in ("ann", "bob") for j in store.jobs(user)}
        assert sorted(positions, key=positions.get) == expected and sorted(positions.values()) == [1, 2, 3, 4, 5]
        claimed = []
        for _ in expected:
            job = store.claim_job()
            claimed.append(job["id"])
            assert store.job(job["id"])["position"] is None
            store.finish_job(job["id"], names.DONE)
        assert claimed == expected
        store.add("carl", "a note")
        carl = store.queue_job("carl", names.EDIT)
        store.queue_job("ann", names.EDIT)
        assert store.claim_job()["id"] == carl["id"]  # queued first, never served: before ann


def test_an_existing_users_edit_is_not_passed_by_the_first_jobs_of_users_who_came_after_it(tmp_path):
    """The tester's queue: ann's first edit ran, her next was queued, then 15 new users each queued a first job;
    hers was at position 13 after 25 minutes. It is next; the newcomers follow in the order they queued."""
    with Store.open(tmp_path) as store:
        store.add("ann", "a note")
        first = store.queue_job("ann", names.EDIT)
        assert store.claim_job()["id"] == first["id"]
        store.finish_job(first["id"], names.DONE)
        mine = store.queue_job("ann", names.EDIT)
        others = []
        for n in range(15):
            store.add(f"new{n}", "a note")
            others.append(store.queue_job(f"new{n}", names.EDIT)["id"])
        assert store.job(mine["id"])["position"] == 1
        assert [store.claim_job()["id"] for _ in range(16)] == [mine["id"], *others]


@pytest.mark.parametrize("seed", range(4))
def test_invariant_a_queued_job_goes_before_any_job_queued_after_it_by_a_user_not_due_a_turn(tmp_path, seed):
    """An existing user's edit waited 25 minutes at position 13 behind every newer user's first job (a user never
    served went first, however late they queued). Oracle over random queueing and claiming by 5 users: when a job
    Y of user V is claimed while user U's job X, queued before Y, waits, then U had its turn after Y was queued
    and after V's last turn (U has just gone: it is V's turn); so no job waits behind later jobs of a user who
    already had a turn since, nor behind a newcomer who queued after it. /jobs' first position is the next claim."""
    import random

    rng = random.Random(seed)
    users, kinds = [f"u{i}" for i in range(5)], (names.EDIT, names.PERCE, names.CE)
    queued_at, turn_at, clock = {}, {}, 0   # job id -> event number it was queued at; user -> last claim's
    with Store.open(tmp_path) as store:
        for user in users:
            store.add(user, "a note")
        for _ in range(120):
            clock += 1
            if rng.random() < 0.55:
                user = rng.choice(users[:2] if rng.random() < 0.5 else users)  # two busy users, three occasional
                job = store.queue_job(user, rng.choice(kinds))
                queued_at.setdefault(job["id"], clock)
                continue
            waiting = [j for user in users for j in store.jobs(user) if j["state"] == names.QUEUED]
            first = min(waiting, key=lambda j: j["position"]) if waiting else None
            job = store.claim_job()
            assert (job and job["id"]) == (first and first["id"])
            if job is None:
                continue
            for x in waiting:
                if x["user"] != job["user"] and queued_at[x["id"]] < queued_at[job["id"]]:
                    assert turn_at.get(x["user"], 0) > max(queued_at[job["id"]], turn_at.get(job["user"], 0)), (x, job)
            turn_at[job["user"]] = clock
            store.finish_job(job["id"], names.DONE)


# ----- the job process (spawned: a fresh interpreter loads the random model)

def dying_job(store, user, engine, job):
    """A job kind for the job-process tests: counts its runs in the data folder, then dies as the OOM killer
    kills ("oom"), or sleeps until killed ("slow")."""
    runs = store.directory / f"runs-{user}"
    runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
    (store.directory / f"pid-{user}").write_text(str(os.getpid()))
    if user == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait(120)
    return {}


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    from localpers.engine.engine import Engine
    from tests.helpers_models import random_model_path

    engine = Engine(random_model_path(tmp_path_factory, "llama"), n_ctx=256, n_threads=1)
    yield engine
    engine.close()


def test_a_killed_job_process_is_retried_once_then_fails_with_a_readable_reason(small_engine, tmp_path, monkeypatch,
                                                                                  capsys):
    """kill -9 of the job process (the OOM killer) failed the job with "EOFError: " and never retried it."""
    monkeypatch.setitem(jobs.JOB_KINDS, "dying", "tests.test_job_faults:dying_job")
    with Store.open(tmp_path) as store:
        store.add("oom", "a note")
        job = store.queue_job("oom", "dying")
        worker = jobs.Worker(store, lambda: small_engine, process=True, poll_s=0.1).start()
        try:
            assert wait_until(lambda: store.job(job["id"])["state"] == names.FAILED, 240)
        finally:
            worker.stop(timeout=10)
        assert store.job(job["id"])["reason"] == "the job process died (killed by signal 9 (SIGKILL) — out of memory?)"
        assert (tmp_path / "runs-oom").read_text() == "2"  # one automatic retry
    log = capsys.readouterr().err
    assert f"job {job['id']} (dying) queued again" in log and "killed by signal 9" in log


def test_forget_stops_the_users_running_job(small_engine, tmp_path, monkeypatch, capsys):
    """Forgetting a user left their job running for minutes: forget kills the job process's work for them, the
    job's row goes with the user, the worker goes on."""
    monkeypatch.setitem(jobs.JOB_KINDS, "dying", "tests.test_job_faults:dying_job")
    from localpers.serve.server import create_app

    app = create_app(engine=small_engine, data_dir=str(tmp_path), jobs="process")
    with TestClient(app, base_url="http://localhost") as client:
        client.post("/v1/users/slow/memories", json={"text": "a note"})
        assert client.post("/v1/users/slow/personalize", json={"method": "dying"}).status_code == 202
        assert wait_until(lambda: (tmp_path / "pid-slow").exists(), 240)
        pid = int((tmp_path / "pid-slow").read_text())
        assert client.delete("/v1/users/slow").status_code == 200
        worker = app.state.worker
        assert wait_until(lambda: worker.current is None, 30)  # the sleeping job (120 s) was stopped
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30)  # the job process is gone
        assert client.get("/v1/users/slow/jobs").status_code == 404 and worker._thread.is_alive()  # noqa: SLF001
    assert "cancelled" in capsys.readouterr().err


def test_a_server_starts_on_a_full_disk_and_queues_the_interrupted_job_again_later(tmp_path, monkeypatch):
    """A job left running by a crash is queued again at start; on a full disk that write fails: the worker
    starts all the same and queues it again before its first claim."""
    runs = []
    monkeypatch.setitem(jobs.JOB_KINDS, "noop", lambda store, user, engine, job: runs.append(job) or {})
    with Store.open(tmp_path) as store:
        store.add("kim", "a note")
        job = store.queue_job("kim", "noop")
        store.claim_job()  # then the server died
        requeue = store.requeue_running

        def full(*args):
            raise sqlite_full()

        monkeypatch.setattr(store, "requeue_running", full)
        worker = jobs.Worker(store, lambda: object(), own_engine=False, poll_s=0.05)
        worker.start()
        monkeypatch.setattr(store, "requeue_running", requeue)
        try:
            assert wait_until(lambda: store.job(job["id"])["state"] == names.DONE, 30)
        finally:
            worker.stop(timeout=10)
        assert runs == [job["id"]]


def test_the_cli_on_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from localpers.cli.cli import main

    common = ["--data-dir", str(tmp_path), "--user", "zed"]
    assert main(["remember", *common, "I'm vegetarian."]) in (0, None)

    def full(self):
        raise sqlite_full()

    monkeypatch.setattr(Store, "_write", full)
    capsys.readouterr()
    assert main(["remember", *common, "I live in Madrid."]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "localpers: error: the disk of the data folder is full: free some space and try again"
