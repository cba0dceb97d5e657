"""The job worker's parts one at a time, in this process (serve/jobs.py): the job process's protocol (its child's
loop run in-process on a scripted pipe), its start, priority and stop; the worker's loop, claims, retries,
cancellation and log lines. Fakes stand in for llama.cpp, torch models and child processes, so each test
takes well under a second; test_loop.py and test_job_faults.py run the real processes."""
import os
import signal
import sqlite3
import threading
import time

import pytest

from localpers import names
from localpers.errors import UserError
from localpers.serve import jobs
from localpers.store.store import Store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "data") as s:
        s.add("alice", "a note")
        s.add("bob", "a note")
        yield s


@pytest.fixture(autouse=True)
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def priorities(monkeypatch):
    """os.setpriority recorded, not done: a worker loop run in the test's own thread would renice the test run."""
    calls = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, prio: calls.append((which, who, prio)))
    return calls


# ---------------------------------------------------------------- how a job process ended, and the log

def test_invariant_a_dead_job_processs_reason_names_the_signal_or_the_exit_code():
    assert jobs.died_reason(-9) == "the job process died (killed by signal 9 (SIGKILL) — out of memory?)"
    assert jobs.died_reason(-15) == "the job process died (killed by signal 15 (SIGTERM))"
    assert jobs.died_reason(-200) == "the job process died (killed by signal 200)"
    assert jobs.died_reason(0) == "the job process died (exit code 0)"
    assert jobs.died_reason(3) == "the job process died (exit code 3)"
    assert jobs.died_reason(None) == "the job process died (exit code None)"


def test_invariant_the_log_is_one_prefixed_line_on_stderr(capsys):
    jobs.say("job 3 (edit) started")
    out = capsys.readouterr()
    assert out.err == "localpers: job 3 (edit) started\n" and out.out == ""


def test_invariant_a_job_target_is_imported_from_module_colon_function():
    assert jobs._resolve("localpers.serve.jobs:died_reason") is jobs.died_reason
    assert jobs._resolve("os.path:join") is os.path.join
    assert jobs._resolve(len) is len


# ---------------------------------------------------------------- the job process, its child side run in-process

class ScriptedConn:
    """The child's end of the pipe: hands out `messages` in turn (an exception instance is raised), records sends."""

    def __init__(self, *messages):
        self.messages, self.sent = list(messages), []

    def recv(self):
        message = self.messages.pop(0)
        if isinstance(message, BaseException):
            raise message
        return message

    def send(self, message):
        self.sent.append(message)


def child_side(monkeypatch, tmp_path, *messages):
    """Run _child_main in this process on a scripted pipe, with a fake engine: (sent, engine log, parent seen)."""
    import localpers.engine.engine as engine_module

    log, parents = [], []

    class Engine:
        def __init__(self, model_path, n_ctx=None, n_threads=None):
            log.append(("made", model_path, n_ctx, n_threads))

        def close(self):
            log.append(("closed",))

    monkeypatch.setattr(engine_module, "Engine", Engine)
    monkeypatch.setattr(jobs, "_die_with_parent", parents.append)
    conn = ScriptedConn(*messages)
    jobs._child_main(conn, str(tmp_path / "data"), "model.gguf", 2, 4242)
    return conn.sent, log, parents


def test_invariant_the_child_runs_each_job_message_and_answers_ok_user_error_or_error(tmp_path, monkeypatch, store):
    import torch

    seen = []

    def good(store_, user, engine, job_id):
        seen.append((store_.directory, user, type(engine).__name__, job_id, torch.get_num_threads()))
        return {"user": user, "items": len(store_.items(user))}

    def refused(store_, user, engine, job_id):
        raise UserError("no usable preference")

    def crashed(store_, user, engine, job_id):
        raise KeyError("boom")

    sent, log, parents = child_side(monkeypatch, tmp_path, (good, "alice", 7), (refused, "alice", 8),
                                    (crashed, "bob", 9), (good, "bob", 10), None, (good, "never", 11))
    assert sent == [("ok", {"user": "alice", "items": 1}), ("user_error", "no usable preference"),
                    ("error", "KeyError: 'boom'"), ("ok", {"user": "bob", "items": 1})]
    assert seen == [(store.directory, "alice", "Engine", 7, 2), (store.directory, "bob", "Engine", 10, 2)]
    assert log == [("made", "model.gguf", 2048, 2), ("closed",)] and parents == [4242]


