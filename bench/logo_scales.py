"""LoGo's control-vector scales on a development world: the same users' mc_acc with the mediator's user and
community steering scales set to a few values (one process: the world's knowledge and the CAA steering
vectors are computed once), paired against scales (0, 0).

    python3 bench/logo_scales.py --seed 1 --history 1-2 --limit 32 --steer-limit 8 \
        --scales 0,0 0,1 0,2 0,4 4,0 --method logo+prompt+rag --out docs/eval/logo/scales --threads 1

Steering: logo.Steerer (CAA on the served model, torch) for every evaluated user and for --steer-limit
sampled contributors per round (their mean is each community's steering vector).
"""
import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--history", default="1-2")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--steer-limit", type=int, default=8)
    p.add_argument("--scales", nargs="+", default=["0,0", "0,1", "0,2", "0,4", "4,0"],
                   help="user_scale,community_scale pairs; the first is the reference")
    p.add_argument("--method", default="logo+prompt+rag")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/eval/logo/scales")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from localpers import evaluation as ev
    from localpers import logo, world
    from localpers.compose import Composer
    from localpers.datasets import read_upqa
    from localpers.engine import Engine
    from localpers.eval_cli import _history_buckets

    out = Path(args.out)
    world_dir = world.write_world(world.generate_world(args.users, seed=args.seed), out / "world")
    items = _history_buckets(read_upqa(world_dir / world.WORLD_FILES["upqa"]), args.history)[:args.limit]
    engine = Engine(None, seed=args.seed, n_threads=args.threads)
    steerer = logo.Steerer(engine.model_path)
    cache = {}

    def steer(texts):
        key = tuple(texts)
        if key not in cache:
            cache[key] = steerer(texts)
        return cache[key]

    t0, c0 = time.time(), time.process_time()
    logo.prepare_world(world_dir, [args.method], steer=steer, files=out / "cvecs", seed=args.seed,
                       steer_limit=args.steer_limit)
    prepared = logo._PREPARED[logo.names.LOGO]
    print(f"knowledge and steering: {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU; "
          f"{len(cache)} steering vectors", flush=True)
    results = {}
    for spec in args.scales:
        u, c = map(float, spec.split(","))
        prepared.params = replace(logo.MEDIATOR, user_scale=u, community_scale=c)
        logo._eval_signals.cache_clear()
        t0, c0 = time.time(), time.process_time()
        _, _, rows = ev.run_upqa(engine, items, {args.method: Composer(args.method)}, answers=False)
        results[spec] = {r["id"]: float(r["mc_ok"]) for r in rows if "mc_ok" in r}
        ref = results[args.scales[0]]
        d = np.array([results[spec][k] - ref[k] for k in ref])
        half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"scales user={u} community={c}: mc_acc {np.mean(list(results[spec].values())):.3f} "
              f"(n={len(d)}), paired vs {args.scales[0]}: {d.mean():+.3f} ± {half:.3f}; "
              f"{time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU", flush=True)
    engine.close()
    (out / "scales.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
