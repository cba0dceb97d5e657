"""Private sync at scale: the sync ServerApp and ClientApp (SecAgg+, Flower's own workflow and mod) over 100 and
1,000 in-process devices drawn from the synthetic world (localpers/personalize/world.py), and the quality cost of privacy.

    python bench/bench_sync.py scale --devices 100 1000          # time per round, peak memory, bytes/device
    python bench/bench_sync.py bytes --devices 20                # bytes per device per round, LoGo's real shapes
    python bench/bench_sync.py real --rounds 3                   # 3 real SuperNodes on loopback: time per round
    python bench/bench_sync.py ray --devices 100 1000 --rounds 1 # Flower's simulation engine (Ray; [sim] extra)
    python bench/bench_sync.py privacy --devices 1000 --epsilon inf 16 4 1 --seeds 11 12 13 --direct
    python bench/bench_sync.py logo --seeds 43 47 --settings inprocess plain dp --epsilon 16 4 1 --out rows.jsonl
    python bench/bench_sync.py logo --rows rows.jsonl --plot gain.png     # LoGo's cold-start gain vs epsilon
    python bench/bench_sync.py llm --seeds 43 --limit 100 --epsilon 16 4 1 --out llm.jsonl  # the LLM's mc_acc

`logo` and `llm` measure the quality cost of privacy as LoGo measures itself: LoGo's GlobalKnowledge per world
time step computed by the sync (federated_rounds: one sync run per step over LoGo's own device signals, folded
with LoGo's decay) instead of in-process, scored by LoGo's mediator on cold-start users (logo_gain, as
bench/experiments/logo_offline.py) or by the served model's mc_acc on them (llm_rows, as `localpers eval world --mc-only`).

Each device's signals are read from its world history without a model: preference counts over the public
vocabulary of attribute values (value names and their keywords), user vector = unit(counts), as LoGo's
`user_vector` without embeddings. The privacy figure scores a cold-start proxy: for users with 1-2 history items,
is their community's histogram's most common value of the asked attribute the user's true value? (the world's
labels are read for scoring only). Devices run in one process (sync_app.LocalGrid: every message deep-copied,
no sockets), or (`ray`) in Flower's simulation engine: the same apps, ClientApps in Ray worker processes
(sync_app.simulate_ray), where memory and CPU time are those of the whole process tree (the driver, Ray's GCS,
raylet and workers) sampled every 0.2 s with psutil. Each configuration runs in a fresh subprocess so that peak
memory is its own.
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

from localpers.sync import sync  # noqa: E402
from localpers.personalize.world import ATTRIBUTES, generate_world  # noqa: E402

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
    from localpers.sync.sync_app import simulate

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


class TreeMonitor:
    """Peak RSS (sum over this process and all its descendants) and their CPU seconds, sampled every `every`
    seconds in a thread (a process's CPU time is counted up to its last sample)."""

    def __init__(self, every: float = 0.2):
        import threading

        import psutil

        self.me, self.every = psutil.Process(), every
        self.peak, self.cpu, self.stop = 0, {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        self.peak = max(self.peak, rss)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self.cpu0 = dict(self.cpu)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self.cpu0.get(pid, 0.0) for pid, v in self.cpu.items())


def run_ray(n: int, cfg: sync.SyncConfig, seed: int, num_cpus: int) -> dict:
    """One sync run over n world devices in Flower's simulation engine (Ray), with SecAgg+."""
    from localpers.sync.sync_app import simulate_ray

    with tempfile.TemporaryDirectory() as tmp:
        nodes, truth = world_devices(n, seed, cfg, Path(tmp))
        run_config = {**cfg.to_run_config(), "min-devices": n, "timeout": 3600.0, "wait": 600.0,
                      "out-dir": str(Path(tmp) / "server")}
        start = time.perf_counter()
        with TreeMonitor() as monitor:
            summary = simulate_ray(nodes, run_config, num_cpus=num_cpus)
        wall = time.perf_counter() - start
        knowledge = sync.Knowledge.load(Path(tmp) / "server" / sync.GLOBAL_KNOWLEDGE_FILE)
        sent = [sum(e["bytes"] for e in sync.read_log(node["data-dir"]) if e["kind"] == "message"
                    and e["message_type"] == "train") for node in nodes]
    return {"devices": n, "engine": "ray", "ray_cpus": num_cpus, "rounds": cfg.rounds, "complete": summary["complete"],
            "devices_per_round": [h["devices"] for h in summary["history"]],
            "seconds_per_round": summary["seconds"] / cfg.rounds, "wall_seconds_with_ray_start": wall,
            "tree_cpu_seconds_per_round": monitor.cpu_seconds / cfg.rounds, "peak_tree_rss_mib": monitor.peak / 2**20,
            "bytes_per_device_per_round": float(np.mean(sent)) / cfg.rounds, "vector_length": cfg.length,
            **score(knowledge, truth)}


def child(args) -> int:
    cfg = sync.SyncConfig(**json.loads(args.config))
    if args.ray:
        print(json.dumps(run_ray(args.n, cfg, args.seed, args.ray)))
    else:
        print(json.dumps(run(args.n, cfg, args.seed, secagg=not args.direct)))
    return 0


def spawn(n: int, cfg: sync.SyncConfig, seed: int, direct: bool = False, ray: int = 0) -> dict:
    cfg = sync.SyncConfig(**{**cfg.__dict__, "min_contributors": max(2, int(0.9 * n))})
    out = subprocess.run([sys.executable, __file__, "child", "--n", str(n), "--seed", str(seed), "--config",
                          json.dumps(cfg.__dict__)] + (["--direct"] if direct else []) + (["--ray", str(ray)] if ray else []),
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- quality cost of privacy: LoGo's cold-start gain


def federated_rounds(upqa: list[dict], epsilon: float, seed: int, lloyd: int = 3, secagg: bool = False,
                     root: Path | None = None) -> tuple[dict, list[dict]]:
    """LoGo's global knowledge per world step (as logo.world_rounds: round r folds in every user still active at r
    with items before step r), computed by the sync instead of in-process: each round is one sync run of `lloyd`
    federated k-means rounds over those users' LoGo signals (logo.local_signals: unit preference vector and
    counts, no steering), started from the previous round's folded centroids (the first: public random ones),
    k = logo.choose_k(first round's contributors), min_size = logo.MIN_SIZE, DP at `epsilon` per sync round
    with noise shares from 90% of the round's devices, then folded by sync_app.logo_knowledge. secagg: through
    Flower's SecAgg+ (sync_app.simulate, devices written under root), else summed directly (equal up to
    error_bound). Returns ({step: logo.GlobalKnowledge}, per-round log)."""
    from localpers.personalize import logo
    from localpers.sync.sync_app import logo_knowledge, simulate

    steps = 1 + max(e["step"] for e in upqa)
    rng = np.random.default_rng(seed)
    out, log, knowledge, k = {}, [], None, None
    for r in range(1, steps):
        users = []
        for e in upqa:
            texts = [p["text"] for p in e["profile"] if p["step"] < r]
            if e["step"] >= r and texts:
                signals = logo.local_signals(texts)
                if signals.vector.any():  # a user who named no value has no vector to contribute
                    users.append((e["user_id"], sync.Contribution(signals.vector, np.zeros((0, 0)), signals.counts)))
        if len(users) < 2:
            out[r] = knowledge
            continue
        k = k or logo.choose_k(len(users))
        cfg = sync.SyncConfig(k=k, dim=len(logo.VOCABULARY), n_layer=0, steer_dim=0, vocab=len(logo.VOCABULARY),
                              rounds=lloyd, epsilon=epsilon, min_size=int(logo.MIN_SIZE),
                              min_contributors=max(2, int(0.9 * len(users))), seed=seed)
        start = None if knowledge is None else knowledge.centroids.astype(np.float64)
        if secagg:
            nodes = []
            for uid, c in users:
                sync.save_contribution(root / f"r{r}" / uid, uid, c)
                nodes.append({"data-dir": str(root / f"r{r}" / uid), "user": uid, "epsilon-budget": "inf"})
            strategy, _ = simulate(nodes, {**cfg.to_run_config(), "min-devices": len(nodes), "timeout": 3600.0,
                                           "wait": 60.0}, centroids=start)
            published = strategy.knowledge
        else:
            published = sync.plain_kmeans([c for _, c in users], cfg, rng=rng if cfg.noise_multiplier else None,
                                          start=start)
        knowledge = logo_knowledge(knowledge, published, cfg)
        out[r] = knowledge
        log.append({"round": r, "devices": len(users), "k": k, "published": int(published.published.sum())})
    return out, log


def logo_gain(upqa: list[dict], rounds: dict) -> dict:
    """Offline LoGo scores per history bucket (as bench/experiments/logo_offline.py): `local` the user's own most named value
    of the asked attribute is the true one; `logo` the mediated choice (own value, else the community note's)
    is; `note_given`/`note_right` how often the mediator gives a note for the asked attribute and how often it
    is right; `global` the mediated choice with one pooled histogram of all published communities instead;
    `chance` the expected score of the mediated choice with a uniformly random value in place of each note
    (what a note that knows nothing scores). gain = logo - local; over_chance = logo - chance. The world's
    targets are read for scoring only."""
    from localpers.personalize import logo
    from localpers.personalize.world import history_bucket

    stats: dict = {}
    for e in upqa:
        a, target = e["attribute_type"], e["target"]
        signals = logo.local_signals([p["text"] for p in e["profile"]])
        know = rounds.get(e["step"])
        context = dict(logo.mediate(signals, know).context) if know is not None else {}
        s = logo.ATTRIBUTE_SLICES[a]
        local = logo.VOCAB_VALUE[s.start + int(np.argmax(signals.counts[s]))] if signals.counts[s].sum() else None
        pooled = None
        if know is not None and know.published.any():
            hist = know.histograms[know.published].sum(axis=0)[s]
            pooled = logo.VOCAB_VALUE[s.start + int(np.argmax(hist))] if hist.sum() > 0 else None
        b = stats.setdefault(history_bucket(e["history_size"]),
                             {k: [] for k in ("local", "logo", "chance", "global", "note_given")})
        b["local"].append(local == target)
        b["chance"].append(float(local == target) if local else (1 / (s.stop - s.start) if a in context else 0.0))
        b["logo"].append((local or context.get(a)) == target)
        b["global"].append((local or pooled) == target)
        b["note_given"].append(a in context)
        b.setdefault("note_right", []).extend([context[a] == target] if a in context else [])
    out = {}
    for bucket, b in stats.items():
        out[bucket] = {"users": len(b["local"]), **{k: float(np.mean(v)) if v else None for k, v in b.items()}}
        out[bucket]["gain"] = out[bucket]["logo"] - out[bucket]["local"]
        out[bucket]["global_gain"] = out[bucket]["global"] - out[bucket]["local"]
        out[bucket]["over_chance"] = out[bucket]["logo"] - out[bucket]["chance"]
        out[bucket]["global_over_chance"] = out[bucket]["global"] - out[bucket]["chance"]
    return out


def logo_row(setting: str, users: int, seed: int, epsilon: float, lloyd: int) -> dict:
    """One row of the privacy-cost figure: LoGo's offline cold-start gain with knowledge from `setting`:
    'inprocess' (logo.world_rounds, LoGo's own in-process communities), 'plain' (the sync's computation, no
    noise, summed directly), 'secagg' (through Flower's SecAgg+), 'dp' (summed directly with DP noise)."""
    from localpers.personalize import logo

    upqa = generate_world(users=users, seed=seed)["upqa"]
    start, cpu0 = time.perf_counter(), time.process_time()
    log = []
    if setting == "inprocess":
        rounds = logo.world_rounds(upqa, seed=seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rounds, log = federated_rounds(upqa, epsilon if setting == "dp" else math.inf, seed, lloyd,
                                           secagg=setting == "secagg", root=Path(tmp))
    z = sync.noise_multiplier_for_epsilon(epsilon, 1e-6) if setting == "dp" else 0.0
    most = max((sum(1 for r in range(1, e["step"] + 1) if any(p["step"] < r for p in e["profile"])) for e in upqa))
    return {"setting": setting, "users": users, "seed": seed, "lloyd_rounds": lloyd,
            "epsilon_per_round": epsilon if setting == "dp" else math.inf, "delta": 1e-6,
            "epsilon_per_sync_run": sync.rdp_epsilon(z, lloyd, 1e-6) if z else math.inf,
            "epsilon_device_max": sync.rdp_epsilon(z, lloyd * most, 1e-6) if z else math.inf,
            "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
            "rounds_log": log, **{f"b{bucket}": v for bucket, v in logo_gain(upqa, rounds).items()}}


def llm_rows(users: int, seed: int, limit: int, epsilons: list[float], lloyd: int) -> list[dict]:
    """The LLM's mc_acc (the served model, `localpers eval world --mc-only` scoring: evaluation.run_upqa with
    answers=False) on `limit` cold-start users (1-2 items, a seeded sample) for prompt+rag (local only) and
    logo+prompt+rag with each knowledge: LoGo's in-process rounds, the sync's without noise, with DP at each
    epsilon per round. The knowledge is swapped into what logo.prepare_world prepared for the world
    (logo._PREPARED; everything else, the mediator included, is the evaluation's). One torch/llama.cpp thread."""
    import dataclasses
    import random

    import torch

    from localpers.eval import evaluation as ev
    from localpers import names
    from localpers.personalize import logo
    from localpers.personalize.datasets import read_upqa
    from localpers.engine.engine import Engine
    from localpers.personalize.methods import get_method
    from localpers.personalize.world import WORLD_FILES, history_bucket, write_world

    torch.set_num_threads(1)
    world = generate_world(users=users, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_world(world, tmp)
        items = [it for it in read_upqa(Path(tmp) / WORLD_FILES["upqa"])
                 if history_bucket(dict(it.meta)["history_size"]) == "1-2"]
        items = random.Random(seed).sample(items, min(limit, len(items)))
        logo.prepare_world(tmp, [names.LOGO], seed=seed)
    prepared = logo._PREPARED[names.LOGO]
    variants = {"inprocess": prepared.rounds, "plain": federated_rounds(world["upqa"], math.inf, seed, lloyd)[0]}
    for eps in epsilons:
        variants[f"dp {eps:g}"] = federated_rounds(world["upqa"], eps, seed, lloyd)[0]
    engine = Engine(None, seed=seed, n_threads=1)
    out = []
    try:
        start, cpu0 = time.perf_counter(), time.process_time()
        _, _, rows = ev.run_upqa(engine, items, {"prompt+rag": get_method("prompt+rag")}, answers=False)
        base = {r["id"]: r["mc_ok"] for r in rows}
        out.append({"setting": "prompt+rag", "seed": seed, "users": len(items), "mc_acc": float(np.mean(list(base.values()))),
                    "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)})
        for name, rounds in variants.items():
            logo._PREPARED[names.LOGO] = dataclasses.replace(prepared, rounds=rounds)
            start, cpu0 = time.perf_counter(), time.process_time()
            _, _, rows = ev.run_upqa(engine, items, {"logo+prompt+rag": get_method("logo+prompt+rag")}, answers=False)
            diff = [float(r["mc_ok"]) - float(base[r["id"]]) for r in rows]
            out.append({"setting": f"logo+prompt+rag, {name}", "seed": seed, "users": len(rows),
                        "mc_acc": float(np.mean([r["mc_ok"] for r in rows])), "paired_gain": float(np.mean(diff)),
                        "paired_gain_se": float(np.std(diff, ddof=1) / math.sqrt(len(diff))),
                        "seconds": round(time.perf_counter() - start, 1),
                        "cpu_seconds": round(time.process_time() - cpu0, 1)})
            print(json.dumps(out[-1]), flush=True)
    finally:
        engine.close()
        logo._PREPARED[names.LOGO] = prepared
    return out


def plot_gain(rows: list[dict], path: str) -> None:
    """Cold-start (1-2 items) offline LoGo gain over local-only and over a chance note (mean and range over
    seeds) vs epsilon per sync round, with the in-process and noiseless federated references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stat(sel, key):
        vals = [r["b1-2"][key] for r in rows if sel(r)]
        return float(np.mean(vals)), min(vals), max(vals)

    dp = sorted({r["epsilon_per_round"] for r in rows if r["setting"] == "dp"})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in zip(axes, ("gain", "over_chance"), ("mediated - local only", "mediated - chance note")):
        if dp:
            pts = [stat(lambda r, e=e: r["setting"] == "dp" and r["epsilon_per_round"] == e, key) for e in dp]
            ax.errorbar(dp, [p[0] for p in pts], yerr=[[p[0] - p[1] for p in pts], [p[2] - p[0] for p in pts]],
                        marker="o", capsize=3, label="federated, SecAgg+ + DP")
        for setting, color, ls, name in (("inprocess", "k", "--", "LoGo in-process (no privacy)"),
                                         ("plain", "g", ":", "federated, no DP"),
                                         ("secagg", "m", "-.", "federated through Flower SecAgg+")):
            if any(r["setting"] == setting for r in rows):
                ax.axhline(stat(lambda r, s=setting: r["setting"] == s, key)[0], ls=ls, color=color, label=name)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xscale("log")
        ax.set_xticks(dp, [f"{e:g}" for e in dp])
        ax.set_xlabel("epsilon per sync round (delta 1e-6)")
        ax.set_ylabel(f"cold-start gain ({label})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["scale", "ray", "bytes", "privacy", "logo", "llm", "real", "child"])
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
    p.add_argument("--ray", type=int, default=0, help="child: run in Flower's simulation engine with this many CPUs")
    p.add_argument("--settings", nargs="+", default=["inprocess", "plain", "dp"],
                   help="logo: knowledge from inprocess (LoGo's own), plain (sync, no noise), secagg, dp (at each --epsilon)")
    p.add_argument("--users", type=int, default=1000, help="logo, llm: world users")
    p.add_argument("--limit", type=int, default=60, help="llm: cold-start users scored")
    p.add_argument("--out", help="logo: append the rows (JSON lines) to this file")
    p.add_argument("--cpus", type=int, default=2, help="ray: CPUs Ray may use (one ClientApp actor per CPU)")
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
    elif args.what == "ray":
        rows = [spawn(n, sync.SyncConfig(**base), args.seed, ray=args.cpus) for n in args.devices]
    elif args.what == "bytes":
        # LoGo's steering shape on SmolLM2-135M: [29 control-vector layers, 576]; user vector: V preferences
        cfg = sync.SyncConfig(**{**base, "dim": len(VOCAB), "n_layer": 29, "steer_dim": 576, "rounds": 1,
                                 "min_size": 1, "min_contributors": 2})
        rows = [spawn(n, cfg, args.seed) for n in args.devices]
    elif args.what == "llm":
        for seed in args.seeds:
            for row in llm_rows(args.users, seed, args.limit, args.epsilon, args.rounds):
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        return 0
    elif args.what == "logo":
        if not args.rows:
            for seed in args.seeds:
                for setting in args.settings:
                    for eps in (args.epsilon if setting == "dp" else [math.inf]):
                        if setting == "dp" and math.isinf(eps):
                            continue
                        rows.append(logo_row(setting, args.users, seed, eps, args.rounds))
                        print(json.dumps(rows[-1]), flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(json.dumps(rows[-1]) + "\n")
        else:
            rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
        if args.plot:
            plot_gain(rows, args.plot)
        return 0
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
