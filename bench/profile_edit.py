"""Where one preference edit's seconds go, and the end-to-end edit (statement -> verified adapter) timed.

    PYTHONPATH=. python bench/profile_edit.py [--threads 1] [--facts 3] [--torch-profile] [--out FILE.json]

On the default model, for UPQA cluster9 dev items (item 0, 10, 20, ...: 13 questions each, as bench/bench_edit.py),
each edited from the unedited model with the default EditConfig:

- `parts`: the editor's stages timed one by one, as Editor.edit runs them (the training batch's cached forward,
  the keys, the key covariance C and its inverse (cold: first use in a process), each Adam step's suffix forward,
  backward and update), plus the llama.cpp verification and the adapter write of `edit_facts`;
- `edit_s`: Editor.edit alone, inside `edit_facts_s`: the whole fact -> verified adapter (edit, write, check);
- with --torch-profile, torch.profiler's table of the operators of one edit (self CPU time), printed.

Every stage also runs in the same process on the same facts, so a figure taken while other processes load the
CPU can be read as proportions. Also works on an older checkout of the package (PYTHONPATH=old-tree), timing
only what both have: run both on the same machine in turn to compare before/after.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from localpers import default_model_path
from localpers.engine.engine import Engine
from localpers.personalize import editing
from localpers.personalize.datasets import data_path, read_upqa


def timed(parts: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
    return out


def stage_breakdown(editor, fact) -> dict:
    """Editor.edit's stages, one by one (the same calls as Editor.edit, in its order), seconds each."""
    parts, cfg = {}, editor.config
    editor._cov_inv = None  # C cold, as in a fresh job process without a cached copy
    if hasattr(editor, "_cov_cache"):
        editor._cov_cache = None
    pairs = editor.pairs(fact)
    batch = timed(parts, "batch: cached forward of the training prompts", editor.batch, pairs)
    keys = timed(parts, "keys: forward passes to layer L", editor.keys, fact)
    timed(parts, "key direction incl. C and C^-1 (cold)", editor.key_direction, keys)
    key = timed(parts, "key direction (C warm)", editor.key_direction, keys)
    k_star = keys.mean(0)
    with torch.no_grad():
        timed(parts, "NLL before (one suffix forward)", lambda: float(editor.nll(batch, editor.logprobs(batch))))
        max_norm = cfg.clamp * float((editor.W @ k_star).norm())
    delta = torch.zeros(editor.model.config.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    steps = 0
    for _ in range(cfg.steps):
        nll = timed(parts, "steps: suffix forward", lambda: editor.nll(batch, editor.logprobs(batch, key, delta)))
        if float(nll.detach()) < cfg.stop_nll:
            break
        opt.zero_grad()
        timed(parts, "steps: backward", nll.backward)
        timed(parts, "steps: Adam update + clamp", lambda: (opt.step(), delta.data.mul_(
            min(1.0, max_norm / (float(delta.norm()) + 1e-12)))))
        steps += 1
    parts = {k: round(v, 3) for k, v in parts.items()}
    shapes = {"prompts": len(batch.x), "suffix_positions": batch.x.shape[1],
              "prefix_positions": batch.caches[0][0].shape[2], "scored_rows": len(batch.tokens),
              "keys": len(keys), "steps": steps}
    return {"parts": parts, "shapes": shapes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--facts", type=int, default=3)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--no-stages", action="store_true", help="only the end-to-end times")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = read_upqa(data_path("upqa_cluster9"))
    facts = [editing.facts_of(i.user.preferences, i.user.facts)[0] for i in items[::10][:args.facts]]
    t0 = time.perf_counter()
    editor = editing.editor_for(str(default_model_path()))
    load_s = time.perf_counter() - t0
    engine = Engine(n_threads=args.threads)
    rows = []
    for fact in facts:
        row = {"statement": fact.statement, "questions": len(fact.questions)}
        if not args.no_stages:
            editor.reset()
            row.update(stage_breakdown(editor, fact))
        editor._cov_inv = None  # cold C, as a fresh job process without a cached copy
        path = Path("/tmp") / f"profile-edit-{time.time_ns()}.gguf"
        t0 = time.perf_counter()
        result = editing.edit_facts(engine, editor, [fact], path)
        row["edit_facts_s"] = round(time.perf_counter() - t0, 3)
        edit = (result.edits or [None])[0]
        row["verified"] = bool(result.edits)
        row["answer"] = result.answers.get(fact.statement)
        if edit:
            row["edit_s"] = round(edit.seconds, 3)
            row["nll"] = [round(edit.nll_before, 3), round(edit.nll_after, 3)]
            parts = {}
            timed(parts, "write adapter", editing.write_adapter, path, [edit], editor.model.config.arch)
            timed(parts, "verify on llama.cpp", editing.states_target, engine, path, fact)
            row.update({k: round(v, 3) for k, v in parts.items()})
        path.unlink(missing_ok=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        editor.reset()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            editor.edit(facts[0])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    summary = {"threads": args.threads, "editor_load_s": round(load_s, 2), "rows": rows,
               "edit_s_median": sorted(r.get("edit_s", 0) for r in rows)[len(rows) // 2],
               "edit_facts_s_median": sorted(r["edit_facts_s"] for r in rows)[len(rows) // 2]}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
