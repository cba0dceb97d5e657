"""A report from an interrupted `localpers eval` run's journal (DIR/progress.jsonl): the items that every method
has scored, aggregated as the finished run would aggregate them (means, counts, paired intervals, plots).

    python bench/experiments/journal_report.py DIR --out OUT_DIR
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

from localpers.eval import evaluation as ev

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("run")
ap.add_argument("--out", required=True)
args = ap.parse_args()
lines = (Path(args.run) / "progress.jsonl").read_text().splitlines()
header = json.loads(lines[0])
done = dict(json.loads(line) for line in lines[1:])
methods = header["methods"]
parts = sorted({key.split("/")[0] for key in done})
results, counts, rows = defaultdict(dict), defaultdict(dict), []
for part in parts:
    indices = sorted({int(k.split("/")[2]) for k in done if k.startswith(part + "/") and k.split("/")[2].isdigit()})
    complete = [i for i in indices if all(f"{part}/{m}/{i}" in done for m in methods)]
    for m in methods:
        values = defaultdict(list)
        for i in complete:
            item_values, item_rows = done[f"{part}/{m}/{i}"]
            for metric, v in item_values.items():
                values[metric] += v
            rows += item_rows
        means, n = ev._summary(values)
        results[m].update(means)
        counts[m].update(n)
    print(part, "complete items:", len(complete))
report = {"task": header["task"], "model": header["model"], "config": {**header["config"], "complete_items": len(complete)},
          "rules": [], "results": dict(results), "counts": dict(counts), "items": rows}
for path in ev.write_report(args.out, report):
    print(path)
