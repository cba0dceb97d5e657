"""What OpenAI's and llama-server's clients expect beyond plain chat (issue #26), mounted by server.create_app.

- Routes answer with or without `/v1` (`/chat/completions`, `/models`, ...), as llama-server's do.
- Any model name is served (the served file's stem, `localpers`, each `--alias`, then anything else), unless the
  server runs with `--strict-model-names` (then an unknown name is 404 model_not_found, as on OpenAI).
- Who is served (first that applies): the request's `user` (or OpenAI's newer `safety_identifier`), the
  `X-Localpers-User` header (percent-encoded UTF-8), a model named `NAME@localpers`, the server's owner
  (`localpers serve --user NAME`, config `LOCALPERS_USER`); else nobody (the base model).
- GET /v1/models lists the served names, the embedding model and `NAME@localpers` for each user of the store;
  GET /v1/models/{id} retrieves one.
- POST /v1/completions (text completion: a prompt string, a list of them, or token ids; streamed or not) and
  POST /v1/embeddings (the store's embedder, else the served GGUF in llama.cpp's embedding mode, mean-pooled).
- The chat pipeline shared by chat completions, the Responses API and Ollama's routes (prepare_chat): fields
  OpenAI documents that localpers cannot honour are refused with a 400 naming them; tools go through
  localpers.serve.tools (llama.cpp's generic format on templates without tool support).
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Literal
from urllib.parse import unquote

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from localpers.engine.engine import Cancelled, ContextOverflow, model_sha256, usage_of
from localpers.errors import UserError
from localpers.model.chat import template_supports_tools
from localpers.personalize.methods import MarkupFilter, drop_markup
from localpers.serve import limits
from localpers.serve import server as S
from localpers.serve.tools import ToolPlan, plan as tool_plan
from localpers.store.store import check_user

USER_HEADER = "X-Localpers-User"
USER_SUFFIX = "@localpers"
OWNER_ENV = "LOCALPERS_USER"
UNPREFIXED = ("/chat/completions", "/completions", "/embeddings", "/models", "/responses")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_EMBEDDING_INPUTS = 2048  # inputs of one /v1/embeddings request (OpenAI's limit)

router = APIRouter()


# -- routes without /v1 ---------------------------------------------------------------------------------------

class V1Aliases:
    """ASGI middleware (outermost, so the guard sees the /v1 path and asks for the API key): `/chat/completions`,
    `/models/x` ... are served as `/v1/chat/completions`, `/v1/models/x` (llama-server answers both)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            if any(path == p or path.startswith(p + "/") for p in UNPREFIXED):
                scope = {**scope, "path": "/v1" + path, "raw_path": b"/v1" + scope.get("raw_path", path.encode())}
        await self.app(scope, receive, send)


# -- who is served, under which names ---------------------------------------------------------------------------

def served_names(app, engine) -> list[str]:
    """The names the served model answers to, its own first."""
    return list(dict.fromkeys([engine.model_name, *app.state.aliases, "localpers"]))


def request_user(app, request: Request, model: str | None, user: str | None) -> str | None:
    """The user a request is served as (see the module docstring); 404 model_not_found for an unknown model
    name under --strict-model-names."""
    engine = app.state.engine
    named = None
    if model and model.endswith(USER_SUFFIX) and len(model) > len(USER_SUFFIX):
        named = model[:-len(USER_SUFFIX)]
    elif model and app.state.strict_model_names and model not in served_names(app, engine) \
            and model != embedding_name(app):
        raise S.APIError(404, f"the model '{model}' does not exist; this server serves "
                              f"{', '.join(repr(n) for n in served_names(app, engine))} and NAME{USER_SUFFIX}",
                         code="model_not_found", param="model")
    return user or header_user(request) or named or app.state.owner or None


