"""Offline check of LoGo's global knowledge on the synthetic world, without the LLM: how often the community
context names the user's true current value of the asked attribute (cold-start users), against the upper bound
(the user's true community's most common value; upper_t: among its members asked within one step) and the
population's most common value.

    python3 bench/experiments/logo_offline.py --seed 1 --users 1000 [--window] [--half-life 2] [--k 0] [--nearest] [--restarts 1]

Also printed, for users whose own items name two or more values of the asked attribute (conflicting local
evidence): how often their latest named value, their most named value, and the community mixture's choice
among the values they named is the current one (what a community note for conflicting attributes would do).
"""
import argparse
from collections import Counter, defaultdict

import numpy as np

from localpers.personalize import logo
from localpers.personalize import world


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--window", action="store_true", help="contributions from the round's window only")
    p.add_argument("--half-life", type=float, default=logo.HALF_LIFE)
    p.add_argument("--k", type=int, default=0)
    p.add_argument("--init-seed", type=int, help="k-means++ seed (default: --seed, as `localpers eval world` uses)")
    p.add_argument("--random", action="store_true", help="random community assignment (ablation)")
    p.add_argument("--nearest", action="store_true", help="context from the nearest community (cosine), not the "
                   "posterior mixture (the default)")
    p.add_argument("--restarts", type=int, default=1, help="first-round k-means++ restarts (least inertia kept)")
    args = p.parse_args()
    if args.init_seed is None:
        args.init_seed = args.seed
    w = world.generate_world(args.users, seed=args.seed)
    items = {it["user_id"]: it for it in w["upqa"]}
    truth = {u["id"]: u for u in w["users"]}
    rounds = logo.world_rounds(w["upqa"], seed=args.init_seed, half_life=args.half_life, k=args.k or None, window=args.window,
                               random_assignment=args.random, restarts=args.restarts)
    # upper bound: the true community's most common current value (over all users, at their query steps)
    mode = defaultdict(Counter)
    for u in w["users"]:
        for a, v in u["values"].items():
            mode[u["community"], a][v] += 1
    # time-aware upper bound: the community's most common value among its members asked at steps t-1..t+1
    near = defaultdict(Counter)
    for u in w["users"]:
        for t in (u["step"] - 1, u["step"], u["step"] + 1):
            for a, v in u["values"].items():
                near[u["community"], t, a][v] += 1
    pop = defaultdict(Counter)
    for u in w["users"]:
        for a, v in u["values"].items():
            pop[a][v] += 1
    stats = defaultdict(lambda: defaultdict(list))
    for uid, it in items.items():
        bucket = world.history_bucket(it["history_size"])
        a, target = it["attribute_type"], it["target"]
        texts = [p["text"] for p in it["profile"]]
        sig = logo.local_signals(texts)
        know = rounds[it["step"]]
        med = logo.mediate(sig, know, logo.MediatorParams(posterior=not args.nearest))
        ctx = dict(med.context)
        s = logo.ATTRIBUTE_SLICES[a]
        local = logo.VOCAB_VALUE[s.start + int(np.argmax(sig.counts[s]))] if sig.counts[s].sum() else None
        stats[bucket]["local"].append(local == target)
        stats[bucket]["context_given"].append(a in ctx)
        if a in ctx:
            stats[bucket]["note_right"].append(ctx[a] == target)
        stats[bucket]["logo"].append((local or ctx.get(a)) == target)
        stats[bucket]["upper"].append(mode[truth[uid]["community"], a].most_common(1)[0][0] == target)
        fixed = dict(logo.mediate(sig, know, logo.FIXED).context).get(a)
        # without the mediator the note also covers stated attributes: how often it contradicts a right local answer
        stats[bucket]["nomediator_conflict"].append(local == target and fixed is not None and fixed != target)
        stats[bucket]["upper_t"].append(near[truth[uid]["community"], it["step"], a].most_common(1)[0][0] == target)
        stats[bucket]["popular"].append(pop[a].most_common(1)[0][0] == target)
        if (sig.counts[s] > 0).sum() >= 2:  # conflicting local evidence
            named = [logo.read_preferences(t)[s] for t in texts]
            latest = next(logo.VOCAB_VALUE[s.start + int(np.argmax(x))] for x in reversed(named) if x.sum())
            mix = logo.community_posterior(sig.counts, know) @ logo.attribute_shares(know.histograms, 1.0)
            choice = logo.VOCAB_VALUE[s.start + int(np.argmax(np.where(sig.counts[s] > 0, mix[s], -1)))]
            stats[bucket]["conflict_latest"].append(latest == target)
            stats[bucket]["conflict_most"].append(local == target)
            stats[bucket]["conflict_community"].append(choice == target)
    for bucket in ("1-2", "3-9", "10-49", "50+"):
        print(bucket, len(stats[bucket]["local"]), {k: round(float(np.mean(v)), 3) for k, v in stats[bucket].items()},
              "conflicting:", len(stats[bucket]["conflict_latest"]))


if __name__ == "__main__":
    main()
