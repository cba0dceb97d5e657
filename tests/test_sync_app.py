"""The Flower app of private sync (localpers/sync/sync_app.py) without starting Flower's processes or Ray: what the
server publishes and writes to --out, what a device captures and keeps (its LoGo knowledge), and the apps Flower's
simulation engine runs, driven in-process (sync_app.LocalGrid). Each case runs in about a second; they were
written for the mutation survivors of sync_app.py (docs/history/mutation/) and test the behaviour, not the lines."""
from __future__ import annotations

import json
import logging
import operator
import time
import types

import numpy as np
import pytest
from flwr.common import Context, RecordDict

from localpers.errors import UserError
from localpers.personalize import logo
from localpers.sync import sync, sync_app
from tests.test_sync import CFG, assert_close_to_plain, devices, make_users, run_config

ONE_ROUND = sync.SyncConfig(**{**CFG.__dict__, "rounds": 1})


def test_invariant_a_capture_holds_exactly_the_replies_the_ledger_logs(tmp_path, monkeypatch):
    """A device with node config capture-dir (made, parents included) keeps one file per reply it sent with
    content — the same stages, in the same order, as its ledger's message rows — each holding the reply's values;
    a device without one captures nothing, anywhere (its working directory included)."""
    monkeypatch.chdir(tmp_path)
    nodes = devices(tmp_path, make_users(3))
    nodes[0]["capture-dir"] = str(tmp_path / "capture" / "device0")
    sync_app.simulate(nodes, run_config(ONE_ROUND, 3))
    files = sorted((tmp_path / "capture" / "device0").iterdir(), key=lambda p: int(p.name.split("-")[0]))
    logged = [e for e in sync.read_log(nodes[0]["data-dir"]) if e["kind"] == "message" and e["values"]]
    assert len(files) == len(logged) >= 4  # the SecAgg+ stages and the knowledge's download
    captured = [json.loads(f.read_text()) for f in files]
    assert [c["stage"] for c in captured] == [e["stage"] for e in logged]
    kinds = set()
    for c, e, f in zip(captured, logged, files):
        assert sorted((r["record"], r["key"]) for r in e["values"]) == \
            sorted((rname, key) for rname, record in c["content"].items() for key in record)
        for row in e["values"]:  # each value as the ledger describes it: arrays of its shape, bytes of its length
            value = c["content"][row["record"]][row["key"]]
            kinds.add(row["type"])
            if row["type"] == "Array":
                assert list(np.asarray(value["array"]).shape) == row["shape"]
            elif row["type"] == "bytes":
                assert len(bytes.fromhex(value["hex"])) == row["bytes"]
        assert e["message_type"] in f.name and (e["stage"] or "") in f.name
    assert {"bytes", "list"} <= kinds, kinds  # SecAgg+'s replies: key shares, masked vectors as lists of ints
    masked = [c for c in captured if c["stage"] == "collect_masked_vectors"]
    assert len(masked) == 1 and json.dumps(masked[0]["content"]).count("hex") >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture", "d0", "d1", "d2"]  # nothing captured elsewhere


