"""Private sync (localpers/sync/sync.py, sync_app.py): SecAgg+ sums recovered exactly, overflow refused, DP noise and
accounting, budget, minimum community size, the device ledger, and no network socket while sync is off."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from localpers.sync import sync
from localpers.errors import UserError
from tests.serve_helpers import free_port, serve_process, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
CFG = sync.SyncConfig(k=3, dim=6, n_layer=2, steer_dim=5, vocab=4, rounds=3, min_size=1, min_contributors=2, seed=1)


def make_users(n: int, cfg: sync.SyncConfig = CFG, seed: int = 0) -> list[sync.Contribution]:
    """n users around cfg.k well separated directions."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((cfg.k, cfg.dim)) * 3
    return [sync.Contribution(vector=centers[i % cfg.k] + rng.standard_normal(cfg.dim),
                              steering=rng.standard_normal((cfg.n_layer, cfg.steer_dim)) * 4,
                              histogram=rng.integers(0, 3, cfg.vocab).astype(np.float64)) for i in range(n)]


def devices(tmp_path, users, budget="inf") -> list[dict]:
    nodes = []
    for i, c in enumerate(users):
        sync.save_contribution(tmp_path / f"d{i}", f"user{i}", c)
        nodes.append({"data-dir": str(tmp_path / f"d{i}"), "user": f"user{i}", "epsilon-budget": budget})
    return nodes


def run_config(cfg: sync.SyncConfig, n: int) -> dict:
    return {**cfg.to_run_config(), "min-devices": n, "timeout": 30.0, "wait": 60.0}


def assert_close_to_plain(got: sync.Knowledge, plain: sync.Knowledge, n: int, cfg: sync.SyncConfig) -> None:
    bound = sync.error_bound(n, cfg)
    assert np.array_equal(got.sizes, plain.sizes) and np.array_equal(got.published, plain.published)
    np.testing.assert_allclose(got.steering, plain.steering, atol=bound * cfg.steer_clip)
    np.testing.assert_allclose(got.histograms, plain.histograms, atol=bound * cfg.hist_clip)
    np.testing.assert_allclose(got.centroids, plain.centroids, atol=1e-4)


def test_secagg_rounds_equal_the_plain_computation(tmp_path):
    """Invariant: three rounds of federated k-means through Flower's SecAgg+ publish the plain in-process result
    within error_bound (counts exactly), and the devices receive it."""
    from localpers.sync.sync_app import simulate

    users = make_users(7)
    nodes = devices(tmp_path, users)
    strategy, grid = simulate(nodes, run_config(CFG, 7))
    assert [h["devices"] for h in strategy.history] == [7, 7, 7]
    assert_close_to_plain(strategy.knowledge, sync.plain_kmeans(users, CFG), 7, CFG)
    mine = sync.Knowledge.load(sync.sync_dir(nodes[0]["data-dir"]) / sync.GLOBAL_KNOWLEDGE_FILE)
    np.testing.assert_array_equal(mine.sizes, strategy.knowledge.sizes)


def test_a_run_started_from_published_centroids_continues_those_communities(tmp_path):
    """Invariant: with run config `start` (what `localpers sync-server` passes from the previous run in --out), the
    federated rounds start from those centroids and publish plain_kmeans(start=...) — community j stays
    community j — and a start of the wrong shape is refused before any round."""
    from localpers.sync.sync_app import simulate

    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 1})
    users = make_users(6)
    first = sync.plain_kmeans(users, cfg)
    start = first.centroids[::-1].copy()  # the same communities, numbered the other way round
    np.save(tmp_path / "start.npy", start)
    strategy, _ = simulate(devices(tmp_path, users), {**run_config(cfg, 6), "start": str(tmp_path / "start.npy")})
    assert_close_to_plain(strategy.knowledge, sync.plain_kmeans(users, cfg, start=start), 6, cfg)
    np.testing.assert_array_equal(strategy.knowledge.sizes, first.sizes[::-1])
    np.save(tmp_path / "bad.npy", start[:, :2])
    with pytest.raises(UserError, match="start centroids"):
        simulate(devices(tmp_path, users), {**run_config(cfg, 6), "start": str(tmp_path / "bad.npy")})


