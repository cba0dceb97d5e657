"""Private sync at scale: the sync ServerApp and ClientApp (SecAgg+, Flower's own workflow and mod) over 100 and
1,000 in-process devices drawn from the synthetic world (localpers/world.py), and the quality cost of privacy.

    python bench/bench_sync.py scale --devices 100 1000          # time per round, peak memory, bytes/device
    python bench/bench_sync.py bytes --devices 20                # bytes per device per round, LoGo's real shapes
    python bench/bench_sync.py real --rounds 3                   # 3 real SuperNodes on loopback: time per round
    python bench/bench_sync.py privacy --devices 1000 --epsilon inf 16 4 1 --seeds 11 12 13 --direct

Each device's signals are read from its world history without a model: preference counts over the public
vocabulary of attribute values (value names and their keywords), user vector = unit(counts), as LoGo's
`user_vector` without embeddings. The privacy figure scores a cold-start proxy: for users with 1-2 history items,
is their community's histogram's most common value of the asked attribute the user's true value? (the world's
labels are read for scoring only). Devices run in one process (sync_app.LocalGrid: every message deep-copied,
no sockets); each configuration runs in a fresh subprocess so that peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localpers import sync  # noqa: E402
from localpers.world import ATTRIBUTES, generate_world  # noqa: E402

VOCAB = [(a, v) for a, spec in ATTRIBUTES.items() for v in spec["values"]]


def counts_of(texts: list[str]) -> np.ndarray:
    counts = np.zeros(len(VOCAB))
    for text in texts:
        low = text.lower()
        for i, (a, v) in enumerate(VOCAB):
            counts[i] += any(p.lower() in low for p in (v, *ATTRIBUTES[a]["values"][v]))
    return counts


def world_devices(n: int, seed: int, cfg: sync.SyncConfig, root: Path) -> tuple[list[dict], list[dict]]:
    world = generate_world(users=n, communities=8, seed=seed)
    nodes, truth = [], []
    for user, item in zip(world["users"], world["upqa"]):
        counts = counts_of([p["text"] for p in item["profile"]])
        vector = counts / np.linalg.norm(counts) if counts.any() else np.full(len(VOCAB), 1 / math.sqrt(len(VOCAB)))
        rng = np.random.default_rng(len(nodes))
        steering = rng.standard_normal((cfg.n_layer, cfg.steer_dim)).astype(np.float32)
        sync.save_contribution(root / user["id"], user["id"], sync.Contribution(vector, steering, counts))
        nodes.append({"data-dir": str(root / user["id"]), "user": user["id"], "epsilon-budget": "inf"})
        truth.append({"size": item["history_size"], "attribute": item["attribute_type"], "target": item["target"],
                      "vector": vector})
    return nodes, truth


def score(k: sync.Knowledge, truth: list[dict]) -> dict:
    """Cold-start proxy: users with 1-2 items, their community's most common value of the asked attribute."""
    cold = [t for t in truth if t["size"] <= 2]
    pooled = k.histograms[k.published].sum(axis=0)  # one community of everyone: the global baseline
    hits, base = [], []
    for t in cold:
        j = sync.assign(t["vector"], k.centroids)
        cols = [i for i, (a, _) in enumerate(VOCAB) if a == t["attribute"]]
        hist = k.histograms[j, cols]
        hits.append(bool(k.published[j] and hist.max() > 0 and VOCAB[cols[int(np.argmax(hist))]][1] == t["target"]))
        base.append(VOCAB[cols[int(np.argmax(pooled[cols]))]][1] == t["target"])
    return {"published": int(k.published.sum()), "cold_users": len(cold),
            "cold_community_acc": float(np.mean(hits)) if hits else None,
            "cold_global_acc": float(np.mean(base)) if base else None}


def run(n: int, cfg: sync.SyncConfig, seed: int, secagg: bool = True) -> dict:
    """One sync run over n world devices in this process: through Flower's SecAgg+ (LocalGrid), or with the
    same contributions and noise shares summed directly (secagg=False; equal up to error_bound, see tests)."""
    from localpers.sync_app import simulate

    with tempfile.TemporaryDirectory() as tmp:
        nodes, truth = world_devices(n, seed, cfg, Path(tmp))
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        rss0 = usage0.ru_maxrss
        start = time.perf_counter()
        if secagg:
            strategy, grid = simulate(nodes, {**cfg.to_run_config(), "min-devices": n, "timeout": 600.0,
                                              "wait": 60.0})
            knowledge, sent = strategy.knowledge, float(np.mean(list(grid.sent_bytes.values()))) / cfg.rounds
        else:
            users = [sync.load_contribution(node["data-dir"], node["user"]) for node in nodes]
            knowledge, sent = sync.plain_kmeans(users, cfg, rng=np.random.default_rng(seed)), None
        seconds = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    return {"devices": n, "secagg": secagg, "rounds": cfg.rounds, "seconds_per_round": seconds / cfg.rounds,
            "cpu_seconds_per_round": cpu / cfg.rounds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mib": rss0 / 1024,
            "bytes_per_device_per_round": sent, "vector_length": cfg.length, "epsilon_per_round": cfg.epsilon,
            "epsilon_total": sync.rdp_epsilon(cfg.noise_multiplier, cfg.rounds, cfg.delta), "delta": cfg.delta,
            "min_contributors": cfg.min_contributors, **score(knowledge, truth)}