def test_invariant_the_server_publishes_its_privacy_terms_and_writes_them_to_out_dir(tmp_path):
    """After the rounds the published knowledge's meta states the run's privacy terms (rounds, epsilon a round,
    delta, the accountant's epsilon over the rounds, min_size) and its history; run config out-dir receives that
    knowledge and a summary of the run (config, history, complete)."""
    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 2, "epsilon": 8.0, "min_size": 2})
    out = tmp_path / "runs" / "server"  # made, parents included
    nodes = devices(tmp_path, make_users(4))
    started = time.perf_counter()
    strategy, _ = sync_app.simulate(nodes, {**run_config(cfg, 4), "out-dir": str(out), "wait": 7.5})
    took = time.perf_counter() - started
    assert strategy.wait_seconds == 7.5  # run config wait: how long the server waits for min-devices
    meta = strategy.knowledge.meta
    saved = sync.Knowledge.load(out / sync.GLOBAL_KNOWLEDGE_FILE)
    assert meta == {"rounds": 2, "epsilon_per_round": 8.0, "delta": cfg.delta,
                    "epsilon_total": pytest.approx(sync.rdp_epsilon(cfg.noise_multiplier, 2, cfg.delta)),
                    "min_size": 2, "history": strategy.history}
    assert 8.0 < meta["epsilon_total"] < 16.0 and len(strategy.history) == 2
    assert [h["error_bound"] for h in strategy.history] == [sync.error_bound(4, cfg)] * 2
    assert [h["sizes"] for h in strategy.history][-1] == strategy.knowledge.sizes.tolist()
    for node in nodes:  # what every device received: the same terms (issue 28's mutation run: they got none)
        mine = sync.Knowledge.load(sync.sync_dir(node["data-dir"]) / sync.GLOBAL_KNOWLEDGE_FILE)
        assert mine.meta == saved.meta
    np.testing.assert_array_equal(saved.sizes, strategy.knowledge.sizes)
    assert saved.meta == json.loads(json.dumps(meta))
    summary = json.loads((out / sync_app.SUMMARY_FILE).read_text())
    assert summary["config"] == cfg.to_run_config() and summary["complete"] is True
    assert summary["history"] == json.loads(json.dumps(strategy.history)) and 0 <= summary["seconds"] <= took
    assert strategy.min_fit_clients == 4  # run config min-devices
    few = sync.SyncConfig(**{**cfg.__dict__, "min_contributors": 3})
    with pytest.raises(UserError, match="exceeds min-devices 2"):
        sync_app.simulate(nodes, {**few.to_run_config(), "min-devices": 2})
    strategy, _ = sync_app.simulate(devices(tmp_path / "again", make_users(4)), run_config(cfg, 4))
    assert strategy.knowledge is not None and not (tmp_path / "again" / sync_app.SUMMARY_FILE).exists()
    (out / sync_app.SUMMARY_FILE).write_text("{}")
    sync_app.simulate(nodes, {**run_config(cfg, 4), "out-dir": str(out)})  # the next run, into the same --out
    assert json.loads((out / sync_app.SUMMARY_FILE).read_text())["complete"] is True


def test_invariant_a_device_folds_each_sync_run_into_its_logo_knowledge(tmp_path):
    """With LoGo's vocabulary, every device of a run keeps the published knowledge and folds it into its LoGo
    knowledge (source sync, the run's privacy terms, LoGo's decay from one run to the next); with another
    vocabulary it keeps only the sync knowledge."""
    V = len(logo.VOCABULARY)
    cfg = sync.SyncConfig(**{**CFG.__dict__, "vocab": V, "rounds": 1})
    nodes = devices(tmp_path, make_users(3, cfg))
    strategy, _ = sync_app.simulate(nodes, run_config(cfg, 3))
    sizes = np.where(strategy.knowledge.published, strategy.knowledge.sizes, 0)
    for node in nodes:
        mine = logo.GlobalKnowledge.load(logo.knowledge_dir(node["data-dir"]) / logo.KNOWLEDGE_FILE)
        assert mine.round == 1 and mine.meta["source"] == logo.SYNC_SOURCE and mine.min_size == cfg.min_size
        assert mine.meta["sync"] == {"rounds": 1, "delta": cfg.delta, "epsilon_total": pytest.approx(
            sync.rdp_epsilon(cfg.noise_multiplier, 1, cfg.delta))}
        np.testing.assert_array_equal(mine.sizes, sizes)
        [received] = [e for e in sync.read_log(node["data-dir"]) if e["kind"] == "received"]
        assert received["run"] == 1 and received["communities"] == int(strategy.knowledge.published.sum())
    sync_app.simulate(nodes, run_config(cfg, 3))
    again = logo.GlobalKnowledge.load(logo.knowledge_dir(nodes[0]["data-dir"]) / logo.KNOWLEDGE_FILE)
    assert again.round == 2
    np.testing.assert_allclose(again.sizes, sizes * (1 + 0.5 ** (1 / logo.HALF_LIFE)))
    other = devices(tmp_path / "other", make_users(3))
    sync_app.simulate(other, run_config(ONE_ROUND, 3))
    assert (sync.sync_dir(other[0]["data-dir"]) / sync.GLOBAL_KNOWLEDGE_FILE).is_file()
    assert not (logo.knowledge_dir(other[0]["data-dir"]) / logo.KNOWLEDGE_FILE).exists()


