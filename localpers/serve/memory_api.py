"""mem0-like memory endpoints over the history store (app.state.store), mounted by `localpers serve`.

    POST   /v1/users/{user}/memories              {"text": ..., "kind"?, "meta"?} or {"messages": [{"role", "content"}]}
                                                  (a chat: its user messages only, learned from as in chat)
                                                  (text and content: a string or a list of text parts, as in chat)
                                                  {"text", "kind": "preference"} without meta: learned as facts
                                                  through the detector (400 when it states none)
    GET    /v1/users/{user}/memories[?kind=]
    GET    /v1/users/{user}/memories/search?q=&k=&mode=
    GET    /v1/users/{user}/facts                 the current facts: id, attribute, value, statement, message (the
                                                  source message's id), created, status (store.facts)
    DELETE /v1/users/{user}/memories/{item_id}
    GET    /v1/users/{user}/export
    DELETE /v1/users/{user}                       (stops the user's running job)

Errors are OpenAI-style bodies {"error": {"message", "type", "param", "code"}} (param: the field at fault, or
null): 404 for an unknown user or item, 400 for any other bad input (a kind not in names.ITEM_KINDS, a body that
is not a JSON object, a ts out of range ...), 507 when the data folder's disk is full. `{user}` is any user id the store accepts (store.check_user), URL-encoded
("john%20doe", "a%2Fb"). Handlers are plain functions: FastAPI runs them in its thread pool, and the
store gives each thread its own SQLite connection."""
from __future__ import annotations

import json
import sqlite3
from urllib.parse import unquote

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match

from localpers import names
from localpers.model.chat import content_text
from localpers.errors import UserError
from localpers.personalize.detect import NO_FACT, detect_facts
from localpers.serve.learn import learn_from_messages, learn_from_text
from localpers.store.store import DISK_FULL, NotFoundError, check_item, disk_full, message_items, said_by


def error_response(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status)


def disk_full_response() -> JSONResponse:
    """507 Insufficient Storage: the data folder's disk is full (store.disk_full), never a 500."""
    return JSONResponse({"error": {"message": DISK_FULL, "type": "server_error", "param": None,
                                   "code": "disk_full"}}, 507)


def check_kind(kind: str) -> str:
    """An item kind a client may name: one of names.ITEM_KINDS, else UserError naming them."""
    if kind not in names.ITEM_KINDS:
        raise UserError(f"unknown kind {kind!r}: use one of {', '.join(names.ITEM_KINDS)}")
    return kind


def _escaped_path(raw_path: bytes) -> str:
    """The request path with each segment percent-decoded except for '/' and '%', which stay encoded, so that a
    user id holding '/' ("a/b", sent as a%2Fb) stays one segment and routes like any other id."""
    return "/".join(unquote(segment, errors="surrogateescape").replace("%", "%25").replace("/", "%2F")
                    for segment in raw_path.decode("ascii", "replace").split("/"))


class OpenAIErrorRoute(APIRoute):
    """Routes on the undecoded path (any user id, URL-encoded, is one `{user}` segment), and answers UserError
    and FastAPI's own request errors (validation, unparsable body) with an OpenAI-style error body."""

    def matches(self, scope):
        if scope["type"] != "http" or not scope.get("raw_path") or scope.get("root_path"):
            return super().matches(scope)
        match, child = super().matches({**scope, "path": _escaped_path(scope["raw_path"])})
        if match != Match.NONE:
            # bytes that are not UTF-8 (%ff, %c3 alone) become lone surrogates, which the store refuses (400),
            # instead of U+FFFD, which would make distinct ids one
            child["path_params"] = {k: unquote(v, errors="surrogateescape") if isinstance(v, str) else v
                                    for k, v in child["path_params"].items()}
        return match, child

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except NotFoundError as e:
                return error_response(404, str(e), "not_found")
            except UserError as e:
                return error_response(400, str(e), "invalid_request")
            except RequestValidationError as e:
                from localpers.serve.server import _describe_validation as describe  # the chat routes' wording

                message, param = describe(e.errors())
                return error_response(400, message, "invalid_request", param)
            except HTTPException as e:
                return error_response(e.status_code, str(e.detail), "invalid_request")
            except (sqlite3.OperationalError, OSError) as e:
                if not disk_full(e):
                    raise
                return disk_full_response()

        return handle


router = APIRouter(route_class=OpenAIErrorRoute)


