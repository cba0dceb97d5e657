"""The page of `localpers serve`: "what my assistant knows about me", at `/`, and the JSON it needs.

The page (localpers/serve/static: index.html, page.js, page.css; no build step, no third-party asset) chats with
the server (streaming, each reply with a "why" panel), shows every fact held about the person with its status,
their history items (searchable), the background jobs, and lets them correct, delete, export and forget. It talks
only to this server's JSON routes, as any client does: the Host and Origin rules, the JSON content type of
state-changing requests and the API key (typed by the person, kept in the tab's sessionStorage, sent as an
Authorization header) apply to it unchanged. Its documents carry a strict Content-Security-Policy: scripts,
styles and connections from this origin only, no inline script or style, no frames, no form submissions.

    GET   /                                       the page (and /static/page.js, page.css, icon.svg)
    GET   /v1/page                                {"owner": the person the page chats as by default, or null,
                                                   "model": the served model's name, or null while it loads}
    GET   /v1/users/{user}/memory                 the page's snapshot: facts with their status, the current
                                                   artifacts (no paths), the jobs with their durations
    PATCH /v1/users/{user}/memories/{item_id}     {"text": ...}: correct an item (a fact or a user's message is
                                                   relearned; see edit_memory)

A fact is an item of kind "preference". Its status: "in use" when a current artifact of the served model was
made from it (artifact meta "sources"), "learning" while a job that will make one is queued or running, "failed"
when the last job ended failed (its reason) or done without it (the edit could not be made or verified), and
"stored" when no job has looked at it yet (a server without its worker).
"""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Body, Request
from fastapi.responses import FileResponse

from localpers import names
from localpers.errors import UserError
from localpers.serve.learn import detect, learn_from_text
from localpers.serve.memory_api import OpenAIErrorRoute
from localpers.store.store import NotFoundError, check_item

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"page.js": "text/javascript", "page.css": "text/css", "icon.svg": "image/svg+xml"}
# no inline script or style, nothing from another origin, no frames, no form posts, no plugins
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
IN_USE, LEARNING, FAILED, STORED = "in use", "learning", "failed", "stored"
PENDING = (names.QUEUED, names.RUNNING)

router = APIRouter(route_class=OpenAIErrorRoute)


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def asset(name: str):
    if name not in ASSETS:
        raise NotFoundError(f"no such file: /static/{name}")
    return FileResponse(STATIC / name, media_type=f"{ASSETS[name]}; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/v1/page")
def page_config(request: Request):
    engine = request.app.state.engine
    return {"owner": getattr(request.app.state, "owner", None),
            "model": engine.model_name if engine is not None else None}


def _served_sha(request: Request) -> str | None:
    from localpers.engine.engine import model_sha256

    engine = request.app.state.engine
    return model_sha256(engine.model_path) if engine is not None else None


def fact_status(fact: dict, artifacts: list[dict], jobs: list[dict]) -> tuple[str, str | None]:
    """(status, reason) of one preference item, given the user's current artifacts of the served model and
    their jobs (newest first); see the module docstring."""
    if any(fact["id"] in a["sources"] and not a["meta"].get("broken") for a in artifacts):
        return IN_USE, None
    trained = [j for j in jobs if j["kind"] in names.TRAINED_METHODS]
    if any(j["state"] in PENDING for j in trained):
        return LEARNING, None
    last = next((j for j in trained if j["finished"] is not None and j["started"] is not None
                 and j["started"] >= fact["ts"]), None)
    if last is None:
        return STORED, None
    if last["state"] == names.FAILED:
        return FAILED, last["reason"]
    broken = next((a["meta"]["broken"] for a in artifacts if fact["id"] in a["sources"]), None)
    if broken:
        return FAILED, f"its adapter cannot be loaded: {broken}"
    return FAILED, f"job {last['id']} ({last['kind']}) could not make or verify an edit for it"


def _job_view(job: dict, now: float) -> dict:
    end = job["finished"] if job["finished"] is not None else now
    return {**job, "duration_s": None if job["started"] is None else round(end - job["started"], 3)}


