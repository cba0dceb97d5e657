"""OpenAI's Responses API (POST /v1/responses, GET /v1/responses/{id}) over the chat pipeline.

`input` (a string or a list of message / function_call / function_call_output items) and `instructions` become a
chat conversation, served by localpers.serve.openai_extra.prepare_chat: composed for the user like every route,
with function tools (llama.cpp's generic format where the template has none). The reply is a `response` object
whose `output` holds a message item (output_text) or function_call items; with `stream` the server sends
Responses' named SSE events (response.created ... response.output_text.delta ... response.completed).
`previous_response_id` continues a stored response: with `store` (the default, as on OpenAI) the conversation
of each response is kept, readable only by the same user: a user's in their store (the newest
names.MAX_KEPT_RESPONSES; across restarts; in their export; deleted by forget, and with a deleted message they
hold), unless their history is off
(--no-history, "localpers": {"history": false}); then, and for requests naming no user, in the server's memory
(the last MAX_KEPT; not across restarts).
Refused with a 400 naming them: reasoning, background, include, conversation, prompt templates, top_logprobs,
max_tool_calls, truncation "auto", non-function tools, image/file/audio input.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from localpers import names
from localpers.errors import UserError
from localpers.serve import openai_extra as extra
from localpers.serve import server as S

MAX_KEPT = 1000  # responses kept in the server's memory (no user, or their history off)
log = logging.getLogger(__name__)
router = APIRouter()
_kept: OrderedDict[str, tuple[str | None, list[dict]]] = OrderedDict()
_kept_lock = threading.Lock()


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: StrictStr | list[dict[str, Any]] = Field(min_length=1)
    model: StrictStr | None = None
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, ge=0, le=1)
    stream: StrictBool | None = None
    store: StrictBool | None = None
    text: dict[str, Any] | None = None
    user: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    truncation: StrictStr | None = None
    localpers: S.LocalpersOptions | None = None


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        S.refuse(where, "must be a string or a list of content parts")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            S.refuse(f"{where}.{k}", f"content of type {kind!r} is not supported (text only)")
        parts.append(part.get("text", ""))
    return "".join(parts)


def input_messages(items) -> list[dict]:
    """`input` as OpenAI chat messages (function calls as assistant tool_calls, their outputs as tool messages)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if not isinstance(item.get("content", ""), (str, list)) or not isinstance(item.get("output", ""), (str, list, dict)):
            S.refuse(f"input.{i}", "content must be text or a list of content parts")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                S.refuse(f"input.{i}.role", f"unknown role {role!r}")
            out.append({"role": role, "content": _text_of(item.get("content", ""), f"input.{i}.content"),
                        # a group chat's speaker: only the user's own messages are learned and personalized
                        **({"name": item["name"]} if role == "user" and isinstance(item.get("name"), str) else {})})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments", "{}"), str):
                S.refuse(f"input.{i}", "a function_call item needs a string 'name' and 'arguments'")
            call = {"id": str(item.get("call_id") or item.get("id") or "call_" + uuid.uuid4().hex[:24]),
                    "type": "function", "function": {"name": item["name"],
                                                     "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            S.refuse(f"input.{i}.type", f"input items of type {kind!r} are not supported")
    return out


def chat_request(req: ResponsesRequest, history: list[dict]) -> S.ChatRequest:
    """The chat-completions request a Responses request is served as."""
    extra_fields = req.model_extra or {}
    for name in ("reasoning", "include", "conversation", "prompt", "top_logprobs", "max_tool_calls",
                 "background"):
        if extra_fields.get(name):
            S.refuse(name, "is not supported by localpers")
    if req.truncation not in (None, "disabled"):
        S.refuse("truncation", "only 'disabled' is supported (a prompt over the context is refused)")
    tools = []
    for k, tool in enumerate(req.tools or ()):
        if tool.get("type") != "function":
            S.refuse(f"tools.{k}.type", f"tools of type {tool.get('type')!r} are not supported (function only)")
        if not isinstance(tool.get("name"), str):
            S.refuse(f"tools.{k}.name", "a function tool needs a string 'name'")
        tools.append({"type": "function", "function": {key: tool[key] for key in
                                                       ("name", "description", "parameters", "strict") if key in tool}})
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            S.refuse("tool_choice", "only 'none', 'auto', 'required' and function choices are supported")
        choice = {"type": "function", "function": {"name": choice.get("name", "")}}
    body: dict[str, Any] = {
        "messages": ([{"role": "system", "content": req.instructions}] if req.instructions else [])
        + history + input_messages(req.input),
        "model": req.model, "max_tokens": req.max_output_tokens, "user": req.user,
        "temperature": None if req.temperature is None else float(req.temperature),
        "top_p": None if req.top_p is None else float(req.top_p), "stream": req.stream,
        "tools": tools or None, "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls,
        "localpers": req.localpers.model_dump() if req.localpers else None}
    fmt = (req.text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        S.refuse("text.format", "must be an object such as {\"type\": \"json_schema\", \"schema\": {...}}")
    if fmt:
        if fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                key: fmt[key] for key in ("name", "description", "schema", "strict") if key in fmt}}
        else:
            body["response_format"] = {"type": fmt.get("type")}
    return extra.chat_request_of({k: v for k, v in body.items() if v is not None})


def output_items(choice: dict) -> list[dict]:
    """A parsed chat choice ({"message", "finish_reason"}) as Responses output items."""
    message = choice["message"]
    items = []
    if message.get("content"):
        items.append({"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": message["content"], "annotations": [],
                                   "logprobs": []}]})
    for call in message.get("tool_calls") or ():
        items.append({"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def response_object(rid: str, req: ResponsesRequest, model: str, output: list[dict], out: dict | None,
                    status: str, finish_reason: str | None = None, explanation: dict | None = None) -> dict:
    usage = None
    if out is not None:
        usage = {"input_tokens": out["prompt_tokens"], "output_tokens": out["completion_tokens"],
                 "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
                 "input_tokens_details": {"cached_tokens": out.get("cached_tokens", 0)},
                 "output_tokens_details": {"reasoning_tokens": 0}}
    body = {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "model": model, "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
            "instructions": req.instructions, "previous_response_id": req.previous_response_id,
            "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
            "parallel_tool_calls": bool(req.parallel_tool_calls), "temperature": req.temperature,
            "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "text": req.text or {"format": {"type": "text"}}, "truncation": req.truncation or "disabled",
            "store": req.store is not False}
    if explanation:
        body["localpers"] = explanation
    return body


def keep(store, rid: str, user: str | None, messages: list[dict], in_store: bool) -> None:
    """Keep a response's conversation: in the user's store when `in_store` (their history is on), else (or when
    the store refuses the write: a full disk) in the server's memory."""
    if user and in_store:
        try:
            store.keep_response(user, rid, messages)
            return
        except (UserError, sqlite3.Error, OSError) as e:
            log.warning("response kept in memory only, not in %r's store: %s: %s", user, type(e).__name__, e)
    with _kept_lock:
        _kept[rid] = (user, messages)
        while len(_kept) > MAX_KEPT:
            _kept.popitem(last=False)


def kept(store, rid: str, user: str | None) -> list[dict]:
    """The conversation of the user's response `rid` (their store first, then the server's memory), else 404."""
    found = None
    if user:
        try:
            found = store.response_conversation(user, rid)
        except UserError:  # a user id the store cannot hold keeps nothing there
            found = None
    if found is not None:
        return found
    with _kept_lock:
        held = _kept.get(rid)
    if held is None or held[0] != user:
        raise S.APIError(404, f"no stored response {rid!r} (a response is kept for the same user only: in their "
                              f"store, the newest {names.MAX_KEPT_RESPONSES}; with history off or no user, in "
                              f"the server's memory until it restarts)", code="response_not_found",
                         param="previous_response_id")
    return held[1]


def conversation_after(req_messages: list[dict], choice: dict) -> list[dict]:
    """The conversation a later previous_response_id continues: the request's messages (without the
    instructions) and the reply."""
    message = {k: v for k, v in choice["message"].items() if v is not None}
    return [m for m in req_messages if m["role"] != "system"] + [message]


@router.post("/v1/responses", responses={**S.ERRORS, **extra.SSE})
async def create_response(req: ResponsesRequest, request: Request):
    app = request.app
    extra.check_text(req)  # the whole request: fields it only echoes back (metadata, tools) too
    S.ready_engine_of(app)
    user = extra.request_user(app, request, req.model, req.user)
    history = kept(app.state.store, req.previous_response_id, user) if req.previous_response_id else []
    chat = chat_request(req, history)
    if user and not chat.user:
        chat.user = user
    prepared = await extra.prepare_chat(app, request, chat)
    conversation = [m.model_dump(exclude_none=True) for m in chat.messages]
    rid, model = "resp_" + uuid.uuid4().hex, prepared.engine.model_name

    in_store = bool(app.state.history and (req.localpers or S.LocalpersOptions()).history)

    async def finish(out) -> tuple[dict, list[dict], str]:
        choice = prepared.plan.parse(out["choices"][0]["text"], out["choices"][0]["finish_reason"])
        if req.store is not False:
            await run_in_threadpool(keep, app.state.store, rid, prepared.user,
                                    conversation_after(conversation, choice), in_store)
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        return choice, output_items(choice), status

    if not req.stream:
        out, left = await extra.whole(request, prepared.work, prepared.artifacts)
        if left is not None:
            return left
        choice, items, status = await finish(out)
        return response_object(rid, req, model, items, out, status, choice["finish_reason"], prepared.explanation)

    async def events():
        seq = 0

        def event(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields}, ensure_ascii=False)}\n\n"

        shell = response_object(rid, req, model, [], None, "in_progress")
        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        buffered = prepared.plan.mode != "none"
        msg_id, text, opened = "msg_" + uuid.uuid4().hex, "", False
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        async for ev in extra.generation(request, prepared.work):
            if ev[0] == "error":
                if ev[1] is not None:
                    yield event("error", code=ev[1]["error"]["code"], message=ev[1]["error"]["message"], param=None)
                return
            if ev[0] == "done":
                out = ev[1]
                break
            if buffered:
                continue
            if not opened:
                opened = True
                yield event("response.output_item.added", output_index=0, item={
                    "type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []})
                yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                            part=part)
            text += ev[2]
            yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                        delta=ev[2], logprobs=[])
        choice, items, status = await finish(out)
        if not buffered:
            items = [{"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                      "content": [{**part, "text": text}]}]
            if not opened:
                yield event("response.output_item.added", output_index=0, item={**items[0], "content": [],
                                                                                   "status": "in_progress"})
                yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                            part=part)
            yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text,
                        logprobs=[])
            yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0,
                        part={**part, "text": text})
            yield event("response.output_item.done", output_index=0, item=items[0])
        else:
            for k, item in enumerate(items):
                yield event("response.output_item.added", output_index=k, item={**item, "status": "in_progress",
                                                                                   **({"arguments": ""} if item["type"] == "function_call" else {"content": []})})
                if item["type"] == "function_call":
                    yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=k,
                                delta=item["arguments"])
                    yield event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                                arguments=item["arguments"], name=item["name"])
                else:
                    content = item["content"][0]
                    yield event("response.content_part.added", item_id=item["id"], output_index=k,
                                content_index=0, part={**content, "text": ""})
                    yield event("response.output_text.delta", item_id=item["id"], output_index=k, content_index=0,
                                delta=content["text"], logprobs=[])
                    yield event("response.output_text.done", item_id=item["id"], output_index=k, content_index=0,
                                text=content["text"], logprobs=[])
                    yield event("response.content_part.done", item_id=item["id"], output_index=k,
                                content_index=0, part=content)
                yield event("response.output_item.done", output_index=k, item=item)
        final = response_object(rid, req, model, items, out, status, choice["finish_reason"], prepared.explanation)
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)

    return S.PinnedStream(events(), prepared.artifacts, media_type="text/event-stream")
