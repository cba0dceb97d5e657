"""Shared by tests/test_clients_*.py: a live localpers server (uvicorn on loopback, the default model) that the
clients people already use (openai SDK, langchain-openai, litellm, the llm CLI) talk to, and the three ways a
client names the user it personalizes for."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from localpers.errors import UserError
from serve_helpers import live_server

HEADER = "X-Localpers-User"
WAYS = ("field", "header", "model")  # OpenAI's `user`, the X-Localpers-User header, a NAME@localpers model
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
               "required": ["city", "country"], "additionalProperties": False}



class City(BaseModel):
    """The structured output the client tests ask for."""
    city: str
    country: str


@contextlib.contextmanager
def clients_server(data_dir, **options):
    """A live server over the default model; yields .url (no /v1), .app, .engine, .store."""
    from localpers.engine.engine import Engine
    from localpers.serve.server import create_app

    engine = Engine(n_ctx=2048, n_threads=1)
    try:
        app = create_app(engine=engine, data_dir=str(data_dir), **options)
        with live_server(app) as url:
            yield SimpleNamespace(url=url, app=app, engine=engine, store=app.state.store)
    finally:
        engine.close()


def server_fixture(**options):
    """The `server` fixture of a client test module, one live server per module: `server = server_fixture()`
    (options: create_app's, as for clients_server)."""
    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        with clients_server(tmp_path_factory.mktemp("data"), **options) as s:
            yield s
    return server


def stored(store, user: str) -> list[str]:
    """The texts of `user`'s history ([] for a user the store does not know): what a request served as them left."""
    try:
        return [item["text"] for item in store.items(user)]
    except UserError:
        return []


def model_for(way: str, user: str, served: str) -> str:
    return f"{user}@localpers" if way == "model" else served
