"""Private sync with real processes on loopback: `localpers sync-server` (Flower SuperLink + ServerApp) and three
`localpers sync` devices (Flower SuperNodes): one of them killed in the middle of the round; and (slow) three
devices whose synced communities a cold-start user's reply from a real `localpers serve` then uses."""
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
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from localpers.sync import sync
from localpers.sync.sync_app import KEY_SHARES_COLLECTED

ROOT = Path(__file__).resolve().parent.parent
CFG = sync.SyncConfig(k=2, dim=8, n_layer=2, steer_dim=3, vocab=5, rounds=1, min_size=1, min_contributors=2, seed=3)
USERS = ("alice", "bob", "carol")
SECRET = "my secret diary entry about kayaking"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this run: a port picked for a process that has not bound it
    yet is free again, and the OS gave the SuperLink's port to a device's SuperNode once (a CI run: "address
    already in use", the round never came)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


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
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sighup)


def _default_sighup() -> None:
    """A run under nohup inherits SIGHUP ignored; the processes started here get its default (a closed
    terminal ends them), as from a terminal, which the SIGHUP cases test."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


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


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(condition, proc: subprocess.Popen, limit_s: float) -> None:
    """Until condition() holds (a hang guard, not a timing assertion); fails when proc exits first."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"{proc.args[3:5]} exited ({proc.returncode}) before the awaited event"
        assert time.monotonic() < deadline, "the awaited event did not come"
        time.sleep(0.02)


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
                   "--min-contributors", "2", "--seed", "3", "--timeout", "60", "--max-seconds", "600"]
    procs = {"server": start(server_args, tmp_path / "server.log")}
    try:
        for u in USERS:
            procs[u] = start(["sync", "--superlink", f"127.0.0.1:{port}", "--user", u, "--data-dir", str(dirs[u]),
                              "--port", str(free_port()), "--epsilon-budget", "inf", "--capture",
                              str(tmp_path / f"capture-{u}"), "--once", "--max-seconds", "600"],
                             tmp_path / f"{u}.log")
        # Kill carol when the server logs that it holds every key share of the round (the end of 'share keys'):
        # her masked vector is asked for next, and answering needs the SuperNode to pull the message and start
        # a fresh ClientApp process (seconds), so she dies between the two stages — the dropout SecAgg+ must
        # recover from. Waits on the server's event, not on a clock.
        wait_for(lambda: KEY_SHARES_COLLECTED in read(out / "run.log"), procs["server"], 600)
        assert logged(dirs["carol"], "message", "collect_masked_vectors") is None, "carol answered before the kill"
        kill_device(dirs["carol"])
        assert procs["server"].wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
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


# ---------------------------------------------------------------- replies use the synced communities

CLIMBERS = ["I love bouldering at the climbing gym.", "Sushi and ramen are my favourite dinner."]
GARDENERS = ["My tomatoes and seedlings are doing great.", "Tacos and burritos every Friday!"]
DEVICE_USERS = {"cliff": CLIMBERS, "rocky": CLIMBERS, "rose": GARDENERS}  # one user (and device) each
COLD = ["Went bouldering again this morning."]  # a new user on cliff's device: one item, no stated cuisine
QUERY = "What food should I eat tonight?"


