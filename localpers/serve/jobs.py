"""Background personalization: the worker that runs the store's persistent job queue, and its HTTP routes.

A job is (user, kind) with a state: queued -> running -> done | failed (with its reason). Jobs live in the
store's database, so they survive a restart (a job left running by a dead process is queued again when the
next worker starts). A new, changed or deleted preference queues an `edit` job (store.add_many, delete_item);
deleting an item an artifact was derived from queues that artifact's method. Forgetting a user deletes their
jobs and stops a job of theirs that is running (Worker.cancel_user kills the job process); a job still running
registers nothing (store.register_artifact(job=...) finds it gone). Jobs are claimed round-robin over users
(store.claim_job), one at a time. A job whose process died (kill -9, the OOM killer) runs once more
(JOB_RETRIES), then fails with a readable reason (died_reason). A store error (a full disk) never ends the
worker: it waits, retries, and reports it on /health ("jobs_error") and /jobs ("worker_error").

One worker thread runs the jobs one at a time, at a lower CPU priority (nice 10) and with torch capped at
`threads` threads, so that chat keeps the rest of the machine. Under `localpers serve` each job runs in a child
process (JobProcess), at normal priority until a chat request arrives during a job (then nice 10), with its own llama.cpp context on the same model file to check its artifacts: chat never
waits for a job, and what a job loads (torch, the editor's model, about 1.5 GB) goes back to the system when
that process exits, IDLE_EXIT_S after its last job; a later job starts a new one (the editor's model then maps
its cached float32 copy: editing.editor_model). The worker holds the data folder's job lock while a job runs
(store.job_lock), so `localpers personalize` by hand never races it. Job start and end are logged (id, kind,
duration; never user text). Job kinds map to functions `(store, user, engine, job_id) -> result dict` (ids and
counts, no text): edit, perce and ce (the user's LoRA adapter), logo (a LoGo round for the whole store:
logo.logo_job).

    GET  /v1/users/{user}/jobs          the user's jobs, newest first (a queued one's `position` in the queue of
                                        all users; "worker_error" while the worker cannot run jobs: a full disk)
    POST /v1/users/{user}/personalize   {"method"?: "edit" | "perce" | "ce" | "logo"} queue a job (202; an already queued one is reused)
"""
from __future__ import annotations

import importlib
import logging
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Body, Request

from localpers import names
from localpers.errors import UserError
from localpers.serve.memory_api import OpenAIErrorRoute
from localpers.store.store import DISK_FULL, SourcesGoneError, disk_full

log = logging.getLogger(__name__)

# job kind (a method name) -> function, or "module:function" imported when the first such job runs
JOB_KINDS: dict[str, Callable | str] = {
    names.EDIT: "localpers.personalize.editing:edit_job",
    names.PERCE: "localpers.personalize.training:perce_job",   # PerCE LoRA on the user's own items (training.JOB_CONFIG)
    names.CE: "localpers.personalize.training:ce_job",
    names.LOGO: "localpers.personalize.logo:logo_job",         # one LoGo round over every user of the store (see logo_job)
}
# job kind -> what to load ahead of the first job (the editor's torch model takes ~30 s), run by warm workers
WARM_UP: dict[str, str] = {
    names.EDIT: "localpers.personalize.editing:warm_up",
}


def _resolve(target):
    if isinstance(target, str):
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)
    return target


class ProcessDied(RuntimeError):
    """The job process died mid-job (killed: the OOM killer's SIGKILL, a crash): its message says how, readable."""


def died_reason(exitcode: int | None) -> str:
    """How a job process ended, as a job's reason: "the job process died (killed by signal 9 (SIGKILL) — out of
    memory?)" for a kill, "the job process died (exit code 3)" for an exit."""
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        hint = " — out of memory?" if -exitcode == signal.SIGKILL else ""
        return f"the job process died (killed by signal {-exitcode}{name}{hint})"
    return f"the job process died (exit code {exitcode})"


