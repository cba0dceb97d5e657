"""Background personalization: the worker that runs the store's persistent job queue, and its HTTP routes.

A job is (user, kind) with a state: queued -> running -> done | failed (with its reason). Jobs live in the
store's database, so they survive a restart (a job left running by a dead process is queued again when the
next worker starts). A new, changed or deleted preference queues an `edit` job (store.add_many, delete_item);
deleting an item an artifact was derived from queues that artifact's method. Forgetting a user deletes their
jobs; a job still running then registers nothing (store.register_artifact(job=...) finds it gone).

One worker thread runs the jobs one at a time, at a lower CPU priority (nice 10) and with torch capped at
`threads` threads, so that chat keeps the rest of the machine. Jobs check their artifacts on llama.cpp with the
worker's own engine (a second context on the same memory-mapped model, `threads` threads), so chat never waits
for a job, not even for the engine's lock. Job kinds map to functions `(store, user, engine, job_id) -> result dict` (ids and counts, no text):
edit, perce and ce (the user's LoRA adapter), logo (a LoGo round for the whole store: logo.logo_job).

    GET  /v1/users/{user}/jobs          the user's jobs, newest first
    POST /v1/users/{user}/personalize   {"method"?: "edit" | "perce" | "ce" | "logo"} queue a job (202; an already queued one is reused)
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from typing import Callable

from fastapi import APIRouter, Body, Request

from localpers import names
from localpers.errors import UserError
from localpers.serve.memory_api import OpenAIErrorRoute

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


class Worker:
    """The one background worker of a server: runs queued jobs with `engine()` (None while it loads)."""

    def __init__(self, store, engine: Callable[[], object], *, threads: int = 1, poll_s: float = 0.5,
                 warm: bool = False, nice: int = 10, own_engine: bool = True):
        self.store, self.engine, self.threads, self.poll_s, self.warm = store, engine, threads, poll_s, warm
        self.nice, self.own_engine = nice, own_engine
        self._job_engine = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self.ready = threading.Event()  # set once the engine is there and warming up (if asked) is over
        self._thread = threading.Thread(target=self._run, daemon=True, name="localpers-jobs")
        self.current: dict | None = None

    def start(self) -> "Worker":
        self.store.requeue_running()
        self.store.sweep_temp()  # scratch folders of jobs a crash interrupted
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Lower this thread's CPU priority (Linux: nice is per thread, and threads it starts inherit it): on a
        # loaded machine the scheduler then gives chat's llama.cpp threads the cores first.
        if hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError:
                pass
        warmed = not self.warm
        while not self._stop.is_set():
            engine = self.engine()
            if engine is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            engine = self.job_engine(engine)
            if not warmed:
                warmed = True
                import torch

                torch.set_num_threads(self.threads)
                for kind, target in WARM_UP.items():
                    try:
                        _resolve(target)(engine)
                    except Exception as e:  # a job reports it later; warming is only an optimisation
                        log.warning("warming up %s jobs failed: %s", kind, e)
            self.ready.set()
            if not self.run_one(engine):
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
        job = self.store.claim_job(list(JOB_KINDS))
        if job is None:
            return False
        import torch  # the jobs train with torch: capped, so that chat keeps the other cores

        torch.set_num_threads(self.threads)
        self.current = job
        started = time.monotonic()
        say(f"job {job['id']} ({job['kind']}) started")
        try:
            result = _resolve(JOB_KINDS[job["kind"]])(self.store, job["user"], engine, job["id"])
            self.store.finish_job(job["id"], names.DONE, result=result)
            say(f"job {job['id']} ({job['kind']}) done in {time.monotonic() - started:.1f} s")
        except UserError as e:  # StaleError (cancelled, sources deleted), no preferences, a model mismatch...
            self.store.finish_job(job["id"], names.FAILED, reason=str(e))
            say(f"job {job['id']} ({job['kind']}) failed in {time.monotonic() - started:.1f} s")
        except Exception as e:  # a bug: the job fails with its reason and the worker goes on
            log.exception("job %s (%s) failed", job["id"], job["kind"])
            self.store.finish_job(job["id"], names.FAILED, reason=f"{type(e).__name__}: {e}")
            say(f"job {job['id']} ({job['kind']}) failed in {time.monotonic() - started:.1f} s: {type(e).__name__}")
        finally:
            self.current = None
        return True


def say(line: str) -> None:
    """One line of the server's log (stderr, as uvicorn's): job ids, kinds and durations, never user text."""
    print(f"localpers: {line}", file=sys.stderr, flush=True)


router = APIRouter(route_class=OpenAIErrorRoute)


@router.get("/v1/users/{user}/jobs")
def list_jobs(user: str, request: Request):
    return {"object": "list", "data": request.app.state.store.jobs(user)}


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
