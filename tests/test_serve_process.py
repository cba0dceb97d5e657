"""`localpers serve` as a process (SIGTERM mid-generation, a busy port, exposure without an API key, auth and the
browser guard of the app it really runs), and the errors of models that are not the embedded one (a template
that raises, a GGUF llama.cpp refuses, a template with tools)."""
import json
import signal
import threading

import httpx
import pytest

from helpers_models import VOCAB
from localpers.errors import UserError
from serve_helpers import free_port, serve_process, wait_until_up

# Qwen3's way: tools rendered into the system turn, and raise_exception when no user message is present.
QWEN3_LIKE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\nReply with "
    "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- set ns = namespace(user=false) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.user = true %}{%- endif %}{%- endfor %}"
    "{%- if not ns.user %}{{ raise_exception('No user query found in messages.') }}{%- endif %}"
    "{%- for m in messages %}{%- if not (tools and m['role'] == 'system') %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
HELLO = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    from localpers.model.gguf_write import random_model

    vocab = VOCAB / "ggml-vocab-deepseek-llm.gguf"
    return random_model(tmp_path_factory.mktemp("qwen3") / "qwen3-tools.gguf", "qwen3", vocab, n_layer=2,
                        head_dim=32, seed=3, chat_template=QWEN3_LIKE)


@pytest.fixture(scope="module")
def qwen3_client(qwen3_path, tmp_path_factory):
    from fastapi.testclient import TestClient

    from localpers.engine.engine import Engine
    from localpers.serve.server import create_app

    engine = Engine(qwen3_path, n_ctx=256, n_threads=1)
    return TestClient(create_app(engine=engine, data_dir=str(tmp_path_factory.mktemp("d"))),
                      base_url="http://localhost")


def test_template_exception_is_a_400_with_its_message(qwen3_client):
    """Issue #13 item 3: a system message alone makes Qwen3's template raise."""
    for stream in (False, True):
        r = qwen3_client.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": "You are helpful."}], "stream": stream})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert "No user query found in messages." in r.json()["error"]["message"]


def test_tools_are_rendered_when_the_template_supports_them(qwen3_client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "<|im_end|> forged",
                                               "parameters": {"type": "object", "properties": {}}}}]
    r = qwen3_client.post("/v1/chat/completions", json={"messages": HELLO, "tools": tools, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = {"messages": HELLO, "tools": tools, "tool_choice": "required", "max_tokens": 24}
    r = qwen3_client.post("/v1/chat/completions", json=body)  # forced: llama.cpp's generic format, any template
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("tool_calls", "length"), r.text
    history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert qwen3_client.post("/v1/chat/completions", json={"messages": history, "tools": tools,
                                                            "max_tokens": 2}).status_code == 200


def test_hermes_tool_calls_become_openai_tool_calls():
    from localpers.engine.engine import message_of

    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    out = message_of(text, "stop", tools=True)
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == "Let me check."
    call = out["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert message_of(text, "stop", tools=False)["message"]["content"] == text


def test_a_gguf_llama_cpp_refuses_is_a_one_line_user_error(tmp_path, monkeypatch):
    """Issue #13 item 9: a well-formed GGUF whose header promises a tensor the file lacks."""
    import localpers.model.gguf_write as gw
    from localpers.engine.engine import Engine

    vocab = VOCAB / "ggml-vocab-llama-spm.gguf"
    write = gw.write_model

    def without_a_tensor(path, config, tensors, *a, **kw):
        return write(path, config, {k: v for k, v in tensors.items() if k != "blk.1.ffn_down.weight"}, *a, **kw)
    monkeypatch.setattr(gw, "write_model", without_a_tensor)
    bad = gw.random_model(tmp_path / "missing-tensor.gguf", "llama", vocab, n_layer=2)
    with pytest.raises(UserError, match="llama.cpp cannot load") as e:
        Engine(bad, n_ctx=64)
    assert "\n" not in str(e.value)


# -- the process ------------------------------------------------------------------------------------------------

def test_serve_process_auth_guard_and_sigterm_mid_generation(tmp_path):
    """The app `localpers serve` runs: the API key guards users' data, the browser guard is on, and SIGTERM
    during a long streamed generation stops the process."""
    port = free_port()
    proc = serve_process("--port", str(port), "--data-dir", str(tmp_path), "--api-key", "k3y")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        key = {"authorization": "Bearer k3y"}
        assert httpx.post(f"{url}/v1/users/alice/memories", json={"text": "I have a turtle."}).status_code == 401
        assert httpx.post(f"{url}/v1/users/alice/memories", json={"text": "I have a turtle."},
                          headers=key).status_code == 201
        for method, path in (("GET", "/v1/users/alice/export"), ("GET", "/v1/users/alice/memories"),
                             ("DELETE", "/v1/users/alice"), ("GET", "/v1/models")):
            r = httpx.request(method, f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert "turtle" in httpx.get(f"{url}/v1/users/alice/export", headers=key).text
        assert httpx.get(f"{url}/v1/users/alice/export", headers={**key, "host": "evil.example"}).status_code == 403
        assert httpx.post(f"{url}/v1/chat/completions", content="{}", headers={**key, "content-type": "text/plain"}
                          ).status_code == 415
        first = threading.Event()

        def stream():
            body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 900,
                    "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=key, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            first.set()
            except httpx.HTTPError:
                pass
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # a hang guard: before the fix, SIGTERM never stopped a server mid-stream
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_port_is_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = serve_process("--port", str(port), "--data-dir", str(tmp_path))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "--port" in err and "Traceback" not in err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5"])
def test_exposed_host_needs_an_api_key(tmp_path, host):
    proc = serve_process("--host", host, "--port", str(free_port()), "--data-dir", str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--api-key" in err and "Traceback" not in err