def knowledge(k=3, dim=6, sizes=(5.0, 7.0, 2.0), meta=None) -> sync.Knowledge:
    rng = np.random.default_rng(k * dim)
    c = rng.standard_normal((k, dim))
    return sync.Knowledge(centroids=c / np.linalg.norm(c, axis=1, keepdims=True), sizes=np.array(sizes[:k]),
                          steering=np.ones((k, 2, 5)), histograms=np.ones((k, len(logo.VOCABULARY))),
                          published=np.array([True, False, True][:k]),
                          meta={"rounds": 3, "epsilon_total": 2.5, "delta": 1e-6, "history": [1]} if meta is None else meta)


def test_invariant_logo_knowledge_folds_like_sync_runs_and_starts_over_from_anything_else():
    """logo_knowledge: a first run is LoGo round 1 (the run's centroids, published sizes only, meta naming sync
    and its privacy terms); a second run of the same shapes folds in with LoGo's decay; knowledge of another
    source or other shapes is dropped, not folded."""
    V = len(logo.VOCABULARY)
    cfg = sync.SyncConfig(k=3, dim=6, n_layer=2, steer_dim=5, vocab=V, rounds=3, min_size=2, seed=1)
    k1 = knowledge()
    first = sync_app.logo_knowledge(None, k1, cfg)
    assert first.round == 1 and first.half_life == logo.HALF_LIFE and first.min_size == 2
    assert first.meta == {"source": logo.SYNC_SOURCE, "embedder": "sync-dim-6", "community_cvecs": {},
                          "sync": {"rounds": 3, "epsilon_total": 2.5, "delta": 1e-6}}
    assert first.sizes.tolist() == [5.0, 0.0, 2.0]
    np.testing.assert_allclose(first.centroids, k1.centroids, atol=1e-6)
    second = sync_app.logo_knowledge(first, k1, cfg)
    decay = 0.5 ** (1 / logo.HALF_LIFE)
    assert second.round == 2
    np.testing.assert_allclose(second.sizes, np.array([5.0, 0.0, 2.0]) * (1 + decay))
    local = logo.GlobalKnowledge(**{**first.__dict__, "meta": {**first.meta, "source": "local"}})
    assert sync_app.logo_knowledge(local, k1, cfg).round == 1
    wider = sync_app.logo_knowledge(None, knowledge(dim=8), cfg)
    assert sync_app.logo_knowledge(wider, k1, cfg).round == 1  # the vectors' width changed
    fewer = sync_app.logo_knowledge(None, knowledge(k=2), cfg)
    assert sync_app.logo_knowledge(fewer, k1, cfg).round == 1  # the number of communities changed
    own = sync.SyncConfig(**{**cfg.__dict__, "dim": V})
    assert sync_app.logo_knowledge(None, knowledge(dim=V), own).meta["embedder"] is None
    assert sync_app.logo_knowledge(None, knowledge(meta={}), cfg).meta["sync"] == \
        {"rounds": None, "epsilon_total": None, "delta": None}


def fake_ray_engine(calls: list):
    """flwr.simulation.run_simulation's stand-in: records its arguments and runs the apps as the engine does —
    num_supernodes virtual devices that know only their partition id, an empty run config — in-process."""
    from flwr.supercore.task_identity import TaskIdentity

    def run_simulation(server_app, client_app, num_supernodes, backend_config):
        calls.append({"devices": num_supernodes, "backend": backend_config})
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
        grid = sync_app.LocalGrid([{"partition-id": i, "num-partitions": num_supernodes}
                                   for i in range(num_supernodes)], {}, app=client_app)
        server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    return run_simulation