def test_invariant_the_child_ends_when_its_pipe_closes_and_still_closes_its_engine(tmp_path, monkeypatch, store):
    for end in (EOFError(), OSError("pipe")):
        sent, log, _ = child_side(monkeypatch, tmp_path, end, None)
        assert sent == [] and log[-1] == ("closed",)


def test_invariant_the_child_asks_the_kernel_for_sigterm_when_its_parent_dies_and_leaves_if_it_already_did(
        monkeypatch):
    import ctypes

    calls, exits = [], []

    class Libc:
        def __init__(self, name, use_errno=False):
            calls.append((name, use_errno))

        def prctl(self, option, sig):
            calls.append(("prctl", option, sig))

    def leave(code):
        exits.append(code)

    monkeypatch.setattr(ctypes, "CDLL", Libc)
    monkeypatch.setattr(os, "_exit", leave)
    jobs._die_with_parent(os.getppid())
    assert calls == [("libc.so.6", True), ("prctl", 1, signal.SIGTERM)] and exits == []
    jobs._die_with_parent(os.getppid() + 1)  # the parent is gone (another process adopted us)
    assert exits == [0]

    def missing(name, use_errno=False):
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    jobs._die_with_parent(os.getppid())  # not Linux: nothing to ask, nothing raised
    assert exits == [0]


# ---------------------------------------------------------------- the job process, its worker side

class FakeProc:
    def __init__(self, alive=True, exitcode=None, pid=None):
        self._alive, self.exitcode, self.pid = alive, exitcode, pid or os.getpid()
        self.calls = []

    def is_alive(self):
        return self._alive

    def start(self):
        self.calls.append("start")

    def join(self, timeout=None):
        self.calls.append(("join", timeout))

    def terminate(self):
        self.calls.append("terminate")
        self._alive = False

    def kill(self):
        self.calls.append("kill")


class FakeConn:
    def __init__(self, answers=(), polls=(True,)):
        self.answers, self.polls, self.sent, self.closed = list(answers), list(polls), [], False

    def send(self, message):
        self.sent.append(message)

    def poll(self, timeout):
        return self.polls.pop(0) if self.polls else True

    def recv(self):
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self):
        self.closed = True


def started(child, proc, conn):
    child._proc, child._conn = proc, conn


def test_invariant_a_job_process_starts_spawned_as_a_daemon_running_the_child_loop(tmp_path, monkeypatch):
    import multiprocessing

    made = {}

    class Context:
        def Pipe(self):
            made["pipe"] = (FakeConn(), FakeConn())
            return made["pipe"]

        def Process(self, **kw):
            made["process"] = kw
            return FakeProc()

    def get_context(method):
        made["method"] = method
        return Context()

    monkeypatch.setattr(multiprocessing, "get_context", get_context)
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 3, 12)
    assert (child.data_dir, child.model_path, child.threads, child.nice) == (str(tmp_path), str(tmp_path / "m.gguf"), 3, 12)
    assert not child.alive and child.pid is None and child.started == 0 and child.lowered is False
    before = time.monotonic()
    assert child.last_used <= before
    child.lowered = True
    child._start()
    parent_end, child_end = made["pipe"]
    kw = made["process"]
    assert made["method"] == "spawn" and kw["target"] is jobs._child_main and kw["name"] == "localpers-job"
    assert kw["args"] == (child_end, str(tmp_path), str(tmp_path / "m.gguf"), 3, os.getpid()) and kw["daemon"] is True
    assert child._conn is parent_end and child_end.closed and child._proc.calls == ["start"]
    assert child.started == 1 and child.lowered is False and child.alive and child.pid == os.getpid()
    child._start()
    assert child.started == 2


def test_invariant_a_job_process_returns_the_childs_result_or_raises_its_user_error_or_error(tmp_path, monkeypatch):
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 10)
    conn = FakeConn([("ok", {"n": 1}), ("user_error", "no preferences"), ("error", "KeyError: 'x'")], polls=[False, True])
    starts = []
    monkeypatch.setattr(child, "_start", lambda: starts.append(1) or started(child, FakeProc(), conn))
    child.last_used = 0.0
    assert child.run("m:f", "alice", 5) == {"n": 1} and conn.sent == [("m:f", "alice", 5)]
    assert child.last_used > 0 and starts == [1]  # started once, then alive
    with pytest.raises(UserError, match="^no preferences$"):
        child.run("m:f", "bob", 6)
    with pytest.raises(RuntimeError, match=r"^KeyError: 'x'$") as raised:
        child.run("m:f", "bob", 7)
    assert not isinstance(raised.value, (UserError, jobs.ProcessDied)) and starts == [1]


