"""`localpers serve`: an OpenAI-compatible HTTP server over the engine.

Routes: POST /v1/chat/completions (plain, or SSE chunks ending with `data: [DONE]`), GET /v1/models,
GET /health (503 while the model loads, 200 after), GET /openapi.json (the request body described by the pydantic
models below). 
A request that names a `user` is composed for that user (localpers.serve.compose, spec `--personalize`, default
memory+rag): their current registry artifacts for the served model, their stated preferences and retrieved history,
as `localpers eval` measures the same spec. Unless the server runs with `--no-history` or the request says
`"localpers": {"history": false}`, the user's new messages are stored in their history and the preferences stated
in them learned (localpers.serve.learn), which queues background jobs (localpers.serve.jobs). `"localpers": {"explain": true}`
adds a `localpers` object to the response (a last chunk of a stream, with no choices): the composition, the artifacts served
(method, kind, id), the ids of the retrieved items, the ids of the stated preferences put before the question
("stated", when any) and, when this request's message stored, replaced or retired facts,
`learned`: {"facts": [{"id", "attribute"}], "replaced": [...], "retired": [...]} (and "retried": [...], facts restated
after their edit failed, whose edit is queued again); never text. The mem0-like memory
endpoints of localpers.serve.memory_api and the job endpoints of localpers.serve.jobs live under /v1/users/; the page
at `/` ("what my assistant knows about me") and the routes it adds are localpers.serve.page.

Protocol (issue #13):
- Every OpenAI chat-completions field is honoured or refused with a 400 that names it; unknown top-level fields
  are ignored (as llama-server does). Errors are OpenAI error bodies; a 500 only for a real server fault.
- A client that goes away stops its generation within one decoding step (generation runs on a thread of its own
  that holds the engine; the request handler watches the connection and sets the generation's cancel event).
- The browser is an attacker: requests whose Host is not a loopback name, the bound address or an allowed host
  are refused (DNS rebinding), JSON endpoints take only Content-Type application/json (no "simple" cross-site
  POST), requests with an Origin that is neither this server nor an allowed origin are refused, and binding a
  non-loopback address needs an API key or --insecure-no-api-key.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from localpers import names
from localpers.serve.compose import DEFAULT_SPEC, Composer, last_user_message, served_user
from localpers.engine.engine import Artifacts, Cancelled, ContextOverflow, Sampling, model_sha256
from localpers.errors import UserError
from localpers.serve import limits
from localpers.serve.jobs import Worker
from localpers.serve.jobs import router as jobs_router
from localpers.serve.learn import changed, learn_from_chat
from localpers.serve.memory_api import disk_full_response, router as memory_router
from localpers.serve.page import router as page_router
from localpers.personalize.methods import apply
from localpers.store.store import NotFoundError, Store, disk_full, said_by
from localpers.store.store import data_dir as resolve_data_dir

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any chat a 4k-token context can hold
MAX_N = 8                 # choices per request: each is a full generation on the one engine
MAX_STOP = 4              # as OpenAI
DEFAULT_MAX_TOKENS = 512
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
POLL_S = 0.1              # how often a waiting handler checks that its client is still there
COMPOSE_TRIES = 3         # a request composed while its artifacts are replaced reads the registry again


# -- the request body, as OpenAI documents it ---------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Strict):
    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None


class JSONSchema(_Strict):
    name: StrictStr | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-server's json_object with a schema


class Function(_Strict):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, StrictStr]


class LocalpersOptions(_Strict):
    """localpers' own request options (not OpenAI's): `explain` adds the `localpers` object (what shaped the
    reply) to the response; `history: false` keeps this request's messages out of the user's history."""
    explain: StrictBool = False
    history: StrictBool = True


class ChatRequest(BaseModel):
    """OpenAI's chat-completions request. Unknown top-level fields are ignored, as llama-server does."""
    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, StrictFloat] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    seed: StrictInt | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    json_schema: dict[str, Any] | None = None  # llama-server's shorthand for response_format json_schema
    localpers: LocalpersOptions | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ReplyMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The response of a request without `stream` (with it: text/event-stream of chat.completion.chunk)."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 500, 503)}