def test_the_simulation_engines_apps_run_each_virtual_device_as_the_device_it_stands_for(tmp_path, monkeypatch):
    """simulate_ray hands Flower's simulation engine one virtual device per node config and the CPUs asked for;
    its apps turn partition i into node config i (data-dir, user, budget) under the run config, so the run
    publishes the plain result and each device's own folder logs and receives it. Refused in one line: no Ray,
    no out-dir, a run that wrote no result."""
    import importlib.util

    import flwr.simulation

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"\[sim\]"):
        sync_app.simulate_ray([], {"out-dir": str(tmp_path)})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else find_spec(name, *a))
    calls = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_ray_engine(calls))
    users = make_users(4)
    nodes = devices(tmp_path, users)
    with pytest.raises(UserError, match="out-dir"):
        sync_app.simulate_ray(nodes, run_config(CFG, 4))
    assert calls == []
    summary = sync_app.simulate_ray(nodes, {**run_config(CFG, 4), "out-dir": str(tmp_path / "server")},
                                    num_cpus=3, cpus_per_device=0.5)
    assert calls == [{"devices": 4, "backend": {"client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
                                                "init_args": {"num_cpus": 3, "num_gpus": 0,
                                                              "include_dashboard": False}}}]
    assert summary["complete"] and [h["devices"] for h in summary["history"]] == [4, 4, 4]
    got = sync.Knowledge.load(tmp_path / "server" / sync.GLOBAL_KNOWLEDGE_FILE)
    assert_close_to_plain(got, sync.plain_kmeans(users, CFG), 4, CFG)
    for node in nodes:
        rows = sync.read_log(node["data-dir"])
        kinds = [e["kind"] for e in rows]
        assert kinds.count("contribution") == 3 and kinds.count("received") == 1
        assert {e["run"] for e in rows} == {1}  # the engine's run id, through the device's view of its Context
    sync_app.simulate_ray(nodes, {**run_config(CFG, 4), "out-dir": str(tmp_path / "server")})
    assert calls[-1]["backend"] == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},  # one device a CPU
                                    "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: None)
    with pytest.raises(UserError, match="without a result"):
        sync_app.simulate_ray(nodes, {**run_config(CFG, 4), "out-dir": str(tmp_path / "nothing")})


def test_a_device_whose_consenting_command_is_gone_ends_with_a_failure_code(tmp_path, monkeypatch):
    """check_consent: no consent token (Flower's own tools) answers; a live token is watched once; a dead one
    ends the process with a non-zero code before anything is sent."""
    ended, watched = [], []
    monkeypatch.setattr(sync_app.os, "_exit", lambda code: ended.append(operator.index(code)))  # os._exit: an int
    monkeypatch.setattr(sync_app.lifetime, "watch", lambda tok: watched.append(tok) or "watching")
    monkeypatch.setattr(sync_app, "_watching", None)
    context = types.SimpleNamespace(node_config={})
    sync_app.check_consent(context)
    assert ended == [] and watched == []
    live = sync_app.lifetime.token()
    for _ in range(2):
        sync_app.check_consent(types.SimpleNamespace(node_config={"consent": live}))
    assert ended == [] and watched == [live]
    monkeypatch.setattr(sync_app.lifetime, "alive", lambda tok: False)
    sync_app.check_consent(types.SimpleNamespace(node_config={"consent": live}))
    assert len(ended) == 1 and ended[0] != 0


