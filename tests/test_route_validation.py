"""Every generating route gets chat's input checks (issue #27's follow-up): /v1/completions, /v1/embeddings,
/v1/responses, Ollama's /api/chat and /api/generate answer a 400 naming the field, never a 500, for text that is not
valid Unicode (a lone surrogate), for work over the server's cap (n x max_tokens, counted up to the context) and for
ids no model holds; nothing reaches the engine. On a stand-in engine that tokenizes as llama.cpp does (UTF-8 first)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from test_store_api import RecordingEngine

JSON = {"content-type": "application/json"}
LIMIT = 4096


class TextEngine(RecordingEngine):
    """RecordingEngine with the raw-prompt side of the engine: bytes as token ids (UTF-8 first, as
    Engine.tokenize: a lone surrogate fails there), a 1,024-token context, 256 token ids."""

    n_ctx, n_vocab = 1024, 256

    def tokenize(self, text, *, add_bos=True, special=True):
        return list(text.encode("utf-8"))

    def detokenize(self, ids):
        return bytes(ids).decode("utf-8", "replace")

    def prompt_tokens(self, prompt):
        from localpers.errors import UserError

        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise UserError(f"'prompt': token ids must be in 0..{self.n_vocab - 1}")
        return tokens

    def complete(self, prompt, **kwargs):
        return {**super().complete(prompt, **kwargs), "cached_tokens": 0}


class Embedder:
    name = "fake-embedder"

    def __init__(self):
        self.embedded = []

    def embed(self, texts):
        self.embedded += [t.encode("utf-8") for t in texts]  # a real embedder encodes too
        return np.ones((len(texts), 4), dtype=np.float32)


@pytest.fixture
def app_client(tmp_path, monkeypatch):
    from localpers.serve.server import create_app

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    engine = TextEngine(model)
    app = create_app(engine=engine, data_dir=str(tmp_path / "home"), max_request_tokens=LIMIT)
    app.state.store.embedder = Embedder()
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield engine, client


def post_raw(client, path: str, body: str):
    return client.post(path, content=body.encode(), headers=JSON)


def assert_refused(r, param: str, words: str):
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"] or "").startswith(param) and words in error["message"], error


# -- lone surrogates ------------------------------------------------------------------------------------------

SURROGATES = [
    ("/v1/completions", '{"prompt": "hi \\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud83d"]}', "stop.0"),
    ("/v1/completions", '{"prompt": "hi", "user": "\\ud800"}', "user"),
    ("/v1/completions", '{"prompt": "hi", "model": "\\ud800"}', "model"),
    ("/v1/completions", '{"prompt": "hi", "metadata": {"\\ud800": 1}}', "metadata"),
    ("/v1/embeddings", '{"input": "hi \\ud800"}', "input"),
    ("/v1/embeddings", '{"input": ["ok", "\\udc80"]}', "input.1"),
    ("/v1/embeddings", '{"input": "hi", "user": "\\ud800"}', "user"),
    ("/v1/responses", '{"input": "hi \\ud800"}', "input"),
    ("/v1/responses", '{"input": "hi", "metadata": {"k": "\\ud800"}}', "metadata.k"),
    ("/v1/responses", '{"input": "hi", "instructions": "\\udfff"}', "instructions"),
    ("/v1/responses", '{"input": "hi", "previous_response_id": "\\ud800"}', "previous_response_id"),
    ("/v1/responses", '{"input": "hi", "tools": [{"type": "function", "name": "f", "x": "\\ud800"}]}', "tools.0.x"),
    ("/v1/responses", '{"input": [{"role": "user", "content": [{"type": "input_text", "text": "\\ud800"}]}]}',
     "input.0.content.0.text"),
    ("/api/chat", '{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
    ("/api/chat", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/api/chat", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"stop": ["\\udc00"]}}',
     "options.stop.0"),
    ("/api/generate", '{"model": "m", "prompt": "hi \\ud800"}', "prompt"),
    ("/api/generate", '{"model": "m", "prompt": "hi", "system": "\\ud800"}', "system"),
    ("/api/generate", '{"model": "\\udfff", "prompt": "hi"}', "model"),
]


@pytest.mark.parametrize("path, body, where", SURROGATES)
def test_a_lone_surrogate_in_any_routes_request_is_a_400_naming_the_field(app_client, path, body, where):
    engine, client = app_client
    r = post_raw(client, path, body)
    assert_refused(r, where, "not valid Unicode")
    assert engine.served == [] and client.app.state.store.embedder.embedded == []
    assert client.app.state.store.users() == []  # nothing stored either


# -- the work of one request ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, ok", [
    ("/v1/completions", {"prompt": "hi", "n": 8, "max_tokens": 10 ** 9}, False),
    ("/v1/completions", {"prompt": "hi", "n": 4, "max_tokens": 1024}, True),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "n": 1, "max_tokens": 1000}, False),  # 5 prompts
    ("/v1/completions", {"prompt": [[1, 2], [3, 4]], "n": 2, "best_of": 2, "max_tokens": 1024}, True),
    ("/v1/completions", {"prompt": [[1, 2], [3, 4]], "n": 4, "max_tokens": 1024}, False),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 10 ** 12}, True),  # one choice, bounded by the context
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"num_predict": 10 ** 30}}, True),
])
def test_the_work_cap_holds_on_every_route(app_client, path, body, ok):
    engine, client = app_client
    r = client.post(path, json=body)
    if ok:
        assert r.status_code == 200, r.text
    else:
        assert_refused(r, "max_tokens", f"limit of {LIMIT} tokens")
        assert engine.served == []


def test_the_work_cap_is_the_servers_on_responses_and_ollama(tmp_path, monkeypatch):
    """With a small --max-request-tokens, a Responses or Ollama request asking for more is refused too."""
    from localpers.serve.server import create_app

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"x")
    engine = TextEngine(model)
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path / "home"), max_request_tokens=50),
                    base_url="http://localhost", raise_server_exceptions=False) as client:
        for path, body in (("/v1/responses", {"input": "hi", "max_output_tokens": 60}),
                           ("/api/generate", {"model": "m", "prompt": "hi", "stream": False,
                                              "options": {"num_predict": 60}}),
                           ("/v1/completions", {"prompt": "hi", "max_tokens": 60})):
            assert_refused(client.post(path, json=body), "max_tokens", "limit of 50 tokens")
    assert engine.served == []


def test_embeddings_refuse_more_inputs_than_openai_takes(app_client):
    from localpers.serve.openai_extra import MAX_EMBEDDING_INPUTS

    engine, client = app_client
    r = client.post("/v1/embeddings", json={"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)})
    assert_refused(r, "input", f"at most {MAX_EMBEDDING_INPUTS} inputs")
    assert client.app.state.store.embedder.embedded == []
    assert client.post("/v1/embeddings", json={"input": ["a"] * 3}).status_code == 200


# -- ids no model holds, numbers no engine takes --------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": [10 ** 30]}, "prompt"),
    ("/v1/completions", {"prompt": [[1], [-1]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1" * 5000: 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"²": 1}}, "logit_bias"),  # a digit int() does not read
    ("/v1/completions", {"prompt": "hi", "seed": 1 << 80}, "seed"),
    ("/v1/embeddings", {"input": [10 ** 30]}, "input"),
    ("/v1/embeddings", {"input": [[1, 2], [1 << 64]]}, "input"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"9" * 5000: 1}},
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"³": 1}}, "logit_bias"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"seed": 1 << 80}},
     "seed"),
    ("/api/generate", {"model": "m", "prompt": "hi", "options": {"temperature": 10 ** 400}}, "options.temperature"),
    ("/v1/responses", {"input": "hi", "text": {"format": "json"}}, "text.format"),  # a string, not an object
])
def test_ids_and_numbers_out_of_range_are_a_400(app_client, path, body, param):
    engine, client = app_client
    r = client.post(path, content=json.dumps(body).encode(), headers=JSON)
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or "") + r.json()["error"]["message"], r.text
    assert engine.served == []


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e400"])
@pytest.mark.parametrize("option", ["num_predict", "seed", "temperature"])
def test_an_ollama_option_that_is_not_a_finite_number_is_a_400(app_client, option, value):
    """Python's JSON reads Infinity and NaN: num_predict reached int(inf), a 500."""
    engine, client = app_client
    for path, body in (("/api/chat", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                                     '"stream": false, "options": {"%s": %s}}' % (option, value)),
                       ("/api/generate", '{"model": "m", "prompt": "hi", "stream": false, '
                                         '"options": {"%s": %s}}' % (option, value))):
        r = post_raw(client, path, body)
        assert r.status_code == 400 and f"options.{option}" in r.text, r.text
    assert engine.served == []