def test_invariant_a_job_process_that_dies_mid_job_raises_process_died_with_how_it_ended(tmp_path, monkeypatch):
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 10)
    for exitcode, error in ((-9, EOFError()), (3, OSError("broken pipe"))):
        proc, conn = FakeProc(alive=False, exitcode=exitcode), FakeConn([error], polls=[False, False])
        monkeypatch.setattr(child, "_start", lambda: started(child, proc, conn))
        child.last_used = 0.0
        with pytest.raises(jobs.ProcessDied) as died:
            child.run("m:f", "alice", 5)
        assert str(died.value) == jobs.died_reason(exitcode)
        assert proc.calls == [("join", 5)] and conn.closed and child._proc is None and child._conn is None
        assert child.last_used == 0.0


def test_invariant_yield_to_chat_lowers_every_thread_of_a_live_job_process_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, prio: calls.append((which, who, prio)))
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 13)
    child.yield_to_chat()  # no process: nothing to lower
    assert calls == [] and child.lowered is False
    started(child, FakeProc(pid=os.getpid()), FakeConn())
    tasks = {int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")}
    done, ids = threading.Event(), []
    helper = threading.Thread(target=lambda: ids.append(threading.get_native_id()) or done.wait(30))
    helper.start()  # a thread the job started: it is lowered too (nice is per thread on Linux)
    while not ids:
        time.sleep(0.01)
    try:
        child.yield_to_chat()
        tasks |= {int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")}
    finally:
        done.set()
        helper.join(30)
    assert ids[0] in [who for _, who, _ in calls]
    whos = [who for _, who, _ in calls]
    assert child.lowered is True and os.getpid() in whos and set(whos) <= tasks and len(whos) == len(set(whos))
    assert all(which == os.PRIO_PROCESS and prio == 13 for which, _, prio in calls)
    n = len(calls)
    child.yield_to_chat()  # already lowered
    assert len(calls) == n
    started(child, FakeProc(alive=False), FakeConn())
    child.lowered = False
    child.yield_to_chat()
    assert len(calls) == n and child.lowered is False


def test_invariant_kill_ends_a_live_job_process_and_stop_asks_it_to_leave_then_terminates_it(tmp_path):
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 10)
    child.kill()  # nothing running: nothing to kill
    child.stop()
    proc, conn = FakeProc(), FakeConn()
    started(child, proc, conn)
    child.kill()
    assert proc.calls == ["kill"]
    started(child, FakeProc(alive=False), FakeConn())
    child.kill()
    assert child._proc.calls == []
    proc, conn = FakeProc(), FakeConn()  # stays alive past the join: terminated
    started(child, proc, conn)
    child.stop(timeout=0.5)
    assert conn.sent == [None] and proc.calls == [("join", 0.5), "terminate", ("join", 0.5)] and conn.closed
    assert child._proc is None and child._conn is None
    proc, conn = FakeProc(alive=False), FakeConn()  # left when asked
    conn.send = lambda message: (_ for _ in ()).throw(OSError("closed"))
    started(child, proc, conn)
    child.stop()
    assert proc.calls == [("join", 5)] and conn.closed


# ---------------------------------------------------------------- the worker

class Child:
    """A JobProcess stand-in for the worker: records what the worker asks of it."""

    def __init__(self, result=None, error=None, alive=True, last_used=None):
        self.result, self.error, self.alive = result, error, alive
        self.last_used = time.monotonic() if last_used is None else last_used
        self.calls = []

    def run(self, target, user, job_id):
        self.calls.append(("run", target, user, job_id))
        if self.error is not None:
            raise self.error
        return self.result

    def yield_to_chat(self):
        self.calls.append("yield")

    def kill(self):
        self.calls.append("kill")

    def stop(self, timeout=5):
        self.calls.append("stop")
        self.alive = False


class Engine:
    def __init__(self, model_path="m.gguf", n_ctx=None, n_threads=None):
        self.model_path, self.n_ctx, self.n_threads, self.checked = model_path, n_ctx, n_threads, 0

    def check_files_soon(self):
        self.checked += 1


def test_invariant_a_job_in_the_job_process_gets_its_target_user_and_id_and_the_engine_looks_for_files(
        store, monkeypatch):
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, "some.module:edit_job")
    worker = jobs.Worker(store, lambda: None)
    worker.child, engine = Child(result={"adapter": 3}), Engine()
    job = store.queue_job("alice", names.EDIT)
    assert worker.run_one(engine) is True
    assert worker.child.calls == [("run", "some.module:edit_job", "alice", job["id"])] and engine.checked == 1
    assert store.job(job["id"])["state"] == names.DONE and store.job(job["id"])["result"] == {"adapter": 3}
    second = store.queue_job("bob", names.EDIT)
    assert worker.run_one(object()) is True  # an engine with no files to check is fine
    assert store.job(second["id"])["state"] == names.DONE
    # a callable job kind runs in the worker's thread even when there is a job process
    ran = []
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, lambda s, user, e, job_id: ran.append((s, user, e, job_id)) or {})
    third = store.queue_job("alice", names.EDIT)
    assert worker.run_one(engine) and ran == [(store, "alice", engine, third["id"])] and engine.checked == 1