def header_user(request: Request) -> str | None:
    """The user the X-Localpers-User header names: its bytes read as UTF-8, then percent-decoded as a URL path's
    user segment is (`jos%C3%A9` and a raw UTF-8 `josé` are one user; a literal '%' is written %25). Bytes that
    are not UTF-8, raw or percent-encoded (%ff), and ids the store refuses (control characters, blank) are a 400:
    no user is made of them."""
    header = request.headers.get(USER_HEADER)  # Starlette decodes header bytes as latin-1: encode() gets them back
    if not header:
        return None
    text = unquote(header.encode("latin-1").decode("utf-8", "surrogateescape"), errors="surrogateescape")
    try:
        return check_user(text)
    except UserError as e:
        raise S.APIError(400, f"the {USER_HEADER} header: {e}", param=USER_HEADER) from None


def system_fingerprint(engine) -> str:
    """`b<llama-cpp-python version>-<first 10 hex digits of the model's sha256>`: changes when the backend or the
    model does (llama-server's fingerprints start with its build, `b`)."""
    fp = getattr(engine, "_fingerprint", None)
    if fp is None:
        import llama_cpp

        fp = f"b{llama_cpp.__version__}-{model_sha256(engine.model_path)[:10]}"
        try:
            engine._fingerprint = fp
        except AttributeError:
            pass
    return fp


def chat_request_of(body: dict):
    """A ChatRequest made from another API's request (Responses, Ollama), its validation errors a 400."""
    from pydantic import ValidationError

    try:
        return S.ChatRequest.model_validate(body)
    except ValidationError as e:
        message, param = S._describe_validation(e.errors())
        raise S.APIError(400, message, param=param) from None


def check_token_ids(ids: list[int], n_vocab: int, param: str) -> None:
    if any(not 0 <= t < n_vocab for t in ids):
        S.refuse(param, f"token ids must be in 0..{n_vocab - 1}")


def context_error(e: ContextOverflow) -> JSONResponse:
    """OpenAI's context_length_exceeded error, with llama-server's counts (n_prompt_tokens, n_ctx)."""
    body = S.error_body(f"This model's maximum context length is {e.n_ctx} tokens. However, your messages "
                        f"resulted in {e.n_prompt} tokens.", code="context_length_exceeded", param="messages")
    body["error"] |= {"n_prompt_tokens": e.n_prompt, "n_ctx": e.n_ctx}
    return JSONResponse(body, status_code=400)


# -- OpenAI fields localpers cannot honour ------------------------------------------------------------------------

def check_chat_fields(req) -> None:
    """Refuse, with a 400 naming the field, what OpenAI's chat-completions schema offers and localpers cannot
    do: audio in or out, predicted outputs, web search, stored completions (store / metadata), the deprecated
    functions API, reasoning effort and verbosity (no reasoning model), service tiers, 24-hour cache retention,
    stream obfuscation; and a conversation ending with two assistant messages."""
    extra = req.model_extra or {}
    for name in ("audio", "prediction", "web_search_options", "functions", "function_call"):
        if extra.get(name) is not None:
            hint = "; use 'tools' and 'tool_choice'" if name.startswith("function") else ""
            S.refuse(name, f"is not supported by localpers{hint}")
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"]:
        S.refuse("modalities", "only [\"text\"] is supported")
    if extra.get("store"):
        S.refuse("store", "localpers does not keep completions for later retrieval (the user's messages go to "
                          "their history unless 'localpers': {'history': false})")
    if extra.get("metadata"):
        S.refuse("metadata", "goes with 'store', which localpers does not support")
    if extra.get("reasoning_effort") not in (None, "none"):
        S.refuse("reasoning_effort", "the served model does not reason; only 'none' is accepted")
    if extra.get("verbosity") is not None:
        S.refuse("verbosity", "is not supported by localpers")
    if extra.get("service_tier") not in (None, "auto", "default"):
        S.refuse("service_tier", "localpers has one tier: 'auto' or 'default'")
    if extra.get("prompt_cache_retention") not in (None, "in_memory", "in-memory"):
        S.refuse("prompt_cache_retention", "localpers keeps prompt caches in memory only")
    for name in ("prompt_cache_key", "safety_identifier"):
        if extra.get(name) is not None and not isinstance(extra[name], str):
            S.refuse(name, "must be a string")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        S.refuse("stream_options.include_obfuscation", "localpers does not pad streamed chunks")
    calls: set = set()
    for i, m in enumerate(req.messages):
        if m.role == "assistant":
            calls = {c.id for c in m.tool_calls or ()}
        elif m.role == "tool" and not calls:
            S.refuse(f"messages.{i}", "a 'tool' message must answer a tool call of the assistant message before it")
        elif m.role == "tool" and m.tool_call_id not in calls:
            S.refuse(f"messages.{i}.tool_call_id", f"names no tool call of the assistant message before it "
                                                   f"({', '.join(sorted(calls))})")
        elif m.role != "tool":
            calls = set()
    roles = [m.role for m in req.messages]
    if len(roles) >= 2 and roles[-1] == roles[-2] == "assistant":
        S.refuse(f"messages.{len(roles) - 1}", "the conversation ends with two assistant messages; at most one "
                                               "(a prefill) may follow the last user message")