def test_embedding_token_ids_without_text_are_named_as_such(app_client, monkeypatch):
    """Token ids that detokenize to nothing (special and control tokens: BOS, EOS, chat markers) are a 400 that
    says so, naming the input; an empty string is "empty"."""
    engine, client = app_client
    monkeypatch.setattr(engine, "detokenize", lambda ids: "".join(chr(t) for t in ids if t >= 32))
    r = client.post("/v1/embeddings", json={"input": [1, 2, 3]})
    assert_refused(r, "input", "the token ids [1, 2, 3] hold no text to embed: special or control tokens")
    r = client.post("/v1/embeddings", json={"input": [[104, 105], [2, 32]]})
    assert_refused(r, "input.1", "the token ids [2, 32] hold no text")
    assert_refused(client.post("/v1/embeddings", json={"input": ["ok", ""]}), "input.1", "is empty")
    assert client.post("/v1/embeddings", json={"input": [[104, 105], [1, 104]]}).status_code == 200


def test_valid_requests_still_pass(app_client):
    """The checks refuse only what they name: ordinary requests of each route answer 200."""
    engine, client = app_client
    assert client.post("/v1/completions", json={"prompt": "héllo 👍", "max_tokens": 5}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": [1, 2, 3], "logit_bias": {"5": -100}}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": ["héllo 👍", "x"]}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": [[104, 105], [1]]}).status_code == 200
    assert client.post("/v1/responses", json={"input": "héllo 👍", "metadata": {"k": "v"}}).status_code == 200
    assert client.post("/api/chat", json={"model": "m", "stream": False, "options": {"num_predict": -1, "seed": 3},
                                          "messages": [{"role": "user", "content": "héllo 👍"}]}).status_code == 200
    assert client.post("/api/generate", json={"model": "m", "prompt": "héllo", "stream": False}).status_code == 200
    assert len(engine.served) == 5
