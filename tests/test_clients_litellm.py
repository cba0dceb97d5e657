"""litellm against localpers (its `openai/` provider with api_base), unchanged: chat, streaming, structured
output and tool use on the default model, personalized in each of the three ways."""
import json
import os

import pytest

from clients_helpers import CITY_SCHEMA, HEADER, WAYS, WEATHER, model_for, server_fixture, stored

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")
litellm = pytest.importorskip("litellm")

server = server_fixture()


@pytest.mark.parametrize("way", WAYS)
def test_chat_stream_structured_tools_served_as_the_user(server, way):
    user = f"ll-{way}"
    kw = dict(model="openai/" + model_for(way, user, "gpt-4o-mini"), api_base=server.url + "/v1",
              api_key="unused", temperature=0, max_tokens=40, num_retries=0)
    if way == "field":
        kw["user"] = user
    if way == "header":
        kw["extra_headers"] = {HEADER: user}
    said = f"Hello from litellm ({way})"
    reply = litellm.completion(messages=[{"role": "user", "content": said}], **kw)
    text = reply.choices[0].message.content
    assert text
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(
        messages=[{"role": "user", "content": said}], stream=True, **kw) if c.choices)
    assert streamed == text
    structured = litellm.completion(messages=[{"role": "user", "content": "Where is the Eiffel Tower?"}],
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "city", "schema": CITY_SCHEMA, "strict": True}}, **kw)
    assert set(json.loads(structured.choices[0].message.content)) == {"city", "country"}
    calls = litellm.completion(messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                               tools=[WEATHER], tool_choice="required", **kw).choices[0].message.tool_calls
    assert calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments)
    assert said in stored(server.store, user)