@pytest.mark.slow  # starts Ray (about 20 s); needs the [sim] extra
def test_flower_simulation_engine_publishes_the_plain_computation(tmp_path):
    """Invariant: the same ServerApp and ClientApp (SecAgg+ included) in Flower's simulation engine (Ray workers,
    virtual devices given only a partition id) publish the plain in-process result within error_bound, and
    every virtual device receives it into its own data directory."""
    pytest.importorskip("ray", reason="the [sim] extra (bash install.sh sim)")
    from localpers.sync.sync_app import simulate_ray

    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 2})
    users = make_users(7)
    nodes = devices(tmp_path, users)
    # stages wait up to 600 s: Ray's workers start (and import Flower) while the first stage waits
    summary = simulate_ray(nodes, {**run_config(cfg, 7), "timeout": 600.0, "out-dir": str(tmp_path / "server")})
    assert summary["complete"] and [h["devices"] for h in summary["history"]] == [7, 7]
    got = sync.Knowledge.load(tmp_path / "server" / sync.GLOBAL_KNOWLEDGE_FILE)
    assert_close_to_plain(got, sync.plain_kmeans(users, cfg), 7, cfg)
    for node in nodes:
        mine = sync.Knowledge.load(sync.sync_dir(node["data-dir"]) / sync.GLOBAL_KNOWLEDGE_FILE)
        np.testing.assert_array_equal(mine.sizes, got.sizes)


@pytest.mark.parametrize("stage", ["share_keys", "collect_masked_vectors"])
def test_dropout_is_recovered(tmp_path, stage):
    """Invariant: a device that goes offline during the round leaves the survivors' exact sum (SecAgg+ removes its
    pairwise masks from the key shares it gave its neighbours)."""
    from localpers.sync.sync_app import simulate

    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 1})
    users = make_users(5)
    strategy, _ = simulate(devices(tmp_path, users), run_config(cfg, 5), drop_at={3: stage})
    assert strategy.history[0]["devices"] == 4
    assert_close_to_plain(strategy.knowledge, sync.plain_kmeans(users[:1] + users[2:], cfg), 4, cfg)


def test_cohort_overflow_is_refused_where_the_modular_sum_wraps():
    """Invariant: check_cohort accepts n exactly while n values of SecAgg+'s largest quantized value sum below the
    modulus — the first refused n is the first whose modular sum comes back wrong."""
    q, m = sync.QUANTIZATION_RANGE, sync.MODULUS_RANGE
    largest_ok = (m - 1) // q
    for n in (largest_ok, largest_ok + 1):
        wraps = (n * q) % m != n * q
        if wraps:
            with pytest.raises(UserError, match="overflows SecAgg"):
                sync.check_cohort(n, CFG)
        else:
            sync.check_cohort(n, CFG)
    with pytest.raises(UserError):
        sync.check_cohort(1, CFG)


def test_accountant_upper_bounds_the_exact_gaussian_epsilon():
    """Oracle: the RDP accountant's epsilon is an upper bound on the exact epsilon of the Gaussian mechanism
    (Balle & Wang, ICML 2018, Thm. 8: delta(eps) = Phi(1/2z - eps z) - e^eps Phi(-1/2z - eps z)), and not loose
    by more than 40%; composition of T rounds costs more than one and less than T times one."""
    delta = 1e-6
    for z in (0.5, 1.0, 2.0, 5.0):
        def exact_delta(eps):
            return norm.cdf(0.5 / z - eps * z) - math.exp(eps) * norm.cdf(-0.5 / z - eps * z)

        lo, hi = 0.0, 100.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if exact_delta(mid) > delta else (lo, mid)
        eps = sync.rdp_epsilon(z, 1, delta)
        assert hi <= eps <= 1.4 * hi, (z, hi, eps)
        assert eps < sync.rdp_epsilon(z, 4, delta) < 4 * eps
    for target in (1.0, 4.0, 16.0):
        z = sync.noise_multiplier_for_epsilon(target, delta)
        assert sync.rdp_epsilon(z, 1, delta) <= target < sync.rdp_epsilon(z * 0.99, 1, delta)


