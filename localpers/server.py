"""`localpers serve`: an OpenAI-compatible HTTP server over the engine.

Routes: POST /v1/chat/completions (plain, or SSE chunks ending with `data: [DONE]`), GET /v1/models,
GET /health (503 while the model loads, 200 after). User mistakes get 4xx with OpenAI's error body, never a 500.

A request that names a `user` is composed for that user (localpers.compose, spec `--personalize`, default
edit+rag): their current registry artifacts for the served model, their stated preferences and retrieved history,
as `localpers eval` measures the same spec. Unless the server runs with `--no-history` or the request says
`"localpers": {"history": false}`, the user's new messages are stored in their history and the preferences stated
in them learned (localpers.learn), which queues background jobs (localpers.jobs). `"localpers": {"explain": true}`
adds a `localpers` object to the response (a last chunk of a stream, with no choices): the composition, the artifacts served
(method, kind, id) and the ids of the retrieved items, never text. The mem0-like memory endpoints of
localpers.memory_api and the job endpoints of localpers.jobs live under /v1/users/.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from localpers import names
from localpers.compose import DEFAULT_SPEC, Composer, last_user_message, served_user
from localpers.engine import model_sha256
from localpers.errors import UserError
from localpers.jobs import Worker
from localpers.jobs import router as jobs_router
from localpers.learn import learn_from_chat
from localpers.memory_api import router as memory_router
from localpers.methods import apply
from localpers.store import Store
from localpers.store import data_dir as resolve_data_dir

log = logging.getLogger(__name__)
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
    options = body.get("localpers") or {}
    if not isinstance(options, dict) or set(options) - {"explain", "history"} \
            or not all(isinstance(v, bool) for v in options.values()):
        raise APIError(400, "'localpers' must be an object with optional booleans 'explain' and 'history'")
    return dict(
        messages=clean,
        max_tokens=number(max_tokens_field, 512, 1, 1 << 20, int),
        temperature=number("temperature", 0.7, 0.0, 2.0),
        top_p=number("top_p", 1.0, 0.0, 1.0),
        seed=number("seed", None, -(1 << 31), (1 << 32) - 1, int),
        stop=stop,
        user=user,
        stream=stream,
        explain=options.get("explain", False),
        history=options.get("history", True),
    )


def create_app(model_path: str | Path | None = None, *, api_key: str | None = None, data_dir: str | None = None,
               engine=None, personalize: str = DEFAULT_SPEC, history: bool = True, jobs: bool = False,
               warm_jobs: bool = False) -> FastAPI:
    """The server's app. The engine loads in a background thread (so /health answers 503 meanwhile) unless an
    engine is given. `personalize`: the composition spec of requests with a `user`; `history`: store users'
    messages and learn their preferences; `jobs`: run the background job worker (`localpers serve` does; without
    it jobs stay queued), `warm_jobs`: load what jobs need (the editor's torch model) once the engine is ready."""
    app = FastAPI(title="localpers", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.load_error = None
    app.state.store = store = Store.open(resolve_data_dir(data_dir))
    app.state.composer = composer = Composer(personalize)
    app.include_router(memory_router)
    app.include_router(jobs_router)
    app.state.worker = Worker(store, lambda: app.state.engine, warm=warm_jobs).start() if jobs else None
    if app.state.worker is not None:
        app.router.on_shutdown.append(lambda: app.state.worker.stop(timeout=2))  # a running job dies with the process

    def compose(user: str | None, messages: list[dict]):
        """(messages as served, engine arguments, explanation) of a request: what `user` is served with."""
        if not user:
            return messages, {}, {"composition": names.BASE, "artifacts": [], "retrieved": []}
        engine = app.state.engine
        person = served_user(store, user, model_sha256(engine.model_path), messages)
        personalized = composer(person, last_user_message(messages), engine)
        return apply(personalized, messages), {"artifacts": personalized.artifacts}, composer.explain(person, personalized)

    def learn(user: str | None, messages: list[dict], wanted: bool) -> None:
        """Store the user's new messages and the preferences stated in them (once the request is accepted: a
        request refused with a 4xx stores nothing); a learned preference wakes the job worker."""
        if user and history and wanted:
            try:
                learned = learn_from_chat(store, user, messages)
            except UserError as e:  # a message the store refuses (over 64 KiB...): the reply is still served
                log.warning("not stored in %s's history: %s", user, e)
                return
            if (learned["preferences"] or learned["replaced"]) and app.state.worker is not None:
                app.state.worker.wake()

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
        user, stream, explain = args.pop("user"), args.pop("stream"), args.pop("explain")
        said, wanted = args["messages"], args.pop("history")
        args["messages"], extra, explanation = await run_in_threadpool(compose, user, said)
        args.update(extra)
        if not stream:
            out = await run_in_threadpool(engine.chat, **args)
            await run_in_threadpool(learn, user, said, wanted)
            return out | {"localpers": explanation} if explain else out
        chunks = engine.chat_stream(**args)
        # Surface prompt errors (too long, a bad artifact) as a 4xx before the stream starts.
        first = await run_in_threadpool(next, chunks)
        await run_in_threadpool(learn, user, said, wanted)

        def sse():
            yield f"data: {json.dumps(first)}\n\n"
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            if explain:  # one more chunk, with no choices (as OpenAI's usage chunk), carries the explanation
                yield f"data: {json.dumps(first | {'choices': [], 'localpers': explanation})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          data_dir: str | None = None, personalize: str = DEFAULT_SPEC, history: bool = True) -> None:
    import uvicorn

    if model is not None and not Path(model).is_file():
        raise UserError(f"{model}: no such model file")
    Composer(personalize)  # an unknown method is a one-line error before anything starts
    app = create_app(model, api_key=api_key, data_dir=data_dir, personalize=personalize, history=history,
                     jobs=True, warm_jobs=True)
    print(f"localpers: serving on http://{host}:{port}/v1 (the model loads in the background; GET /health)")
    uvicorn.run(app, host=host, port=port, log_level="info")
    if app.state.worker is not None and app.state.worker.current is not None:
        # a job is still running in its thread (torch, llama.cpp): leave without finalizing the interpreter
        # under it; the job is queued again at the next start (store.requeue_running)
        os._exit(0)
