"""The openai SDK against localpers, unchanged: chat, streaming, structured output and tool use on the default
model (whose template has no tool support), personalized for a user in each of the three ways."""
import json

import pytest
from clients_helpers import City, CITY_SCHEMA, HEADER, WAYS, WEATHER, clients_server, model_for, server_fixture, stored

openai = pytest.importorskip("openai")

server = server_fixture()


def sdk(server, way=None, user=None, v1=True):
    headers = {HEADER: user} if way == "header" else None
    return openai.OpenAI(base_url=server.url + ("/v1" if v1 else ""), api_key="unused", max_retries=0,
                         default_headers=headers)


@pytest.mark.parametrize("way", WAYS)
def test_chat_stream_structured_tools_served_as_the_user(server, way):
    user = f"ann-{way}"
    client = sdk(server, way, user)
    kw = dict(model=model_for(way, user, server.engine.model_name), temperature=0)
    if way == "field":
        kw["user"] = user
    said = f"Hello from the openai SDK ({way})"
    reply = client.chat.completions.create(messages=[{"role": "user", "content": said}], max_tokens=6, **kw)
    assert reply.choices[0].message.content and reply.system_fingerprint
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": said}], max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the usage chunk has none
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    parsed = client.chat.completions.parse(messages=[{"role": "user", "content": "Where is the Eiffel Tower?"}],
                                           response_format=City, max_tokens=40, **kw)
    assert isinstance(parsed.choices[0].message.parsed, City)
    calls = client.chat.completions.create(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", max_tokens=40, **kw).choices[0].message.tool_calls
    assert calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments)
    assert said in stored(server.store, user)


def test_tool_use_round_trip_streamed_and_named(server):
    client = sdk(server)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=ask, tools=[WEATHER], temperature=0,
                                                 tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                 max_tokens=40, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather",
                                                              "arguments": deltas[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": "sunny, 24 C"}]
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=history, tools=[WEATHER], temperature=0,
                                            tool_choice="none", max_tokens=12)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_structured_output_json_schema_without_name_and_json_object_with_schema(server):
    client = sdk(server)
    ask = [{"role": "user", "content": "Name a city."}]
    for fmt in ({"type": "json_schema", "json_schema": {"schema": CITY_SCHEMA}},
                {"type": "json_object", "schema": CITY_SCHEMA}):
        text = client.chat.completions.create(model="x", messages=ask, response_format=fmt, max_tokens=40,
                                              temperature=0).choices[0].message.content
        assert set(json.loads(text)) == {"city", "country"}


def test_owner_serves_requests_naming_nobody_and_user_wins(tmp_path):
    with clients_server(tmp_path, owner="olga") as owned:
        client = sdk(owned)
        client.chat.completions.create(model="localpers", messages=[{"role": "user", "content": "Owner's words"}],
                                       max_tokens=2)
        client.chat.completions.create(model="localpers", user="amy", max_tokens=2,
                                       messages=[{"role": "user", "content": "Amy's words"}])
        assert stored(owned.store, "olga") == ["Owner's words"] and stored(owned.store, "amy") == ["Amy's words"]


def test_each_way_serves_the_users_adapter(tmp_path):
    """The oracle of personalization: a user's LoRA adapter changes greedy replies; each way of naming the user
    gives the reply that `user` gives, and it differs from the base model's."""
    from serve_helpers import make_users

    with clients_server(tmp_path / "d") as s:
        make_users(s.engine, s.store, tmp_path)
        ask = [{"role": "user", "content": "Describe your ideal weekend."}]

        def reply(way=None, user=None):
            kw = {"user": user} if way == "field" else {}
            return sdk(s, way, user).chat.completions.create(
                model=model_for(way, user, "localpers") if way else "localpers", messages=ask, max_tokens=12,
                temperature=0, extra_body={"localpers": {"history": False}}, **kw).choices[0].message.content

        base, ben = reply(), reply("field", "ben")
        assert ben != base
        assert reply("header", "ben") == ben and reply("model", "ben") == ben
