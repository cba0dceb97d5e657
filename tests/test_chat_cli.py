"""`localpers chat` through a real pseudo-terminal (pexpect): against a live `localpers serve` app with a tiny
random model, and against a fake server that speaks the whole contract (jobs, the `localpers` explanation), so
the client's rendering of both is checked whatever the live server offers."""
import os
import sys
from pathlib import Path

import pexpect  # the test extra installs it
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from helpers_models import random_model_path  # noqa: E402
from localpers.cli.chat_cli import serve_in_thread  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "alice> "


def spawn(url: str, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "160"}
    child = pexpect.spawn(sys.executable, ["-m", "localpers", "chat", "--url", url, "--user", "alice",
                                           "--max-tokens", "8", "--temperature", "0", *extra],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=60, dimensions=(40, 160))
    child.expect_exact(PROMPT)
    return child


def run(child, line: str, *expected: str) -> str:
    """Send a line; wait for the next prompt; the output in between must hold every `expected` string."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before
    for text in expected:
        assert text in out, f"{text!r} not in the output of {line!r}: {out!r}"
    return out


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    from localpers.serve.server import create_app

    model = random_model_path(tmp_path_factory, "llama")
    url, stop = serve_in_thread(create_app(model, data_dir=str(tmp_path_factory.mktemp("chatdata"))))
    yield url
    stop()


def test_chat_against_live_server(live_url):
    child = spawn(live_url)
    out = run(child, "Hello there, who are you?")
    assert out.strip() != "Hello there, who are you?"                    # a reply streamed back
    run(child, "I live in Lyon and I love jazz.", "noted: home = Lyon", "noted: likes = jazz")
    run(child, "Actually, I live in Paris now.", "noted: home = Paris", "replaced: home")
    run(child, "/remember I am vegetarian.", "remembered (item")
    run(child, "/history", "vegetarian", "preference")
    out = run(child, "/jobs")
    assert "no jobs for alice" in out or "does not offer" in out or "edit" in out
    out = run(child, "/why")
    assert "composition:" in out or "did not explain" in out
    run(child, "/nonsense", "unknown command /nonsense")
    run(child, "/help", "/remember TEXT", "/why")
    child.sendline("/forget")
    child.expect_exact("[y/N]")
    run(child, "y", "forgot alice")
    run(child, "/history", "nothing held about alice")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def fake_server() -> FastAPI:
    """The contract of the loop engineer's server: explanation object on the last stream chunk, jobs list."""
    app = FastAPI()
    items = [{"id": 7, "kind": "preference", "text": "I am vegetarian."},
             {"id": 9, "kind": "message", "text": "Lentil soup was great."}]

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        assert body["user"] == "alice" and body["stream"] and body["localpers"] == {"explain": True}
        calls["chats"] += 1

        def sse():
            for piece in ("Try a ", "lentil ", "curry."):
                yield 'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % piece
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "localpers": {"composition": "memory+rag", "stated": [7],
                                  "artifacts": [{"method": "edit", "kind": "lora", "id": 3}], "retrieved": [9]}}
            import json

            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.get("/v1/users/{user}/memories")
    def memories(user: str):
        return {"object": "list", "data": items}

    calls = {"chats": 0, "jobs": 0}

    @app.get("/v1/users/{user}/jobs")
    def jobs(user: str):
        calls["jobs"] += 1
        learned = []
        if calls["chats"]:  # the chat's message queued job 4: running when first listed, then done
            learned = [{"id": 4, "kind": "edit", "state": "running", "created": 100.0, "started": 101.0}
                       if calls["jobs"] == 1 else
                       {"id": 4, "kind": "edit", "state": "done", "created": 100.0, "started": 101.0,
                        "finished": 109.5, "result": {"artifact": 5, "edited": 1}}]
        return {"object": "list", "data": learned + [
            {"id": 2, "kind": "edit", "state": "failed", "reason": "the preference could not be stated"},
            {"id": 1, "kind": "edit", "state": "done", "result": {"artifact": 3}, "created": 10.0, "started": 12.0,
             "finished": 15.25}]}

    @app.delete("/v1/users/{user}")
    def forget(user: str):
        return JSONResponse({"error": {"message": f"no user {user!r}", "code": "not_found"}}, 404)

    return app


