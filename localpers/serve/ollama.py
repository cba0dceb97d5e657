"""Ollama's API (https://github.com/ollama/ollama/blob/main/docs/api.md) over the chat pipeline: POST /api/chat,
POST /api/generate, GET /api/tags, POST /api/show (and GET /api/version, which clients probe).

Streaming (the default, as in Ollama) is NDJSON: one JSON object per line, {"message": {"role": "assistant",
"content": piece}, "done": false} ..., then a last object with "done": true, "done_reason" and the counts
(prompt_eval_count, eval_count, durations in nanoseconds). Ollama requests carry no `user`: the user comes from
the X-Localpers-User header, a model named NAME@localpers or the server's owner (localpers.serve.openai_extra),
and is personalized like every route. `options` honoured: num_predict, temperature, top_p, seed, stop,
presence_penalty, frequency_penalty; the others (num_ctx, top_k, repeat_penalty, mirostat ...) are Ollama's
runtime settings and are ignored, as Ollama ignores options a model does not use. `format` ("json" or a JSON
schema) constrains the reply; `tools` work on any model; `images` are refused.
"""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from localpers.serve import openai_extra as extra
from localpers.serve import server as S

router = APIRouter()
OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
           "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


class OllamaChat(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    format: StrictStr | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: StrictBool = True
    keep_alive: Any = None
    think: Any = None


class OllamaGenerate(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    prompt: StrictStr = ""
    system: StrictStr | None = None
    format: StrictStr | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: StrictBool = True
    raw: StrictBool = False
    suffix: StrictStr | None = None
    images: list | None = None
    keep_alive: Any = None


class OllamaShow(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    name: StrictStr | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _sampling(options: dict | None, fmt) -> dict:
    body = {}
    for key, field in OPTIONS.items():
        value = (options or {}).get(key)
        if value is None:
            continue
        if key == "stop":
            if not isinstance(value, (str, list)):
                S.refuse("options.stop", "must be a string or a list of strings")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            S.refuse(f"options.{key}", "must be a finite number")  # (Python's JSON reads Infinity and NaN)
        if key == "num_predict":
            if value < 0:
                continue  # -1: until the end (localpers' default limit applies)
            value = max(int(value), 1)
        if key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = float(value)
        body[field] = value
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {"type": "json_object", "schema": fmt}
    elif fmt not in (None, ""):
        S.refuse("format", "must be \"json\" or a JSON schema")
    return body


def _finite(value: int | float) -> bool:
    """A number a float holds: not NaN, not infinite, not an integer beyond floats (10**400)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _messages(messages: list[dict]) -> list[dict]:
    """Ollama's messages as OpenAI's (tool calls get ids; their arguments, objects in Ollama, become JSON text)."""
    out, pending = [], []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  and isinstance(c["function"].get("name"), str) for c in calls):
            S.refuse(f"messages.{i}.tool_calls", "each tool call needs a function with a string name")
        if m.get("images"):
            S.refuse(f"messages.{i}.images", "images are not supported")
        msg = {"role": m.get("role"), "content": m.get("content", "")}
        if m.get("role") == "user" and isinstance(m.get("name"), str):  # a group chat's speaker, as in chat
            msg["name"] = m["name"]
        if calls:
            msg["tool_calls"] = [{"id": f"call_{i}_{k}", "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.dumps(c["function"].get("arguments", {}))}}
                for k, c in enumerate(calls)]
            pending = [(c["id"], c["function"]["name"]) for c in msg["tool_calls"]]
        if m.get("tool_name"):
            msg["name"] = m["tool_name"]
        if m.get("role") == "tool" and out and pending:  # Ollama's results name the tool, not the call
            match = next((p for p in pending if p[1] == m.get("tool_name")), pending[0])
            pending.remove(match)
            msg["tool_call_id"] = match[0]
        out.append(msg)
    return out


def _counts(out: dict, started: float) -> dict:
    total = int((time.monotonic() - started) * 1e9)
    return {"total_duration": total, "load_duration": 0, "prompt_eval_count": out["prompt_tokens"],
            "prompt_eval_duration": 0, "eval_count": out["completion_tokens"], "eval_duration": total}


def _object(arguments: str):
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:  # a model's own tool-call text (native templates) may not be JSON
        return arguments


def _ollama_message(choice: dict) -> dict:
    message = {"role": "assistant", "content": choice["message"].get("content") or ""}
    if choice["message"].get("tool_calls"):
        message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                               "arguments": _object(c["function"]["arguments"])}}
                                 for c in choice["message"]["tool_calls"]]
    return message


async def _serve(request: Request, body: dict, model: str, shape):
    """Run a chat body through the pipeline; `shape(message dict, done, extra)` makes each NDJSON object."""
    chat = extra.chat_request_of(body)
    prepared = await extra.prepare_chat(request.app, request, chat)
    started = time.monotonic()

    if not chat.stream:
        out, left = await extra.whole(request, prepared.work, prepared.artifacts)
        if left is not None:
            return left
        choice = prepared.plan.parse(out["choices"][0]["text"], out["choices"][0]["finish_reason"])
        return shape(_ollama_message(choice), True, {"done_reason": choice["finish_reason"], **_counts(out, started)})

    async def lines():
        buffered = prepared.plan.mode != "none"
        async for ev in extra.generation(request, prepared.work):
            if ev[0] == "error":
                if ev[1] is not None:
                    yield json.dumps({"error": ev[1]["error"]["message"]}) + "\n"
                return
            if ev[0] == "done":
                out = ev[1]
                break
            if not buffered:
                yield json.dumps(shape({"role": "assistant", "content": ev[2]}, False, {}), ensure_ascii=False) + "\n"
        choice = prepared.plan.parse(out["choices"][0]["text"], out["choices"][0]["finish_reason"])
        last = _ollama_message(choice) if buffered else {"role": "assistant", "content": ""}
        yield json.dumps(shape(last, True, {"done_reason": choice["finish_reason"], **_counts(out, started)}),
                         ensure_ascii=False) + "\n"

    return S.PinnedStream(lines(), prepared.artifacts, media_type="application/x-ndjson")


NDJSON = {200: {"content": {"application/json": {}, "application/x-ndjson": {}}}}


@router.post("/api/chat", responses={**S.ERRORS, **NDJSON})
async def ollama_chat(req: OllamaChat, request: Request):
    extra.check_text(req)
    if not req.messages:  # Ollama loads the model and answers done
        return {"model": req.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    body = {"model": req.model, "messages": _messages(req.messages), "stream": req.stream,
            **_sampling(req.options, req.format)}
    if req.tools:
        body["tools"] = req.tools
    return await _serve(request, body, req.model, lambda message, done, more: {
        "model": req.model, "created_at": _now(), "message": message, "done": done, **more})


@router.post("/api/generate", responses={**S.ERRORS, **NDJSON})
async def ollama_generate(req: OllamaGenerate, request: Request):
    extra.check_text(req)
    if req.images:
        S.refuse("images", "images are not supported")
    if req.suffix:
        S.refuse("suffix", "insertion (fill-in-the-middle) is not supported")
    if req.raw:
        S.refuse("raw", "raw prompts are served by /v1/completions")
    if not req.prompt:
        return {"model": req.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": "user", "content": req.prompt}]
    body = {"model": req.model, "messages": messages, "stream": req.stream, **_sampling(req.options, req.format)}
    return await _serve(request, body, req.model, lambda message, done, more: {
        "model": req.model, "created_at": _now(), "response": message.get("content", ""), "done": done, **more})


def _details(engine) -> dict:
    meta = engine.llm.metadata
    return {"parent_model": "", "format": "gguf", "family": meta.get("general.architecture", ""),
            "families": [meta.get("general.architecture", "")],
            "parameter_size": meta.get("general.size_label", ""),
            "quantization_level": engine.model_path.stem.rsplit(".", 1)[-1]}


@router.get("/api/tags", responses=S.ERRORS)
def ollama_tags(request: Request):
    app = request.app
    engine = S.ready_engine_of(app)
    size = engine.model_path.stat().st_size
    digest = extra.model_sha256(engine.model_path)
    modified = datetime.fromtimestamp(engine.model_path.stat().st_mtime, timezone.utc).isoformat()
    return {"models": [{"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest,
                        "details": _details(engine)} for name in extra.served_names(app, engine)]}


@router.post("/api/show", responses=S.ERRORS)
def ollama_show(req: OllamaShow, request: Request):
    app = request.app
    engine = S.ready_engine_of(app)
    extra.request_user(app, request, req.model or req.name, None)  # the strict-name check
    meta = engine.llm.metadata
    return {"modelfile": f"FROM {engine.model_path.name}\n", "parameters": "", "template": engine.chat_template or "",
            "details": _details(engine),
            "model_info": {k: v for k, v in meta.items() if k != "tokenizer.chat_template"},
            "capabilities": ["completion", "tools", "embedding"], "modified_at": _now()}


@router.get("/api/version")
def ollama_version():
    from localpers import __version__

    return {"version": __version__}