class JobProcess:
    """A child process that runs jobs for a server (`localpers serve`), so that what a job loads (torch, the
    editor's model, its own llama.cpp context) is given back to the system when the process exits: it starts
    with the first job (spawned: a fresh interpreter, never a fork of the serving threads), keeps what it loaded
    while jobs keep coming, and exits when the worker stops it after IDLE_EXIT_S without a job, or when the
    server exits (its pipe closes; on Linux also the parent-death signal)."""

    def __init__(self, data_dir, model_path, threads: int, nice: int):
        self.data_dir, self.model_path, self.threads, self.nice = str(data_dir), str(model_path), threads, nice
        self._proc = self._conn = None
        self.lowered = False  # yield_to_chat lowered its priority
        self.last_used = time.monotonic()
        self.started = 0  # processes started so far (monitoring, benchmarks)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.alive else None

    def _start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_child_main, name="localpers-job",
                                     args=(child, self.data_dir, self.model_path, self.threads, os.getpid()),
                                     daemon=True)
        self._proc.start()
        child.close()
        self.started += 1
        self.lowered = False

    def run(self, target: str, user: str, job_id: int) -> dict:
        """Run job `target` ("module:function") in the child; its result, or its UserError raised here."""
        if not self.alive:
            self._start()
        try:
            self._conn.send((target, user, job_id))
            while not self._conn.poll(0.2):
                if not self._proc.is_alive():
                    break
            status, value = self._conn.recv()
        except (EOFError, OSError):  # the pipe closed: the process died (kill -9, the OOM killer, a crash)
            proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
            proc.join(5)
            conn.close()
            raise ProcessDied(died_reason(proc.exitcode)) from None
        self.last_used = time.monotonic()
        if status == "ok":
            return value
        if status == "sources_gone":
            raise SourcesGoneError(value)
        if status == "user_error":
            raise UserError(value)
        raise RuntimeError(value)

    def yield_to_chat(self) -> None:
        """Lower the running job process's priority (every thread to `nice`): chat has requests. Raising nice is
        allowed to any user, lowering it is not, so it stays low until the process exits (idle)."""
        if not self.alive or self.lowered:
            return
        self.lowered = True
        pid = self._proc.pid
        for task in Path(f"/proc/{pid}/task").glob("*") if Path(f"/proc/{pid}/task").is_dir() else [Path(str(pid))]:
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), self.nice)
            except (OSError, ValueError):
                pass

    def kill(self) -> None:
        """End the job process now (SIGKILL): its job's work is dropped (forget cancels a running job)."""
        if self.alive:
            self._proc.kill()

    def stop(self, timeout: float = 5) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None:
            return
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
        conn.close()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when its parent dies (prctl PR_SET_PDEATHSIG), so no job outlives a server;
    a parent that died before this ran (while the child was starting) ends it now."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _child_main(conn, data_dir: str, model_path: str, threads: int, parent: int) -> None:
    """The job process: runs (target, user, job id) messages until None or its parent goes away."""
    import traceback

    _die_with_parent(parent)
    import torch

    from localpers.engine.engine import Engine
    from localpers.store.store import Store

    torch.set_num_threads(threads)
    store = Store.open(data_dir)
    engine = Engine(model_path, n_ctx=2048, n_threads=threads)
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message is None:
                break
            target, user, job_id = message
            try:
                conn.send(("ok", _resolve(target)(store, user, engine, job_id)))
            except SourcesGoneError as e:
                conn.send(("sources_gone", str(e)))
            except UserError as e:
                conn.send(("user_error", str(e)))
            except Exception as e:  # a bug: reported to the worker, which fails the job with it
                traceback.print_exc()
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        engine.close()
        store.close()


SUPERSEDED_BY_CHANGE = "the job queued by a change of its preferences while it ran"
JOB_RETRIES = 1  # a job whose process died (kill -9, the OOM killer) runs again this many times
MAX_BACKOFF_S = 30.0  # the longest wait of the worker between tries after a store error (a full disk)
IDLE_EXIT_S = 30.0  # a job process with no job for this long exits (what it loaded goes back to the system)