def test_invariant_a_job_whose_process_died_runs_once_more_then_fails_with_the_reason(store, monkeypatch, capsys):
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, "some.module:edit_job")
    worker = jobs.Worker(store, lambda: None)
    worker.child = Child(error=jobs.ProcessDied(jobs.died_reason(-9)))
    job = store.queue_job("alice", names.EDIT)
    assert worker.run_one(Engine())
    assert store.job(job["id"])["state"] == names.QUEUED and worker._died == {job["id"]: 1}
    assert worker.run_one(Engine())
    got = store.job(job["id"])
    assert got["state"] == names.FAILED and got["reason"] == jobs.died_reason(-9) and worker._died == {}
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"localpers: job {job['id']} ({names.EDIT}) started"
    assert err[1].startswith(f"localpers: job {job['id']} ({names.EDIT}) queued again in ")
    assert err[1].endswith(f" s: {jobs.died_reason(-9)}")
    assert err[3].startswith(f"localpers: job {job['id']} ({names.EDIT}) failed in ")
    assert err[3].endswith(f" s: {jobs.died_reason(-9)}")
    # a job that failed for its own reasons logs no reason (it may quote the user's text)
    worker.child = Child(error=UserError("your text: I love sushi"))
    other = store.queue_job("bob", names.EDIT)
    assert worker.run_one(Engine())
    assert store.job(other["id"])["reason"] == "your text: I love sushi"
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"localpers: job {other['id']} ({names.EDIT}) failed in ") and last.endswith(" s")


def test_invariant_each_job_has_its_own_retry_count(store, monkeypatch):
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, "some.module:edit_job")
    worker = jobs.Worker(store, lambda: None)
    worker.child = Child(error=jobs.ProcessDied("the job process died (exit code 1)"))
    first, second = {"id": 1, "user": "alice", "kind": names.EDIT}, {"id": 2, "user": "bob", "kind": names.EDIT}
    reason = "the job process died (exit code 1)"
    assert worker._execute(first, Engine()) == (names.QUEUED, reason, None)
    assert worker._execute(second, Engine()) == (names.QUEUED, reason, None)
    assert worker._died == {1: 1, 2: 1}
    assert worker._execute(first, Engine()) == (names.FAILED, reason, None) and worker._died == {1: 2, 2: 1}


def test_invariant_a_cancelled_job_records_nothing_of_its_result_and_says_so(store, monkeypatch, capsys):
    worker = jobs.Worker(store, lambda: None)
    worker.child = Child()

    def cancelled_meanwhile(s, user, engine, job_id):
        assert worker.cancel_user("alice") is True
        return {"adapter": 1}

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, cancelled_meanwhile)
    job = store.queue_job("alice", names.EDIT)
    assert worker.run_one(Engine())
    assert worker.child.calls == ["kill"] and worker.current is None
    got = store.job(job["id"])
    assert got["state"] == names.DONE and got["result"] == {"adapter": 1}  # (the user's row is what forget deletes)
    assert capsys.readouterr().err.splitlines()[-1].endswith(" s (its user was forgotten)")
    # a cancelled job whose process died is recorded failed, not queued again
    worker.child = Child(error=jobs.ProcessDied("the job process died (killed by signal 9 (SIGKILL))"))
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, "some.module:edit_job")
    job = store.queue_job("bob", names.EDIT)
    real_execute = worker._execute

    def execute_then_cancel(job_, engine):
        out = real_execute(job_, engine)
        worker._cancelled = job_["id"]
        return out

    monkeypatch.setattr(worker, "_execute", execute_then_cancel)
    assert worker.run_one(Engine())
    got = store.job(job["id"])
    assert got["state"] == names.FAILED and got["reason"] == "the job process died (killed by signal 9 (SIGKILL))"
    assert worker._died == {}


