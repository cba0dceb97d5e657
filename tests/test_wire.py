"""The pieces wired together: background jobs for perce/ce/logo (the worker trains, the next request serves it,
forget cancels), and LoGo's knowledge computed across devices by the Flower sync (SecAgg+, in-process grid) and
served to a cold-start user exactly as in-process LoGo computes it."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from localpers import names
from localpers.personalize import logo
from localpers.personalize import training
from localpers.serve.server import create_app
from localpers.store.store import Store
from tests.helpers_models import random_model_path
from tests.serve_helpers import wait_until
from test_loop import chat, wait_for_jobs  # noqa: E402 (tests/ is on sys.path)

LOCAL = "http://localhost"
POSTS = [f"Hey all! Another weekend of bouldering at gym {i}, so cozy and fun. Stay curious!" for i in range(9)]


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return random_model_path(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def engine(llama_path):
    from localpers.engine.engine import Engine

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
    with TestClient(create_app(engine=engine, data_dir=str(tmp_path), personalize=names.PERCE), base_url=LOCAL) as client:
        assert client.delete("/v1/users/ann").status_code == 200  # forget after the job: the adapter goes too
        assert chat(client, question).json()["localpers"]["artifacts"] == []
    assert not Path(artifact["path"]).exists()


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
        wait_until(lambda: outcome, 60)
        assert outcome and outcome[0][0] == names.FAILED, outcome
        assert client.get("/v1/users/fay/jobs").status_code == 404
    assert [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []
    with Store.open(tmp_path) as store:
        assert "fay" not in store.users()


# ---------------------------------------------------------------- LoGo over the Flower sync

GROUPS = {  # two planted communities: what their members wrote
    "climbers": ["I love bouldering at the climbing gym.", "Sushi and ramen are my favourite dinner."],
    "gardeners": ["My tomatoes and seedlings are doing great.", "Tacos and burritos every Friday!"],
}
COLD = ["Went bouldering again this morning."]  # a cold-start user: one item, one attribute
QUERY = "What food should I eat tonight?"


def test_synced_communities_serve_a_cold_start_user_as_in_process_logo(tmp_path, llama_path):
    """Devices (one store and user each) -> LoGo refresh job (their sync contributions) -> one synced run
    (ServerApp, ClientApps, SecAgg+ on the in-process grid) -> every device's LoGo knowledge file -> a new
    cold-start user's served `logo` method names the synced community's top value, and equals in-process
    LoGo on the same users (histograms within SecAgg+'s error bound)."""
    from types import SimpleNamespace

    from localpers.serve import jobs
    from localpers.sync import sync
    from localpers.serve.compose import served_user
    from localpers.engine.engine import model_sha256
    from localpers.model.gguf_info import open_gguf
    from localpers.model.model import ModelConfig
    from localpers.sync.sync_app import simulate

    config = ModelConfig.from_gguf(open_gguf(llama_path))
    devices = []
    for group, texts in GROUPS.items():
        for i in range(3):
            home, user = tmp_path / f"{group}-{i}", f"{group}-{i}"
            with Store.open(home) as store:
                for t in texts:
                    store.add(user, t)
                logo.refresh_knowledge(store, model_path=llama_path, min_size=2)  # with CAA steering
            devices.append((home, user))
    V = len(logo.VOCABULARY)
    contributions = [sync.load_contribution(home, user) for home, user in devices]
    assert contributions[0].steering.shape == (config.n_layer - 1, config.d_model)
    # the public initial centroids of the first seed that do not put both planted groups in one community
    cfg = next(c for c in (sync.SyncConfig(k=2, dim=V, n_layer=config.n_layer - 1, steer_dim=config.d_model, vocab=V,
                                           rounds=3, min_size=2, seed=s) for s in range(20))
               if sorted(sync.plain_kmeans(contributions, c).sizes) == [3, 3])
    nodes = [{"data-dir": str(home), "user": user, "epsilon-budget": "inf"} for home, user in devices]
    strategy, _ = simulate(nodes, {**cfg.to_run_config(), "min-devices": len(nodes)})
    assert sorted(strategy.knowledge.sizes) == [3, 3]

    # in-process LoGo on the same users
    steer = logo.Steerer(llama_path)
    signals = [logo.local_signals(texts, steering=steer(texts)) for texts in GROUPS.values() for _ in range(3)]
    assert max(np.linalg.norm(s.steering) for s in signals) < cfg.steer_clip  # so sync's clip leaves them as they are
    ours = logo.advance(None, signals, k=2, min_size=2)
    tol = sync.error_bound(len(nodes), cfg) * cfg.hist_clip
    for home, _ in devices:
        synced = logo.GlobalKnowledge.load(logo.knowledge_dir(home) / logo.KNOWLEDGE_FILE)
        assert synced.meta["source"] == logo.SYNC_SOURCE and synced.round == 1 and synced.published.all()
        match = np.argmax(synced.centroids @ ours.centroids.T, axis=1)
        assert sorted(match) == [0, 1]
        np.testing.assert_allclose(synced.centroids, ours.centroids[match], atol=1e-5)
        np.testing.assert_allclose(synced.sizes, ours.sizes[match], atol=tol)
        np.testing.assert_allclose(synced.histograms, ours.histograms[match], atol=tol)
        np.testing.assert_allclose(synced.steering, ours.steering[match], atol=sync.error_bound(len(nodes), cfg) * cfg.steer_clip)

    # a new user on the first device; the worker's logo job keeps the synced knowledge and registers them
    home = devices[0][0]
    with Store.open(home) as store:
        for t in COLD:
            store.add("newbie", t)
        store.queue_job("newbie", names.LOGO)
        assert jobs.Worker(store, lambda: None).run_one(SimpleNamespace(model_path=llama_path))
        [job] = store.jobs("newbie")
        assert job["state"] == names.DONE, job
        user = served_user(store, "newbie", model_sha256(llama_path))
    kept = logo.GlobalKnowledge.load(logo.knowledge_dir(home) / logo.KNOWLEDGE_FILE)
    assert kept.meta["source"] == logo.SYNC_SOURCE and kept.round == 1
    assert sorted(kept.meta["community_cvecs"]) == ["0", "1"]  # the synced communities' steering, as control vectors
    assert all(Path(f).is_file() for f in kept.meta["community_cvecs"].values())
    served = logo.logo_method(user, QUERY, None)
    assert "Japanese food" in served.user_prefix  # the climbers' top cuisine, from the synced histograms
    expected = logo.personalize(logo.local_signals(COLD), ours, logo.MEDIATOR, None, lambda c: None, QUERY)
    assert served.user_prefix == expected.user_prefix
    steered = logo._served(user, QUERY, logo.MediatorParams(user_scale=1.0, community_scale=1.0))
    assert steered.artifacts.control_vectors[-1][0] in kept.meta["community_cvecs"].values()

    # the next sync run is the next LoGo round: folded into the synced knowledge with LoGo's decay
    simulate(nodes, {**cfg.to_run_config(), "min-devices": len(nodes)})
    again = logo.GlobalKnowledge.load(logo.knowledge_dir(home) / logo.KNOWLEDGE_FILE)
    assert again.round == 2 and again.meta["source"] == logo.SYNC_SOURCE
    np.testing.assert_allclose(again.sizes, 3 * (1 + 0.5 ** (1 / logo.HALF_LIFE)), atol=tol)