class Worker:
    """The one background worker of a server: runs queued jobs with `engine()` (None while it loads).

    process=True (`localpers serve`): jobs whose kind is a "module:function" run in a JobProcess (the data
    folder `data_dir`), which exits IDLE_EXIT_S after its last job; otherwise in this thread."""

    def __init__(self, store, engine: Callable[[], object], *, threads: int = 1, poll_s: float = 0.5,
                 warm: bool = False, nice: int = 10, own_engine: bool = True, process: bool = False,
                 idle_exit_s: float = IDLE_EXIT_S):
        self.store, self.engine, self.threads, self.poll_s, self.warm = store, engine, threads, poll_s, warm
        self.nice, self.own_engine, self.process, self.idle_exit_s = nice, own_engine, process, idle_exit_s
        self.child: JobProcess | None = None
        self._job_engine = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self.ready = threading.Event()  # set once the engine is there and warming up (if asked) is over
        self._thread = threading.Thread(target=self._run, daemon=True, name="localpers-jobs")
        self.current: dict | None = None
        self.problem: str | None = None  # why the worker cannot run jobs now (a full disk...): /health shows it
        self._died: dict[int, int] = {}  # job id -> times its job process died running it (one retry)
        self._cancelled: int | None = None  # the running job forget cancelled (cancel_user)
        self._requeue_later: int | None = None  # a job left running by a store error: queued again once it works
        self._requeue_running = False  # start's requeue_running failed: done before the first claim
        self._warmed = not warm or process  # a job process loads what its jobs need when it starts

    def start(self) -> "Worker":
        try:
            self.store.requeue_running()
        except sqlite3.Error as e:  # a full disk: the server starts all the same; done before the first claim
            log.warning("jobs left running are queued again later: %s", e)
            self._requeue_running = True
        self.store.sweep_temp()  # scratch folders of jobs a crash interrupted
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def chat_request(self) -> None:
        """A chat request arrived: a job process running a job yields the CPU to chat from now on (it runs at
        normal priority while chat is idle)."""
        if self.child is not None and self.current is not None:
            self.child.yield_to_chat()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self.child is not None and self.current is None:
            self.child.stop()

    def cancel_user(self, user: str) -> bool:
        """Forget is deleting `user`: a job of theirs running in the job process is stopped (the process is
        killed; its result is never written: the job's row goes with the user). True when one was running."""
        job = self.current
        if job is None or job["user"] != user:
            return False
        self._cancelled = job["id"]
        if self.child is not None:
            self.child.kill()
        return True

    def _run(self) -> None:
        """The worker thread: runs jobs until stopped. A store error (a full disk: sqlite "database or disk is
        full", ENOSPC) never ends it: it is logged and kept in `problem` (/health reports it), and the thread
        tries again after a back-off (doubling, at most MAX_BACKOFF_S); queued jobs run once the store works."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except Exception as e:
                failures += 1
                why = DISK_FULL if disk_full(e) else f"{type(e).__name__}: {e}"
                self.problem = f"background jobs are paused: {why}"
                if failures == 1:
                    log.exception("the job worker hit an error; it retries")
                say(f"{self.problem} (retrying, attempt {failures})")
                self._stop.wait(min(self.poll_s * 2 ** failures, MAX_BACKOFF_S))

    def _loop(self) -> None:
        # Lower this thread's CPU priority (Linux: nice is per thread, and threads it starts inherit it): on a
        # loaded machine the scheduler then gives chat's llama.cpp threads the cores first.
        if hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError:
                pass
        while not self._stop.is_set():
            engine = self.engine()
            if engine is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            if self.process and self.child is None:
                self.child = JobProcess(self.store.directory, engine.model_path, self.threads, self.nice)
            engine = engine if self.process else self.job_engine(engine)
            if not self._warmed:
                self._warmed = True
                import torch

                torch.set_num_threads(self.threads)
                for kind, target in WARM_UP.items():
                    try:
                        _resolve(target)(engine)
                    except Exception as e:  # a job reports it later; warming is only an optimisation
                        log.warning("warming up %s jobs failed: %s", kind, e)
            self.ready.set()
            ran = self.run_one(engine)
            self.problem = None  # the store answered: any earlier problem is over
            if not ran:
                if self.child is not None and self.child.alive and \
                        time.monotonic() - self.child.last_used > self.idle_exit_s:
                    self.child.stop()
                    say("the job process exited (idle)")
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def job_engine(self, served):
        """The engine jobs run with: the worker's own context on the served model (made once), or the served
        engine itself when own_engine is off or the second context cannot be made."""
        if not self.own_engine:
            return served
        if self._job_engine is None:
            try:
                self._job_engine = type(served)(served.model_path, n_ctx=2048, n_threads=self.threads)
            except Exception as e:
                log.warning("the job worker shares the served engine: %s", e)
                self.own_engine = False
                return served
        return self._job_engine

    def run_one(self, engine) -> bool:
        """Claim and run the oldest queued job, holding the data folder's job lock (so `localpers personalize`
        never runs beside it); False when there was none, or the lock is held by another process."""
        with self.store.job_lock(wait=False) as held:
            return held and self._run_one(engine)

    def _run_one(self, engine) -> bool:
        if self._requeue_running:  # start could not (a full disk)
            self.store.requeue_running()
            self._requeue_running = False
        if self._requeue_later is not None:  # a job whose end a store error kept from being recorded
            self.store.requeue_job(self._requeue_later)
            self._requeue_later = None
        job = self.store.claim_job(list(JOB_KINDS))
        if job is None:
            return False
        import torch  # the jobs train with torch: capped, so that chat keeps the other cores

        torch.set_num_threads(self.threads)
        self.current, self._cancelled = job, None
        started = time.monotonic()
        say(f"job {job['id']} ({job['kind']}) started")
        try:
            state, reason, result = self._execute(job, engine)
            took = f"in {time.monotonic() - started:.1f} s"
            if self._cancelled == job["id"]:  # its row goes with the user: recording the end writes nothing
                self._died.pop(job["id"], None)
                self.store.finish_job(job["id"], names.FAILED if state == names.QUEUED else state, reason=reason,
                                      result=result)
                say(f"job {job['id']} ({job['kind']}) cancelled {took} (its user was forgotten)")
            elif state == names.QUEUED:  # the job process died: run once more
                self.store.requeue_job(job["id"])
                say(f"job {job['id']} ({job['kind']}) queued again {took}: {reason}")
            else:
                self.store.finish_job(job["id"], state, reason=reason, result=result)
                died = self._died.pop(job["id"], None) and state == names.FAILED  # a reason with no user data
                say(f"job {job['id']} ({job['kind']}) {state} {took}" + (f": {reason}" if died else ""))
        except Exception:  # a store error recording the end (a full disk): queued again once the store works
            self._requeue_later = job["id"]
            raise
        finally:
            self.current = None
        return True

    def _execute(self, job: dict, engine) -> tuple[str, str | None, dict | None]:
        """Run one claimed job: (state, reason, result); state QUEUED when its process died the first time."""
        try:
            target = JOB_KINDS[job["kind"]]
            if self.child is not None and isinstance(target, str):
                result = self.child.run(target, job["user"], job["id"])
                check = getattr(engine, "check_files_soon", None)
                if check is not None:  # the job retired files in another process: the engine looks soon
                    check()
            else:
                result = _resolve(target)(self.store, job["user"], engine, job["id"])
            return names.DONE, None, result
        except SourcesGoneError as e:  # a preference changed while it ran: the job that change queued redoes it
            return names.DONE, None, {"superseded_by": SUPERSEDED_BY_CHANGE, "stale": str(e)}
        except UserError as e:  # StaleError (cancelled), no preferences, a model mismatch...
            return names.FAILED, str(e), None
        except ProcessDied as e:  # killed (the OOM killer...): one automatic retry, then failed with the reason
            self._died[job["id"]] = tries = self._died.get(job["id"], 0) + 1
            return (names.QUEUED if tries <= JOB_RETRIES else names.FAILED), str(e), None
        except Exception as e:  # a bug: the job fails with its reason and the worker goes on
            log.exception("job %s (%s) failed", job["id"], job["kind"])
            return names.FAILED, f"{type(e).__name__}: {e}", None


def say(line: str) -> None:
    """One line of the server's log (stderr, as uvicorn's): job ids, kinds and durations, never user text."""
    print(f"localpers: {line}", file=sys.stderr, flush=True)


router = APIRouter(route_class=OpenAIErrorRoute)


@router.get("/v1/users/{user}/jobs")
def list_jobs(user: str, request: Request):
    worker = getattr(request.app.state, "worker", None)
    problem = {"worker_error": worker.problem} if worker is not None and worker.problem else {}
    return {"object": "list", "data": request.app.state.store.jobs(user), **problem}


@router.post("/v1/users/{user}/personalize", status_code=202)
def personalize(user: str, request: Request, payload: dict | None = Body(None)):
    payload = payload or {}
    if not isinstance(payload, dict):
        raise UserError("the request body must be a JSON object")
    method = payload.get("method", names.EDIT)
    if method not in JOB_KINDS:
        raise UserError(f"unknown personalization method {method!r} (background jobs: {', '.join(JOB_KINDS)})")
    job = request.app.state.store.queue_job(user, method)
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wake()
    return job