def test_chat_renders_explanation_and_jobs_from_the_contract():
    url, stop = serve_in_thread(fake_server(), timeout_s=60)
    try:
        child = spawn(url)
        run(child, "/why", "no reply yet")
        run(child, "Suggest a dinner for tonight.", "Try a lentil curry.")
        child.expect_exact("now in use — edit job 4 done in 8.5 s")  # the job the message queued, followed
        run(child, "/why", "composition: memory+rag", "edit lora (artifact 3)", "line before your question",
            "#7 I am vegetarian.", "#9 Lentil soup was great.")
        run(child, "/jobs", "failed", "the preference could not be stated", "done", "3.2 s", "artifact 5, edited 1")
        run(child, "/remember", "/remember needs the text")
        run(child, "/remember I like jazz.", "does not offer")   # no POST memories route on this server
        child.sendline("/forget")
        child.expect_exact("[y/N]")
        run(child, "n", "kept")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        stop()


def test_chat_without_a_server_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = pexpect.spawn(sys.executable, ["-m", "localpers", "chat", "--url", "http://127.0.0.1:9/v1", "--user", "a"],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "cannot reach http://127.0.0.1:9/v1" in child.before and "Traceback" not in child.before


def test_why_after_ctrl_c_says_the_reply_was_interrupted_not_that_the_server_is_old():
    """Ctrl-C stops a streamed reply before its last chunk (which carries the explanation): /why then says so."""
    import io

    from rich.console import Console

    from localpers.cli.chat_cli import Chat

    class Client:
        user = "alice"

        def __init__(self, interrupt: bool):
            self.interrupt = interrupt

        def stream_chat(self, body):
            yield "text", "Try a lentil"
            if self.interrupt:
                raise KeyboardInterrupt
            yield "done", {}  # a server that sends no explanation

        def user_url(self, path):
            return "http://fake/v1/users/alice" + path

        def request(self, *args, **kwargs):
            from types import SimpleNamespace

            return SimpleNamespace(json=lambda: {"object": "list", "data": []})

    for interrupt, said in ((True, "the last reply was interrupted (Ctrl-C)"), (False, "an older")):
        out = io.StringIO()
        chat = Chat(Client(interrupt), Console(file=out, width=200, color_system=None))
        chat.poll_s = 0
        chat.send("Suggest a dinner.")
        chat.why()
        assert said in out.getvalue() and ("older" in out.getvalue()) != interrupt, out.getvalue()


def test_invariant_each_noted_fact_shows_its_own_value_in_the_order_stated():
    """A tester's `localpers chat` printed "noted: likes = jazz music" twice for "I love Italian food and jazz music."
    (values looked up by attribute), and /remember "noted: likes" with no value: each learned fact gets the next
    value of its attribute the text states."""
    from localpers.cli.chat_cli import noted_lines

    likes = [{"id": 1, "attribute": "likes"}, {"id": 2, "attribute": "likes"}]
    assert noted_lines("I love Italian food and jazz music.", likes) == ["likes = Italian food", "likes = jazz music"]
    assert noted_lines("I'm vegan.", [{"id": 3, "attribute": "diet"}]) == ["diet = vegan"]
    assert noted_lines("I'm vegan.", [{"id": 3, "attribute": "home"}]) == ["home"]   # nothing of it said: no value
    gone = [{"id": 4, "attribute": "likes"}]      # a second tester's "no longer: likes (#193)" named no value
    assert noted_lines("I gave up jazz.", gone, retired=True) == ["likes = jazz"]
    assert noted_lines("I gave up jazz.", gone) == ["likes"]


@pytest.mark.parametrize("user, message", [("", "--user must not be empty"), ("   ", "--user must not be empty"),
                                           ("eve\u202e", "user id")])
def test_invariant_a_bad_user_is_refused_before_any_server_is_reached(user, message, capsys):
    """A tester's `--user ""` silently became the login name, and a user id holding U+202E was refused only at the
    first message: both are told at once, before a connection (the URL points nowhere)."""
    from localpers.cli.cli import main

    assert main(["chat", "--user", user, "--url", "http://127.0.0.1:9"]) != 0
    assert message in capsys.readouterr().err