def test_invariant_the_ledger_describes_every_value_a_reply_carries_and_logs_a_failed_reply(tmp_path):
    """describe(): one row per value (record, key, type; arrays with shape and bytes, byte strings with bytes,
    lists with items and bytes); ledger_mod logs a reply without content (an error) with no values and its
    reason."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
    from flwr.supercore.task_identity import TaskIdentity

    array = Array(np.zeros((2, 3), dtype=np.float32))
    content = RecordDict({"arrays": ArrayRecord({"a": array}),
                          "config": ConfigRecord({"b": b"xyz", "l": [b"ab", b"c"], "n": [1, 2, 3], "s": "text"})})
    assert sync_app.describe(content) == [
        {"record": "arrays", "key": "a", "type": "Array", "shape": [2, 3], "bytes": len(array.data)},
        {"record": "config", "key": "b", "type": "bytes", "bytes": 3},
        {"record": "config", "key": "l", "type": "list", "items": 2, "bytes": 3},
        {"record": "config", "key": "n", "type": "list", "items": 3, "bytes": 24},
        {"record": "config", "key": "s", "type": "str"}]
    # a capture keeps every value as JSON: arrays as nested lists, bytes as hex, lists item by item
    assert sync_app._jsonable(Array(np.arange(6.0).reshape(2, 3))) == {"array": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}
    assert sync_app._jsonable([b"\x01", [b"\xff"], 3, "s"]) == [{"hex": "01"}, [{"hex": "ff"}], 3, "s"]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    grid = sync_app.LocalGrid([{"data-dir": str(tmp_path)}], {})
    msg = grid.create_message(RecordDict(), "train", 2, "round 1")
    assert (msg.metadata.dst_node_id, msg.metadata.group_id, msg.metadata.message_type) == (2, "round 1", "train")
    context = grid.contexts[2]
    reply = sync_app.ledger_mod(msg, context, lambda m, c: Message(Error(code=0, reason="it failed"), reply_to=m))
    assert reply.has_error()
    [row] = sync.read_log(tmp_path)
    assert (row["kind"], row["message_type"], row["bytes"], row["values"], row["error"]) == \
        ("message", "train", 0, [], "it failed")


def test_simulate_starts_from_the_centroids_given(tmp_path):
    """simulate(centroids=...) starts the first round there, as run config `start` does."""
    users = make_users(6)
    first = sync.plain_kmeans(users, ONE_ROUND)
    start = first.centroids[::-1].copy()
    strategy, _ = sync_app.simulate(devices(tmp_path, users), run_config(ONE_ROUND, 6), centroids=start)
    assert_close_to_plain(strategy.knowledge, sync.plain_kmeans(users, ONE_ROUND, start=start), 6, ONE_ROUND)
    np.testing.assert_array_equal(strategy.knowledge.sizes, first.sizes[::-1])


def test_a_round_with_exactly_min_contributors_is_published():
    """aggregate_fit publishes a round whose devices are exactly min_contributors (each added its noise share)
    and withholds one below it."""
    from types import SimpleNamespace

    from flwr.common import ndarrays_to_parameters

    strategy = sync_app.KMeansStrategy(CFG, min_devices=3)
    flats = [sync.encode(c, strategy.centroids, CFG)[0] for c in make_users(CFG.min_contributors)]
    fit = SimpleNamespace(parameters=ndarrays_to_parameters([np.mean(flats, axis=0)]))
    params, metrics = strategy.aggregate_fit(1, [(None, fit)] * CFG.min_contributors, [])
    assert params is not None and metrics == {"devices": CFG.min_contributors}
    assert "withheld" not in strategy.history[-1] and sum(strategy.history[-1]["sizes"]) == CFG.min_contributors
    assert strategy.aggregate_fit(2, [(None, fit)] * (CFG.min_contributors - 1), []) == (None, {})
    assert strategy.history[-1]["withheld"] is True


# ---------------------------------------------------------------- sync_app.py's sample of 200 (seed 5): its survivors' tests

def test_a_run_config_without_min_devices_waits_for_two_and_a_device_takes_knowledge_without_meta(tmp_path):
    """min-devices defaults to 2 (the fewest SecAgg+ takes); a knowledge download whose config has no meta is
    kept with an empty meta."""
    nodes = devices(tmp_path, make_users(2))
    config = run_config(ONE_ROUND, 2)
    del config["min-devices"]
    strategy, _ = sync_app.simulate(nodes, config)
    assert strategy.min_fit_clients == 2 and strategy.knowledge is not None and strategy.history[0]["devices"] == 2
    client = sync_app.SyncClient(Context(run_id=1, node_id=2, node_config=nodes[0], state=RecordDict(), run_config=config))
    assert client.evaluate(strategy.knowledge.arrays(), {}) == (0.0, 1, {})
    kept = sync.Knowledge.load(sync.sync_dir(nodes[0]["data-dir"]) / sync.GLOBAL_KNOWLEDGE_FILE)
    assert kept.meta == {}
    np.testing.assert_array_equal(kept.sizes, strategy.knowledge.sizes)


def test_invariant_every_secagg_stage_waits_the_run_configs_timeout(tmp_path, monkeypatch):
    """Run config `timeout` bounds each of SecAgg+'s four stages (setup, share keys, collect masked vectors,
    unmask). (Flower 1.x's default evaluate workflow, the knowledge's download, passes no timeout: the last call.)"""
    seen = []
    real = sync_app.LocalGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        seen.append(timeout)
        return real(self, messages, timeout=timeout)

    monkeypatch.setattr(sync_app.LocalGrid, "send_and_receive", recording)
    sync_app.simulate(devices(tmp_path, make_users(3)), {**run_config(ONE_ROUND, 3), "timeout": 12.5})
    assert len(seen) == 5 and seen[:4] == [12.5] * 4, seen


def test_invariant_a_devices_ledger_records_the_round_of_each_contribution(tmp_path):
    nodes = devices(tmp_path, make_users(3))
    sync_app.simulate(nodes, run_config(sync.SyncConfig(**{**CFG.__dict__, "rounds": 2}), 3))
    for node in nodes:
        assert [e["round"] for e in sync.read_log(node["data-dir"]) if e["kind"] == "contribution"] == [1, 2]


def test_invariant_a_run_whose_every_round_is_withheld_publishes_and_writes_no_knowledge(tmp_path):
    """A device drops before sending its masked vector: the round's sum covers 2 devices, below min_contributors
    3, so it is withheld; with no round published the run ends without knowledge (no file, no download) and
    its summary says so."""
    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 1, "min_contributors": 3})
    nodes = devices(tmp_path, make_users(3))
    out = tmp_path / "out"
    strategy, _ = sync_app.simulate(nodes, {**run_config(cfg, 3), "out-dir": str(out)},
                                    drop_at={3: "collect_masked_vectors"})
    assert strategy.knowledge is None and strategy.history[0]["withheld"] is True
    assert sorted(p.name for p in out.iterdir()) == [sync_app.SUMMARY_FILE]
    assert json.loads((out / sync_app.SUMMARY_FILE).read_text())["history"][0]["devices"] == 2
    for node in nodes:
        assert not [e for e in sync.read_log(node["data-dir"]) if e["kind"] == "received"]


def test_invariant_every_ledger_row_names_its_run(tmp_path):
    """Each row a device logs (its messages, contributions, the knowledge received, a refusal) carries the run id."""
    nodes = devices(tmp_path, make_users(3))
    nodes[2]["epsilon-budget"] = "0.0001"  # refuses from the first round
    sync_app.simulate(nodes, run_config(ONE_ROUND, 2))
    rows = [e for node in nodes for e in sync.read_log(node["data-dir"])]
    assert {"message", "contribution", "received", "refused"} <= {e["kind"] for e in rows}
    assert all(e.get("run") == 1 for e in rows), [e for e in rows if e.get("run") != 1][:2]


# ---------------------------------------------------------------- sync_app.py's every-mutant run: its survivors' tests

def test_invariant_the_grids_byte_count_of_each_device_is_what_its_ledger_logs(tmp_path):
    """LocalGrid.sent_bytes (bench_sync's bytes a device) counts, for each device, the bytes of the values its
    replies carry — the bytes its own ledger logs message by message — also for a device that answered the first
    stages and then refused (its error reply carries nothing and takes nothing away)."""
    nodes = devices(tmp_path, make_users(4))
    nodes[3]["epsilon-budget"] = "0.0001"  # refuses its contribution, after SecAgg+'s setup and key shares
    _, grid = sync_app.simulate(nodes, run_config(sync.SyncConfig(**{**CFG.__dict__, "rounds": 2}), 3))
    logged = {}
    for i, node in enumerate(nodes):
        rows = [e for e in sync.read_log(node["data-dir"]) if e["kind"] == "message"]
        assert all(e["bytes"] == sum(v.get("bytes", 0) for v in e["values"]) for e in rows)  # scalars: none
        logged[i + 2] = sum(e["bytes"] for e in rows)
    assert [e["kind"] for e in sync.read_log(nodes[3]["data-dir"])].count("refused") == 2
    assert all(b > 0 for b in logged.values()) and logged[5] < logged[2]
    assert grid.sent_bytes == logged


def test_a_device_whose_logo_knowledge_is_unreadable_starts_it_over(tmp_path):
    """A damaged DATA_DIR/logo/knowledge.npz is replaced by the sync run's knowledge as LoGo round 1."""
    V = len(logo.VOCABULARY)
    cfg = sync.SyncConfig(k=3, dim=6, n_layer=2, steer_dim=5, vocab=V, rounds=3, min_size=2, seed=1)
    path = logo.knowledge_dir(tmp_path) / logo.KNOWLEDGE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a knowledge file")
    assert sync_app.save_logo_knowledge(tmp_path, knowledge(), cfg) == path
    kept = logo.GlobalKnowledge.load(path)
    assert kept.round == 1 and kept.meta["source"] == logo.SYNC_SOURCE and kept.sizes.tolist() == [5.0, 0.0, 2.0]


def test_invariant_the_server_logs_each_rounds_key_shares_with_the_number_of_devices(tmp_path):
    """Each round logs KEY_SHARES_COLLECTED and how many devices passed 'share keys' (what `localpers sync-server`'s
    process tests wait for before they stop a device)."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    flower = logging.getLogger("flwr")
    flower.addHandler(handler)
    try:
        sync_app.simulate(devices(tmp_path, make_users(3)), run_config(sync.SyncConfig(**{**CFG.__dict__, "rounds": 2}), 3))
    finally:
        flower.removeHandler(handler)
    assert [m for m in seen if sync_app.KEY_SHARES_COLLECTED in m] == [f"{sync_app.KEY_SHARES_COLLECTED} 3 devices"] * 2


def test_a_start_file_holding_a_pickle_is_never_unpickled(tmp_path):
    """Run config `start` is read as a plain array: an object array (a pickle) in it is refused, never run."""
    marker = tmp_path / "unpickled"
    start = tmp_path / "start.npy"
    np.save(start, np.array([_Unpickles(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises((ValueError, UserError)):
        sync_app.simulate(devices(tmp_path, make_users(2)), {**run_config(ONE_ROUND, 2), "start": str(start)})
    assert not marker.exists()


class _Unpickles:
    """Unpickling it creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_invariant_each_device_gets_the_secagg_terms_the_error_bound_assumes(tmp_path, monkeypatch):
    """SecAgg+'s setup tells every device weight bound 1 (each device's weight: no quantization step is spent on
    weighting), the run's clipping range, sync.QUANTIZATION_RANGE and sync.MODULUS_RANGE: the terms of
    sync.error_bound and sync.check_cohort."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    setups = []
    real = sync_app.LocalGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            config = m.content.config_records.get(RECORD_KEY_CONFIGS)
            if config is not None and config.get(Key.STAGE) == Stage.SETUP:
                setups.append(dict(config))
        return real(self, messages, timeout=timeout)

    monkeypatch.setattr(sync_app.LocalGrid, "send_and_receive", recording)
    cfg = sync.SyncConfig(**{**ONE_ROUND.__dict__, "epsilon": 4.0})
    sync_app.simulate(devices(tmp_path, make_users(3)), run_config(cfg, 3))
    assert len(setups) == 3
    for setup in setups:
        assert setup[Key.MAX_WEIGHT] == 1.0 and setup[Key.CLIPPING_RANGE] == pytest.approx(cfg.clipping_range)
        assert (setup[Key.TARGET_RANGE], setup[Key.MOD_RANGE]) == (sync.QUANTIZATION_RANGE, sync.MODULUS_RANGE)


class _Leaving(sync_app.LocalGrid):
    """A grid that stops listing a device once it went offline (as a SuperLink forgets a dead node)."""

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.dropped]


def test_later_rounds_go_on_with_the_devices_left_and_a_dropped_device_stays_gone(tmp_path):
    """Round 1 waits for min-devices; a device that drops in round 1 never answers again, and the later rounds go
    on with the devices left (at least min_contributors) instead of waiting for min-devices again."""
    from flwr.supercore.task_identity import TaskIdentity

    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 2})
    nodes = devices(tmp_path, make_users(4))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    config = {**run_config(cfg, 4), "wait": 1.0}
    grid = _Leaving(nodes, config)
    grid.drop_at = {5: "collect_masked_vectors"}
    strategy = sync_app.run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                                 run_config=config))
    assert [h["devices"] for h in strategy.history] == [3, 3] and strategy.knowledge is not None
    gone = sync.read_log(nodes[3]["data-dir"])  # answered round 1's first two stages, then nothing
    assert [e["stage"] for e in gone if e["kind"] == "message"] == ["setup", "share_keys"]
    assert not [e for e in gone if e["kind"] != "message"]


def test_a_round_of_one_device_is_published_when_one_contributor_is_enough():
    """With min_contributors 1 a round whose SecAgg+ sum holds one device is published (its noise share is the
    whole noise)."""
    from types import SimpleNamespace

    from flwr.common import ndarrays_to_parameters

    cfg = sync.SyncConfig(**{**CFG.__dict__, "min_contributors": 1})
    strategy = sync_app.KMeansStrategy(cfg, min_devices=2)
    [flat] = [sync.encode(c, strategy.centroids, cfg)[0] for c in make_users(1)]
    fit = SimpleNamespace(parameters=ndarrays_to_parameters([flat]))
    params, metrics = strategy.aggregate_fit(1, [(None, fit)], [])
    assert params is not None and metrics == {"devices": 1} and sum(strategy.history[-1]["sizes"]) == 1