# -- the chat pipeline, shared by chat completions, responses and Ollama's routes ----------------------------------

@dataclass
class Prepared:
    """One chat request, checked and composed: what the engine runs and how its output is read."""
    engine: Any
    user: str | None
    served: list[dict]
    plan: ToolPlan
    sampling: Any
    n: int
    artifacts: Any
    explanation: dict
    retrieved: bool = False   # the prompt holds retrieved history (methods.rag_prefix): its tags leave the reply

    def args(self) -> dict:
        return dict(artifacts=self.artifacts, sampling=self.sampling, n=self.n, tools=self.plan.template_tools)

    def work(self, cancel, on_delta=None) -> dict:
        """The generation (engine.complete) of this request, on the generation's thread, which releases the
        pinned artifacts once the engine is done with them (server.PinnedStream / whole() release them when the
        generation never ran). With retrieved history, the block's tags the model copied are dropped from every
        choice's text and from its streamed pieces alike (methods.MarkupFilter)."""
        if not self.retrieved:
            return pinned_work(self.artifacts, lambda: self.engine.complete(
                self.served, cancel=cancel, on_delta=on_delta, **self.args()))
        filters = defaultdict(MarkupFilter)

        def filtered(index, text, logprobs=None):
            if (kept := filters[index].feed(text)) or logprobs is not None:
                on_delta(index, kept, logprobs)

        out = pinned_work(self.artifacts, lambda: self.engine.complete(
            self.served, cancel=cancel, on_delta=filtered if on_delta else None, **self.args()))
        for c in out["choices"]:
            if on_delta and (rest := filters[c["index"]].flush()):
                on_delta(c["index"], rest, None)
            c["text"] = drop_markup(c["text"])
        return out


def pinned_work(pinned, run):
    if not pinned.claim():  # the response ended before this thread ran
        raise Cancelled()
    try:
        return run()
    finally:
        pinned.release()


async def whole(request: Request, work, pinned):
    """(work's result, None), or (None, the 499 response) when the client left first; a UserError of the
    generation is a 400 without the server's paths; `pinned` is released if the generation never ran."""
    engine = request.app.state.engine
    try:
        return await S.run_cancellable(request, work), None
    except Cancelled:
        return None, S.error_response(499, "the client closed the request", code="client_closed_request")
    except UserError as e:
        raise S.APIError(400, S.client_text(str(e), request.app.state.store.directory,
                                            engine.model_path.parent)) from None
    finally:
        if pinned.claim():
            pinned.release()


def check_text(req: BaseModel) -> None:
    """The 400 naming the first field of a request (any route's pydantic model, extra fields included) that holds
    text that is not valid Unicode (a lone surrogate: limits.bad_text_at); every route checks before it reads."""
    if (where := limits.bad_text_at(req.model_dump(by_alias=True, exclude_none=True))) is not None:
        raise S.APIError(400, f"'{where}' is not valid Unicode text (it holds a lone surrogate such as \\ud800)",
                         param=where)


