"""Each endpoint and field of issue #26 with the client that uses it (the openai SDK; httpx for Ollama's NDJSON):
routes without /v1, model names, /v1/models/{id}, /v1/completions, /v1/embeddings, /v1/responses, Ollama's /api/*,
system_fingerprint, cached_tokens, streamed logprobs, context_length_exceeded, the refused OpenAI fields."""
import json

import httpx
import numpy as np
import pytest

from clients_helpers import HEADER, WEATHER, clients_server, server_fixture, stored

openai = pytest.importorskip("openai")
ASK = [{"role": "user", "content": "What is the capital of France?"}]


server = server_fixture(aliases=("my-model",))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_routes_without_v1_and_any_model_name(server, client):
    bare = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    for c in (bare, client):
        assert c.chat.completions.create(model="gpt-3.5-turbo", messages=ASK, max_tokens=2).choices
    ids = [m.id for m in bare.models.list()]
    assert ids[:3] == [server.engine.model_name, "my-model", "localpers"]
    assert f"{server.engine.model_name}-embedding" in ids
    assert client.models.retrieve(server.engine.model_name).id == server.engine.model_name
    assert client.models.retrieve("gpt-4").id == "gpt-4"  # any name is served


def test_users_are_listed_as_models(server, client):
    client.chat.completions.create(model="localpers", user="zoe", messages=ASK, max_tokens=1)
    assert "zoe@localpers" in [m.id for m in client.models.list()]


def test_strict_model_names_refuse_unknown_names(tmp_path):
    with clients_server(tmp_path, strict_model_names=True) as s:
        strict = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            strict.chat.completions.create(model="gpt-4", messages=ASK, max_tokens=1)
        with pytest.raises(openai.NotFoundError):
            strict.models.retrieve("gpt-4")
        assert strict.chat.completions.create(model="zoe@localpers", messages=ASK, max_tokens=1).choices


def test_api_key_covers_routes_without_v1_and_ollama(tmp_path):
    with clients_server(tmp_path, api_key="k") as s:
        for path in ("/models", "/v1/models", "/api/tags"):
            assert httpx.get(s.url + path).status_code == 401
        assert httpx.get(s.url + "/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_fingerprint_cached_tokens_and_streamed_logprobs(client):
    system = {"role": "system", "content": "You are a helpful assistant. " * 40}
    first = client.chat.completions.create(model="x", messages=[system, *ASK], max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="x", messages=[system, *ASK], max_tokens=2, temperature=0)
    assert first.system_fingerprint == again.system_fingerprint and first.system_fingerprint.startswith("b")
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the KV cache held the prompt
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="x", messages=ASK, max_tokens=6, temperature=0, stream=True,
                                                 logprobs=True, top_logprobs=2))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(t.token for t in tokens) == text and len(tokens) == 6
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)


def test_context_length_exceeded(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 3000}])
    error = e.value.body
    assert error["code"] == "context_length_exceeded" and error["n_ctx"] == server.engine.n_ctx
    assert error["n_prompt_tokens"] > server.engine.n_ctx


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}), ("store", True),
    ("metadata", {"a": "b"}), ("functions", [WEATHER["function"]]), ("reasoning_effort", "high"),
    ("verbosity", "low"), ("service_tier", "flex"), ("prompt_cache_retention", "24h"),
])
def test_unsupported_openai_fields_are_400_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=ASK, max_tokens=1, extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_honoured_optional_fields(client):
    reply = client.chat.completions.create(model="x", messages=ASK, max_tokens=1, store=False, modalities=["text"],
                                           service_tier="auto", prompt_cache_key="k", safety_identifier="sid")
    assert reply.choices


@pytest.mark.parametrize("messages, param", [
    ([*ASK, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "messages.2"),
    ([*ASK, {"role": "tool", "tool_call_id": "c1", "content": "42"}], "messages.1"),
    ([*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c2", "content": "42"}], "messages.2.tool_call_id"),
])
def test_malformed_conversations_are_400(client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=messages, max_tokens=1)
    assert e.value.body["param"] == param


def test_tool_choice_naming_no_tool_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], max_tokens=1,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_parallel_tool_calls_and_auto(client):
    reply = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=True, max_tokens=60, temperature=0)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and calls and all(c.id for c in calls)
    auto = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0)
    message = auto.choices[0].message
    assert (message.tool_calls and auto.choices[0].finish_reason == "tool_calls") or \
        (message.content and not message.content.lstrip().startswith("{"))  # an answer is unwrapped from JSON


def test_completions(client):
    one = client.completions.create(model="x", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert one.object == "text_completion" and one.choices[0].text and one.system_fingerprint
    many = client.completions.create(model="x", prompt=["One", "Two"], max_tokens=2, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == one.choices[0].text
    echoed = client.completions.create(model="x", prompt="Hello", max_tokens=2, echo=True, logprobs=1,
                                       temperature=0)
    assert echoed.choices[0].text.startswith("Hello") and len(echoed.choices[0].logprobs.tokens) == 2
    assert client.completions.create(model="x", prompt=[1, 2, 3], max_tokens=1).choices
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="x", prompt="x", suffix="y", max_tokens=1)


def test_completions_are_personalized(server, client):
    from serve_helpers import make_users

    make_users(server.engine, server.store, server.store.directory)
    kw = dict(model="x", prompt="My ideal weekend is", max_tokens=8, temperature=0)
    assert client.completions.create(user="ben", **kw).choices[0].text != client.completions.create(
        **kw).choices[0].text


def test_embeddings(client, server):
    for fmt in ({"encoding_format": "float"}, {}):  # unless told, the SDK asks for base64 and decodes it
        out = client.embeddings.create(model="text-embedding-3-small", input=["sea", "mountain"], **fmt)
        vectors = np.array([d.embedding for d in out.data])
        assert vectors.shape == (2, server.engine.n_embd) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="x", input="sea", dimensions=3)