@pytest.mark.slow  # about 2.5 min on the shared machine (two Flower runs' worth of processes, a server, a job)
def test_three_real_devices_learn_communities_and_a_cold_users_served_reply_uses_them(tmp_path, tmp_path_factory):
    """Three real devices learn the communities privately and their users' replies use them: each device's LoGo
    refresh computes its user's signals; `localpers sync-server` and three `localpers sync` processes run the
    federated rounds (SecAgg+); then a real `localpers serve --personalize logo` on the first device registers a
    new cold-start user (its worker's logo job, which keeps the synced knowledge) and serves them. Oracle: the
    reply's prompt is exactly the request with the community note LoGo's mediator derives from the device's synced
    knowledge (the climbers' cuisine, which the cold user never stated) — prompt_tokens equal the token count of
    that conversation, and exceed the plain request's, which is what the same user got before."""
    import httpx
    from serve_helpers import serve_process, wait_until_up

    from localpers import names
    from localpers.personalize import logo
    from localpers.engine.engine import Engine
    from localpers.model.gguf_info import open_gguf
    from localpers.personalize.methods import apply
    from localpers.model.model import ModelConfig
    from localpers.store.store import Store
    from tests.helpers_models import random_model_path

    model = random_model_path(tmp_path_factory, "llama")
    config = ModelConfig.from_gguf(open_gguf(model))
    dirs = {u: tmp_path / u for u in DEVICE_USERS}
    for user, texts in DEVICE_USERS.items():
        with Store.open(dirs[user]) as store:
            for t in texts:
                store.add(user, t)
            logo.refresh_knowledge(store, model_path=model, min_size=1)  # signals, steering, sync contribution
    V = len(logo.VOCABULARY)
    contributions = [sync.load_contribution(dirs[u], u) for u in DEVICE_USERS]
    # the first public seed whose initial centroids separate the planted groups (climbers together)
    cfg = next(c for c in (sync.SyncConfig(k=2, dim=V, n_layer=config.n_layer - 1, steer_dim=config.d_model, vocab=V,
                                           rounds=2, min_size=1, seed=s) for s in range(20))
               if sorted(sync.plain_kmeans(contributions, c).sizes) == [1, 2])

    port = free_port()
    out = tmp_path / "server"
    procs = {"server": start(["sync-server", "--out", str(out), "--port", str(port), "--devices", "3",
                              "--rounds", str(cfg.rounds), "--k", "2", "--dim", str(V), "--n-layer", str(cfg.n_layer),
                              "--steer-dim", str(cfg.steer_dim), "--vocab", str(V), "--min-size", "1",
                              "--min-contributors", "2", "--seed", str(cfg.seed), "--timeout", "120",
                              "--max-seconds", "600"], tmp_path / "server.log")}
    try:
        for u in DEVICE_USERS:
            procs[u] = start(["sync", "--superlink", f"127.0.0.1:{port}", "--user", u, "--data-dir", str(dirs[u]),
                              "--port", str(free_port()), "--epsilon-budget", "inf", "--once", "--max-seconds", "600"],
                             tmp_path / f"{u}.log")
        assert procs["server"].wait(timeout=700) == 0, read(tmp_path / "server.log")[-3000:]
        for u in DEVICE_USERS:  # each device leaves once it holds the published knowledge
            assert procs[u].wait(timeout=120) == 0, read(tmp_path / f"{u}.log")[-3000:]
    finally:
        for p in procs.values():
            stop(p)
    summary = json.loads((out / "summary.json").read_text())
    assert [h["devices"] for h in summary["history"]] == [3] * cfg.rounds
    published = sync.Knowledge.load(out / sync.GLOBAL_KNOWLEDGE_FILE)
    plain = sync.plain_kmeans(contributions, cfg)
    assert np.array_equal(published.sizes, plain.sizes)
    np.testing.assert_allclose(published.histograms, plain.histograms, atol=sync.error_bound(3, cfg) * cfg.hist_clip)

    home = dirs["cliff"]
    with Store.open(home) as store:
        for t in COLD:
            store.add("newbie", t)
    url = f"http://127.0.0.1:{free_port()}"
    serve = serve_process("--model", str(model), "--data-dir", str(home), "--port", url.rsplit(":", 1)[1],
                          "--personalize", names.LOGO)
    messages = [{"role": "user", "content": QUERY}]
    body = {"model": model.stem, "messages": messages, "user": "newbie", "max_tokens": 1, "temperature": 0,
            "localpers": {"explain": True, "history": False}}
    try:
        wait_until_up(url, serve)
        before = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        assert "localpers" in before, before
        r = httpx.post(f"{url}/v1/users/newbie/personalize", json={"method": names.LOGO}, timeout=60)
        assert r.status_code == 202, r.text

        def jobs() -> list[dict]:
            return httpx.get(f"{url}/v1/users/newbie/jobs", timeout=60).json()["data"]

        wait_for(lambda: all(j["state"] in (names.DONE, names.FAILED) for j in jobs()), serve, 600)
        assert [j["state"] for j in jobs()] == [names.DONE], jobs()
        after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    finally:
        serve.terminate()
        serve.wait(timeout=60)

    # the device serves the synced knowledge (kept by the logo job), and the oracle derives the note from it
    knowledge = logo.GlobalKnowledge.load(logo.knowledge_dir(home) / logo.KNOWLEDGE_FILE)
    assert knowledge.meta["source"] == logo.SYNC_SOURCE and knowledge.round == 1
    np.testing.assert_allclose(knowledge.histograms, published.histograms, atol=1e-6)
    expected = logo.personalize(logo.local_signals(COLD), knowledge, logo.MEDIATOR, None, lambda c: None, QUERY)
    assert "Japanese food" in expected.user_prefix  # the climbers' cuisine: the cold user never named one
    engine = Engine(model, n_ctx=512, n_threads=1)
    assert before["localpers"]["composition"] == after["localpers"]["composition"] == names.LOGO
    assert before["usage"]["prompt_tokens"] == len(engine.chat_tokens(messages))
    assert after["usage"]["prompt_tokens"] == len(engine.chat_tokens(apply(expected, messages)))
    assert after["usage"]["prompt_tokens"] > before["usage"]["prompt_tokens"]


