"""Many preferences per user: one user holding N UPQA statements of different attribute types (every item of
--shard, one per type for --shard I/10), edited together as `localpers personalize` edits a user (every fact
from the unedited model, stacked, verified on llama.cpp), then each fact's explicit and paraphrased question
asked with the composed method (default: the served composition), the locality KL on the neutral prompts, and
the wall time of the edit of all N facts (what adding the N-th costs: personalize recomputes from all of them).

    python bench/experiments/many_preferences.py --shard 5/10 --method edit,edit+facts [--threads 1] --out DIR
"""
import argparse
import json
import time
from pathlib import Path

from localpers.engine.engine import Engine
from localpers.eval.evaluation import NEUTRAL, answer_logprobs, generate, locality_kl
from localpers.personalize.datasets import data_path, read_upqa
from localpers.personalize.editing import editor_for, facts_of, user_adapter
from localpers.personalize.matching import target_match
from localpers.personalize.methods import Personalized, User
from localpers.serve.compose import DEFAULT_SPEC, Composer

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--shard", default="5/10", help="I/N: every N-th shipped UPQA dev item from the I-th")
ap.add_argument("--method", default=DEFAULT_SPEC)
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--out", required=True)
args = ap.parse_args()
index, count = map(int, args.shard.split("/"))
items = read_upqa(data_path("upqa"))[index::count]
user = User("many", preferences=tuple(i.user.preferences[0] for i in items), facts=tuple(f for i in items for f in i.user.facts))
engine = Engine(n_threads=args.threads)
editor_for(str(engine.model_path))   # load the torch model before timing
started = time.perf_counter()
adapter = user_adapter(user, engine)
edit_s = time.perf_counter() - started
kept = facts_of(user.preferences, user.facts)
base_logprobs = [answer_logprobs(engine, Personalized(), q, a) for q, a in NEUTRAL]
out, rows, summary = Path(args.out), [], {"facts": len(items), "kept": len(kept), "edit_seconds": round(edit_s, 1),
                                         "adapter": bool(adapter)}
for spec in args.method.split(","):
    method = Composer(spec)
    ok = {"explicit": [], "paraphrased": []}
    for item in items:
        for kind, question in (("explicit", item.question), ("paraphrased", item.question_paraphrased)):
            answer = generate(engine, method(user, question, engine), [{"role": "user", "content": question}], 32)
            ok[kind].append(target_match(answer, item.targets, item.candidates))
            rows.append({"method": spec, "statement": item.user.preferences[0], "kind": kind, "question": question,
                         "answer": answer, "ok": ok[kind][-1]})
    summary[spec] = {k: sum(v) / len(v) for k, v in ok.items()}
    summary[spec]["locality_kl"] = locality_kl(engine, method, [user], base_logprobs)
    print(spec, summary[spec], flush=True)
out.mkdir(parents=True, exist_ok=True)
(out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
engine.close()
