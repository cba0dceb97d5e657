"""What limits LoGo's cold-start gain in an evaluation: per user, whether the community note covered the asked
attribute, whether its value was the user's (true labels, for scoring only), and whether the model chose it.

    python3 bench/experiments/logo_diagnose.py REPORT_DIR... --seed 7 --users 1000 --method logo+prompt+rag
"""
import argparse
import json
from pathlib import Path

import numpy as np

from localpers.personalize import logo
from localpers.personalize import world


def main():
    p = argparse.ArgumentParser()
    p.add_argument("reports", nargs="+")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--method", default="logo+prompt+rag")
    args = p.parse_args()
    rows = [r for d in args.reports for r in json.loads((Path(d) / "report.json").read_text())["items"]
            if r["method"] == args.method and "mc_ok" in r]
    w = world.generate_world(args.users, seed=args.seed)
    entries = {e["user_id"]: e for e in w["upqa"]}
    rounds = logo.world_rounds(w["upqa"], seed=args.seed)  # as `localpers eval world --seed S` prepares it
    given, right, followed, ok_when_right, ok_when_wrong, ok_without = [], [], [], [], [], []
    own_right, own_followed = [], []
    for r in rows:
        e = entries[r["id"]]
        m = logo.mediate(logo.local_signals([x["text"] for x in e["profile"]]), rounds[e["step"]])
        value = dict(m.context).get(e["attribute_type"])
        given.append(value is not None)
        if (own := dict(m.own).get(e["attribute_type"])) is not None:
            own_right.append(own == e["target"])
            own_followed.append(r["mc_choice"] == own)
        if value is None:
            ok_without.append(r["mc_ok"])
            continue
        right.append(value == e["target"])
        followed.append(r["mc_choice"] == value)
        (ok_when_right if value == e["target"] else ok_when_wrong).append(r["mc_ok"])
    f = lambda v: f"{np.mean(v):.3f} (n={len(v)})" if v else "-"
    print(f"users {len(rows)}; note covers the asked attribute: {f(given)}; its value is the user's: {f(right)}; "
          f"model chose the note's value: {f(followed)}; mc_acc when the note is right: {f(ok_when_right)}, "
          f"wrong: {f(ok_when_wrong)}, no community note: {f(ok_without)}; the user's own latest value "
          f"(own note) is right: {f(own_right)}, chosen: {f(own_followed)}")


if __name__ == "__main__":
    main()