def test_invariant_cancel_user_stops_only_that_users_running_job():
    worker = jobs.Worker(None, lambda: None)
    assert worker.cancel_user("alice") is False
    worker.current, worker.child = {"id": 4, "user": "bob"}, Child()
    assert worker.cancel_user("alice") is False and worker._cancelled is None and worker.child.calls == []
    assert worker.cancel_user("bob") is True and worker._cancelled == 4 and worker.child.calls == ["kill"]
    worker.child = None
    assert worker.cancel_user("bob") is True


def test_invariant_a_chat_request_lowers_the_job_process_only_while_a_job_runs():
    worker = jobs.Worker(None, lambda: None)
    worker.chat_request()  # no job process
    worker.child = Child()
    worker.chat_request()
    assert worker.child.calls == []
    worker.current = {"id": 1, "user": "u"}
    worker.chat_request()
    assert worker.child.calls == ["yield"]


def test_invariant_stopping_the_worker_stops_an_idle_job_process_but_never_one_mid_job(store):
    worker = jobs.Worker(store, lambda: None, poll_s=0.01).start()
    worker.stop(timeout=10)  # no child
    assert not worker._thread.is_alive()
    worker.child, worker.current = Child(), {"id": 1, "user": "u"}
    worker.stop(timeout=0)
    assert worker.child.calls == [] and worker._stop.is_set()
    worker.current = None
    worker.stop(timeout=0)
    assert worker.child.calls == ["stop"]


def test_invariant_the_job_engine_is_one_own_context_on_the_served_model_or_the_served_one(monkeypatch):
    served = Engine("served.gguf")
    worker = jobs.Worker(None, lambda: served, threads=3)
    own = worker.job_engine(served)
    assert isinstance(own, Engine) and own is not served
    assert (own.model_path, own.n_ctx, own.n_threads) == ("served.gguf", 2048, 3)
    assert worker.job_engine(served) is own
    assert jobs.Worker(None, lambda: served, own_engine=False).job_engine(served) is served

    class Unloadable(Engine):
        def __init__(self, model_path, **kw):
            if kw:
                raise MemoryError("no room for a second context")
            super().__init__(model_path)

    shared = jobs.Worker(None, lambda: None)
    engine = Unloadable("m.gguf")
    assert shared.job_engine(engine) is engine and shared.own_engine is False and shared._job_engine is None


def test_invariant_a_store_error_before_a_claim_is_retried_the_next_time(store, monkeypatch):
    calls = []
    monkeypatch.setattr(store, "requeue_running", lambda: calls.append("requeue_running") or 0)
    monkeypatch.setattr(store, "requeue_job", lambda job_id: calls.append(("requeue_job", job_id)) or True)
    worker = jobs.Worker(store, lambda: None)
    assert worker.run_one(Engine()) is False and calls == []
    worker._requeue_running, worker._requeue_later = True, 12
    assert worker.run_one(Engine()) is False
    assert calls == ["requeue_running", ("requeue_job", 12)]
    assert worker._requeue_running is False and worker._requeue_later is None
    # a store error recording the end: the job is queued again once the store works, and the error goes up
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, lambda s, user, e, job_id: {})

    def full(*args, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "finish_job", full)
    job = store.queue_job("alice", names.EDIT)
    with pytest.raises(sqlite3.OperationalError):
        worker.run_one(Engine())
    assert worker._requeue_later == job["id"] and worker.current is None


def test_invariant_start_queues_interrupted_jobs_again_and_sweeps_scratch_even_on_a_full_disk(store, monkeypatch):
    calls = []
    monkeypatch.setattr(store, "sweep_temp", lambda: calls.append("sweep") or 0)

    def full():
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "requeue_running", full)
    worker = jobs.Worker(store, lambda: None, poll_s=0.01)
    assert worker.start() is worker
    try:
        assert worker._requeue_running is True and calls == ["sweep"] and worker._thread.is_alive()
    finally:
        worker.stop(timeout=10)
    monkeypatch.setattr(store, "requeue_running", lambda: calls.append("requeue") or 0)
    again = jobs.Worker(store, lambda: None, poll_s=0.01).start()
    again.stop(timeout=10)
    assert again._requeue_running is False and calls == ["sweep", "requeue", "sweep"]


