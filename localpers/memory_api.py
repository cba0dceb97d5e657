"""mem0-like memory endpoints over the history store (app.state.store), mounted by `localpers serve`.

    POST   /v1/users/{user}/memories              {"text": ..., "kind"?, "meta"?} or {"messages": [{"role", "content"}]}
    GET    /v1/users/{user}/memories[?kind=]
    GET    /v1/users/{user}/memories/search?q=&k=&mode=
    DELETE /v1/users/{user}/memories/{item_id}
    GET    /v1/users/{user}/export
    DELETE /v1/users/{user}

Errors are OpenAI-style bodies {"error": {"message", "type", "code"}}: 404 for an unknown user or item,
400 for any other bad input. Handlers are plain functions: FastAPI runs them in its thread pool, and the
store gives each thread its own SQLite connection."""
from __future__ import annotations

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from localpers.errors import UserError
from localpers.store import NotFoundError, check_item


def error_response(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)


class OpenAIErrorRoute(APIRoute):
    """Answers UserError and FastAPI's own request errors (validation, unparsable body) with an OpenAI-style
    error body."""

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
                first = e.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                return error_response(400, f"{where}: {first['msg']}", "invalid_request")
            except HTTPException as e:
                return error_response(e.status_code, str(e.detail), "invalid_request")

        return handle


router = APIRouter(route_class=OpenAIErrorRoute)


@router.post("/v1/users/{user}/memories", status_code=201)
def add_memories(user: str, request: Request, payload: dict = Body(...)):
    """Store one item ({"text", "kind"?, "meta"?, "ts"?}) or a chat ({"messages": [...]}, one item per
    message, kind "message", the role in meta); nothing is stored unless every item is valid."""
    if "messages" in payload:
        messages = payload["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError('"messages" must be a non-empty list of {"role", "content"} objects')
        items = []
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise UserError(f'messages[{number}] must be an object with a "role" and a "content"')
            try:
                items.append(check_item(message.get("content"), "message", {"role": message["role"]}))
            except UserError as e:
                raise UserError(f"messages[{number}]: {e}") from None
    elif "text" in payload:
        items = [check_item(payload["text"], payload.get("kind", "message"), payload.get("meta"), payload.get("ts"))]
    else:
        raise UserError('the request body needs "text" or "messages"')
    ids = request.app.state.store.add_many(user, items)
    return {"object": "list", "data": [{"id": item_id, "user": user} for item_id in ids]}


@router.get("/v1/users/{user}/memories")
def list_memories(user: str, request: Request, kind: str | None = None):
    return {"object": "list", "data": request.app.state.store.items(user, kind=kind)}


@router.get("/v1/users/{user}/memories/search")
def search_memories(user: str, request: Request, q: str = "", k: int = 5, mode: str = "bm25"):
    return {"object": "list", "data": request.app.state.store.search(user, q, k=k, mode=mode)}


@router.delete("/v1/users/{user}/memories/{item_id}")
def delete_memory(user: str, item_id: int, request: Request):
    request.app.state.store.delete_item(user, item_id)
    return {"id": item_id, "deleted": True}


@router.get("/v1/users/{user}/export")
def export_user(user: str, request: Request):
    return request.app.state.store.export(user)


@router.delete("/v1/users/{user}")
def forget_user(user: str, request: Request):
    request.app.state.store.forget(user)
    return {"user": user, "deleted": True}