# -- errors ---------------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": limits.printable(message), "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None):
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def refuse(param: str, message: str):
    raise APIError(400, f"'{param}': {message}", param=param, code="unsupported_parameter")


def _describe_validation(errors) -> tuple[str, str | None]:
    """pydantic's errors as one line naming the fields: "'messages.0.role': Input should be ..."."""
    parts, first = [], None
    for err in errors:
        if err["type"] == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        if err["loc"] == ("body",) and err["type"] in ("model_attributes_type", "dict_type", "model_type", "missing"):
            return "the request body must be a JSON object", None
        loc = [str(p) for p in err["loc"] if p != "body"]
        # drop the union-member tags pydantic adds (str, list[TextPart], function-after ...)
        loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in {"str", "int", "float", "bool"}))]
        where = ".".join(loc) or "body"
        first = first or where
        bad_float = isinstance(err.get("input"), float) and not math.isfinite(err["input"])
        parts.append(f"'{where}': {'must be a finite number' if bad_float else err['msg']}")
    return "; ".join(dict.fromkeys(parts)), first


# -- from a request to the engine's arguments ------------------------------------------------------------------

def _content_text(message: Message) -> str | None:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content


def engine_messages(req: ChatRequest, tools_ok: bool) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = _content_text(m)
        if m.role in ("system", "developer", "user") and content is None:
            raise APIError(400, f"'messages.{i}.content' is required for a {m.role} message",
                           param=f"messages.{i}.content")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in m.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        out.append(msg)
    return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def sampling_of(req: ChatRequest, n_vocab: int) -> Sampling:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        refuse("stop", f"at most {MAX_STOP} stop sequences")
    bias = []
    for key, value in (req.logit_bias or {}).items():
        # ASCII digits only, at most 10 ("²" is a digit int() cannot read; 5,000 digits are over int()'s limit)
        if not re.fullmatch(r"[0-9]{1,10}", key) or not int(key) < n_vocab:
            refuse("logit_bias", f"{key!r} is not a token id of this model (0..{n_vocab - 1})")
        if not -100 <= value <= 100:
            refuse("logit_bias", f"the bias of token {key} must be in [-100, 100]")
        bias.append((int(key), float(value)))
    if req.top_logprobs is not None and not req.logprobs:
        refuse("top_logprobs", "needs 'logprobs': true")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return Sampling(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=0.7 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=None if req.seed is None else req.seed % (1 << 32),
        stop=tuple(s for s in stop if s),
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        logit_bias=tuple(bias),
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        grammar=grammar_of(req.response_format),
    )


def schema_of(fmt: ResponseFormat | None) -> tuple[dict | None, str]:
    """The JSON schema a response_format asks for ({} for any JSON; None for text) and the field that holds it."""
    if fmt is None or fmt.type == "text":
        return None, "response_format"
    if fmt.type == "json_object":
        return (fmt.schema_ if fmt.schema_ is not None else {}), "response_format.schema"
    if fmt.json_schema is None:
        refuse("response_format.json_schema", "is required when 'type' is 'json_schema'")
    return fmt.json_schema.schema_ or {}, "response_format.json_schema.schema"


def grammar_of(fmt: ResponseFormat | None, schema: dict | None = None, param: str | None = None) -> str | None:
    """The GBNF grammar that makes the reply parse as the requested JSON (llama.cpp's JSON grammar and its
    JSON-schema converter, as llama-server uses them)."""
    if schema is None:
        schema, param = schema_of(fmt)
    if schema is None:
        return None
    from localpers.serve.tools import json_grammar

    try:
        return json_grammar(schema)
    except Exception as e:  # the converter raises assorted errors for schemas it does not support
        refuse(param, f"llama.cpp cannot turn this JSON schema into a grammar ({e})")




# -- the browser is an attacker -------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """The host of a Host header, without the port ([::1]:8000 -> ::1)."""
    h = host_header.strip().lower()
    if h.startswith("["):  # an IPv6 literal: "[addr]" or "[addr]:port", nothing else after it
        end = h.find("]")
        rest = h[end + 1:] if end > 0 else None
        return h[1:end] if rest is not None and (rest == "" or (rest[:1] == ":" and rest[1:].isdigit())) else h
    name, sep, port = h.rpartition(":")
    return name if sep and h.count(":") == 1 and port.isdigit() else h  # "host:8000.evil.example" stays whole


