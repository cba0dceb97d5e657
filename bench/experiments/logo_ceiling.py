"""What is attainable from a user's history at all on the synthetic world (scoring only: the world's TRUE
generative parameters are read, labels only to score): per history-size bucket, the accuracy of predicting
the asked attribute's current value by

  local      the latest value the user's own items state for it, else a uniform guess (expected 1/n);
             what a perfect local-only method gets
  prior      Bayes with the true parameters, using only the asked attribute's own items: the time-aware
             population prior (no community inference from the other attributes)
  ceiling    the Bayes posterior predictive with the community inferred from ALL the user's items
             (world.bayes_predictive, evidence="all"): no method can do better on average
  oracle     the same knowing the user's true community (offsets still unknown)
  mode       the true community's most common current value (bench/experiments/logo_offline.py's "upper")

and the paired gain ceiling - local with its 95% interval, split by whether the user's items name the asked
attribute.

    python3 bench/experiments/logo_ceiling.py --seed 7 [--users 1000] [--samples 2000]
"""
import argparse
import math
from collections import Counter, defaultdict

import numpy as np

from localpers.personalize import world


def ci95(x) -> float:
    x = np.asarray(x, float)
    return 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, nargs="+", default=[7])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--samples", type=int, default=2000, help="Monte Carlo draws of the user offsets")
    args = p.parse_args()
    for seed in args.seed:
        w = world.generate_world(args.users, seed=seed)
        pred = {ev: world.bayes_predictive(w, evidence=ev, samples=args.samples)
                for ev in ("asked", "all", "oracle")}
        mode = defaultdict(Counter)
        for u in w["users"]:
            for a, v in u["values"].items():
                mode[u["community"], a][v] += 1
        community = {u["id"]: u["community"] for u in w["users"]}
        rows = defaultdict(lambda: defaultdict(list))
        for e in w["upqa"]:
            uid, a, target = e["user_id"], e["attribute_type"], e["target"]
            said = [v for att, v, _ in w["truth"]["items"][uid] if att == a]
            local = float(said[-1] == target) if said else 1 / len(world.ATTRIBUTES[a]["values"])
            r = {"local": local, **{name: float(max(pred[ev][uid], key=pred[ev][uid].get) == target)
                                    for name, ev in (("prior", "asked"), ("ceiling", "all"), ("oracle", "oracle"))},
                 "mode": float(mode[community[uid], a].most_common(1)[0][0] == target),
                 "expected": max(pred["all"][uid].values())}
            for key in (world.history_bucket(e["history_size"]),
                        world.history_bucket(e["history_size"]) + (" named" if said else " not named")):
                for name, x in r.items():
                    rows[key][name].append(x)
        print(f"world seed {seed}, {args.users} users, {args.samples} offset samples")
        print("| users | n | local | prior | ceiling (expected) | oracle | mode | ceiling - local (95%) | prior - local |")
        print("|---|---|---|---|---|---|---|---|---|")
        order = [b for _, _, b in world.BUCKETS]
        for key in sorted(rows, key=lambda k: (order.index(k.split()[0]), k)):
            r = {name: np.array(v) for name, v in rows[key].items()}
            gain = r["ceiling"] - r["local"]
            print(f"| {key} | {len(gain)} | {r['local'].mean():.3f} | {r['prior'].mean():.3f} | "
                  f"{r['ceiling'].mean():.3f} ({r['expected'].mean():.3f}) | {r['oracle'].mean():.3f} | "
                  f"{r['mode'].mean():.3f} | {gain.mean():+.3f} ± {ci95(gain):.3f} | "
                  f"{(r['prior'] - r['local']).mean():+.3f} |")


if __name__ == "__main__":
    main()