@router.get("/v1/users/{user}/memory")
def memory(user: str, request: Request):
    """Everything the page shows about a user in one read (it polls this while a job is pending)."""
    store, sha = request.app.state.store, _served_sha(request)
    items = store.items(user)
    artifacts = [a for a in store.artifacts(user) if sha is None or a["base_model_sha256"] == sha]
    jobs = store.jobs(user)
    by_id = {item["id"]: item for item in items}
    facts = []
    for item in items:
        if item["kind"] != names.PREFERENCE:
            continue
        status, reason = fact_status(item, artifacts, jobs)
        source = by_id.get(item["meta"].get("message"))
        facts.append({**item, "attribute": item["meta"].get("attribute"), "value": item["meta"].get("value"),
                      "status": status, "reason": reason,
                      "source": None if source is None else {k: source[k] for k in ("id", "text", "ts")}
                      | {"corrected": source["meta"].get("source") == "page"},  # typed as a correction on the page
                      "artifacts": [a["id"] for a in artifacts if item["id"] in a["sources"]]})
    now = time.time()
    return {"user": user, "facts": facts,
            "artifacts": [{k: a[k] for k in ("id", "method", "kind", "version", "sources", "created")}
                          | {"broken": a["meta"].get("broken")} for a in artifacts],
            "jobs": [_job_view(j, now) for j in jobs],
            "items": sum(item["kind"] != names.PREFERENCE for item in items)}


@router.patch("/v1/users/{user}/memories/{item_id}")
def edit_memory(user: str, item_id: int, request: Request, payload: dict = Body(...)):
    """Replace an item's text; the whole request is validated before any write (400, nothing changed). Returns
    the new item.

    - a preference (a fact): the text must state a fact about the user (detect_facts, retirements left out), else
      400. The old fact is deleted, then the text learned as the user typing it (learn_from_text, source "page",
      with the facts that check detected: the detector runs once),
      through the facts index (a later statement of the same attribute replaces it); returns its first fact.
    - a user's message: deleted (with the facts learned from it), then the new text relearned the same way;
      returns the new message.
    - any other item: stored anew (same kind and metadata, marked edited with the old id), then the old one
      deleted with the artifacts derived from it (two writes: an interruption leaves both, never neither)."""
    if set(payload) != {"text"}:
        raise UserError('the request body must be {"text": "..."}')
    store = request.app.state.store
    old = next((item for item in store.items(user) if item["id"] == item_id), None)
    if old is None:
        raise NotFoundError(f"user {user!r} has no item {item_id}")
    meta = {k: v for k, v in old["meta"].items() if k != "value"}  # the value was read from the old text
    item = check_item(payload["text"], old["kind"], {**meta, "edited": item_id})  # validates before any write
    text = item[2].decode("utf-8")
    if old["kind"] == names.PREFERENCE:
        detected = detect(text)
        found = [f for f in detected if not f.retire]
        if not found:
            raise UserError("a corrected fact must state a fact about you, such as \"I'm vegan.\" or \"I live in "
                            "Lyon.\" (not a question, someone else's fact or a retirement); nothing was changed")
        store.delete_item(user, item_id)
        learned = learn_from_text(store, user, text, source="page", facts=detected)  # detected once
        _wake(request)
        items = store.items(user, kind=names.PREFERENCE)
        if learned["facts"]:
            return next(i for i in items if i["id"] == learned["facts"][0]["id"])
        # already held (stated elsewhere too): the fact that holds it
        return next(i for i in reversed(items) if i["meta"].get("attribute") == found[0].attribute)
    if old["kind"] == names.MESSAGE and old["meta"].get("role", "user") == "user":
        store.delete_item(user, item_id)  # with the facts learned from it
        learned = learn_from_text(store, user, text, source="page")
        _wake(request)
        [message_id] = learned["messages"]
        return next(i for i in store.items(user, kind=names.MESSAGE) if i["id"] == message_id)
    [new_id] = store.add_many(user, [item])
    try:
        store.delete_item(user, item_id)
    except NotFoundError:  # deleted meanwhile by another request: the correction stands
        pass
    _wake(request)
    return next(item for item in store.items(user) if item["id"] == new_id)


def _wake(request: Request) -> None:
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wake()
