"""LoGo figures: centroid drift over rounds (no LLM), and from `localpers eval world` reports the paired
difference of a LoGo method against the best local-only one, by history size and by time step.

    python3 bench/experiments/logo_figures.py drift --seed 7 --users 1000 --out docs/eval/logo
    python3 bench/experiments/logo_figures.py gain REPORT_DIR... --method logo+prompt+rag --reference prompt+rag --out docs/eval/logo
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from localpers.personalize import logo
from localpers.personalize import world
from localpers.eval.evaluation import paired_deltas


def drift(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = world.generate_world(args.users, seed=args.seed)
    rounds = logo.world_rounds(w["upqa"])
    last = rounds[max(rounds)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, last.drift.shape[0] + 1)
    for c in range(last.k):
        ax.plot(steps[1:], last.drift[1:, c], color="0.7", lw=0.8)
    ax.plot(steps[1:], last.drift[1:].mean(axis=1), color="C0", lw=2, label="mean over communities")
    ax.set_xlabel("round (time step)")
    ax.set_ylabel("centroid movement (L2, unit vectors)")
    ax.set_title(f"LoGo centroid drift, world seed {args.seed}, k={last.k}")
    ax.legend()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=120)
    print(out / "drift.png")
    print("round", "contributors(decayed size)", "published", "mean drift", sep="\t")
    for r, k in sorted(rounds.items()):
        print(r, round(float(k.sizes.sum()), 1), int(k.published.sum()), round(float(k.drift[-1].mean()), 4), sep="\t")


def rows_of(dirs):
    rows = []
    for d in dirs:
        rows += json.loads((Path(d) / "report.json").read_text())["items"]
    return rows


def gain(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows_of(args.reports) if "mc_ok" in r or "explicit_ok" in r]
    by_bucket, by_step = defaultdict(list), defaultdict(list)
    for r in rows:
        by_bucket[world.history_bucket(r["history_size"])].append(r)
        by_step[r["step"]].append(r)
    means = defaultdict(dict)
    for r in rows:
        means[r["method"]].setdefault(world.history_bucket(r["history_size"]), []).append(float(r.get("mc_ok", np.nan)))
    print("| history | method | n | mc_acc |")
    print("|---|---|---|---|")
    for method, buckets in means.items():
        for b, v in buckets.items():
            print(f"| {b} | {method} | {len(v)} | {np.nanmean(v):.3f} |")
    print()
    print(f"paired difference vs {args.reference} (delta ± 95% half-width, n):")
    for b, members in sorted(by_bucket.items()):
        d = paired_deltas(members, reference=args.reference)
        for method, metrics in d.items():
            print(b, method, {m: f"{x['delta']:+.3f} ± {x['ci95']:.3f} (n={x['n']})" for m, x in metrics.items()})
    steps, deltas, half = [], [], []
    for s, members in sorted(by_step.items()):
        d = paired_deltas(members, reference=args.reference).get(args.method, {}).get("mc_acc")
        if d:
            steps.append(s)
            deltas.append(d["delta"])
            half.append(d["ci95"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(steps, deltas, yerr=half, fmt="o-", capsize=3)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("time step of the question")
    ax.set_ylabel(f"mc_acc: {args.method} − {args.reference}")
    ax.set_title("cold-start gain (users with 1–2 items), paired, 95% intervals")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "cold_gain_by_step.png", dpi=120)
    print(out / "cold_gain_by_step.png")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drift")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--users", type=int, default=1000)
    d.add_argument("--out", default="docs/eval/logo")
    g = sub.add_parser("gain")
    g.add_argument("reports", nargs="+")
    g.add_argument("--method", default="logo+prompt+rag")
    g.add_argument("--reference", default="prompt+rag")
    g.add_argument("--out", default="docs/eval/logo")
    args = p.parse_args()
    {"drift": drift, "gain": gain}[args.cmd](args)


if __name__ == "__main__":
    main()