def test_noise_shares_add_up_to_the_calibrated_noise():
    """Invariant: min_contributors noise shares sum to N(0, noise_std^2) per coordinate (noise_std = z * DELTA),
    and the signal survives SecAgg+'s clipping (the range leaves 6 share deviations of headroom)."""
    cfg = sync.SyncConfig(**{**CFG.__dict__, "epsilon": 4.0, "min_contributors": 3})
    users = make_users(3, cfg)
    centroids = sync.initial_centroids(cfg)
    rng = np.random.default_rng(0)
    plain = sum(sync.encode(c, centroids, cfg)[0] for c in users)
    residuals = np.concatenate([sum(sync.encode(c, centroids, cfg, rng)[0] for c in users) - plain
                                for _ in range(300)])
    assert abs(residuals.mean()) < 0.05 * cfg.noise_std
    assert abs(residuals.std() / cfg.noise_std - 1) < 0.05
    assert cfg.clipping_range == pytest.approx(1 + 6 * cfg.noise_std / math.sqrt(3))


def test_sensitivity_is_delta_for_any_user():
    """Invariant: adding one user changes the summed vector by at most DELTA in L2, whatever their raw norms."""
    centroids = sync.initial_centroids(CFG)
    for c in make_users(20, seed=5):
        c.steering *= 1000.0
        c.histogram *= 50.0
        assert np.linalg.norm(sync.encode(c, centroids, CFG)[0]) <= sync.DELTA + 1e-9


def test_small_communities_are_never_published():
    cfg = sync.SyncConfig(**{**CFG.__dict__, "min_size": 3})
    sums = sync.Sums(counts=np.array([5.0, 2.0, 0.2]), vectors=np.ones((3, cfg.dim)),
                     steering=np.ones((3, cfg.n_layer, cfg.steer_dim)), histograms=np.ones((3, cfg.vocab)))
    previous = sync.initial_centroids(cfg)
    k = sync.publish(sums, previous, cfg)
    assert k.published.tolist() == [True, False, False]
    assert k.sizes.tolist() == [5.0, 0.0, 0.0]
    assert not k.steering[1:].any() and not k.histograms[1:].any()
    np.testing.assert_array_equal(k.centroids[1:], previous[1:])