@router.post("/v1/users/{user}/memories", status_code=201)
def add_memories(user: str, request: Request, payload: dict = Body(...)):
    """Store one item ({"text", "kind"?, "meta"?, "ts"?}) or a chat ({"messages": [...]}: the user's own
    messages, kind "message", learned from as a served chat's are; the assistant's and other roles' are left out
    and counted in "left_out"); nothing is stored unless every item is valid."""
    if "messages" in payload:
        return _remember_chat(request.app.state.store, user, message_items(payload["messages"]))
    if "text" in payload:
        text = content_text(payload["text"]) if isinstance(payload["text"], list) else payload["text"]
        kind = check_kind(payload.get("kind", names.MESSAGE))
        if kind == names.PREFERENCE and payload.get("meta") is None and "ts" not in payload:
            return _remember_preference(request.app.state.store, user, text)
        items = [check_item(text, kind, _client_meta(payload.get("meta")), payload.get("ts"))]
    else:
        raise UserError('the request body needs "text" or "messages"')
    ids = request.app.state.store.add_many(user, items)
    return {"object": "list", "data": [{"id": item_id, "user": user} for item_id in ids]}


@router.get("/v1/users/{user}/memories")
def list_memories(user: str, request: Request, kind: str | None = None):
    kind = None if kind is None else check_kind(kind)
    return {"object": "list", "data": request.app.state.store.items(user, kind=kind)}


@router.get("/v1/users/{user}/memories/search")
def search_memories(user: str, request: Request, q: str = "", k: int = 5, mode: str = "bm25"):
    return {"object": "list", "data": request.app.state.store.search(user, q, k=k, mode=mode)}


@router.get("/v1/users/{user}/facts")
def list_facts(user: str, request: Request):
    """The user's current facts (store.facts); DELETE /v1/users/{user}/memories/{id} deletes one."""
    return {"object": "list", "data": request.app.state.store.facts(user)}


@router.delete("/v1/users/{user}/memories/{item_id}")
def delete_memory(user: str, item_id: int, request: Request):
    request.app.state.store.delete_item(user, item_id)
    return {"id": item_id, "deleted": True}


@router.get("/v1/users/{user}/export")
def export_user(user: str, request: Request):
    return request.app.state.store.export(user)


@router.delete("/v1/users/{user}")
def forget_user(user: str, request: Request):
    """Delete everything held about the user (store.forget); a job of theirs running is stopped first (its
    result is never written). Works on a full disk (deleting frees space); else a 507 naming the disk."""
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.cancel_user(user)
    request.app.state.store.forget(user)
    return {"user": user, "deleted": True}


def _client_meta(meta):
    """A client's meta for an item, refused (UserError naming the key) when it holds a key the store derives
    (names.FACT_META_KEYS: a fact's attribute, value, message, source ...): a fact is learned from what the user
    said, one current value per single-valued slot, never stated by meta. Other values are check_item's to check."""
    if isinstance(meta, dict):
        for key in meta:
            if key in names.FACT_META_KEYS:
                raise UserError(f'meta key "{key}" is the store\'s own (a fact\'s attribute, value, message or source is '
                                f'learned from what the user said, not set): leave it out')
    return meta


def _remember_chat(store, user: str, items: list[tuple]) -> dict:
    """A chat posted to the memories route, as validated items: the user's messages stored and their facts
    learned (learn_from_messages), like a served chat's; data: the messages' ids, then the new facts' ids."""
    metas = [json.loads(item[3]) for item in items]   # a group chat's other participants' messages are not hers
    mine = [item[2].decode("utf-8") for item, meta in zip(items, metas) if meta.get("role") == "user"
            and said_by(meta, user)]
    learned = learn_from_messages(store, user, mine) if mine else \
        {"messages": [], "preferences": [], "facts": [], "replaced": [], "retired": []}
    return {"object": "list", "data": [{"id": i, "user": user} for i in learned["messages"] + learned["preferences"]],
            "facts": learned["facts"], "replaced": learned["replaced"], "retired": learned["retired"],
            "left_out": len(items) - len(mine)}


def _remember_preference(store, user: str, text) -> dict:
    """A stated preference (chat's /remember) goes through the detector like a chat message: split into atomic
    facts learned through the facts index (meta.source "remember"), so it never contradicts it. Text that states
    no fact about the speaker is a UserError (400). data: the message's id and the new facts' ids."""
    if not isinstance(text, str) or not detect_facts(text, names.MAX_FACTS_PER_MESSAGE):
        raise UserError(NO_FACT.format(text=text))
    learned = learn_from_text(store, user, text, source="remember")
    return {"object": "list", "data": [{"id": i, "user": user} for i in learned["messages"] + learned["preferences"]],
            "facts": learned["facts"], "replaced": learned["replaced"], "retired": learned["retired"]}