# ---------------------------------------------------------------- a device's processes end with its command


def session_members(sid: int) -> list[int]:
    """Pids of the processes in session `sid` (the SuperNode and the ClientApps it started)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append(int(stat.parent.name))
    return out


def test_a_sync_ended_by_sighup_or_sigkill_mid_round_leaves_no_process_and_no_later_contribution(tmp_path):
    """Invariant: nothing syncs unless `localpers sync` runs. Four devices join a two-round run; when the server
    holds every key share of round 1, one device's `localpers sync` gets SIGHUP (its terminal closed) and
    another's SIGKILL (its flower-supernode is then killed by the kernel, PR_SET_PDEATHSIG). Their SuperNodes and
    ClientApps are gone, neither device contributes to round 1 or round 2 (each round's sum holds the two
    survivors only) and neither ledger has anything after the kill."""
    users = {u: c for u, c in zip(("alice", "bob", "carol", "dave"), [*contributions().values(), contributions()["bob"]])}
    dirs = {u: tmp_path / u for u in users}
    for u, c in users.items():
        sync.save_contribution(dirs[u], u, c)
    port = free_port()
    out = tmp_path / "server"
    server_args = ["sync-server", "--out", str(out), "--port", str(port), "--devices", "4", "--rounds", "2",
                   "--k", "2", "--dim", "8", "--n-layer", "2", "--steer-dim", "3", "--vocab", "5", "--min-size", "1",
                   "--min-contributors", "2", "--seed", "3", "--timeout", "60", "--max-seconds", "600"]
    procs = {"server": start(server_args, tmp_path / "server.log")}
    killed = {"carol": signal.SIGHUP, "dave": signal.SIGKILL}
    try:
        for u in users:
            procs[u] = start(["sync", "--superlink", f"127.0.0.1:{port}", "--user", u, "--data-dir", str(dirs[u]),
                              "--port", str(free_port()), "--epsilon-budget", "inf", "--max-seconds", "600"],
                             tmp_path / f"{u}.log")
        wait_for(lambda: KEY_SHARES_COLLECTED in read(out / "run.log"), procs["server"], 600)
        nodes = {u: int((sync.sync_dir(dirs[u]) / "supernode.pid").read_text()) for u in killed}
        for u, sig in killed.items():
            os.kill(procs[u].pid, sig)  # the command only: its SuperNode runs in a session of its own
        for u in killed:
            procs[u].wait(timeout=60)
        kill_time = time.time()
        for u in killed:  # a hang guard, not a timing assertion: the kernel and the command's `finally` end them
            wait_for(lambda: not session_members(nodes[u]), procs["server"], 120)
        assert procs["server"].wait(timeout=600) == 0, read(tmp_path / "server.log")[-3000:]
    finally:
        for p in procs.values():
            stop(p)

    summary = json.loads((out / "summary.json").read_text())
    assert [h["devices"] for h in summary["history"]] == [2, 2], summary["history"]
    for u in killed:
        entries = sync.read_log(dirs[u])
        assert [e for e in entries if e["kind"] == "contribution"] == [], u
        assert [e for e in entries if e["time"] > kill_time] == [], u
    for u in ("alice", "bob"):
        assert [e["round"] for e in sync.read_log(dirs[u]) if e["kind"] == "contribution"] == [1, 2]
