"""Private sync with real processes on loopback: `localpers sync-server` (Flower SuperLink + ServerApp) and three
`localpers sync` devices (Flower SuperNodes), one of them killed in the middle of the last round."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from localpers import sync

ROOT = Path(__file__).resolve().parent.parent
CFG = sync.SyncConfig(k=2, dim=8, n_layer=2, steer_dim=3, vocab=5, rounds=1, min_size=1, min_contributors=2, seed=3)
USERS = ("alice", "bob", "carol")
SECRET = "my secret diary entry about kayaking"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def contributions() -> dict[str, sync.Contribution]:
    rng = np.random.default_rng(7)
    base = rng.standard_normal(CFG.dim)
    out = {}
    for i, user in enumerate(USERS):
        v = base + (-1) ** i * rng.standard_normal(CFG.dim)
        out[user] = sync.Contribution(vector=v, steering=rng.standard_normal((CFG.n_layer, CFG.steer_dim)),
                                      histogram=rng.integers(0, 4, CFG.vocab).astype(np.float64))
    return out


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "localpers", *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the CLI then stops its Flower children), then SIGKILL to the whole group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def kill_device(data_dir: Path) -> None:
    """The device dies: SIGKILL its SuperNode's process group (the SuperNode and its ClientApp processes)."""
    pid = int((sync.sync_dir(data_dir) / "supernode.pid").read_text())
    os.killpg(pid, signal.SIGKILL)


def logged(data_dir: Path, kind: str, stage: str | None = None) -> float | None:
    """Time of the first ledger entry of this kind (and SecAgg+ stage), or None."""
    for e in sync.read_log(data_dir):
        if e["kind"] == kind and (stage is None or e.get("stage") == stage):
            return e["time"]
    return None


def test_three_devices_one_killed_mid_round_publish_the_plain_result(tmp_path):
    """Invariant: with one device killed after it joined the round's key agreement, SecAgg+ still unmasks the sum
    of the survivors, and the published knowledge equals the plain in-process computation within error_bound;
    every payload a device sent holds no text, and a masked vector differs from the plain contribution."""
    users = contributions()
    dirs = {u: tmp_path / u for u in USERS}
    for u in USERS:
        sync.save_contribution(dirs[u], u, users[u])
        (dirs[u] / "diary.txt").write_text(SECRET)  # local text that must never leave
    port = free_port()
    out = tmp_path / "server"
    server_args = ["sync-server", "--out", str(out), "--port", str(port), "--devices", "3", "--rounds", "1",
                   "--k", "2", "--dim", "8", "--n-layer", "2", "--steer-dim", "3", "--vocab", "5", "--min-size", "1",
                   "--min-contributors", "2", "--seed", "3", "--timeout", "60", "--max-seconds", "150"]
    procs = {"server": start(server_args, tmp_path / "server.log")}
    try:
        for u in USERS:
            procs[u] = start(["sync", "--superlink", f"127.0.0.1:{port}", "--user", u, "--data-dir", str(dirs[u]),
                              "--port", str(free_port()), "--epsilon-budget", "inf", "--capture",
                              str(tmp_path / f"capture-{u}"), "--once", "--max-seconds", "150"],
                             tmp_path / f"{u}.log")
        # Kill carol 1 s after she sent her key shares ('share keys', stage 1): her reply is delivered within
        # milliseconds, her masked vector (stage 2) needs the server to collect every share and a fresh
        # ClientApp process (seconds), so she dies between the two — the dropout SecAgg+ must recover from.
        killed = False
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and procs["server"].poll() is None:
            shared = logged(dirs["carol"], "message", "share_keys")
            if not killed and shared is not None and time.time() > shared + 1.0:
                assert logged(dirs["carol"], "contribution") is None, "carol was too fast to be killed mid-round"
                kill_device(dirs["carol"])
                killed = True
            time.sleep(0.02)
        assert killed
        assert procs["server"].wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            stop(p)

    summary = json.loads((out / "summary.json").read_text())
    assert [h["devices"] for h in summary["history"]] == [2]
    # the oracle: the plain computation over the survivors
    plain2 = sync.plain_kmeans([users["alice"], users["bob"]], CFG)
    got = sync.Knowledge.load(out / sync.GLOBAL_KNOWLEDGE_FILE)
    bound = sync.error_bound(3, CFG)
    assert np.array_equal(got.sizes, plain2.sizes) and np.array_equal(got.published, plain2.published)
    np.testing.assert_allclose(got.steering, plain2.steering, atol=bound * CFG.steer_clip)
    np.testing.assert_allclose(got.histograms, plain2.histograms, atol=bound * CFG.hist_clip)
    np.testing.assert_allclose(got.centroids, plain2.centroids, atol=1e-4)
    # survivors received the knowledge
    for u in ("alice", "bob"):
        mine = sync.Knowledge.load(sync.sync_dir(dirs[u]) / sync.GLOBAL_KNOWLEDGE_FILE)
        assert np.array_equal(mine.sizes, got.sizes)

    # What the server saw: every payload each device sent.
    for u in USERS:
        files = sorted((tmp_path / f"capture-{u}").glob("*.json"))
        assert files
        for f in files:
            raw = f.read_text()
            assert SECRET not in raw and u not in raw
            strings = [v for rec in json.loads(raw)["content"].values() for v in rec.values() if isinstance(v, str)]
            assert set(strings) <= {"Success", ""}, strings  # only Flower's status message
        masked = [json.loads(f.read_text()) for f in files if "collect_masked_vectors" in f.name]
        if u == "carol":
            continue
        assert len(masked) == 1  # one masked vector per round
        entry = masked[0]["content"][RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        vector = bytes_to_ndarray(bytes.fromhex(entry[1]["hex"]))
        plain = sync.encode(users[u], sync.initial_centroids(CFG), CFG)[0]
        quantized = quantize([plain], CFG.clipping_range, sync.QUANTIZATION_RANGE)[0]
        assert vector.shape == plain.shape
        assert np.mean(np.abs(vector.astype(np.int64) - quantized) <= 1) < 0.5  # masked: looks uniform
    # the ledger the user reads
    log = subprocess.run([sys.executable, "-m", "localpers", "sync", "--log", "--data-dir", str(dirs["alice"])],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert log.returncode == 0 and "round 1" in log.stdout and "collect_masked_vectors" in log.stdout
