"""`localpers serve`: an OpenAI-compatible HTTP server over the engine.

Routes: POST /v1/chat/completions (plain, or SSE chunks ending with `data: [DONE]`), GET /v1/models,
GET /health (503 while the model loads, 200 after). User mistakes get 4xx with OpenAI's error body, never a 500.
A request that names a `user` is served with that user's newest artifacts (LoRA adapter, control vector) made for
the served model; the mem0-like memory endpoints of localpers.memory_api live under /v1/users/.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from localpers.engine import Artifacts, model_sha256
from localpers.errors import UserError
from localpers.memory_api import router as memory_router
from localpers.store import NotFoundError, Store
from localpers.store import data_dir as resolve_data_dir

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any chat a 4k-token context can hold
ROLES = {"system", "user", "assistant"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


def _content_text(content, index: int) -> str:
    """OpenAI content is a string or a list of parts; only text parts can be served by a text model."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts")


def parse_chat_request(body, model_name: str) -> dict:
    """Validate an OpenAI chat request; return the engine's arguments. Raises APIError with a precise message."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise APIError(400, f"messages[{i}] must be an object with 'role' ({', '.join(sorted(ROLES))}) and 'content'")
        clean.append({"role": m["role"], "content": _content_text(m["content"], i)})
    model = body.get("model")
    if model not in (None, "", model_name, "localpers"):
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                       code="model_not_found")

    def number(name, default, lo, hi, kind=float):
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value) \
                or not lo <= value <= hi:
            raise APIError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}]")
        return kind(value)

    max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "'stop' must be a string or a list of strings")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user):
        raise APIError(400, "'user' must be a non-empty string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false")
    return dict(
        messages=clean,
        max_tokens=number(max_tokens_field, 512, 1, 1 << 20, int),
        temperature=number("temperature", 0.7, 0.0, 2.0),
        top_p=number("top_p", 1.0, 0.0, 1.0),
        seed=number("seed", None, -(1 << 31), (1 << 32) - 1, int),
        stop=stop,
        user=user,
        stream=stream,
    )


def create_app(model_path: str | Path | None = None, *, api_key: str | None = None, data_dir: str | None = None,
               engine=None) -> FastAPI:
    """The server's app. The engine loads in a background thread (so /health answers 503 meanwhile) unless an
    engine is given."""
    app = FastAPI(title="localpers", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.load_error = None
    app.state.store = store = Store.open(resolve_data_dir(data_dir))
    app.include_router(memory_router)

    def artifacts_for(user: str):
        """The user's newest adapter and control vector made for the served model (None: serve the base model)."""
        sha = model_sha256(app.state.engine.model_path)
        try:
            lora = store.latest_artifact(user, "lora", sha)
            cvec = store.latest_artifact(user, "control_vector", sha)
        except NotFoundError:
            return None
        if not (lora or cvec):
            return None
        return Artifacts(lora=((lora["path"], 1.0),) if lora else (), control_vectors=((cvec["path"], 1.0),) if cvec else ())

    def load():
        from localpers.engine import Engine

        try:
            app.state.engine = Engine(model_path)
        except Exception as e:  # reported on /health and by every request instead of crashing the server
            app.state.load_error = str(e)

    if engine is None:
        threading.Thread(target=load, daemon=True, name="localpers-load").start()

    def ready_engine():
        if app.state.engine is None:
            if app.state.load_error:
                raise APIError(500, f"the model failed to load: {app.state.load_error}", "server_error")
            raise APIError(503, "the model is still loading", "server_error", "model_loading")
        return app.state.engine

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") \
                and request.headers.get("authorization") != f"Bearer {api_key}":
            return error_response(401, "a valid API key is required (Authorization: Bearer KEY)",
                                  "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error_response(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.code)

    @app.exception_handler(UserError)
    async def on_user_error(request, e: UserError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        return error_response(400, "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.get("/health")
    def health():
        if app.state.engine is not None:
            return {"status": "ok", "model": app.state.engine.model_name}
        if app.state.load_error:
            return error_response(500, f"the model failed to load: {app.state.load_error}", "server_error")
        return error_response(503, "the model is still loading", "server_error", "model_loading")

    @app.get("/v1/models")
    def models():
        engine = ready_engine()
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "localpers"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:  # chunked bodies carry no content-length
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        engine = ready_engine()
        args = parse_chat_request(body, engine.model_name)
        user, stream = args.pop("user"), args.pop("stream")
        artifacts = artifacts_for(user) if user else None
        if artifacts is not None:
            args["artifacts"] = artifacts
        if not stream:
            return await run_in_threadpool(engine.chat, **args)
        chunks = engine.chat_stream(**args)
        # Surface prompt errors (too long, a bad artifact) as a 4xx before the stream starts.
        first = await run_in_threadpool(next, chunks)

        def sse():
            yield f"data: {json.dumps(first)}\n\n"
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          data_dir: str | None = None) -> None:
    import uvicorn

    if model is not None and not Path(model).is_file():
        raise UserError(f"{model}: no such model file")
    app = create_app(model, api_key=api_key, data_dir=data_dir)
    print(f"localpers: serving on http://{host}:{port}/v1 (the model loads in the background; GET /health)")
    uvicorn.run(app, host=host, port=port, log_level="info")