def test_device_stops_at_its_budget_and_logs_what_it_sent(tmp_path):
    """A device whose budget does not cover the next round refuses it (the round goes on without it, SecAgg+
    treats it as a dropout); the ledger holds shapes, bytes, norms and epsilon — numbers only."""
    from localpers.sync.sync_app import simulate

    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 2, "epsilon": 2.0})
    users = make_users(4)
    nodes = devices(tmp_path, users)
    nodes[0]["epsilon-budget"] = "2.5"  # one round of 2.0 fits, two compose to 2.92
    strategy, _ = simulate(nodes, run_config(cfg, 4))
    assert [h["devices"] for h in strategy.history] == [4, 3]
    log = sync.read_log(nodes[0]["data-dir"])
    kinds = [e["kind"] for e in log]
    assert kinds.count("contribution") == 1 and kinds.count("refused") == 1
    spent = sync.spent(nodes[0]["data-dir"], cfg.delta)
    assert spent == pytest.approx(sync.rdp_epsilon(cfg.noise_multiplier, 1, cfg.delta)) and spent <= 2.5
    sent = [e for e in log if e["kind"] == "message" and e["stage"] == "collect_masked_vectors"]
    assert sent and sent[0]["bytes"] > 8 * cfg.length
    text = json.dumps(log)
    assert "user0" not in text and str(nodes[0]["data-dir"]) not in text
    out = subprocess.run([sys.executable, "-m", "localpers", "sync", "--log", "--data-dir", nodes[0]["data-dir"]],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and "refused" in out.stdout and "epsilon" in out.stdout


def test_a_device_without_a_limit_syncs_again_after_noiseless_rounds(tmp_path):
    """Invariant: noiseless rounds spend an infinite epsilon, which exhausts every finite budget but never the
    budget inf (`localpers sync --epsilon-budget inf` joins again); a noisy round is checked against its budget."""
    from localpers.sync.sync_app import simulate

    cfg = sync.SyncConfig(**{**CFG.__dict__, "rounds": 1})
    nodes = devices(tmp_path, make_users(3))
    data_dir = nodes[0]["data-dir"]
    assert not sync.exhausted(data_dir, 16.0, cfg.delta)
    simulate(nodes, run_config(cfg, 3))
    assert sync.spent(data_dir, cfg.delta) == math.inf
    assert sync.exhausted(data_dir, 16.0, cfg.delta) and not sync.exhausted(data_dir, math.inf, cfg.delta)
    strategy, _ = simulate(nodes, run_config(cfg, 3))  # the same devices, a second run
    assert [h["devices"] for h in strategy.history] == [3]


def test_bad_contribution_is_a_user_error(tmp_path):
    c = make_users(1)[0]
    c.steering = np.zeros((5, 5))
    with pytest.raises(UserError, match="steering"):
        sync.encode(c, sync.initial_centroids(CFG), CFG)
    with pytest.raises(UserError, match="no local signals"):
        sync.load_contribution(tmp_path, "nobody")
    r = subprocess.run([sys.executable, "-m", "localpers", "sync", "--user", "nobody", "--data-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "no local signals" in r.stderr and "Traceback" not in r.stderr


def _sockets(pid: int) -> list[tuple[str, str, str]]:
    """(protocol, local address, remote address) of every inet socket of process pid, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.append((proto, fields[1], fields[2]))
    return found


def _is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian
        return bytes.fromhex(host)[::-1][0] == 127
    return host in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def test_with_sync_off_the_server_has_no_socket_but_loopback(tmp_path):
    """Opt-in: `localpers serve` (sync not running) after answering a chat has only loopback inet sockets, and
    the serving path never imports Flower."""


    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = serve_process("--port", str(port), "--data-dir", str(tmp_path))
    try:
        import httpx

        wait_until_up(f"http://127.0.0.1:{port}", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200
        found = _sockets(proc.pid)
        assert found, "the server must at least listen on loopback"
        for proto, local, remote in found:
            assert _is_loopback(local), (proto, local)
            assert remote.split(":")[0].strip("0") == "" or _is_loopback(remote), (proto, remote)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    code = "import sys, localpers.serve.server, localpers.cli.cli; sys.exit('flwr' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env).returncode == 0


def test_pyproject_declares_the_flower_app():
    """pyproject's [tool.flwr.app.components] name the ServerApp and ClientApp that sync-server runs, and its
    run config holds every SyncConfig field (so `flwr run .` gets the same app)."""
    import importlib
    import tomllib

    from flwr.client import ClientApp
    from flwr.server import ServerApp

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
    for key, ref in app["components"].items():
        module, attr = ref.split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), kinds[key])
    cfg = sync.SyncConfig.from_run_config(app["config"])
    assert set(cfg.to_run_config()) <= set(app["config"])


def test_a_failed_sync_server_run_keeps_the_previous_runs_knowledge(tmp_path):
    """sync-server sets the published file aside for the run: restored when the run writes none (failure,
    interruption), replaced when it publishes a new one."""
    from localpers.cli.sync_cli import kept_unless_replaced

    path = tmp_path / "global_knowledge.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with kept_unless_replaced(path):
            assert not path.exists()  # the run sees no stale file
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    with kept_unless_replaced(path) as published:
        pass
    assert path.read_text() == "old" and not published()
    with kept_unless_replaced(path) as published:
        path.write_text("new")
    assert path.read_text() == "new" and published() and not list(tmp_path.glob("*.previous"))


def test_sync_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    """User mistakes end in one line: a non-positive epsilon budget, --out naming a file, a busy port."""
    import socket

    from localpers.cli.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["sync-server", "--out", str(tmp_path / "file"), "--devices", "2"]) == 2
    assert "--out" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["sync-server", "--out", str(tmp_path / "o"), "--devices", "2", "--port", str(port)]) == 2
        assert "is in use" in capsys.readouterr().err
    assert main(["sync", "--user", "alice", "--epsilon-budget", "-1", "--data-dir", str(tmp_path / "d")]) == 2
    assert "--epsilon-budget must be positive" in capsys.readouterr().err


def test_invariant_encode_then_decode_returns_each_part_where_it_was_put_and_any_share_std_adds_noise():
    """decode(encode(c)) gives back the count, the unit vector, the clipped steering and the clipped histogram
    in the user's community (each slice where encode put it), zeros elsewhere; a device adds its noise share
    whenever share_std > 0, small ones included; initial centroids are unit rows (mutation survivors of
    sync/sync.py, docs/history/mutation/)."""
    centroids = sync.initial_centroids(CFG)
    assert centroids.shape == (CFG.k, CFG.dim)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0)
    [c] = make_users(1)
    flat, j = sync.encode(c, centroids, CFG)
    got = sync.decode(flat, CFG)
    assert got.counts[j] == 1.0 and got.counts.sum() == 1.0
    assert np.allclose(got.vectors[j], c.vector / np.linalg.norm(c.vector))
    steering = c.steering.ravel() / max(CFG.steer_clip, np.linalg.norm(c.steering))
    assert np.allclose(got.steering[j].ravel(), steering)
    assert np.allclose(got.histograms[j], c.histogram / max(CFG.hist_clip, np.linalg.norm(c.histogram)))
    others = [i for i in range(CFG.k) if i != j]
    assert not got.histograms[others].any() and not got.steering[others].any()
    small = sync.SyncConfig(**{**CFG.__dict__, "epsilon": 50.0, "min_contributors": 4})
    assert 0 < small.share_std < 1
    noised, _ = sync.encode(c, centroids, small, np.random.default_rng(0))
    assert not np.allclose(noised, sync.encode(c, centroids, small)[0])


def test_invariant_a_device_is_exhausted_once_it_has_spent_exactly_its_budget(tmp_path):
    sync.log_sent(tmp_path, {"kind": "contribution", "noise_multiplier": 2.0})
    budget = sync.spent(tmp_path, CFG.delta)
    assert 0 < budget < math.inf
    assert sync.exhausted(tmp_path, budget, CFG.delta) and not sync.exhausted(tmp_path, budget * 1.01, CFG.delta)
    assert not sync.exhausted(tmp_path, math.inf, CFG.delta)


def test_invariant_logo_round_sums_serve_only_published_communities_with_their_sizes():
    k = sync.Knowledge(centroids=np.eye(3, 6), sizes=np.array([5.0, 7.0, 2.0]),
                       steering=np.ones((3, 2, 5)), histograms=np.ones((3, 4)),
                       published=np.array([True, False, True]))
    sums = sync.logo_round_sums(k)
    assert set(sums) == {"vector_sum", "count", "steering_sum", "steering_count", "counts"}
    assert sums["count"].tolist() == [5.0, 0.0, 2.0] == sums["steering_count"].tolist()
    assert np.allclose(sums["vector_sum"], np.eye(3, 6) * np.array([[5.0], [0.0], [2.0]]))
    assert np.allclose(sums["steering_sum"][1], 0.0) and np.allclose(sums["steering_sum"][0], 5.0)


def test_invariant_the_strategy_waits_for_enough_devices_and_records_each_rounds_failures():
    """configure_fit asks every device once enough are there (waiting for them when they are not), and gives up
    only when the wait fails; aggregate_fit records the round's devices and failures (mutation survivors of
    sync/sync_app.py, docs/history/mutation/)."""
    from localpers.sync.sync_app import KMeansStrategy

    class Devices:
        def __init__(self, available, arrives):
            self.available, self.arrives, self.waited = available, arrives, []

        def num_available(self):
            return self.available

        def wait_for(self, n, timeout):
            self.waited.append((n, timeout))
            return self.arrives

        def all(self):
            return {str(i): f"proxy{i}" for i in range(3)}

    strategy = KMeansStrategy(CFG, min_devices=3, wait_seconds=7.0)
    late = Devices(available=1, arrives=True)
    assert [proxy for proxy, _ in strategy.configure_fit(1, None, late)] == ["proxy0", "proxy1", "proxy2"]
    assert late.waited == [(3, 7.0)]
    assert strategy.configure_fit(1, None, Devices(available=1, arrives=False)) == []
    assert len(strategy.configure_fit(2, None, Devices(available=3, arrives=False))) == 3
    assert strategy.aggregate_fit(1, [object()], [object(), object()]) == (None, {})  # 1 < min_contributors
    assert strategy.history == [{"round": 1, "devices": 1, "failures": 2, "withheld": True}]
    from types import SimpleNamespace

    from flwr.common import ndarrays_to_parameters

    flats = [sync.encode(c, strategy.centroids, CFG)[0] for c in make_users(3)]
    fit = SimpleNamespace(parameters=ndarrays_to_parameters([np.mean(flats, axis=0)]))
    strategy.aggregate_fit(2, [(None, fit)] * 3, [object()])
    assert {k: strategy.history[-1][k] for k in ("round", "devices", "failures")} == \
        {"round": 2, "devices": 3, "failures": 1}
    assert sum(strategy.history[-1]["sizes"]) > 0 and strategy.knowledge is not None


# -- the full mutation run of sync/sync.py (docs/history/mutation/localpers.sync.sync.survivors.txt) --------------

def test_invariant_secagg_shares_everyone_up_to_16_then_an_odd_log_degree_with_a_majority_threshold():
    """Up to 16 devices: all neighbours (1.0), half must survive (0.5); above: 2 * ceil(log2 n) + 1 neighbours
    (odd) of which a strict majority must survive, growing like log n."""
    for n in (2, 3, 16):
        assert sync.secagg_shares(n) == (1.0, 0.5)
    for n, shares in ((17, 11), (32, 11), (33, 13), (1024, 21), (1025, 23)):
        got, threshold = sync.secagg_shares(n)
        assert (got, threshold) == (shares, shares // 2 + 1) and got % 2 == 1 and threshold > got / 2, n
        assert isinstance(got, int) and got < n


def test_invariant_the_error_bound_is_n_roundings_of_one_quantization_step():
    """n devices each add less than one step 2c/Q of SecAgg+'s quantizer: the bound is n * 2c / Q, linear in n
    and in the clipping range, and shrinks as Q grows."""
    noisy = sync.SyncConfig(**{**CFG.__dict__, "epsilon": 0.5, "delta": 1e-5})
    for cfg in (CFG, noisy):
        c = cfg.clipping_range
        assert sync.error_bound(10, cfg) == pytest.approx(10 * 2 * c / sync.QUANTIZATION_RANGE)
        assert sync.error_bound(10, cfg, quantization_range=1000) == pytest.approx(10 * 2 * c / 1000)
        assert sync.error_bound(20, cfg) == pytest.approx(2 * sync.error_bound(10, cfg))
    assert noisy.clipping_range > 2 and sync.error_bound(1, noisy) > sync.error_bound(1, CFG)


def test_invariant_check_cohort_refuses_fewer_than_two_devices_and_any_cohort_whose_sum_can_wrap():
    """n * quantization_range must stay below the modulus: the largest cohort allowed is (M - 1) // Q, one more
    is refused, and the message says how many devices fit."""
    sync.check_cohort(2, CFG)
    with pytest.raises(UserError, match="at least 2 devices, got 1"):
        sync.check_cohort(1, CFG)
    largest = (sync.MODULUS_RANGE - 1) // sync.QUANTIZATION_RANGE
    sync.check_cohort(largest, CFG)
    with pytest.raises(UserError, match=f"cohort of {largest + 1} devices overflows.*at most {largest} devices"):
        sync.check_cohort(largest + 1, CFG)
    sync.check_cohort(9, CFG, quantization_range=10, modulus_range=100)  # 90 < 100
    with pytest.raises(UserError, match="at most 9 devices"):
        sync.check_cohort(10, CFG, quantization_range=10, modulus_range=100)  # 100 wraps
    sync.check_cohort(10, CFG, quantization_range=10, modulus_range=101)  # 100 < 101
    with pytest.raises(UserError, match="at most 10 devices"):
        sync.check_cohort(11, CFG, quantization_range=10, modulus_range=101)


def test_invariant_a_sync_config_refuses_each_bad_field_naming_it_and_takes_every_edge_value():
    for name in ("k", "dim", "vocab", "rounds", "min_contributors"):
        with pytest.raises(UserError, match=f"sync: {name} must be >= 1, got 0"):
            sync.SyncConfig(**{name: 0})
    sync.SyncConfig(n_layer=0, steer_dim=0, min_size=1)  # no steering; a community of one
    for bad in ({"n_layer": -1}, {"steer_dim": -1}, {"min_size": 0}):
        with pytest.raises(UserError, match="n_layer and steer_dim must be >= 0, min_size >= 1"):
            sync.SyncConfig(**bad)
    sync.SyncConfig(epsilon=0.5, delta=1e-9)
    for bad in ({"epsilon": 0.0}, {"epsilon": -1.0}, {"delta": 0.0}, {"delta": 1.0}, {"delta": 1.5}):
        with pytest.raises(UserError, match="need epsilon > 0 and 0 < delta < 1"):
            sync.SyncConfig(**bad)
    sync.SyncConfig(steer_clip=0.5, hist_clip=0.5)
    for bad in ({"steer_clip": 0.0}, {"hist_clip": 0.0}):
        with pytest.raises(UserError, match="steer_clip and hist_clip must be > 0"):
            sync.SyncConfig(**bad)


def test_invariant_the_run_config_has_dashed_keys_keeps_numbers_and_round_trips():
    """Flower's run config: dashed keys, numbers as numbers, an infinite epsilon as the string "inf"."""
    for cfg in (CFG, sync.SyncConfig(epsilon=2.0, delta=1e-5)):
        rc = cfg.to_run_config()
        assert all("_" not in key for key in rc) and rc["min-size"] == cfg.min_size
        assert rc["delta"] == cfg.delta and isinstance(rc["delta"], float) and isinstance(rc["k"], int)
        assert sync.SyncConfig.from_run_config(rc) == cfg
    assert CFG.to_run_config()["epsilon"] == "inf" and sync.SyncConfig(epsilon=2.0).to_run_config()["epsilon"] == 2.0


def test_invariant_assign_picks_the_nearest_centroid_by_cosine_whatever_the_centroids_norms():
    centroids = np.array([[10.0, 0.0], [0.1, 0.1], [0.0, -3.0]])
    assert sync.assign(np.array([1.0, 1.0]), centroids) == 1  # 45 degrees away from the long one
    assert sync.assign(np.array([1.0, 0.2]), centroids) == 0
    assert sync.assign(np.array([0.1, -1.0]), centroids) == 2


def _balle_epsilon(zs, delta):
    """Balle et al. 2020, Thm. 21, written from the paper: min over orders a of
    rdp(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1), rdp(a) = sum a / (2 z^2)."""
    return max(0.0, min(sum(a / (2 * z * z) for z in zs) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                        for a in sync.RDP_ORDERS))


def _exact_gaussian_epsilon(z, delta):
    """The exact epsilon of one Gaussian mechanism (Balle and Wang 2018): the root of
    Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z) = delta; every valid accountant is at or above it."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * norm.cdf(-1 / (2 * z) - eps * z)
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return hi


def test_invariant_composed_epsilon_is_balles_conversion_and_never_below_the_exact_gaussian_epsilon():
    assert sync.compose_epsilon([], 1e-5) == 0.0 and sync.compose_epsilon([1.0, 0.0], 1e-5) == math.inf
    for zs in ([0.8], [2.0], [5.0, 5.0, 5.0], [50.0]):
        eps = sync.compose_epsilon(zs, 1e-5)
        assert eps == pytest.approx(_balle_epsilon(zs, 1e-5), rel=1e-12), zs
        if len(zs) == 1:
            assert _exact_gaussian_epsilon(zs[0], 1e-5) <= eps <= 1.5 * _exact_gaussian_epsilon(zs[0], 1e-5) + 0.05
    assert 0 < sync.compose_epsilon([50.0], 1e-5) < 0.5  # much noise: a small epsilon, not clamped up


def test_invariant_publish_gives_large_enough_communities_their_unit_mean_and_keeps_the_rest_previous():
    """publish (the server's step): noisy counts rounded, negatives 0; a community of at least min_size gets the
    unit mean of its vectors (one whose mean is zero keeps its previous centroid), its steering as the mean in
    model units (times steer_clip) and its histogram times hist_clip, negatives 0; the others publish nothing."""
    cfg = sync.SyncConfig(k=4, dim=2, n_layer=1, steer_dim=2, vocab=2, min_size=2, steer_clip=8.0, hist_clip=4.0)
    previous = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    steering = np.arange(8, dtype=np.float64).reshape(4, 1, 2) / 10
    hist = np.array([[0.1, -0.05], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])
    sums = sync.Sums(counts=np.array([3.4, 1.0, -0.6, 2.2]), vectors=np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
                     steering=steering, histograms=hist)
    k = sync.publish(sums, previous, cfg)
    assert k.published.tolist() == [True, False, False, True]
    np.testing.assert_allclose(k.sizes, [3.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(k.centroids, [[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(k.steering[0], steering[0] * 8.0 / 3.0)
    np.testing.assert_allclose(k.steering[3], steering[3] * 8.0 / 2.0)
    assert not k.steering[1:3].any() and not k.histograms[1:3].any()
    np.testing.assert_allclose(k.histograms[0], [0.4, 0.0])
    np.testing.assert_allclose(k.histograms[3], [1.6, 1.6])
    # a noisy count below one half is no member: with min_size 1 it publishes nothing
    one = sync.publish(sync.Sums(counts=np.array([0.3]), vectors=np.array([[1.0, 0.0]]),
                                 steering=np.zeros((1, 1, 2)), histograms=np.zeros((1, 2))),
                       np.array([[0.0, 1.0]]), sync.SyncConfig(k=1, dim=2, n_layer=1, steer_dim=2, vocab=2, min_size=1))
    assert one.published.tolist() == [False] and one.sizes.tolist() == [0.0]


def test_invariant_knowledge_saves_into_a_new_folder_loads_back_whole_and_never_unpickles(tmp_path):
    k = sync.plain_kmeans(make_users(6), CFG, rounds=1)
    k.meta = {"rounds": 1, "epsilon_total": 0.5}
    path = k.save(tmp_path / "new" / "deeper" / "knowledge.npz")
    back = sync.Knowledge.load(path)
    for name in ("centroids", "sizes", "steering", "histograms", "published"):
        np.testing.assert_array_equal(getattr(back, name), getattr(k, name))
    assert back.meta == k.meta and back.published.dtype == bool
    again = sync.Knowledge.from_arrays(k.arrays(), k.meta)
    assert again.meta == k.meta and again.published.dtype == bool
    np.testing.assert_array_equal(again.published, k.published)
    assert sync.Knowledge.from_arrays(k.arrays()).meta == {}
    evil = tmp_path / "evil.npz"
    np.savez(evil, centroids=np.array([{"x": 1}], dtype=object), sizes=k.sizes, steering=k.steering,
             histograms=k.histograms, published=k.published, meta=np.array("{}"))
    with pytest.raises(ValueError, match="allow_pickle"):
        sync.Knowledge.load(evil)


def test_invariant_a_noisy_share_stays_in_secaggs_range_and_the_oracle_carries_it(monkeypatch):
    """A device's share is clipped to SecAgg+'s [-c, c] (here with a headroom small enough that the noise
    reaches both ends), and the oracle with rng carries every device's noise share."""
    monkeypatch.setattr(sync, "NOISE_HEADROOM_SIGMAS", 0.5)
    cfg = sync.SyncConfig(**{**CFG.__dict__, "epsilon": 0.2, "delta": 1e-5})
    users = make_users(6, cfg)
    c = cfg.clipping_range
    assert c == 1.0 + 0.5 * cfg.share_std
    for seed in range(5):
        flat, _ = sync.encode(users[0], sync.initial_centroids(cfg), cfg, np.random.default_rng(seed))
        assert flat.min() == -c and flat.max() == c  # clipped, at both ends
    plain = sync.plain_kmeans(users, cfg, rounds=1)
    noisy = sync.plain_kmeans(users, cfg, rounds=1, rng=np.random.default_rng(0))
    assert not np.allclose(plain.histograms, noisy.histograms)


def test_invariant_the_ledger_is_written_into_a_new_data_folder_with_the_time_of_writing(tmp_path):
    import time

    sync.log_sent(tmp_path / "new" / "data", {"round": 1, "bytes": 10})
    [entry] = sync.read_log(tmp_path / "new" / "data")
    assert entry["round"] == 1 and entry["bytes"] == 10 and abs(entry["time"] - time.time()) < 60