def check_work(app, engine, choices: int, max_tokens: int, what: str = "n") -> None:
    """The 400 on 'max_tokens' when `choices` generations of up to max_tokens each (counted up to the context) are
    over the server's --max-request-tokens (limits.check_work); `what` names the choices in the message."""
    if (too_much := limits.check_work(choices, max_tokens, getattr(engine, "n_ctx", None),
                                      app.state.max_request_tokens, what)) is not None:
        S.refuse("max_tokens", too_much)


async def prepare_chat(app, request: Request, req) -> Prepared:
    """Check a ChatRequest whole (4xx before anything is stored), compose it for its user, and store the user's
    new messages (unless history is off)."""
    check_text(req)
    engine = S.ready_engine_of(app)
    if app.state.worker is not None:
        app.state.worker.chat_request()  # a running job process yields the CPU to chat
    extra = req.model_extra or {}
    user = request_user(app, request, req.model, req.user or extra.get("safety_identifier"))
    check_chat_fields(req)
    tools_ok = template_supports_tools(engine.chat_template)
    messages = S.engine_messages(req, tools_ok)
    sampling = S.sampling_of(req, engine.n_vocab)
    check_work(app, engine, req.n or 1, sampling.max_tokens)
    if req.json_schema is not None:
        schema, param = req.json_schema, "json_schema"
    else:
        schema, param = S.schema_of(req.response_format)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice
    if choice is not None and not tools:
        S.refuse("tool_choice", "needs 'tools'")
    plan = tool_plan(tools, choice, req.parallel_tool_calls, tools_ok, schema, S.refuse)
    grammar = plan.grammar if plan.mode == "generic" else S.grammar_of(None, schema, param)
    sampling = replace(sampling, grammar=grammar)
    if req.stream_options is not None and not req.stream:
        S.refuse("stream_options", "only allowed with 'stream': true")
    options = req.localpers or S.LocalpersOptions()
    composed, pinned, explanation = await run_in_threadpool(app.state.compose, engine, user, messages)
    learned = None
    try:
        served = plan.prepare(composed, tools_ok, tools)
        await run_in_threadpool(engine.chat_tokens, served, tools=plan.template_tools)  # template, context: 4xx
        if user and app.state.history and options.history:
            learned = await run_in_threadpool(app.state.learn, user, messages)
    except BaseException:
        pinned.release()
        raise
    if learned:  # the facts this message stored, replaced or retired (ids and attributes)
        explanation = {**explanation, "learned": learned}
    return Prepared(engine, user, served, plan, sampling, req.n or 1, pinned,
                    explanation if options.explain else {}, bool(explanation.get("retrieved")))


async def generation(request: Request, work):
    """Run work(cancel, on_delta) off the event loop (S.run_cancellable: the client leaving cancels it) and
    yield ("delta", choice index, text, token logprobs or None) as pieces come, then ("done", its result), or
    ("error", the error body to end the stream with, None when the client left) if the work failed."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_delta(index, text, logprobs=None):
        loop.call_soon_threadsafe(queue.put_nowait, (index, text, logprobs))

    task = asyncio.ensure_future(S.run_cancellable(request, lambda cancel: work(cancel, on_delta)))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in finished:
                getter.cancel()
                break
            yield ("delta", *getter.result())
        while not queue.empty():  # pieces queued just before the work returned
            yield ("delta", *queue.get_nowait())
        try:
            result = task.result()
        except Exception as e:  # noqa: BLE001 - reported in the stream, as OpenAI does
            yield ("error", stream_error(e))
            return
        yield ("done", result)
    finally:
        if not task.done():
            task.cancel()  # run_cancellable's finally sets the generation's cancel event


def stream_error(e: BaseException) -> dict | None:
    """The error object a stream ends with after a failure (None: the client left)."""
    if isinstance(e, Cancelled):
        return None
    if isinstance(e, UserError):
        return S.error_body(str(e))
    print(f"localpers: server error while streaming: {type(e).__name__}: {e}", flush=True)
    return S.error_body("internal server error", "server_error")


def chat_response(p: Prepared, out: dict) -> dict:
    """complete's result as an OpenAI chat.completion."""
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": p.engine.model_name, "system_fingerprint": system_fingerprint(p.engine),
            "choices": [{"index": c["index"], **p.plan.parse(c["text"], c["finish_reason"]),
                         "logprobs": None if c["logprobs"] is None else {"content": c["logprobs"], "refusal": None}}
                        for c in out["choices"]],
            "usage": usage_of(out)} | ({"localpers": p.explanation} if p.explanation else {})