def test_responses_text_stream_tools_and_previous_response(client):
    first = client.responses.create(model="x", input="Say hello.", max_output_tokens=8, temperature=0, user="rita")
    assert first.output_text and first.usage.input_tokens > 0
    events = list(client.responses.create(model="x", input="Say hello.", max_output_tokens=8, temperature=0,
                                          stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == first.output_text
    later = client.responses.create(model="x", input="Again.", previous_response_id=first.id, max_output_tokens=4,
                                    user="rita")
    assert later.usage.input_tokens > first.usage.input_tokens  # the earlier turn is in the prompt
    with pytest.raises(openai.NotFoundError):  # another user cannot continue rita's response
        client.responses.create(model="x", input="Again.", previous_response_id=first.id, user="sam")
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    called = client.responses.create(model="x", input="What is the weather in Paris?", tools=[tool],
                                     tool_choice="required", max_output_tokens=40, temperature=0)
    call = [o for o in called.output if o.type == "function_call"][0]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    answered = client.responses.create(model="x", previous_response_id=called.id, tools=[tool], max_output_tokens=8,
                                       input=[{"type": "function_call_output", "call_id": call.call_id,
                                               "output": "sunny"}], tool_choice="none")
    assert answered.output_text
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="x", input="hi", reasoning={"effort": "high"})


def test_ollama_routes(server):
    url = server.url
    tags = httpx.get(url + "/api/tags").json()["models"]
    assert tags[0]["name"] == server.engine.model_name and tags[0]["details"]["format"] == "gguf"
    shown = httpx.post(url + "/api/show", json={"model": tags[0]["name"]}).json()
    assert "tools" in shown["capabilities"] and shown["template"]
    body = {"model": "llama3", "messages": ASK, "options": {"num_predict": 6, "temperature": 0}}
    whole = httpx.post(url + "/api/chat", json={**body, "stream": False}, headers={HEADER: "olaf"}, timeout=60).json()
    assert whole["done"] and whole["eval_count"] == 6 and whole["message"]["content"]
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=60) as r:  # NDJSON by default
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] and lines[-1]["done_reason"] == "length"
    assert "".join(x["message"]["content"] for x in lines) == whole["message"]["content"]
    generated = httpx.post(url + "/api/generate", timeout=60, json={
        "model": "olaf@localpers", "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 4}}).json()
    assert generated["done"] and generated["response"]
    called = httpx.post(url + "/api/chat", timeout=60, json={
        "model": "x", "stream": False, "tools": [WEATHER], "format": None, "options": {"num_predict": 40, "temperature": 0},
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}).json()
    assert called["message"].get("tool_calls") or called["message"]["content"]
    structured = httpx.post(url + "/api/chat", timeout=60, json={**body, "stream": False, "format": "json",
                                                                 "options": {"num_predict": 20}}).json()
    assert structured["message"]["content"].lstrip().startswith(("{", "["))
    assert "What is the capital of France?" in stored(server.store, "olaf")
    assert "Why is the sky blue?" in stored(server.store, "olaf")


def test_owner_from_the_environment(server, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from localpers.serve.server import create_app

    monkeypatch.setenv("LOCALPERS_USER", "env-owner")
    app = create_app(engine=server.engine, data_dir=str(tmp_path))
    TestClient(app, base_url="http://localhost").post("/chat/completions", json={"messages": [
        {"role": "user", "content": "From the environment"}], "max_tokens": 1})
    assert stored(app.state.store, "env-owner") == ["From the environment"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [[]]}), ("/v1/completions", {"prompt": [10 ** 9]}), ("/v1/completions", {}),
    ("/v1/completions", {"prompt": "x", "best_of": 3}), ("/v1/embeddings", {"input": [[-1]]}),
    ("/v1/embeddings", {"input": ""}), ("/v1/responses", {"input": [{"type": "function_call", "name": 5}]}),
    ("/v1/responses", {"input": [{"role": "wizard", "content": "x"}]}),
    ("/v1/responses", {"input": "x", "tools": [{"type": "function"}]}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_none"}),
    ("/api/chat", {"model": "x", "messages": [{"role": "user", "content": 5}]}),
    ("/api/chat", {"model": "x", "messages": [{"role": "user", "content": "x", "tool_calls": [{"f": 1}]}]}),
    ("/api/chat", {"model": "x", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}),
    ("/api/chat", {"model": "x", "messages": [{"role": "user", "content": "x"}], "format": "yaml"}),
    ("/api/generate", {"model": "x", "prompt": "x", "images": ["aGk="]}),
])
def test_malformed_bodies_are_4xx(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text


def test_ollama_tool_results_answer_the_call(server):
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    r = httpx.post(server.url + "/api/chat", timeout=60, json={"model": "x", "messages": messages, "stream": False,
                                                               "tools": [WEATHER], "options": {"num_predict": 30}})
    assert r.status_code == 200 and r.json()["done"], r.text
