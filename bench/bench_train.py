"""PerCE/CE training benchmarks on SmolLM2-135M-Instruct (the embedded model), on a synthetic-world user.

    python3 -m bench.bench_train speed [--steps 4] [--layers N] [--threads 1]
        one user's examples trained with fp32 and with bf16 autocast from the same init: seconds per step,
        tokens/s, both loss curves and their largest relative difference per step
    python3 -m bench.bench_train user100 [--objective perce] [--threads 2]
        `personalize --method perce` on a user with 100 history items (the default TrainConfig): wall time
    python3 -m bench.bench_train pir [--out docs/perce]
        PIR of every target token of one user's examples under the base model and after PerCE training:
        a histogram (tokens of the user's signature phrases vs the rest) and one example's target text shaded
        by PIR (pir_histogram.png, pir_tokens.png, pir.json); `plot` redraws them from pir.json
    python3 -m bench.bench_train subset WORLD_DIR OUT_PREFIX [--min-history 12 --max-history 60]
        the world's LongLaMP-style writing task cut to the users with 12..60 history items (enough to train on,
        short enough for the 2-core budget): OUT_PREFIX_questions.json and OUT_PREFIX_outputs.json
    python3 -m bench.bench_train adapters CACHE_DIR [--a perce --b ce]
        per user, how far two methods' cached eval adapters (CACHE_DIR = $XDG_CACHE_HOME/localpers/perce) are
        apart: |dW_a - dW_b| / |dW_b| and |dW_a| / |dW_b| with dW = B A over all modules (Frobenius)
    python3 -m bench.bench_train table EVAL_DIR [EVAL_DIR...]
        ROUGE means of `localpers eval` runs (shards, finished or not) and the paired differences and ratios
        (perce vs ce, +rag, the ablations vs perce and ce) with 95% intervals, as markdown

Users come from `world.generate_world(400, seed=7)` (the development seed; the quality figures use another).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import localpers
from localpers import names
from localpers.personalize.training import (TrainConfig, encode, end_of_turn, history_examples, remove_lora, token_pir,
                                tokenizer, torch_model, train)
from localpers.personalize.world import generate_world

WORLD_SEED = 7


def world_user(size: int):
    """The world user whose history size is closest to `size` (their items cut to `size`), and their style."""
    world = generate_world(400, seed=WORLD_SEED)
    index = min(range(len(world["users"])), key=lambda i: abs(world["users"][i]["history_size"] - size))
    question = world["longlamp_questions"][index]
    items = [{"id": p["id"], "text": p["text"], "kind": p["kind"]} for p in question["profile"]][-size:]
    return world["users"][index], items


def encoded_examples(items, config):
    model_path = str(localpers.default_model_path())
    tok = tokenizer(model_path)
    eot = end_of_turn(tok)
    examples = history_examples(items, config.profile_k)
    return tok, examples, [encode(tok, e, config, eot) for e in examples]


def cmd_speed(args):
    config = TrainConfig(steps=args.steps, batch=4, layers=args.layers)
    _, _, encoded = encoded_examples(world_user(100)[1], config)
    model = torch_model(str(localpers.default_model_path()))
    runs = {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):  # alternately, twice: the machine is shared
        result = train(model, encoded, replace(config, precision=precision), progress=False)
        runs.setdefault(precision, []).append(result)
    out = {}
    for precision, results in runs.items():
        seconds = sorted(s.cpu_seconds for r in results for s in r.steps[1:])  # step 1 warms up
        median = seconds[len(seconds) // 2]  # CPU time of this process: less sensitive to a busy machine
        batch_tokens = [sum(len(encoded[i].pos) + len(encoded[i].neg) for i in b) for b in _batches(config, encoded)]
        out[precision] = {"median_step_cpu_s": round(median, 2),
                          "median_step_wall_s": round(sorted(s.seconds for r in results for s in r.steps[1:])[len(seconds) // 2], 2), "loss": [round(s.loss, 4) for s in results[0].steps],
                          "forwarded_tokens_per_s": round(sum(batch_tokens) / len(batch_tokens) / median, 1),
                          "target_tokens_per_s": round(results[0].tokens / len(results[0].steps) / median, 1)}
    diffs = [abs(a - b) / a for a, b in zip(out["fp32"]["loss"], out["bf16"]["loss"])]
    out["bf16_speedup"] = round(out["fp32"]["median_step_cpu_s"] / out["bf16"]["median_step_cpu_s"], 2)
    out["max_rel_loss_diff"] = round(max(diffs), 4)
    out["cpu_bf16"] = __import__("localpers.personalize.training", fromlist=["cpu_has_bf16"]).cpu_has_bf16()
    print(json.dumps(out, indent=1))


def _batches(config, encoded):
    from localpers.personalize.training import example_order, n_steps

    return example_order(len(encoded), n_steps(config, len(encoded)), config.batch, config.seed)


def cmd_user100(args):
    from localpers.personalize.training import adapter_for_examples, check_enough

    config = replace(TrainConfig(), objective=args.objective)
    _, items = world_user(100)
    examples = history_examples(items, config.profile_k)
    check_enough(examples, "bench")
    model_path = localpers.default_model_path()
    t0 = time.perf_counter()
    torch_model(str(model_path)), tokenizer(str(model_path))
    load = time.perf_counter() - t0
    path, result = adapter_for_examples(model_path, examples, config, Path(args.out) / f"{args.objective}-100.gguf",
                                        progress=True)
    print(json.dumps({"items": len(items), "examples": len(examples), "load_s": round(load, 1),
                      "train_s": round(result.seconds, 1), "train_cpu_s": round(result.cpu_seconds, 1), "total_s": round(time.perf_counter() - t0, 1),
                      **result.summary(), "config": repr(config)}, indent=1))


def cmd_pir(args):
    import matplotlib
    matplotlib.use("Agg")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    user, items = world_user(args.size)
    config = replace(TrainConfig(), objective=names.PERCE, steps=args.steps, batch=4, layers=10, lr=2e-3)
    tok, examples, encoded = encoded_examples(items, config)
    model = torch_model(str(localpers.default_model_path()))
    signatures = user["style"]["sigs"] + [user["style"]["open"]]

    def per_token():
        rows = []
        for e, enc in zip(examples, encoded):
            pir = token_pir(model, enc, config).tolist()
            ids = enc.pos[-enc.n_target:].tolist()
            pieces = [tok.decode([i]) for i in ids]
            spans, pos = [], 0
            for s in signatures:  # character spans of the user's signature phrases in the target
                at = e.target.find(s)
                if at >= 0:
                    spans.append((at, at + len(s)))
            flags = []
            for piece in pieces:
                start, pos = pos, pos + len(piece)
                flags.append(any(a < pos and start < b for a, b in spans))
            rows.append({"pieces": pieces, "pir": pir, "signature": flags})
        return rows

    remove_lora(model)
    before = per_token()
    train(model, encoded, config, progress=True)
    after = per_token()
    remove_lora(model)
    for rows in (before, after):
        for row, e in zip(rows, examples):
            row["prompt"] = e.prompt
    (out / "pir.json").write_text(json.dumps({"user": user["id"], "signatures": signatures, "config": repr(config),
                                              "steps": config.steps,
                                              "before": before, "after": after}))

    plot_pir(out)

    def mean(rows, flag):
        values = [p for r in rows for p, f in zip(r["pir"], r["signature"]) if f == flag]
        return round(sum(values) / max(len(values), 1), 3), len(values)

    print(json.dumps({"user": user["id"], "examples": len(examples),
                      "mean_pir_signature_before": mean(before, True), "mean_pir_other_before": mean(before, False),
                      "mean_pir_signature_after": mean(after, True), "mean_pir_other_after": mean(after, False)},
                     indent=1))


def plot_pir(out: Path) -> None:
    """pir_histogram.png and pir_tokens.png from pir.json (python3 -m bench.bench_train plot --out DIR)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((out / "pir.json").read_text())
    before, after = data["before"], data["after"]
    cfg = TrainConfig()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, rows, title in ((axes[0], before, "base model"), (axes[1], after, f"after {data['steps']} PerCE steps")):
        sig = [p for r in rows for p, f in zip(r["pir"], r["signature"]) if f]
        rest = [p for r in rows for p, f in zip(r["pir"], r["signature"]) if not f]
        bins = torch.linspace(-4, 8, 49).tolist()
        ax.hist([min(max(p, -4), 8) for p in rest], bins=bins, alpha=0.6, density=True, label=f"other tokens ({len(rest)})")
        ax.hist([min(max(p, -4), 8) for p in sig], bins=bins, alpha=0.6, density=True,
                label=f"signature phrases ({len(sig)})")
        for x in (cfg.min_weight, cfg.max_weight):
            ax.axvline(x, color="gray", lw=0.8, ls="--")
        ax.set_title(f"PIR per target token, {title}")
        ax.set_xlabel("PIR = log p(y|profile,x) - log p(y|x)  (clipped to [-4, 8] for display)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(out / "pir_histogram.png", dpi=120)
    plt.close(fig)

    # one example with a signature phrase in its target, shaded by its PIR under the base model
    index = next((i for i, r in enumerate(before) if any(r["signature"]) and len(r["pieces"]) >= 14), 0)
    row = before[index]
    fig, ax = plt.subplots(figsize=(11, 1.3))
    ax.axis("off")
    cmap = plt.get_cmap("RdBu_r")
    renderer = fig.canvas.get_renderer()
    x, y = 0.01, 0.72
    for piece, value in zip(row["pieces"], row["pir"]):
        colour = cmap(min(max((value + 5) / 10, 0.0), 1.0))  # a float: cmap(1) would be LUT entry 1
        t = ax.text(x, y, piece.replace("\n", " ").replace(" ", "\u2423") or "?", fontsize=12, family="monospace",
                    va="center", bbox=dict(facecolor=colour, edgecolor="white", pad=2))
        box = t.get_window_extent(renderer).transformed(ax.transAxes.inverted())
        if box.x1 > 0.99:  # wrap
            t.set_position((0.01, y - 0.25))
            x, y = 0.01, y - 0.25
            box = t.get_window_extent(renderer).transformed(ax.transAxes.inverted())
        x = box.x1 + 0.006
        ax.text(box.x0 + (box.x1 - box.x0) / 2, y - 0.42, f"{value:+.1f}", fontsize=7, ha="center", va="center")
    ax.set_title(f"x: {row['prompt']!r} - target tokens shaded by PIR under the base model "
                 "(blue < 0 < red, -5..5; \u2423 = space)", fontsize=10, loc="left")
    fig.savefig(out / "pir_tokens.png", dpi=120, bbox_inches="tight")
    plt.close(fig)



def cmd_subset(args):
    world, prefix = Path(args.dirs[0]), Path(args.dirs[1])
    questions = json.loads((world / "longlamp_questions.json").read_text())
    outputs = json.loads((world / "longlamp_outputs.json").read_text())
    kept = [q for q in questions if args.min_history <= q["history_size"] <= args.max_history]
    ids = {q["id"] for q in kept}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}_questions.json").write_text(json.dumps(kept))
    Path(f"{prefix}_outputs.json").write_text(json.dumps({**outputs, "golds": [g for g in outputs["golds"] if g["id"] in ids]}))
    print(f"{len(kept)} of {len(questions)} users with {args.min_history}..{args.max_history} history items -> {prefix}_questions.json")