def test_invariant_the_worker_thread_reports_a_store_error_and_backs_off_doubling_up_to_the_cap(store, monkeypatch, capsys):
    waits = []
    worker = jobs.Worker(store, lambda: None, poll_s=0.25)
    attempts = iter(range(6))

    def failing_loop():
        n = next(attempts)
        if n == 5:
            return
        raise (sqlite3.OperationalError("database or disk is full") if n < 4 else KeyError("bug"))

    monkeypatch.setattr(worker, "_loop", failing_loop)
    monkeypatch.setattr(worker._stop, "wait", lambda s: waits.append(s))
    monkeypatch.setattr(jobs, "MAX_BACKOFF_S", 3.0)
    worker._run()
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert worker.problem == "background jobs are paused: KeyError: 'bug'"
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"localpers: background jobs are paused: {jobs.DISK_FULL} (retrying, attempt 1)"
    assert err[-1] == "localpers: background jobs are paused: KeyError: 'bug' (retrying, attempt 5)"


class Stopper(Child):
    """A job process that stops the worker's loop when the loop stops it (idle)."""

    def __init__(self, worker, **kw):
        super().__init__(**kw)
        self.worker = worker

    def stop(self, timeout=5):
        super().stop(timeout)
        self.worker._stop.set()


def test_invariant_the_loop_makes_the_job_process_on_the_served_model_and_stops_it_once_idle(store, monkeypatch, capsys,
                                                                                             priorities):
    served = Engine("served.gguf")
    made = []
    worker = jobs.Worker(store, lambda: served, process=True, threads=2, nice=11, idle_exit_s=5.0, poll_s=0.01)

    def job_process(data_dir, model_path, threads, nice):
        made.append((data_dir, model_path, threads, nice))
        return Stopper(worker, last_used=time.monotonic() - 6.0)

    monkeypatch.setattr(jobs, "JobProcess", job_process)
    priorities.clear()
    worker._loop()
    assert priorities == [(os.PRIO_PROCESS, threading.get_native_id(), 11)]  # the loop's thread: nice 11
    assert made == [(store.directory, "served.gguf", 2, 11)] and worker.child.calls == ["stop"]
    assert worker.ready.is_set() and worker._job_engine is None  # the process makes its own context
    assert capsys.readouterr().err.splitlines()[-1] == "localpers: the job process exited (idle)"
    # not idle long enough: kept; a dead one is not stopped again
    for child in (Child(last_used=time.monotonic() - 1.0), Child(alive=False, last_used=0.0)):
        keeper = jobs.Worker(store, lambda: served, process=True, idle_exit_s=5.0, poll_s=0.01)
        keeper.child = child
        threading.Timer(0.3, keeper._stop.set).start()
        keeper._loop()
        assert child.calls == []


def test_invariant_the_loop_waits_for_the_engine_runs_a_job_on_its_own_context_and_warms_up_once(store, monkeypatch):
    import torch

    served = Engine("served.gguf")
    engines = iter([None, None, served])
    ran, warmed = [], []
    monkeypatch.setattr(jobs, "WARM_UP", {names.EDIT: lambda e: warmed.append((e, torch.get_num_threads())),
                                          "bad": lambda e: 1 / 0})
    worker = jobs.Worker(store, lambda: next(engines, served), warm=True, threads=2, poll_s=0.01)

    def job(s, user, engine, job_id):
        ran.append((engine, torch.get_num_threads()))
        worker._stop.set()
        return {}

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, job)
    store.queue_job("alice", names.EDIT)
    assert not worker._warmed
    worker._loop()
    [(engine, threads)] = ran
    assert engine is worker._job_engine and engine is not served and engine.model_path == "served.gguf"
    assert threads == 2 and warmed == [(engine, 2)] and worker._warmed and worker.ready.is_set()
    assert worker.problem is None
    # a worker with a job process does not warm up in the server: the process loads what it needs
    assert jobs.Worker(store, lambda: served, warm=True, process=True)._warmed is True
    assert jobs.Worker(store, lambda: served, warm=False)._warmed is True


def test_invariant_the_loop_clears_a_reported_problem_once_the_store_answers(store, monkeypatch):
    worker = jobs.Worker(store, lambda: Engine(), own_engine=False, poll_s=0.01)
    worker.problem = "background jobs are paused: full"
    monkeypatch.setattr(worker, "run_one", lambda engine: worker._stop.set() or False)
    worker._loop()
    assert worker.problem is None


