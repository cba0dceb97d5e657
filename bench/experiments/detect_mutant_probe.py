"""Which inputs tell a surviving mutant of localpers/personalize/detect.py from the original (issue 28's judging of
survivors): each named mutant is switched on in mutmut's mutated copy and detect_facts (with and without a
previous turn), is_preference, detect_preferences, merge_preferences and each fact's supersedes are compared with
the original on a corpus (or only on --text / --only texts). NAME: mutmut's name or its short form (_clauses_71).

    python bench/experiments/detect_mutant_probe.py MUTANTS_DIR NAME [NAME ...] [--extra FILE] [--show 3]
    python bench/experiments/detect_mutant_probe.py MUTANTS_DIR _clauses_71 --text "She's vegan and so am I."

MUTANTS_DIR: the `mutants` folder of a bench/mutation.py run (/tmp/localpers-mut-*/mutants, or a copy of it). The
corpus: every text of bench/bench_detect.py (UPQA, PrefEval preferences, distractor chats, questions), the
labelled messages of bench/detect_cases.py, the testers' inputs of bench/experiments/detect_before_after.py, each
string literal of the detector's tests, each of their sentences alone, and the lines of --extra files. Prints per
mutant the number of texts whose output differs and the first --show of them ("no difference" is no proof of
equivalence: it is a prompt to reason about the diff). A one-off judging aid: it runs nothing of mutmut."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def corpus(extra: list[str]) -> list[str]:
    from bench.bench_detect import labelled
    from bench.detect_cases import DEV, HELDOUT
    from bench.experiments.detect_before_after import TESTERS
    texts = [t for t, _, _ in labelled()]
    for case in [*DEV, *HELDOUT]:
        texts.append(case[1])
    texts += [t for t, _ in TESTERS]
    for test in sorted((ROOT / "tests").glob("test_*.py")):
        if not any(w in test.name for w in ("detect", "fact", "memory", "learn", "registry")):
            continue
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and 3 < len(node.value) < 2000:
                texts.append(node.value)
    for name in extra:
        texts += [line.rstrip("\n").replace("\\n", "\n") for line in open(name) if line.strip()]
    return list(dict.fromkeys(texts))


def outputs(detect, text: str) -> tuple:
    def facts(found):
        return [(f.attribute, f.value, f.statement, f.retire, f.change, sorted(g.key for g in f.supersedes))
                for f in found]
    out = [facts(detect.detect_facts(text)), detect.is_preference(text), detect.detect_preferences(text),
           facts(detect.detect_facts(text, limit=1)), facts(detect.detect_facts("Just kidding.", previous=text)),
           facts(detect.detect_facts(text, previous="I'm vegetarian. I live in Oslo. I love jazz.")),
           detect.merge_preferences(["I love jazz music.", "I live in Oslo.", text], ["I'm vegan.", text])]
    for s in detect.sentences(text)[:6]:
        out += [facts(detect.detect_facts(s)), detect.is_preference(s)]
    return tuple(repr(o) for o in out)


def run(detect, texts: list[str]) -> list[tuple]:
    detect.norm_value.cache_clear()
    detect._kinds.cache_clear()
    got = []
    for text in texts:
        try:
            got.append(outputs(detect, text))
        except Exception as e:  # a mutant that raises differs
            got.append((f"raised {type(e).__name__}: {e}",))
    return got


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mutants_dir")
    ap.add_argument("names", nargs="+")
    ap.add_argument("--extra", action="append", default=[])
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--text", action="append", default=[], help="compare on these texts only (no corpus)")
    ap.add_argument("--only", action="append", default=[], help="compare on the lines of this file only (no corpus)")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT)]
    texts = args.text + [line.rstrip("\n") for name in args.only for line in open(name) if line.strip()]
    texts = texts or corpus(args.extra)  # read with the original package first
    for mod in [m for m in sys.modules if m == "localpers" or m.startswith("localpers.")]:
        del sys.modules[mod]
    sys.path.insert(0, str(Path(args.mutants_dir).resolve()))
    os.environ["MUTANT_UNDER_TEST"] = ""
    from localpers.personalize import detect
    assert "mutants" in detect.__file__ or args.mutants_dir in detect.__file__, detect.__file__
    base = run(detect, texts)
    print(f"corpus: {len(texts)} texts")
    for name in args.names:
        short = name.rpartition(".")[2]
        if not short.startswith("x"):  # "_clauses_71" -> "x__clauses__mutmut_71"
            function, _, number = short.rpartition("_")
            short = f"x_{function}__mutmut_{number}"
        full = "localpers.personalize.detect." + short
        if not any(short in vars(detect).get(k, {}) for k in vars(detect) if k.startswith("mutants_")):
            sys.exit(f"{name}: no such mutant in {args.mutants_dir}")
        os.environ["MUTANT_UNDER_TEST"] = full
        got = run(detect, texts)
        os.environ["MUTANT_UNDER_TEST"] = ""
        diffs = [i for i, (a, b) in enumerate(zip(base, got)) if a != b]
        print(f"{name}: {len(diffs)} differ" if diffs else f"{name}: no difference")
        for i in diffs[:args.show]:
            j = next(k for k, (a, b) in enumerate(zip(base[i], got[i])) if a != b) if len(got[i]) > 1 else 0
            print(f"   {texts[i][:160]!r}\n      orig:   {base[i][j][:300]}\n      mutant: {got[i][j][:300]}")
