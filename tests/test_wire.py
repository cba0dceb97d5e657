"""The pieces wired together: background jobs for perce/ce/logo (the worker trains, the next request serves it,
forget cancels), and LoGo's knowledge computed across devices by the Flower sync (SecAgg+, in-process grid) and
served to a cold-start user exactly as in-process LoGo computes it."""
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from localpers import logo, names, training
from localpers.server import create_app
from localpers.store import Store
from tests.helpers_models import random_model_path
from test_loop import chat, wait_for_jobs  # noqa: E402 (tests/ is on sys.path)

LOCAL = "http://localhost"
POSTS = [f"Hey all! Another weekend of bouldering at gym {i}, so cozy and fun. Stay curious!" for i in range(9)]


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return random_model_path(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def engine(llama_path):
    from localpers.engine import Engine

    return Engine(llama_path, n_ctx=512, n_threads=1)


@pytest.fixture
def tiny_jobs(monkeypatch):
    """One optimizer step on the tiny model, one torch thread."""
    monkeypatch.setattr(training, "JOB_CONFIG", training.TrainConfig(steps=1, batch=2, rank=4, precision="fp32",
                                                                      max_examples=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_perce_job_trains_and_the_next_request_serves_its_adapter(engine, tmp_path, tiny_jobs):
    with Store.open(tmp_path) as store:
        ids = [store.add("ann", t, kind="post") for t in POSTS]
    app = create_app(engine=engine, data_dir=str(tmp_path), jobs=True, personalize=names.PERCE)
    with TestClient(app, base_url=LOCAL) as client:
        question = {"messages": [{"role": "user", "content": "Write a post about my weekend."}], "user": "ann",
                    "max_tokens": 4, "temperature": 0, "localpers": {"explain": True, "history": False}}
        assert chat(client, question).json()["localpers"]["artifacts"] == []
        r = client.post("/v1/users/ann/personalize", json={"method": names.PERCE})
        assert r.status_code == 202 and r.json()["kind"] == names.PERCE
        [job] = wait_for_jobs(client, "ann")
        assert job["state"] == names.DONE, job
        result = job["result"]
        assert result["steps"] == 1 and result["sources"] == 4 and "bouldering" not in json.dumps(result)
        served = chat(client, question).json()
        assert served["localpers"]["artifacts"] == [{"method": names.PERCE, "kind": names.LORA,
                                                     "id": result["artifact"]}]
    with Store.open(tmp_path) as store:
        [artifact] = store.artifacts("ann", names.LORA)
        assert artifact["meta"]["method"] == names.PERCE and artifact["sources"] == ids[-4:]
        assert Path(artifact["path"]).is_file() and Path(artifact["path"]).is_relative_to(store.artifact_dir("ann"))


def test_forget_during_a_perce_job_cancels_it_and_writes_nothing(engine, tmp_path, tiny_jobs, monkeypatch):
    started, release, outcome = threading.Event(), threading.Event(), []
    train = training.adapter_for_examples

    def slow(*args, **kwargs):
        started.set()
        release.wait(60)
        return train(*args, **kwargs)

    monkeypatch.setattr(training, "adapter_for_examples", slow)
    finish = Store.finish_job

    def record(self, job, state, **kw):
        outcome.append((state, kw.get("reason", "")))
        return finish(self, job, state, **kw)

    monkeypatch.setattr(Store, "finish_job", record)
    with Store.open(tmp_path) as store:
        for t in POSTS:
            store.add("fay", t, kind="post")
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path), jobs=True), base_url=LOCAL) as client:
        assert client.post("/v1/users/fay/personalize", json={"method": names.CE}).status_code == 202
        assert started.wait(60)
        assert client.delete("/v1/users/fay").status_code == 200
        release.set()
        for _ in range(1200):
            if outcome:
                break
            time.sleep(0.05)
        assert outcome and outcome[0][0] == names.FAILED, outcome
        assert client.get("/v1/users/fay/jobs").status_code == 404
    assert [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []
    with Store.open(tmp_path) as store:
        assert "fay" not in store.users()
