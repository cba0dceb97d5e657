"""Community-inference variants measured offline (no LLM) on the development worlds: how often the community
note's value is the current value of the asked attribute, over cold users (1-2 items) who did not name it.
Labels are used only to score.

    python3 bench/experiments/logo_variants.py --seeds 1 3 7 --variant posterior [--k 8] [--restarts 5] [--half-life 1]
    python3 bench/experiments/logo_variants.py --variant posterior --smoothing 0.5
    python3 bench/experiments/logo_variants.py --variant posterior --latest-histograms   # members' latest values, not mentions
    python3 bench/experiments/logo_variants.py --variant posterior --cem 5               # + classification-EM steps
    python3 bench/experiments/logo_variants.py --variant nearest --minilm 0.5            # + MiniLM item embeddings (w)

--variant: nearest (community by cosine to the centroid) or posterior (the mixture, the default mediator).
"""
import argparse
import math

import numpy as np

from localpers.personalize import logo
from localpers.personalize import world


def latest_histograms(texts) -> np.ndarray:
    """A contributor's counts as one-hot latest values (instead of every mention)."""
    return logo.latest_values(texts)


def cem_lloyd(steps):
    """logo._lloyd followed by `steps` classification-EM steps: each contributor joins the community of highest
    naive-Bayes likelihood of its counts (prior ∝ size) under the round's decayed histograms."""
    plain = logo._lloyd

    def run(signals, centroids, carried, steer_shape, iterations, rng, random_assignment):
        centroids, sums, inertia = plain(signals, centroids, carried, steer_shape, iterations, rng, random_assignment)
        counts = np.stack([s.counts for s in signals])
        for _ in range(steps):
            total = sums if carried is None else carried + sums
            log_p = np.log(np.maximum(total.count, 1e-9))[None] + counts @ np.log(logo.attribute_shares(total.counts, 1.0)).T
            contributions = [logo.Contribution(int(c), s.vector, s.counts, s.steering)
                             for c, s in zip(log_p.argmax(1), signals)]
            sums = logo.aggregate(contributions, len(centroids), len(signals[0].vector), steer_shape)
        return logo.centroids_from(sums if carried is None else carried + sums, centroids), sums, inertia
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 7])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--variant", choices=("nearest", "posterior"), default="posterior")
    p.add_argument("--k", type=int)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--half-life", type=float, default=logo.HALF_LIFE)
    p.add_argument("--window", action="store_true")
    p.add_argument("--smoothing", type=float, default=1.0)
    p.add_argument("--latest-histograms", action="store_true")
    p.add_argument("--cem", type=int, default=0)
    p.add_argument("--minilm", type=float, help="embedding weight of MiniLM item embeddings (needs localpers[dense])")
    args = p.parse_args()
    if args.latest_histograms:
        logo.preference_counts = latest_histograms
    if args.cem:
        logo._lloyd = cem_lloyd(args.cem)
    embedder = None
    if args.minilm is not None:
        import torch

        from localpers.store.retrieval import MiniLMEmbedder

        torch.set_num_threads(1)
        embedder = logo.CachedEmbedder(MiniLMEmbedder())
    params = logo.MediatorParams(posterior=args.variant == "posterior", smoothing=args.smoothing)
    weight = args.minilm if args.minilm is not None else logo.EMBEDDING_WEIGHT
    means = []
    for seed in args.seeds:
        w = world.generate_world(args.users, seed=seed)
        rounds = logo.world_rounds(w["upqa"], seed=seed, k=args.k, restarts=args.restarts, half_life=args.half_life,
                                   window=args.window, embed=embedder, embedding_weight=weight)
        right = []
        for e in w["upqa"]:
            if e["history_size"] > 2:
                continue
            texts = [x["text"] for x in e["profile"]]
            sig = logo.local_signals(texts, embedder(texts) if embedder else None, None, weight)
            if sig.counts[logo.ATTRIBUTE_SLICES[e["attribute_type"]]].sum() > 0:
                continue
            m = logo.mediate(sig, rounds[e["step"]], params)
            right.append(dict(m.context).get(e["attribute_type"]) == e["target"])
        means.append(np.mean(right))
        half = 1.96 * math.sqrt(means[-1] * (1 - means[-1]) / len(right))
        print(f"seed {seed}: note right {means[-1]:.3f} ± {half:.3f} (n={len(right)})", flush=True)
    print(f"mean {np.mean(means):.3f}")


if __name__ == "__main__":
    main()