PAIRS = [("ce", "base"), ("perce", "base"), ("perce", "ce"), ("ce+rag", "rag"), ("perce+rag", "rag"),
         ("perce+rag", "ce+rag"), ("perce+rag", "perce"), ("ce+rag", "ce"),
         *((a, ref) for a in names.PERCE_ABLATIONS for ref in ("perce", "ce"))]


def eval_rows(dirs) -> list[dict]:
    """The scored rows of `localpers eval` output directories: report.json's items, or, for a run still
    going, the rows in its progress.jsonl so far."""
    rows = []
    for directory in dirs:
        report = Path(directory) / "report.json"
        if report.is_file():
            rows += json.loads(report.read_text())["items"]
        else:
            for line in (Path(directory) / "progress.jsonl").read_text().splitlines()[1:]:
                rows += json.loads(line)[1][1]
    return rows


def looping(text: str, n: int = 10) -> bool:
    """A degenerate, repeating answer ("Carpe diem! Carpe diem! ..."): fewer than half of its character
    n-grams are distinct (ordinary prose has almost all distinct; needs 2n characters)."""
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return len(text) >= 2 * n and len(set(grams)) < 0.5 * len(grams)


def ratio_interval(a, b, rounds: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval (percentile, users resampled) of mean(a) / mean(b)."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(a), (rounds, len(a)))
    ratios = a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-12)
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def cmd_table(args):
    """Per-method means (over the users each method has), answers that loop (looping), and, for each pair (a, b) of PAIRS present, the paired
    difference a - b with its 95% interval and the ratio mean(a)/mean(b) with a paired bootstrap 95% interval,
    over the users both have: markdown for BENCHMARKS.md."""
    from localpers.eval.evaluation import paired_deltas

    rows = eval_rows(args.dirs)
    scores = {}  # (method, metric) -> {user: value}
    for r in rows:
        for metric in ("rouge1", "rougeL"):
            scores.setdefault((r["method"], metric), {})[r["id"]] = r[metric]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print("| method | users | ROUGE-1 | ROUGE-L | looping answers |\n|---|---|---|---|---|")
    for m in methods:
        r1, rl = scores[m, "rouge1"], scores[m, "rougeL"]
        loops = sum(looping(r["output"]) for r in rows if r["method"] == m)
        print(f"| {m} | {len(rl)} | {sum(r1.values()) / len(r1):.3f} | {sum(rl.values()) / len(rl):.3f} | {loops} |")
    print("\n| a − b | users | ROUGE-1 a−b (95%) | ROUGE-L a−b (95%) | ROUGE-L a/b (95% bootstrap) |\n|---|---|---|---|---|")
    for a, b in PAIRS:
        if a not in methods or b not in methods:
            continue
        pair = [r for r in rows if r["method"] in (a, b)]
        deltas = paired_deltas(pair, b).get(a, {})
        if "rougeL" not in deltas:
            continue
        common = sorted(set(scores[a, "rougeL"]) & set(scores[b, "rougeL"]))
        va, vb = [scores[a, "rougeL"][u] for u in common], [scores[b, "rougeL"][u] for u in common]
        low, high = ratio_interval(va, vb)
        d1, dl = deltas["rouge1"], deltas["rougeL"]
        print(f"| {a} − {b} | {dl['n']} | {d1['delta']:+.3f} ± {d1['ci95']:.3f} | {dl['delta']:+.3f} ± {dl['ci95']:.3f} "
              f"| {sum(va) / max(sum(vb), 1e-12):.2f} ({low:.2f}..{high:.2f}) |")