def tool_call_deltas(message: dict) -> list[dict]:
    """A parsed message's tool calls as streamed deltas (index, id, type, function name and arguments)."""
    return [{"index": k, "id": c["id"], "type": "function", "function": c["function"]}
            for k, c in enumerate(message.get("tool_calls") or ())]


async def chat_stream(request: Request, p: Prepared, include_usage: bool):
    """SSE chat.completion.chunk events: a role chunk, content chunks (with their tokens' logprobs when asked),
    a finish chunk per choice, then usage (stream_options.include_usage), the `localpers` explanation and [DONE].
    With tools the reply is parsed once it is complete, then sent as content or tool_calls deltas."""
    base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": p.engine.model_name, "system_fingerprint": system_fingerprint(p.engine)}

    def chunk(choices, usage=None) -> str:
        body = {**base, "choices": choices, **({"usage": usage} if include_usage else {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(index, d, logprobs=None, finish=None):
        lp = None if logprobs is None else {"content": logprobs, "refusal": None}
        return chunk([{"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}])

    buffered = p.plan.mode != "none"
    started: set[int] = set()
    async for event in generation(request, p.work):
        if event[0] == "error":
            if event[1] is not None:
                yield f"data: {json.dumps(event[1])}\n\n"
            return
        if event[0] == "done":
            out = event[1]
            break
        _, index, text, logprobs = event
        if index not in started:
            started.add(index)
            yield delta(index, {"role": "assistant", "content": ""})
        if not buffered:
            yield delta(index, {"content": text}, logprobs)
    for c in out["choices"]:
        if c["index"] not in started:
            yield delta(c["index"], {"role": "assistant", "content": ""})
        parsed = p.plan.parse(c["text"], c["finish_reason"]) if buffered else None
        if parsed is not None and parsed["message"].get("tool_calls"):
            yield delta(c["index"], {"tool_calls": tool_call_deltas(parsed["message"])})
        elif parsed is not None and parsed["message"]["content"]:
            yield delta(c["index"], {"content": parsed["message"]["content"]}, c["logprobs"])
        yield delta(c["index"], {}, None, parsed["finish_reason"] if parsed else c["finish_reason"])
    if include_usage:
        yield chunk([], usage_of(out))
    if p.explanation:  # one more chunk without choices, after the usage chunk: what shaped the reply
        yield f"data: {json.dumps({**base, 'choices': [], 'localpers': p.explanation}, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


# -- /v1/models ------------------------------------------------------------------------------------------------

def embedding_name(app) -> str:
    embedder = app.state.store.embedder
    if embedder is not None:
        return embedder.name
    return f"{app.state.engine.model_name}-embedding" if app.state.engine is not None else "embedding"


def model_object(name: str, owned_by: str = "localpers") -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by}


def model_list(app) -> list[dict]:
    engine = S.ready_engine_of(app)
    users = [u + USER_SUFFIX for u in app.state.store.users()]
    return [model_object(n) for n in [*served_names(app, engine), embedding_name(app), *users]]


@router.get("/v1/models", responses=S.ERRORS)
def models(request: Request):
    """The served model's names first, then its embedding model and NAME@localpers for each user."""
    return {"object": "list", "data": model_list(request.app)}


@router.get("/v1/models/{model_id:path}", responses=S.ERRORS)
def model(model_id: str, request: Request):
    """One model object: any name is served unless --strict-model-names (then 404 for an unknown one)."""
    app = request.app
    known = {m["id"]: m for m in model_list(app)}
    if model_id in known or (model_id.endswith(USER_SUFFIX) and len(model_id) > len(USER_SUFFIX)):
        return model_object(model_id)
    if app.state.strict_model_names:
        raise S.APIError(404, f"the model '{model_id}' does not exist", code="model_not_found", param="model")
    return model_object(model_id)


# -- /v1/completions ---------------------------------------------------------------------------------------------

class CompletionRequest(BaseModel):
    """OpenAI's (legacy) completions request."""
    model_config = ConfigDict(extra="allow")
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, ge=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=S.MAX_N)
    best_of: StrictInt | None = Field(None, ge=1, le=S.MAX_N)
    stream: StrictBool | None = None
    stream_options: S.StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool | None = None
    seed: StrictInt | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    suffix: StrictStr | None = None
    user: StrictStr | None = None


def _prompts(prompt) -> list:
    """The request's prompts: each a string or a list of token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _legacy_logprobs(engine, tokens: list[dict], offset: int) -> dict:
    """Token-logprob objects in the completions API's shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    text_offset, at = [], offset
    for t in tokens:
        text_offset.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"]} for t in tokens],
            "text_offset": text_offset}


SSE = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


@router.post("/v1/completions", responses={**S.ERRORS, **SSE})
async def completions(req: CompletionRequest, request: Request):
    """Text completion of a raw prompt (no chat template), through the same composer as chat: a known user is
    served with their adapters and control vectors (retrieved context is not spliced into a raw prompt)."""
    app = request.app
    check_text(req)
    engine = S.ready_engine_of(app)
    user = request_user(app, request, req.model, req.user)
    if req.suffix:
        S.refuse("suffix", "insertion (fill-in-the-middle) is not supported")
    if req.best_of is not None and req.best_of != (req.n or 1):
        S.refuse("best_of", "only best_of equal to n is supported (localpers does not rank completions)")
    if req.stream_options is not None and not req.stream:
        S.refuse("stream_options", "only allowed with 'stream': true")
    if req.echo and req.stream:
        S.refuse("echo", "echo with 'stream': true is not supported")
    view = SimpleNamespace(
        stop=req.stop, logit_bias={k: float(v) for k, v in (req.logit_bias or {}).items()},
        logprobs=req.logprobs is not None, top_logprobs=req.logprobs, max_completion_tokens=None,
        max_tokens=COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
        temperature=None if req.temperature is None else float(req.temperature),
        top_p=None if req.top_p is None else float(req.top_p), seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, response_format=None)
    sampling = S.sampling_of(view, engine.n_vocab)
    prompts = _prompts(req.prompt)
    n = req.n or 1
    check_work(app, engine, n * len(prompts), sampling.max_tokens, "n x prompts" if len(prompts) > 1 else "n")
    for prompt in prompts:
        await run_in_threadpool(engine.prompt_tokens, prompt)  # empty, foreign ids, over the context: 400 now
    first = prompts[0] if isinstance(prompts[0], str) else engine.detokenize(prompts[0])
    _, pinned, _ = await run_in_threadpool(app.state.compose, engine, user, [{"role": "user", "content": first}])
    base = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": engine.model_name, "system_fingerprint": system_fingerprint(engine)}

    def run_all(cancel, on_delta=None):
        def each():
            outs = []
            for k, prompt in enumerate(prompts):
                shifted = (lambda i, *piece, k=k: on_delta(k * n + i, *piece)) if on_delta else None
                outs.append(engine.complete(prompt, artifacts=pinned, sampling=sampling, n=n, cancel=cancel,
                                            on_delta=shifted))
            return outs
        return pinned_work(pinned, each)

    def total(outs):
        return usage_of({"prompt_tokens": sum(o["prompt_tokens"] for o in outs),
                         "completion_tokens": sum(o["completion_tokens"] for o in outs),
                         "cached_tokens": sum(o["cached_tokens"] for o in outs)})

    if not req.stream:
        outs, left = await whole(request, run_all, pinned)
        if left is not None:
            return left
        choices = []
        for k, (prompt, out) in enumerate(zip(prompts, outs)):
            echoed = (prompt if isinstance(prompt, str) else engine.detokenize(prompt)) if req.echo else ""
            for c in out["choices"]:
                choices.append({"index": k * n + c["index"], "text": echoed + c["text"],
                                "finish_reason": c["finish_reason"],
                                "logprobs": None if c["logprobs"] is None else
                                _legacy_logprobs(engine, c["logprobs"], len(echoed))})
        return base | {"choices": choices, "usage": total(outs)}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        def chunk(choices, usage=None):
            return f"data: {json.dumps({**base, 'choices': choices, **({'usage': usage} if usage else {})}, ensure_ascii=False)}\n\n"
        offsets: dict[int, int] = {}
        async for event in generation(request, run_all):
            if event[0] == "error":
                if event[1] is not None:
                    yield f"data: {json.dumps(event[1])}\n\n"
                return
            if event[0] == "done":
                outs = event[1]
                break
            _, index, text, logprobs = event
            lp = None if logprobs is None else _legacy_logprobs(engine, logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(text)
            yield chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": None}])
        for k, out in enumerate(outs):
            for c in out["choices"]:
                yield chunk([{"index": k * n + c["index"], "text": "", "logprobs": None,
                              "finish_reason": c["finish_reason"]}])
        if include_usage:
            yield chunk([], total(outs))
        yield "data: [DONE]\n\n"

    return S.PinnedStream(events(), pinned, media_type="text/event-stream")


# -- /v1/embeddings ---------------------------------------------------------------------------------------------

class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(min_length=1)
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None


_embedder_lock = threading.Lock()


def embedder_of(app):
    """The store's embedder (`--embedder`), else the served GGUF loaded once more in llama.cpp's embedding mode
    (mean pooling, L2-normalized), made on first use."""
    if app.state.store.embedder is not None:
        return app.state.store.embedder
    with _embedder_lock:
        if getattr(app.state, "gguf_embedder", None) is None:
            from localpers.store.retrieval import GGUFEmbedder

            app.state.gguf_embedder = GGUFEmbedder(app.state.engine.model_path)
        return app.state.gguf_embedder


@router.post("/v1/embeddings", responses=S.ERRORS)
async def embeddings(req: EmbeddingRequest, request: Request):
    """OpenAI's embeddings: one vector per input (a string, a list of them, or token ids)."""
    app = request.app
    check_text(req)
    engine = S.ready_engine_of(app)
    request_user(app, request, req.model, req.user)  # the strict-name check
    inputs = _prompts(req.input)
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        S.refuse("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request (OpenAI's limit)")
    for x in inputs:
        if not isinstance(x, str):
            check_token_ids(x, engine.n_vocab, "input")
    texts = [x if isinstance(x, str) else engine.detokenize(x) for x in inputs]
    for i, (x, text) in enumerate(zip(inputs, texts)):
        if text.strip():
            continue
        param = "input" if len(inputs) == 1 and not isinstance(req.input[0], list) else f"input.{i}"
        if isinstance(x, str):
            S.refuse(param, "is empty")
        S.refuse(param, f"the token ids {x[:8]}{' ...' if len(x) > 8 else ''} hold no text to embed: special or "
                        "control tokens of this model (BOS, EOS, chat markers) detokenize to nothing, and "
                        "whitespace is no text either; send text, or the ids of text tokens")
    counts = [len(engine.tokenize(t, add_bos=False)) for t in texts]
    vectors = await run_in_threadpool(lambda: embedder_of(app).embed(texts))
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        S.refuse("dimensions", f"this embedding model has {vectors.shape[1]} dimensions")

    def encode(v: np.ndarray):
        if req.encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]

    return {"object": "list", "model": embedding_name(app),
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}


def mount(app) -> None:
    """Add these routes and the /v1-less aliases to the server's app."""
    app.include_router(router)
    app.add_middleware(V1Aliases)
