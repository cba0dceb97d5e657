"""Round-three hardening (issue #27): inputs that reached a 500 or a traceback, user ids that were not one identity,
the work one request may ask for, slow clients, what `forget` leaves, the key and the files' permissions, and a
sync device that must be refused before it joins. Each reported input is a case, with cases of the same kinds."""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from localpers.serve import limits
from localpers.store.store import MAX_META_DEPTH, Store
from test_store_api import RecordingEngine

ROOT = Path(__file__).resolve().parent.parent
JSON = {"content-type": "application/json"}


@pytest.fixture
def store_client(memory_client):
    """The memory routes over a store holding one note of alice's."""
    memory_client.post("/v1/users/alice/memories", json={"text": "alice's note"})
    return memory_client


def chat_app(tmp_path, **kw):
    from localpers.serve.server import create_app

    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    engine = RecordingEngine(model)
    return engine, TestClient(create_app(engine=engine, data_dir=str(tmp_path / "home"), **kw),
                              base_url="http://localhost")


def raw_chat(client, body: str, **kw):
    return client.post("/v1/chat/completions", content=body.encode(), headers={**JSON, **kw.pop("headers", {})}, **kw)


# -- 3. inputs that reached a 500 ----------------------------------------------------------------------------

@pytest.mark.parametrize("body, where", [
    ('{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
    ('{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages.0.content.0.text"),
    ('{"messages": [{"role": "user", "content": "hi", "name": "\\udc80"}]}', "messages.0.name"),
    ('{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}', "user"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}', "stop.0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "metadata": {"\\ud800": 1}}', "metadata"),
])
def test_a_lone_surrogate_anywhere_in_a_chat_request_is_a_400_naming_the_field(tmp_path, body, where):
    engine, client = chat_app(tmp_path)
    with client:
        r = raw_chat(client, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(where) and "not valid Unicode" in error["message"]
    assert engine.served == []


def test_an_error_message_holding_a_lone_surrogate_is_still_sent():
    """The error body is encodable whatever the message quotes (the handler itself failed on `model`)."""
    from localpers.serve.server import error_response

    r = error_response(404, "the model '\ud800' does not exist")
    assert json.loads(r.body)["error"]["message"] == "the model '\\ud800' does not exist"


@pytest.mark.parametrize("item", ["99999999999999999999999", "9223372036854775808", "-9223372036854775809"])
def test_an_item_id_beyond_sqlites_integers_is_not_found(store_client, item):
    r = store_client.delete(f"/v1/users/alice/memories/{item}")
    assert r.status_code == 404, r.text
    assert len(store_client.get("/v1/users/alice/memories").json()["data"]) == 1


def nested(depth: int, leaf=1, as_list=False):
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


def nested_json(depth: int, as_list=False) -> str:
    """JSON text nesting `depth` levels (built as text: json.dumps itself fails on the deepest)."""
    return ("[" * depth + "1" + "]" * depth) if as_list else ('{"a":' * depth + "1" + "}" * depth)


@pytest.mark.parametrize("meta", [nested_json(965), nested_json(MAX_META_DEPTH + 1),
                                  '{"l": %s}' % nested_json(MAX_META_DEPTH, as_list=True),
                                  '{"x": %s}' % nested_json(5000, as_list=True)])
def test_meta_too_deep_to_read_back_is_refused_and_the_user_stays_readable(store_client, meta):
    """Invariant: what is accepted can be read back: meta nesting over MAX_META_DEPTH levels (objects and arrays)
    is refused on the way in; list, export and search of the user answer 200 afterwards."""
    body = '{"text": "a deep note", "meta": %s}' % meta
    r = store_client.post("/v1/users/alice/memories", content=body.encode(), headers=JSON)
    assert r.status_code == 400, r.text
    # (in a thread with a deep stack already, the JSON parser itself may give up first: also a 400)
    message = r.json()["error"]["message"]
    assert f"more than {MAX_META_DEPTH} levels" in message or "error parsing the body" in message, message
    for path in ("/v1/users/alice/memories", "/v1/users/alice/export", "/v1/users/alice/memories/search?q=note"):
        assert store_client.get(path).status_code == 200


def test_meta_at_the_depth_limit_is_accepted_and_read_back(store_client):
    meta = nested(MAX_META_DEPTH)
    r = store_client.post("/v1/users/alice/memories", json={"text": "deep enough", "meta": meta})
    assert r.status_code == 201, r.text
    items = store_client.get("/v1/users/alice/memories").json()["data"]
    assert items[-1]["meta"] == meta
    assert store_client.get("/v1/users/alice/export").status_code == 200
    assert store_client.get("/v1/users/alice/memories/search", params={"q": "deep"}).status_code == 200


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database or disk is full"),
                                   OSError(28, "No space left on device")])