def lora_updates(path) -> dict:
    """{module: B @ A} of a LoRA adapter GGUF (float32 numpy)."""
    from localpers.model.gguf_info import open_gguf
    from localpers.model.model import tensor_array

    tensors = {t.name: tensor_array(t) for t in open_gguf(path, check_arch=False).tensors}
    return {name[:-len(".lora_a")]: tensors[name[:-len(".lora_a")] + ".lora_b"] @ a
            for name, a in tensors.items() if name.endswith(".lora_a")}


def cmd_adapters(args):
    import numpy as np

    found = {}  # user -> {method: (adapter, meta)}
    for meta_path in Path(args.dirs[0]).glob("*.json"):
        method = meta_path.stem.rsplit("-", 1)[0]
        meta = json.loads(meta_path.read_text())
        found.setdefault(meta["user"], {})[method] = (meta_path.with_suffix(".gguf"), meta)
    diffs, norms = [], []
    for user, methods in sorted(found.items()):
        if args.a in methods and args.b in methods:
            ua, ub = lora_updates(methods[args.a][0]), lora_updates(methods[args.b][0])
            sq = lambda d: sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values())
            diffs.append((sq({k: ua[k] - ub[k] for k in ub}) / sq(ub)) ** 0.5)
            norms.append((sq(ua) / sq(ub)) ** 0.5)
            print(f"{user}  |dW_{args.a} - dW_{args.b}| / |dW_{args.b}| = {diffs[-1]:.3f}  "
                  f"|dW_{args.a}| / |dW_{args.b}| = {norms[-1]:.3f}  mean weight {args.a}: "
                  f"{methods[args.a][1].get('mean_weight')}")
    if diffs:
        print(f"median over {len(diffs)} users: relative difference {np.median(diffs):.3f}, norm ratio {np.median(norms):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "user100", "pir", "plot", "subset", "adapters", "table"])
    parser.add_argument("dirs", nargs="*", help="table: eval output directories (shards)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--size", type=int, default=40, help="pir: the user's history size")
    parser.add_argument("--objective", default=names.PERCE)
    parser.add_argument("--a", default=names.PERCE, help="adapters: the method compared")
    parser.add_argument("--b", default=names.CE, help="adapters: the reference method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-history", type=int, default=12, help="subset: fewest history items")
    parser.add_argument("--max-history", type=int, default=60, help="subset: most history items")
    parser.add_argument("--out", default="/tmp/localpers-bench-train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"speed": cmd_speed, "user100": cmd_user100, "pir": cmd_pir,
     "plot": lambda args: plot_pir(Path(args.out)), "subset": cmd_subset, "adapters": cmd_adapters,
     "table": cmd_table}[args.what](args)


if __name__ == "__main__":
    main()