def real(rounds: int, seed: int) -> dict:
    """`localpers sync-server` and 3 `localpers sync` devices as real processes on loopback (no kill)."""
    import os
    import signal
    import socket

    def port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    cfg = sync.SyncConfig(k=2, dim=len(VOCAB), n_layer=0, steer_dim=0, vocab=len(VOCAB), rounds=rounds, min_size=1,
                          min_contributors=2, seed=seed)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nodes, _ = world_devices(3, seed, cfg, tmp)
        link = port()
        cmd = [sys.executable, "-m", "localpers"]
        procs = [subprocess.Popen(cmd + ["sync-server", "--out", str(tmp / "server"), "--port", str(link),
                                         "--devices", "3", "--rounds", str(rounds), "--k", "2", "--dim", str(cfg.dim),
                                         "--n-layer", "0", "--steer-dim", "0", "--vocab", str(cfg.vocab),
                                         "--min-size", "1", "--timeout", "120"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)]
        try:
            for node in nodes:
                procs.append(subprocess.Popen(cmd + ["sync", "--superlink", f"127.0.0.1:{link}", "--user", node["user"],
                                                     "--data-dir", node["data-dir"], "--port", str(port()),
                                                     "--epsilon-budget", "inf", "--once", "--max-seconds", "1200"],
                                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
            procs[0].wait(timeout=1500)
        finally:
            for proc in procs:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        summary = json.loads((tmp / "server" / "summary.json").read_text())
        sent = [sum(e["bytes"] for e in sync.read_log(node["data-dir"]) if e["kind"] == "message"
                    and e["message_type"] == "train") for node in nodes]
    return {"devices": 3, "real_processes": True, "rounds": rounds, "complete": summary["complete"],
            "seconds_per_round": summary["seconds"] / rounds, "bytes_per_device_per_round": float(np.mean(sent)) / rounds,
            "vector_length": cfg.length}


def child(args) -> int:
    cfg = sync.SyncConfig(**json.loads(args.config))
    print(json.dumps(run(args.n, cfg, args.seed, secagg=not args.direct)))
    return 0


def spawn(n: int, cfg: sync.SyncConfig, seed: int, direct: bool = False) -> dict:
    cfg = sync.SyncConfig(**{**cfg.__dict__, "min_contributors": max(2, int(0.9 * n))})
    out = subprocess.run([sys.executable, __file__, "child", "--n", str(n), "--seed", str(seed), "--config",
                          json.dumps(cfg.__dict__)] + (["--direct"] if direct else []),
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["scale", "bytes", "privacy", "real", "child"])
    p.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--epsilon", type=float, nargs="+", default=[math.inf, 16.0, 4.0, 1.0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--n", type=int)
    p.add_argument("--config")
    p.add_argument("--direct", action="store_true", help="privacy: sum contributions and noise shares directly "
                   "instead of through SecAgg+ (equal up to error_bound; minutes faster at 1,000 devices)")
    p.add_argument("--seeds", type=int, nargs="+", default=[11])
    p.add_argument("--plot", help="privacy: write the plot of cold-start accuracy vs epsilon here (PNG)")
    p.add_argument("--rows", help="privacy: plot these JSON rows (one per line) instead of running")
    args = p.parse_args()
    if args.what == "child":
        return child(args)
    base = dict(k=args.k, dim=len(VOCAB), n_layer=0, steer_dim=0, vocab=len(VOCAB), rounds=args.rounds,
                min_size=10, min_contributors=2, seed=args.seed)
    rows = []
    if args.what == "real":
        rows = [real(args.rounds, args.seed)]
    elif args.what == "scale":
        rows = [spawn(n, sync.SyncConfig(**base), args.seed) for n in args.devices]
    elif args.what == "bytes":
        # LoGo's steering shape on SmolLM2-135M: [29 control-vector layers, 576]; user vector: V preferences
        cfg = sync.SyncConfig(**{**base, "dim": len(VOCAB), "n_layer": 29, "steer_dim": 576, "rounds": 1,
                                 "min_size": 1, "min_contributors": 2})
        rows = [spawn(n, cfg, args.seed) for n in args.devices]
    elif args.rows:
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
    else:
        for eps in args.epsilon:
            for seed in args.seeds:
                rows += [spawn(n, sync.SyncConfig(**{**base, "epsilon": eps, "seed": seed}), seed, args.direct)
                         for n in args.devices]
    if args.what == "privacy" and args.plot:
        plot(rows, args.plot)
    for r in rows:
        r.pop("sizes", None)
        print(json.dumps(r))
    return 0


def plot(rows: list[dict], path: str) -> None:
    """Cold-start community accuracy (mean and range over seeds) vs epsilon per round; no noise at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({r["epsilon_per_round"] for r in rows}, key=lambda e: (math.isinf(e), e))
    xs = [64.0 if math.isinf(e) else e for e in eps]
    acc = [[r["cold_community_acc"] for r in rows if r["epsilon_per_round"] == e] for e in eps]
    base = float(np.mean([r["cold_global_acc"] for r in rows]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar(xs, [np.mean(a) for a in acc], yerr=[[np.mean(a) - min(a) for a in acc], [max(a) - np.mean(a) for a in acc]],
                marker="o", capsize=3, label="community histogram (SecAgg+ + DP)")
    ax.axhline(base, color="gray", ls="--", label="one global histogram")
    ax.set_xscale("log")
    ax.set_xticks(xs, [("no DP" if math.isinf(e) else f"{e:g}") for e in eps])
    ax.set_xlabel("epsilon per round (delta 1e-6)")
    ax.set_ylabel("cold-start accuracy (1-2 items)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