# ---------------------------------------------------------------- the routes

def test_invariant_personalize_queues_a_known_job_kind_wakes_the_worker_and_jobs_lists_them(store):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    class Worker:
        problem, woken = None, 0

        def wake(self):
            Worker.woken += 1

    app = FastAPI()
    app.include_router(jobs.router)
    app.state.store, app.state.worker = store, Worker()
    client = TestClient(app)
    r = client.post("/v1/users/alice/personalize")
    assert r.status_code == 202 and r.json()["kind"] == names.EDIT and Worker.woken == 1
    r = client.post("/v1/users/alice/personalize", json={"method": names.LOGO})
    assert r.status_code == 202 and r.json()["kind"] == names.LOGO and Worker.woken == 2
    for body, message in (({"method": "train-harder"}, "unknown personalization method 'train-harder'"),
                          ([names.EDIT], "the request body must be a JSON object")):
        r = client.post("/v1/users/alice/personalize", json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert Worker.woken == 2
    listed = client.get("/v1/users/alice/jobs").json()
    assert listed == {"object": "list", "data": store.jobs("alice")} and len(listed["data"]) == 2
    Worker.problem = "background jobs are paused: the disk is full"
    assert client.get("/v1/users/alice/jobs").json()["worker_error"] == Worker.problem
    app.state.worker = None  # no worker (personalize by hand): queued all the same
    assert client.post("/v1/users/bob/personalize").status_code == 202
    assert "worker_error" not in client.get("/v1/users/bob/jobs").json()


# ---------------------------------------------------------------- what the operator's log says

def messages(caplog, level):
    return [(r.getMessage(), r.exc_info is not None) for r in caplog.records if r.levelno == level and r.name == jobs.__name__]


def test_invariant_the_log_names_a_failed_jobs_id_kind_and_traceback(store, monkeypatch, caplog):
    import logging

    def crashed(s, user, engine, job_id):
        raise KeyError("boom")

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, crashed)
    job = store.queue_job("alice", names.EDIT)
    with caplog.at_level(logging.WARNING, logger=jobs.__name__):
        assert jobs.Worker(store, lambda: None).run_one(Engine())
    assert messages(caplog, logging.ERROR) == [(f"job {job['id']} ({names.EDIT}) failed", True)]


def test_invariant_the_log_gives_the_reason_for_a_requeue_later_a_shared_engine_and_a_failed_warm_up(
        store, monkeypatch, caplog):
    import logging

    def full():
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "requeue_running", full)

    class Unloadable(Engine):
        def __init__(self, model_path, **kw):
            if kw:
                raise MemoryError("no room for a second context")
            super().__init__(model_path)

    with caplog.at_level(logging.WARNING, logger=jobs.__name__):
        jobs.Worker(store, lambda: None, poll_s=0.01).start().stop(timeout=10)
        jobs.Worker(None, lambda: None).job_engine(Unloadable("m.gguf"))
        monkeypatch.setattr(jobs, "WARM_UP", {"bad": lambda e: 1 / 0})
        warm = jobs.Worker(store, lambda: Engine(), warm=True, own_engine=False, poll_s=0.01)
        monkeypatch.setattr(warm, "run_one", lambda engine: warm._stop.set() or False)
        warm._loop()
    assert messages(caplog, logging.WARNING) == [
        ("jobs left running are queued again later: database or disk is full", False),
        ("the job worker shares the served engine: no room for a second context", False),
        ("warming up bad jobs failed: division by zero", False)]


def test_invariant_the_worker_logs_the_traceback_of_its_first_store_error_only(store, monkeypatch, caplog):
    import logging

    worker = jobs.Worker(store, lambda: None, poll_s=0.01)
    attempts = iter(range(4))

    def failing_loop():
        if next(attempts) < 3:
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(worker, "_loop", failing_loop)
    monkeypatch.setattr(worker._stop, "wait", lambda s: None)
    with caplog.at_level(logging.WARNING, logger=jobs.__name__):
        worker._run()
    assert messages(caplog, logging.ERROR) == [("the job worker hit an error; it retries", True)]
    caplog.clear()
    once = iter(range(2))  # one failure: its traceback is logged

    def fails_once():
        if next(once) == 0:
            raise KeyError("bug")

    monkeypatch.setattr(worker, "_loop", fails_once)
    with caplog.at_level(logging.WARNING, logger=jobs.__name__):
        worker._run()
    assert messages(caplog, logging.ERROR) == [("the job worker hit an error; it retries", True)]


