"""Tool use on every model: llama.cpp's generic tool-call format for chat templates without tool support.

Source: llama.cpp common/chat.cpp (common_chat_params_init_generic) and minja's tool polyfills, which llama-server
uses for any template that does not render `tools`:
- a system message describes the tools (their JSON schemas) and says to answer in JSON, either
  {"tool_call": {"name", "arguments"}} (or {"tool_calls": [...]} with parallel calls) or {"response": "..."};
- the reply is constrained by a GBNF grammar made from that JSON schema (llama-cpp-python's port of llama.cpp's
  json_schema_to_grammar), so it always parses; tool_choice "required" or a named function drops the `response`
  alternative (and the other functions), "none" serves the conversation without tools;
- earlier assistant tool calls become their JSON in the assistant's content, and `tool` result messages become
  user messages {"tool_response": {"tool": name, "tool_call_id", "content"}}.
Templates that render `tools` themselves (Hermes-style <tool_call> blocks) get the tools through the template
under tool_choice "auto"; "required" and named choices use the generic grammar on them too.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from localpers.engine.engine import message_of

GENERIC_INSTRUCTION = ("Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
                       "reply to the user's request")


# llama.cpp's JSON string character (common/json-schema-to-grammar.cpp, grammars/json.gbnf): no raw control
# character (U+0000-U+001F, DEL); JSON's "\/" escape is kept. llama-cpp-python 0.3's port of the converter still
# has the older `[^"\\]`, which lets a raw newline into a string, and the reply then does not parse
# (tests/test_serve_protocol.py::test_json_strings_never_hold_raw_control_characters).
JSON_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def json_grammar(schema: dict) -> str:
    """The GBNF grammar whose sentences are the JSON texts that `schema` (a JSON schema; {} for any JSON value
    of the object kind llama-server's json mode gives) accepts, as llama-server builds it. Raises ValueError
    (or the converter's own errors) for a schema llama.cpp's converter does not support."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if not schema:
        return JSON_GBNF
    return re.sub(r"^char ::= .*$", lambda _: JSON_CHAR_RULE, json_schema_to_gbnf(json.dumps(schema)),
                  flags=re.MULTILINE)


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def generic_schema(tools: list[dict], required: bool, parallel: bool, response_schema: dict | None = None) -> dict:
    """The JSON schema a generic-format reply must match (common_chat_params_init_generic's, as llama.cpp builds
    it): a tool call (one of `tools`, its arguments matching the function's parameters), or, unless `required`, a
    {"response": ...} object (a string, or `response_schema` when the request asks for structured output)."""
    calls = []
    for tool in tools:
        fn = tool["function"]
        schema = {"type": "object",
                  "properties": {"name": {"type": "string", "const": fn["name"]},
                                 "arguments": fn.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"]}
        if fn.get("description"):
            schema["description"] = fn["description"]
        calls.append(schema)
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if parallel:
        call = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
                "required": ["tool_calls"]}
    else:
        call = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}
    if required:
        return call
    response = {"type": "object", "properties": {"response": response_schema or {"type": "string"}},
                "required": ["response"]}
    return {"anyOf": [call, response]}


def tools_prompt(tools: list[dict], parallel: bool) -> str:
    """The system text that describes the tools (minja's polyfill_tools, with the generic format's example)."""
    example = ({"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}}]} if parallel
               else {"tool_call": {"name": "tool_name", "arguments": {"arg1": "some_value"}}})
    return ("You can call any of the following tools to satisfy the user's requests: "
            + json.dumps([t["function"] for t in tools], indent=2, ensure_ascii=False)
            + "\n\nExample tool call syntax:\n\n" + json.dumps(example, ensure_ascii=False) + "\n\n"
            + GENERIC_INSTRUCTION)


def polyfill_messages(messages: list[dict]) -> list[dict]:
    """The conversation for a template without tool support: assistant tool calls as their JSON in the content,
    `tool` messages as user messages carrying {"tool_response": ...} (minja's polyfill_tool_responses)."""
    out, names = [], {}
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m.pop("tool_calls"):
                names[c.get("id")] = c["function"]["name"]
                calls.append({"name": c["function"]["name"], "arguments": c["function"]["arguments"], "id": c.get("id")})
            body = {"tool_calls": calls}
            if m.get("content"):
                body["content"] = m["content"]
            m["content"] = json.dumps(body, ensure_ascii=False)
        if m["role"] == "tool":
            response = {"tool": m.pop("name", None) or names.get(m.get("tool_call_id"), ""),
                        "content": m.get("content", "")}
            if m.get("tool_call_id"):
                response["tool_call_id"] = m.pop("tool_call_id")
            m = {"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)}
        m.pop("tool_call_id", None)
        out.append(m)
    return out


def add_system(messages: list[dict], text: str) -> list[dict]:
    """`text` joined to the conversation's system message (or a new one before it), as common_chat's add_system."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": (messages[0]["content"] + "\n\n" + text).strip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


@dataclass
class ToolPlan:
    """How one request uses tools. mode: "none" (plain chat), "native" (the template renders `tools`, replies
    are parsed for <tool_call> blocks) or "generic" (the JSON format above, grammar-constrained).
    `template_tools` goes to the chat template, `grammar` (GBNF) replaces the response_format grammar."""
    mode: str = "none"
    template_tools: list | None = None
    grammar: str | None = None
    response_json: bool = False   # generic with a response schema: the response is JSON, returned as its text
    parallel: bool = False

    def prepare(self, messages: list[dict], tools_ok: bool, tools: list[dict]) -> list[dict]:
        """The conversation as the template receives it."""
        if self.mode == "generic":
            return add_system(polyfill_messages(messages), tools_prompt(tools, self.parallel))
        if not tools_ok:
            return polyfill_messages(messages)
        return messages

    def parse(self, text: str, finish_reason: str) -> dict:
        """The choice's {"message", "finish_reason"} from the generated text."""
        if self.mode == "native":
            return message_of(text, finish_reason, True)
        if self.mode != "generic":
            return message_of(text, finish_reason, False)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # cut by max_tokens (or a stop string) before the JSON closed
            return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        calls = data.get("tool_calls") or ([data["tool_call"]] if "tool_call" in data else [])
        if calls:
            return {"message": {"role": "assistant", "content": None, "tool_calls": [
                {"id": c.get("id") or _call_id(), "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
                for c in calls]}, "finish_reason": "tool_calls"}
        response = data.get("response", "")
        content = response if isinstance(response, str) and not self.response_json else json.dumps(response)
        return {"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}


def plan(tools: list[dict] | None, tool_choice, parallel: bool | None, tools_ok: bool,
         response_schema: dict | None, refuse) -> ToolPlan:
    """The ToolPlan of a request. `tool_choice`: None | "none" | "auto" | "required" | {"type": "function",
    "function": {"name"}}; `refuse(param, message)` raises the 400 for a choice naming no given tool."""
    if not tools or tool_choice == "none":
        return ToolPlan()
    chosen = tools
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            refuse("tool_choice", f"names the function {name!r}, which is not among 'tools'")
    required = tool_choice not in (None, "auto")
    if tools_ok and not required and response_schema is None:
        return ToolPlan(mode="native", template_tools=tools)
    schema = generic_schema(chosen, required, bool(parallel), response_schema)
    try:
        grammar = json_grammar(schema)
    except Exception as e:  # the converter raises assorted errors for schemas it does not support
        refuse("tools", f"llama.cpp cannot turn these functions' parameters into a grammar ({e})")
    return ToolPlan(mode="generic", grammar=grammar, response_json=response_schema is not None,
                    parallel=bool(parallel))
