"""What adding one preference costs a user who already has N (issue 25): `personalize` as the server's job runs it.

    PYTHONPATH=. python bench/bench_add_fact.py --facts 10 [--more K] [--threads 1] [--out add.json]

A user holding N UPQA dev statements (the many-preferences user of `localpers eval upqa --many-preferences N`,
imported with their question clusters) in a temporary data folder; `editing.personalize` from nothing (every fact
edited and checked on llama.cpp); then one more statement added and personalize run again in the same process
("warm": the job process still up, its editor, caches and llama.cpp engine ready, as `localpers serve`'s job
process keeps them), with --more K, K more added one at
a time, each run warm (the median and the slowest of those warm runs); and one more added and run in a new process
("new process": the editor loaded again from the model cache, the earlier adapters read from the data folder). Prints and writes
each run's seconds, facts, verified, failed and how many facts were edited (not reused). With N >= 4 the user has
routed edits (names.EDIT_ROUTE_FROM): one adapter per fact, so adding one edits one. The default model."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(data_dir: str, user: str, threads: int, engine=None) -> dict:
    """personalize as the job process runs it: with `engine`, the job process's llama.cpp engine, kept between
    its jobs (None: personalize opens one, as a run by hand does; its load is then inside the figure)."""
    import torch

    from localpers.personalize import editing

    torch.set_num_threads(threads)
    trained = []
    real = editing.Editor.joint
    editing.Editor.joint = lambda self, facts: trained.extend(facts) or real(self, facts)
    try:
        started = time.perf_counter()
        result = editing.personalize(user, data_dir=data_dir, config=editing.EditConfig(threads=threads),
                                      engine=engine)
        seconds = time.perf_counter() - started
    finally:
        editing.Editor.joint = real
    return {"seconds": round(seconds, 1), "verified": len(result.edits), "failed": len(result.failed),
            "edit_seconds": round(sum(e.seconds for e in result.edits if not e.reused), 1),   # the value: batch and Adam steps
            "edited": len(trained), "reused": len(result.edits) + len(result.failed) - len(trained)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--more", type=int, default=0, help="then this many more facts, one at a time, warm")
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=2, metavar=("DATA_DIR", "USER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run(*args.child, args.threads)))
        return
    from localpers.eval import evaluation as ev
    from localpers.personalize.datasets import data_path, read_upqa
    from localpers.store.store import Store

    items = ev.many_preference_items(read_upqa(data_path("upqa")), args.facts + 2 + args.more, 0)

    def add(store, item):   # as `localpers remember --kind preference` with the item's UPQA fields
        [fact] = item.user.facts
        store.add("u", item.user.preferences[0], kind="preference",
                  meta={"question": list(fact.questions), "target": list(fact.targets),
                        "attribute_type": list(fact.attributes)})

    from localpers.engine.engine import Engine
    from localpers import default_model_path

    report = {"facts": args.facts, "threads": args.threads}
    # the job process's engine (localpers.serve.jobs._child_main): opened once, before its first job
    with tempfile.TemporaryDirectory() as data_dir, \
            Engine(default_model_path(), n_ctx=2048, n_threads=args.threads) as engine:
        with Store.open(data_dir) as store:
            for item in items[:args.facts]:
                add(store, item)
        report["first"] = run(data_dir, "u", args.threads, engine)
        with Store.open(data_dir) as store:
            add(store, items[args.facts])
        report["warm"] = run(data_dir, "u", args.threads, engine)   # fact N+1, this process's editor ready
        more = items[args.facts + 2:]
        report["more"] = []
        for item in more:   # facts N+2 ... one at a time, each a job of the same process
            with Store.open(data_dir) as store:
                add(store, item)
            report["more"].append(run(data_dir, "u", args.threads, engine))
        if more:
            seconds = sorted([report["warm"]["seconds"]] + [r["seconds"] for r in report["more"]])
            report["warm_seconds"] = {"n": len(seconds), "median": seconds[len(seconds) // 2], "max": seconds[-1]}
        with Store.open(data_dir) as store:
            add(store, items[args.facts + 1])
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", data_dir, "u"],
                             capture_output=True, text=True, check=True, cwd=ROOT)   # fact N+2, a new process
        report["new_process"] = json.loads(out.stdout.strip().splitlines()[-1])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