def test_a_full_disk_serves_the_reply_and_skips_the_history_write(tmp_path, caplog, error):
    """Fault injection: every store write fails as on a full disk; a personalized chat still answers 200 with
    the reply, the history write is skipped, and the server logs a warning naming the user."""
    engine, client = chat_app(tmp_path)
    store = client.app.state.store

    def full(*args, **kw):
        raise error

    with client:
        store.add("alice", "I like tea.")
        store._write = full  # noqa: SLF001 (the one door of every write)
        with caplog.at_level(logging.WARNING, logger="localpers.serve.server"):
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "I love hiking."}],
                                                          "user": "alice"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ok"
    assert any("not stored in 'alice'" in rec.getMessage() for rec in caplog.records)
    del store._write
    assert [i["text"] for i in store.items("alice")] == ["I like tea."]


@pytest.mark.parametrize("command", [["serve", "--port", "99999"], ["sync-server", "--out", "OUT", "--port", "99999"],
                                     ["sync", "--user", "a", "--port", "70000"], ["serve", "--port", "-1"],
                                     ["serve", "--port", "http"]])
def test_a_port_out_of_range_is_a_one_line_error(tmp_path, command):
    command = [str(tmp_path / "out") if c == "OUT" else c for c in command]
    r = subprocess.run([sys.executable, "-m", "localpers", *command], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is not a port number (1-65535)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- 4. user ids ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("segment", ["%ff", "%fe", "%c3", "%80", "a%ffb", "%ed%a0%80", "%c0%af"])
def test_a_user_id_that_is_not_utf8_is_refused_not_merged(store_client, segment):
    """%ff, %fe, %c3 and %80 once all decoded to U+FFFD (one user for all): each is refused with a 400, by every
    endpoint, and nothing is stored."""
    for method, path, kw in (("post", "memories", {"json": {"text": "hi"}}), ("get", "memories", {}),
                             ("get", "export", {}), ("delete", "", {})):
        r = getattr(store_client, method)(f"/v1/users/{segment}/{path}".rstrip("/"), **kw)
        assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]["message"], (method, path, r.text)
    assert store_client.app.state.store.users() == ["alice"]


@pytest.mark.parametrize("user", ["\u200b", "\u200b\u200c\u200d", "\u00a0", "\ufeff", "\u2060", "\u3164", "\u202e",
                                  "\u2066\u2069", "\u200e", " \u0301", "\u2800", "\u180e"])
def test_a_user_id_without_a_visible_character_is_refused(store_client, user):
    """One rule: an id needs a visible character (NBSP-only was refused, zero-width-only accepted)."""
    from urllib.parse import quote

    r = store_client.post(f"/v1/users/{quote(user, safe='')}/memories", json={"text": "hi"})
    assert r.status_code == 400 and "blank" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("user", ["ali\u202ece", "bob\u2066x\u2069", "a\u200fb", "x\u061c"])
def test_a_user_id_with_a_bidi_control_is_refused(store_client, user):
    from urllib.parse import quote

    r = store_client.post(f"/v1/users/{quote(user, safe='')}/memories", json={"text": "hi"})
    assert r.status_code == 400 and "bidirectional-text control" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("user", ["jose\u0301", "a\u00a0b", "\u4e00", "\u0628\u0627\u0628\u0627", "👍"])
def test_visible_user_ids_are_accepted(store_client, user):
    from urllib.parse import quote

    r = store_client.post(f"/v1/users/{quote(user, safe='')}/memories", json={"text": "hi"})
    assert r.status_code == 201, r.text


# -- 5. the work of one request ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, max_tokens, limit, ok", [(8, 10 ** 9, 4096, False), (4, 1025, 4096, False),
                                                      (4, 1024, 4096, True), (1, 60, 50, False), (8, None, 4096, True),
                                                      (2, 30, 60, True)])
def test_n_times_max_tokens_is_capped(tmp_path, n, max_tokens, limit, ok):
    engine, client = chat_app(tmp_path, max_request_tokens=limit)
    body = {"messages": [{"role": "user", "content": "hi"}], "n": n,
            **({"max_tokens": max_tokens} if max_tokens else {})}
    with client:
        r = client.post("/v1/chat/completions", json=body)
    if ok:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert f"limit of {limit} tokens" in r.json()["error"]["message"] and engine.served == []


