"""LoGo's mediator parameters on a development world: the same users' mc_acc under a few settings of
logo.MediatorParams (one process: the world's knowledge, and the CAA steering vectors when a setting has a
nonzero control-vector scale, are computed once), paired against the first setting.

    python3 bench/experiments/logo_mediator.py --seed 1 --history 1-2,10-49 --limit 32 --steer-limit 6 \
        --variants user_scale=0 community_scale=1 community_scale=2 user_scale=4 --out docs/eval/logo/s7/scales
    python3 bench/experiments/logo_mediator.py --seed 7 --history 1-2,50+ --limit 40 --variants own_context=0 own_context=1

Each variant is comma-separated field=value pairs over logo.MEDIATOR; --limit is per history bucket and
picks the users `localpers eval world --history B --limit N` picks (the seed-7 development run above, made
before this, took each bucket's first N users instead).

Steering: logo.Steerer (CAA on the served model, torch) for every evaluated user and for --steer-limit
sampled contributors per round (their mean is each community's steering vector).
"""
import argparse
import json
import math
import shutil
import tempfile
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
    p.add_argument("--variants", nargs="+", required=True,
                   help="field=value[,field=value...] over logo.MEDIATOR; the first is the reference")
    p.add_argument("--method", default="logo+prompt+rag")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/eval/logo/s7/mediator")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from localpers.eval import evaluation as ev
    from localpers.personalize import logo
    from localpers.personalize import world
    from localpers.serve.compose import Composer
    from localpers.personalize.datasets import read_upqa
    from localpers.engine.engine import Engine
    from localpers.cli.eval_cli import _history_buckets, _limit

    variants = {spec: {k: type(getattr(logo.MEDIATOR, k))(float(v)) for k, v in
                       (kv.split("=") for kv in spec.split(","))} for spec in args.variants}
    steers = any(v.get("user_scale", 0) or v.get("community_scale", 0) for v in variants.values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="logo-mediator-"))  # the world and the control vectors: not kept
    world_dir = world.write_world(world.generate_world(args.users, seed=args.seed), tmp / "world")
    everyone = read_upqa(world_dir / world.WORLD_FILES["upqa"])
    buckets = [b.strip() for b in args.history.split(",")]
    # --limit per bucket, the users `localpers eval world --seed S --history B --limit N` picks
    items = [item for b in buckets for item in _limit(_history_buckets(everyone, b),
                                                      argparse.Namespace(limit=args.limit, seed=args.seed, shard=None))]
    bucket_of = {item.user.id: world.history_bucket(dict(item.meta)["history_size"]) for item in items}
    engine = Engine(None, seed=args.seed, n_threads=args.threads)
    steerer = logo.Steerer(engine.model_path) if steers else None
    cache = {}

    def steer(texts):
        key = tuple(texts)
        if key not in cache:
            cache[key] = steerer(texts)
        return cache[key]

    t0, c0 = time.time(), time.process_time()
    logo.prepare_world(world_dir, [args.method], steer=steer if steers else None, files=tmp / "cvecs", seed=args.seed,
                       steer_limit=args.steer_limit)
    prepared = logo._PREPARED[logo.names.LOGO]
    print(f"knowledge and steering: {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU; "
          f"{len(cache)} steering vectors", flush=True)
    results = {}
    print(f"| history | mediator | mc_acc | n | paired vs {args.variants[0]} (95%) |")
    print("|---|---|---|---|---|")
    for spec in args.variants:
        prepared.params = replace(logo.MEDIATOR, **variants[spec])
        logo._eval_signals.cache_clear()
        t0, c0 = time.time(), time.process_time()
        _, _, rows = ev.run_upqa(engine, items, {args.method: Composer(args.method)}, answers=False)
        results[spec] = {r["id"]: float(r["mc_ok"]) for r in rows if "mc_ok" in r}
        ref = results[args.variants[0]]
        for b in buckets:
            ids = [k for k in ref if bucket_of[k] == b]
            d = np.array([results[spec][k] - ref[k] for k in ids])
            half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            print(f"| {b} | {spec} | {np.mean([results[spec][k] for k in ids]):.3f} | {len(d)} | "
                  f"{d.mean():+.3f} ± {half:.3f} |", flush=True)
        print(f"  ({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU)", flush=True)
    engine.close()
    shutil.rmtree(tmp)
    (out / "mediator.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