class Guard:
    """A pure ASGI middleware (it never wraps `receive`, so a streaming response still sees the client leave):
    Host allow-list, Origin allow-list, Content-Type of JSON bodies, the API key, the body size limit."""

    def __init__(self, app, *, api_key: str | None, allowed_hosts: set[str], allowed_origins: set[str]):
        self.app, self.api_key = app, api_key
        self.allowed_hosts, self.allowed_origins = allowed_hosts, allowed_origins

    def refusal(self, scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if "*" not in self.allowed_hosts and _host_name(host) not in self.allowed_hosts:
            return 403, (f"the Host {host!r} is not this server (a DNS-rebinding request?); allow it with "
                         f"`localpers serve --allowed-host`"), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and "*" not in self.allowed_origins and origin not in self.allowed_origins \
                and origin.split("://", 1)[-1].lower() != host.lower():
            return 403, (f"cross-origin requests from {origin!r} are refused; allow the origin with "
                         f"`localpers serve --allowed-origin`"), "origin_not_allowed"
        path = scope.get("path", "")
        if self.api_key and (path.startswith(("/v1", "/api/")) or path == "/openapi.json") \
                and not limits.authorized(headers.get("authorization"), self.api_key):
            return 401, "a valid API key is required (Authorization: Bearer KEY)", "invalid_api_key"
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return 415, f"the request body must be JSON sent as 'Content-Type: application/json', not " \
                            f"{ctype or 'none'!r}", "unsupported_media_type"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return 413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", "body_too_large"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (refused := self.refusal(scope)) is not None:
            status, message, code = refused
            kind = "authentication_error" if status == 401 else "invalid_request_error"
            await error_response(status, message, kind, code)(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH") \
                and not any(k.lower() == b"content-length" for k, _ in scope.get("headers", [])):
            receive = await self._bounded_body(scope, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def _bounded_body(self, scope, receive, send):
        """A chunked body (no Content-Length) read up to the limit, then replayed to the app; None once answered
        (413) or when the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                await error_response(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                                     code="body_too_large")(scope, receive, send)
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay


# -- running engine work off the event loop, cancellable ------------------------------------------------------

async def run_cancellable(request: Request, work, on_event=None):
    """Run work(cancel) on a daemon thread; while it runs, watch the client: if it disconnects (or this task is
    cancelled, e.g. at shutdown), set `cancel`, which stops the engine within one decoding step."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    cancel = threading.Event()

    def settle(setter, value):
        if not done.done():
            setter(value)

    def run():
        try:
            result = work(cancel)
            loop.call_soon_threadsafe(settle, done.set_result, result)
        except BaseException as e:  # handed to the awaiting handler
            loop.call_soon_threadsafe(settle, done.set_exception, e)

    threading.Thread(target=run, daemon=True, name="localpers-generate").start()
    try:
        while True:
            finished, _ = await asyncio.wait({done}, timeout=POLL_S)
            if finished:
                return done.result()
            if await request.is_disconnected():
                cancel.set()
                raise Cancelled()
    finally:
        if not done.done():
            cancel.set()
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nobody awaits it now


def ready_engine_of(app):
    """The app's engine, or the 503 (still loading) / 500 (failed to load) APIError."""
    if app.state.engine is None:
        if app.state.load_error:
            raise APIError(500, "the model failed to load; the server's log says why", "server_error")
        raise APIError(503, "the model is still loading", "server_error", "model_loading")
    return app.state.engine


def create_app(model_path: str | Path | None = None, *, api_key: str | None = None, data_dir: str | None = None,
               engine=None, personalize: str = DEFAULT_SPEC, history: bool = True, jobs: bool = False,
               warm_jobs: bool = False, host: str = "127.0.0.1", allowed_hosts=(), allowed_origins=(),
               lora=(), adapter_cache_bytes: int = names.ADAPTER_CACHE_BYTES,
               max_request_tokens: int = names.MAX_REQUEST_TOKENS, aliases=(), owner: str | None = None,
               strict_model_names: bool = False) -> FastAPI:
    """The server's app, with the guard `localpers serve` runs. The engine loads in a background thread (so
    /health answers 503 meanwhile) unless an engine is given. `personalize`: the composition spec of requests with
    a `user`; `history`: store users' messages and learn their preferences; `jobs`: run the background job worker
    (True: in a thread; "process": each job in a child process, as `localpers serve` does; without it jobs stay
    queued), `adapter_cache_bytes`: the bound of the engine's loaded adapters (names.ADAPTER_CACHE_BYTES),
    `warm_jobs`: load what jobs need (the editor's torch model) once the engine is ready (thread jobs only).
    Requests must name a loopback host, `host` or one of `allowed_hosts` ("*": any) in their Host header. `lora`:
    adapter files applied to every request (scale 1), besides the user's artifacts; one that llama.cpp cannot
    load for the model fails the load (/health says so). `max_request_tokens`: the cap on n x max_tokens of one
    generating request (limits.check_work). `aliases`: more names of the served model; `owner`: the user a request
    naming nobody is served as (default $LOCALPERS_USER); `strict_model_names`: 404 for a model name not served
    (localpers.serve.openai_extra)."""
    from localpers.serve import ollama, openai_extra as extra, responses

    app = FastAPI(title="localpers", version="1", docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible, on-device personalized assistant.")
    app.state.engine = engine
    app.state.load_error = None
    app.state.store = store = Store.open(resolve_data_dir(data_dir))
    app.state.composer = composer = Composer(personalize)
    app.state.aliases, app.state.strict_model_names = tuple(aliases), strict_model_names
    app.state.owner = owner or os.environ.get(extra.OWNER_ENV) or None
    app.state.history = history
    app.state.max_request_tokens = max_request_tokens
    app.include_router(memory_router)
    app.include_router(jobs_router)
    app.include_router(page_router)  # the page at / (localpers.serve.page)
    # a retired artifact leaves the served engine's adapter LRU at once (freed when no request holds it)
    store.on_retire.append(lambda path: app.state.engine is not None and app.state.engine.retire_file(path))
    app.state.worker = Worker(store, lambda: app.state.engine, warm=warm_jobs,
                              process=jobs == "process").start() if jobs else None
    if app.state.worker is not None:
        app.router.on_shutdown.append(lambda: app.state.worker.stop(timeout=2))  # a running job dies with the process
    hosts = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in allowed_hosts}
    if host not in ("0.0.0.0", "::", ""):
        hosts.add(host.lower().strip("[]"))
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=hosts, allowed_origins=set(allowed_origins))
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # runs before the guard: answers the preflight of an allowed origin
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    def compose(engine, user: str | None, messages: list[dict]):
        """(messages as served, the artifacts pinned for this request, explanation): what `user` is served with.
        The artifact set is pinned (engine.pin): retired while the request runs, it is still served to it.
        A file retired between reading the registry and pinning it: composed again from the current registry.
        An artifact llama.cpp cannot load is left out and marked broken in the store (so it shows up as such
        for that user; the client never sees the server's paths)."""
        last = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if not user or (last is not None and not said_by(last, user)):  # a group chat's other participant:
            # never served the user's memory (their facts would answer for someone else)
            return messages, engine.pin(everyone)[0], {"composition": names.BASE, "artifacts": [], "retrieved": []}
        sha = model_sha256(engine.model_path)
        for attempt in range(COMPOSE_TRIES):
            person = served_user(store, user, sha, messages,
                                 preferences=composer.needs_preferences(last_user_message(messages)))
            personalized = composer(person, last_user_message(messages), engine)
            pinned, broken = engine.pin(everyone.merge(personalized.artifacts))
            if attempt + 1 == COMPOSE_TRIES or all(Path(path).exists() for path, _ in broken):
                break
            pinned.release()
        for path, reason in broken:  # a file still missing after the retries: registered, it is broken (a retired
            mark_broken(store, user, path, reason)  # one is registered no more, and marks nothing)
        return apply(personalized, messages), pinned, composer.explain(person, personalized)

    def learn(user: str, messages: list[dict]) -> dict | None:
        """Store the user's new messages and learn the facts stated in them (after composing: this request's
        messages are context, not retrieved history; once the request is accepted: a request refused with a 4xx
        stores nothing); wakes the job worker for a changed fact. Returns what the response's `localpers` object
        reports ({"facts", "replaced", "retired"}, and "retried" when a fact whose edit failed was restated: ids
        and attribute names, no text), or None when no fact changed."""
        try:
            learned = learn_from_chat(store, user, messages)
        except (UserError, sqlite3.Error, OSError) as e:  # a message the store refuses (over 64 KiB...), a full
            # disk: the reply is still served, without the history write
            log.warning("not stored in %r's history: %s: %s", user, type(e).__name__, e)
            return None
        if not changed(learned):
            return None
        if app.state.worker is not None:
            app.state.worker.wake()
        return {key: learned[key] for key in ("facts", "replaced", "retired")} | \
            ({"retried": learned["retried"]} if learned["retried"] else {})

    everyone = Artifacts(lora=tuple((str(path), 1.0) for path in lora))  # --lora: applied to every request

    def load():
        from localpers.engine.engine import Engine

        try:
            loaded = Engine(model_path, adapter_cache_bytes=adapter_cache_bytes)
            if everyone.lora and (broken := loaded.usable(everyone)[1]):
                loaded.close()
                raise UserError(f"--lora {broken[0][0]}: {broken[0][1]}")
            app.state.engine = loaded
        except Exception as e:  # reported on /health and by every request instead of crashing the server
            print(f"localpers: error: the model failed to load: {e}", file=sys.stderr, flush=True)
            app.state.load_error = str(e)

    if engine is None:
        threading.Thread(target=load, daemon=True, name="localpers-load").start()

    app.state.compose, app.state.learn = compose, learn
    app.include_router(responses.router)
    app.include_router(ollama.router)

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(UserError)
    async def on_user_error(request, e: UserError):
        if isinstance(e, ContextOverflow):
            return extra.context_error(e)
        model = app.state.engine.model_path.parent if app.state.engine is not None else store.directory
        return error_response(404 if isinstance(e, NotFoundError) else 400, client_text(str(e), store.directory, model))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        message, param = _describe_validation(e.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def on_server_fault(request, e: Exception):
        if disk_full(e):
            return disk_full_response()
        print(f"localpers: server error on {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error_response(500, "internal server error (the server's log has the details)", "server_error")

    @app.get("/health", responses={503: {"model": ErrorBody}, 500: {"model": ErrorBody}})
    def health():
        if app.state.engine is not None:
            worker = app.state.worker
            problem = {"jobs_error": worker.problem} if worker is not None and worker.problem else {}
            return {"status": "ok", "model": app.state.engine.model_name, **problem}
        if app.state.load_error:
            return error_response(500, "the model failed to load; the server's log says why", "server_error")
        return error_response(503, "the model is still loading", "server_error", "model_loading")

    @app.post("/v1/chat/completions", responses={**ERRORS, 200: {"model": ChatCompletion,
                                                                  "content": {"text/event-stream": {}}}})
    async def chat_completions(req: ChatRequest, request: Request):
        prepared = await extra.prepare_chat(app, request, req)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return PinnedStream(extra.chat_stream(request, prepared, include_usage), prepared.artifacts,
                                media_type="text/event-stream")
        out, left = await extra.whole(request, prepared.work, prepared.artifacts)
        return left if left is not None else extra.chat_response(prepared, out)

    extra.mount(app)  # after the guard: the /v1-less aliases are rewritten before it checks the API key
    return app


class PinnedStream(StreamingResponse):
    """A stream whose generation releases its pinned artifacts; when the client left before the stream started
    (so no generation ran), the response releases them itself."""

    def __init__(self, content, pinned, **kwargs):
        super().__init__(content, **kwargs)
        self.pinned = pinned

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.pinned.claim():
                self.pinned.release()


def client_text(message: str, *folders) -> str:
    """An error message as a client may see it: the server's own paths (the data folder, the model's folder)
    replaced by a neutral word."""
    for folder in folders:
        for form in sorted({str(Path(folder)), str(Path(folder).resolve())}, key=len, reverse=True):
            if len(form) > 1:
                message = message.replace(form, "<server>")
    return message


def mark_broken(store: Store, user: str, path: str, reason: str) -> None:
    """The hook for an artifact the served path cannot load (unreadable, or its file gone): recorded in the
    metadata of the user's artifact registered at `path` (meta["broken"], the data folder's path in it written
    <server>: the page and export show it; nothing for a path registered no more), logged on the server's console
    when newly marked."""
    try:
        marked = store.mark_artifact_broken(user, path, client_text(reason, store.directory))
    except UserError:
        return
    if marked:
        print(f"localpers: {user!r}'s artifact {path} is broken and is not served: {reason}", file=sys.stderr,
              flush=True)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a one-line UserError when the address is taken or cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno == 98 or "in use" in str(e).lower():
            raise UserError(f"port {port} on {host} is already in use; choose another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          data_dir: str | None = None, personalize: str = DEFAULT_SPEC, history: bool = True, allowed_hosts=(),
          allowed_origins=(), insecure_no_api_key: bool = False, lora=(),
          adapter_cache_mb: float = names.ADAPTER_CACHE_BYTES / 2**20,
          max_request_tokens: int = names.MAX_REQUEST_TOKENS, max_connections: int | None = None,
          header_timeout: float = names.HEADER_TIMEOUT_S, body_timeout: float = names.BODY_TIMEOUT_S,
          aliases=(), owner: str | None = None, strict_model_names: bool = False) -> None:
    import uvicorn

    from localpers.model.gguf_info import open_gguf

    if not is_loopback(host) and not api_key and not insecure_no_api_key:
        raise UserError(f"--host {host} lets other machines reach every user's history: give --api-key KEY "
                        "(or --insecure-no-api-key to accept that risk)")
    if model is not None:
        open_gguf(model)  # a one-line UserError for a missing or unreadable file, before the server starts
    for path in lora:  # a missing file or one that is no LoRA adapter: one line, before the server starts
        adapter = open_gguf(path, check_arch=False).get_field("adapter.type")
        if adapter is None or adapter.contents() != "lora":
            raise UserError(f"--lora {path}: not a llama.cpp LoRA adapter (no adapter.type = lora)")
    Composer(personalize)  # an unknown method is a one-line error before anything starts
    if not adapter_cache_mb >= 0:
        raise UserError(f"--adapter-cache-mb must be 0 or more, not {adapter_cache_mb}")
    sock = bind(host, port)
    app = create_app(model, api_key=api_key, data_dir=data_dir, personalize=personalize, history=history,
                     jobs="process", warm_jobs=True, host=host, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
                     lora=lora, adapter_cache_bytes=int(adapter_cache_mb * 2**20), max_request_tokens=max_request_tokens,
                     aliases=aliases, owner=owner, strict_model_names=strict_model_names)
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::") and not allowed_hosts:
        print("localpers: note: requests must name this machine as a loopback address; to reach it by another "
              "name or address, add --allowed-host NAME", file=sys.stderr, flush=True)
    from localpers import default_model_path

    try:
        shown_model = model or default_model_path()
    except FileNotFoundError:  # reported by the load, on /health
        shown_model = "the default model"
    print(f"localpers: serving {shown_model} with the data folder {app.state.store.directory} "
          f"on http://{shown}:{port}/v1 (the model loads in the background; GET /health)", flush=True)
    # timeout_graceful_shutdown: on SIGTERM, open streams get 2 s, then their tasks are cancelled, which sets
    # their generations' cancel events (a generation never outlives its request).
    # slow clients (limits.bounded_protocol): receive deadlines, a connection cap below the descriptor limit
    cap = max_connections or limits.connection_cap(limits.raise_fd_limit())
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2,
                                           http=limits.bounded_protocol(cap, header_timeout, body_timeout)))
    server.run(sockets=[sock])
    if app.state.worker is not None and app.state.worker.current is not None:
        # a job is still running in its thread (torch, llama.cpp): leave without finalizing the interpreter
        # under it; the job is queued again at the next start (store.requeue_running)
        os._exit(0)