def test_the_work_cap_counts_max_tokens_up_to_the_context():
    assert limits.check_work(1, 10 ** 9, 4096, 4096) is None  # bounded by the context anyway
    assert "8 x 4096" in limits.check_work(8, 10 ** 9, 4096, 4096)


# -- 6. slow clients -----------------------------------------------------------------------------------------

@pytest.fixture
def bounded_server():
    """A uvicorn server with the bounded protocol: at most 8 connections, 1 s for headers, 1 s for the body."""
    import uvicorn
    from serve_helpers import free_port, wait_until_up

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(payload: dict):
        return payload

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           http=limits.bounded_protocol(8, header_timeout=1.0, body_timeout=1.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield port
    finally:
        server.should_exit = True
        thread.join(15)


def half_sent(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(data)
    return s


def closed_by_server(s: socket.socket, limit_s: float = 30) -> bool:
    """Whether the server closes the connection (EOF or reset) before limit_s (a hang guard)."""
    s.settimeout(limit_s)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_many_half_sent_requests_do_not_lock_out_another_client(bounded_server):
    """~10x the connection cap of clients that never finish their headers (or their body): another client is
    served at once (the oldest half-sent connection is closed to make room), and each half-sent one is closed."""
    import httpx

    port = bounded_server
    stalled = [half_sent(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ") for _ in range(40)]
    stalled += [half_sent(port, b"POST /echo HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                                b"content-length: 100\r\n\r\n{\"a\"") for _ in range(40)]
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert r.status_code == 200
        r = httpx.post(f"http://127.0.0.1:{port}/echo", json={"a": 1}, timeout=30)
        assert r.json() == {"a": 1}
        assert all(closed_by_server(s) for s in stalled)
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize("data", [b"", b"GET /health HTT", b"POST /echo HTTP/1.1\r\nHost: localhost\r\n"
                                  b"content-type: application/json\r\ncontent-length: 10\r\n\r\n{"])
def test_a_client_that_does_not_finish_its_request_is_disconnected(bounded_server, data):
    s = half_sent(bounded_server, data)
    try:
        assert closed_by_server(s)
    finally:
        s.close()


def test_a_keep_alive_connection_gets_the_same_deadline_for_its_next_request(bounded_server):
    s = half_sent(bounded_server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    try:
        s.settimeout(30)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: loc")  # the next request, never finished
        assert closed_by_server(s)
    finally:
        s.close()


def test_the_connection_cap_keeps_a_descriptor_reserve():
    assert limits.connection_cap(1024) == 1024 - limits.names.FD_RESERVE
    assert limits.connection_cap(64) == 8


# -- 8. forget leaves nothing --------------------------------------------------------------------------------

def test_forget_removes_every_file_derived_from_the_user(tmp_path, monkeypatch):
    """Every place a user's data lands (Store.forget's list): the database rows, the artifact folder, the LoGo
    sync signals file and the sync node config naming the user; another user's files stay."""
    from localpers.personalize.signals import Contribution, save_contribution, signals_path

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    c = Contribution(vector=np.ones(4), steering=np.zeros((1, 2)), histogram=np.ones(3))
    with Store.open(tmp_path) as store:
        for user in ("alice", "bob"):
            store.add(user, f"{user} likes kayaking")
            save_contribution(tmp_path, user, c)
            adapter = tmp_path / f"{user}.gguf"
            adapter.write_bytes(b"adapter")
            store.register_artifact(user, "lora", adapter, "0" * 64, {"method": "edit"})
        (tmp_path / "sync" / "node.toml").write_text('data-dir = "x"\nuser = "alice"\n')
        alice_folder = Path(store.artifacts("alice")[0]["path"]).parent
        store.forget("alice")
        assert not signals_path(tmp_path, "alice").exists() and signals_path(tmp_path, "bob").exists()
        assert not (tmp_path / "sync" / "node.toml").exists()
        assert not alice_folder.exists() and Path(store.artifacts("bob")[0]["path"]).exists()
        assert store.users() == ["bob"]
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"alice likes kayaking" not in f.read_bytes()


def test_forget_keeps_a_node_config_naming_another_user(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path) as store:
        store.add("alice", "hi")
        (tmp_path / "sync").mkdir()
        (tmp_path / "sync" / "node.toml").write_text('user = "bob"\n')
        store.forget("alice")
    assert (tmp_path / "sync" / "node.toml").exists()


# -- 9. the key and the files' permissions -------------------------------------------------------------------

@pytest.mark.parametrize("header, path, status", [
    ("bearer k3y", "/v1/models", 200), ("BEARER k3y", "/v1/models", 200), ("Bearer  k3y", "/v1/models", 200),
    ("Bearer k3y", "/openapi.json", 200), (None, "/openapi.json", 401), ("Bearer nope", "/openapi.json", 401),
    ("Basic k3y", "/v1/models", 401), ("Bearer", "/v1/models", 401), (None, "/health", 200),
    ("bearer k3yy", "/v1/models", 401)])
def test_the_api_key_scheme_is_case_insensitive_and_guards_the_schema(tmp_path, header, path, status):
    _, client = chat_app(tmp_path, api_key="k3y")
    with client:
        r = client.get(path, headers={"authorization": header} if header else {})
    assert r.status_code == status, (header, path, r.text)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_store_files_are_private_even_under_a_permissive_umask(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    old = os.umask(0o022)
    try:
        home = tmp_path / "home"
        with Store.open(home) as store:
            store.add("alice", "hi")
            adapter = tmp_path / "a.gguf"
            adapter.write_bytes(b"adapter")
            adapter.chmod(0o644)
            store.register_artifact("alice", "lora", adapter, "0" * 64, {"method": "edit"})
            files = [p for p in home.rglob("*")]
            assert {p.name for p in files} >= {"localpers.db", "localpers.db-wal", "localpers.db-shm", "key"}
            assert mode(home) == 0o700
            for p in files:
                assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    finally:
        os.umask(old)


def test_every_file_a_command_writes_under_the_data_folder_is_private(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LOCALPERS_PASSPHRASE", None)
    r = subprocess.run(["sh", "-c", f"umask 022 && {sys.executable} -m localpers remember --data-dir {home} "
                                    "--user alice 'I like tea.'"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    paths = [home, *home.rglob("*")]
    assert len(paths) > 2
    for p in paths:
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p


# -- 7. a sync device is checked before it joins -------------------------------------------------------------

def sync_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localpers", "sync", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=timeout)


@pytest.mark.parametrize("field, value", [("vector", np.nan), ("steering", np.inf), ("histogram", -np.inf)])
def test_a_device_with_non_finite_signals_is_refused_before_joining(tmp_path, field, value):
    """The device's own `localpers sync` says why, and nothing starts (no SuperNode, nothing in its ledger)."""
    from localpers.personalize.signals import Contribution, save_contribution
    from localpers.sync import sync

    c = Contribution(vector=np.ones(4), steering=np.zeros((2, 3)), histogram=np.ones(5))
    getattr(c, field)[0] = value
    save_contribution(tmp_path, "alice", c)
    r = sync_cli("--user", "alice", "--data-dir", str(tmp_path), "--superlink", "127.0.0.1:1", "--once")
    assert r.returncode == 2 and f"the local {field} has non-finite values" in r.stderr, r.stderr
    assert not (sync.sync_dir(tmp_path) / "supernode.pid").exists() and sync.read_log(tmp_path) == []


def test_sync_once_against_a_wrong_address_says_it_waits_and_gives_up(tmp_path):
    from localpers.personalize.signals import Contribution, save_contribution
    from serve_helpers import free_port

    save_contribution(tmp_path, "alice", Contribution(vector=np.ones(4), steering=np.zeros((2, 3)),
                                                      histogram=np.ones(5)))
    r = sync_cli("--user", "alice", "--data-dir", str(tmp_path), "--superlink", f"127.0.0.1:{free_port()}", "--once",
                 "--connect-timeout", "1")
    assert "waiting for the sync server" in r.stdout, r.stdout
    assert r.returncode == 2 and "no sync server answered" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_user_with_too_deep_meta_stored_before_the_limit_stays_readable(store_client):
    """A store written before the limit: the item's meta is replaced by a note when read, never a 500."""
    store = store_client.app.state.store
    with store._write() as conn:  # noqa: SLF001 (writing what the API now refuses)
        user_id = store._user_id(conn, "alice")
        conn.execute("UPDATE items SET meta = ? WHERE user_id = ?",
                     (store.cipher.seal(nested_json(965).encode(), b"%d:meta" % user_id), user_id))
    for path in ("/v1/users/alice/memories", "/v1/users/alice/export", "/v1/users/alice/memories/search?q=note"):
        r = store_client.get(path)
        assert r.status_code == 200, r.text
    assert "unreadable" in store_client.get("/v1/users/alice/memories").json()["data"][0]["meta"]