def test_invariant_without_proc_tasks_yield_to_chat_lowers_the_process_itself(tmp_path, monkeypatch):
    import pathlib

    calls = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, prio: calls.append((which, who, prio)))
    monkeypatch.setattr(pathlib.Path, "is_dir", lambda self: False)  # not Linux: no /proc/<pid>/task
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 14)
    started(child, FakeProc(pid=4321), FakeConn())
    child.yield_to_chat()
    assert calls == [(os.PRIO_PROCESS, 4321, 14)]


def test_invariant_stop_waits_at_most_its_timeout_for_a_running_job(store, monkeypatch):
    release, running = threading.Event(), threading.Event()

    def slow(s, user, engine, job_id):
        running.set()
        release.wait(60)  # a guard against a hang: set by the test
        return {}

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, slow)
    store.queue_job("alice", names.EDIT)
    worker = jobs.Worker(store, lambda: Engine(), own_engine=False, poll_s=0.01).start()
    try:
        assert running.wait(60)
        worker.stop(timeout=0.1)
        assert worker._thread.is_alive()  # it returned with the job still running
    finally:
        release.set()
        worker._thread.join(60)
    assert not worker._thread.is_alive()


def test_invariant_the_worker_runs_no_job_while_another_holds_the_data_folders_job_lock(store, monkeypatch):
    """`localpers personalize` by hand holds the job lock: the worker's run_one answers False at once (it never
    waits for the lock in its thread) and claims nothing."""
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, lambda s, user, e, job_id: {})
    job = store.queue_job("alice", names.EDIT)
    worker, answers = jobs.Worker(store, lambda: None), []
    with store.job_lock() as held:
        assert held
        asking = threading.Thread(target=lambda: answers.append(worker.run_one(Engine())), daemon=True)
        asking.start()
        asking.join(30)  # a guard against a worker that waits for the lock
        assert answers == [False] and store.job(job["id"])["state"] == names.QUEUED
    assert worker.run_one(Engine()) and store.job(job["id"])["state"] == names.DONE


def test_invariant_the_logged_duration_of_a_job_is_its_own(store, monkeypatch, capsys):
    import re

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, lambda s, user, e, job_id: time.sleep(0.2) or {})
    job = store.queue_job("alice", names.EDIT)
    before = time.monotonic()
    assert jobs.Worker(store, lambda: None).run_one(Engine())
    elapsed = time.monotonic() - before
    [line] = [l for l in capsys.readouterr().err.splitlines() if " done in " in l]
    took = float(re.fullmatch(rf"localpers: job {job['id']} \({names.EDIT}\) done in ([0-9.]+) s", line).group(1))
    assert 0.2 - 0.05 <= took <= elapsed + 0.05


def test_invariant_a_job_whose_preferences_changed_while_it_ran_is_superseded_not_failed(tmp_path, monkeypatch, store):
    """A tester's case: a preference replaced while its edit job ran made the job `failed` ("items [14] were
    deleted ..."), though the change had queued the job that redoes it. In the child, through the pipe and in the
    worker it is done, superseded by that job; any other UserError still fails the job."""
    from localpers.store.store import SourcesGoneError

    def gone(store_, user, engine, job_id):
        raise SourcesGoneError("items [14] were deleted: the artifact is not registered")

    sent, _, _ = child_side(monkeypatch, tmp_path, (gone, "alice", 7), None)
    assert sent == [("sources_gone", "items [14] were deleted: the artifact is not registered")]
    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 10)
    conn = FakeConn([("sources_gone", "items [14] were deleted")], polls=[True])
    monkeypatch.setattr(child, "_start", lambda: started(child, FakeProc(), conn))
    with pytest.raises(SourcesGoneError, match=r"^items \[14\] were deleted$"):
        child.run("m:f", "alice", 5)
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, "some.module:edit_job")
    worker = jobs.Worker(store, lambda: None)
    job = {"id": 1, "user": "alice", "kind": names.EDIT}
    worker.child = Child(error=SourcesGoneError("items [14] were deleted"))
    assert worker._execute(job, Engine()) == (names.DONE, None, {"superseded_by": jobs.SUPERSEDED_BY_CHANGE,
                                                                  "stale": "items [14] were deleted"})
    worker.child = Child(error=UserError("job 1 was cancelled: its artifact is not registered"))
    assert worker._execute(job, Engine())[:2] == (names.FAILED, "job 1 was cancelled: its artifact is not registered")
