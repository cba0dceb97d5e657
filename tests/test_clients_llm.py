"""Simon Willison's `llm` CLI against localpers, configured as an OpenAI-compatible model in
extra-openai-models.yaml (docs/clients.md): a prompt (streamed, as llm does by default, and --no-stream), --schema
(structured output) and --functions (tool use, llm runs the function and sends its result back), personalized by
the X-Localpers-User header (llm's `headers`), a NAME@localpers model name, or the server's owner (llm has no way
to send OpenAI's `user` field)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients_helpers import HEADER, clients_server, server_fixture, stored

LLM = Path(sys.executable).with_name("llm")
pytestmark = pytest.mark.skipif(not LLM.exists(), reason="the llm CLI is not installed (pip install '.[test]')")

server = server_fixture()


def configure(home: Path, url: str, way: str, user: str) -> str:
    """extra-openai-models.yaml naming localpers as model id `lp`; returns the id."""
    home.mkdir(parents=True, exist_ok=True)
    entry = {"model_id": "lp", "model_name": f"{user}@localpers" if way == "model" else "localpers",
             "api_base": url + "/v1", "supports_tools": True, "supports_schema": True}
    if way == "header":
        entry["headers"] = {HEADER: user}
    (home / "extra-openai-models.yaml").write_text(json.dumps([entry]))  # YAML is a superset of JSON
    return "lp"


def llm(home: Path, *args: str, chain_limit_ok: bool = False) -> str:
    env = {**os.environ, "LLM_USER_PATH": str(home), "OPENAI_API_KEY": "unused"}
    run = subprocess.run([str(LLM), *args], env=env, capture_output=True, text=True, timeout=300)
    if chain_limit_ok and "Chain limit of" in run.stderr:
        # SmolLM2-135M calls the tool again after its result (the generic format leaves that choice to the
        # model); llm stops the chain at its limit: the round trip itself is what is checked
        return run.stdout + run.stderr
    assert run.returncode == 0, run.stderr
    return run.stdout


def check_served_as(server, tmp_path, way: str, user: str, everything: bool = True) -> None:
    """A prompt served as `user`; with `everything`, also --no-stream, --schema and --functions (each llm run
    costs seconds of start-up on a loaded machine: the other ways check the prompt only)."""
    model = configure(tmp_path / "llm", server.url, way, user)
    said = f"Hello from llm ({way})"
    streamed = llm(tmp_path / "llm", "-m", model, "-o", "temperature", "0", "-o", "max_tokens", "8", said)
    assert streamed.strip() and said in stored(server.store, user)
    if not everything:
        return
    plain = llm(tmp_path / "llm", "-m", model, "--no-stream", "-o", "temperature", "0", "-o", "max_tokens", "8",
                said)
    assert streamed == plain
    city = json.loads(llm(tmp_path / "llm", "-m", model, "--schema", "city str, country str", "-o", "temperature",
                          "0", "-o", "max_tokens", "40", "Where is the Eiffel Tower?"))
    assert set(city) == {"city", "country"}
    out = llm(tmp_path / "llm", "-m", model, "--functions",
              "def get_weather(city: str) -> str:\n    'The current weather in a city'\n    return 'sunny, 24 C'",
              "--td", "-o", "temperature", "0", "-o", "max_tokens", "40", "--cl", "2", "What is the weather in Paris?",
              chain_limit_ok=True)
    # llm called the function with the arguments the model gave and sent its result back
    assert "Tool call: get_weather({'city': 'Paris'})" in out and "sunny, 24 C" in out


def test_prompt_stream_schema_functions_served_as_the_user(server, tmp_path):
    check_served_as(server, tmp_path, "header", "llm-header")


def test_served_as_the_user_its_model_name_names(server, tmp_path):
    check_served_as(server, tmp_path, "model", "llm-model", everything=False)


def test_served_as_the_owner(tmp_path):
    with clients_server(tmp_path / "data", owner="llm-owner") as owned:
        check_served_as(owned, tmp_path, "owner", "llm-owner", everything=False)
