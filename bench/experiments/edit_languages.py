"""Personalization Editing on preferences stated in other languages: each statement goes through the same
editor as English ones (fact_from_statement -> edit -> write the adapter -> ask llama.cpp the fact's canonical
question with it), alone, on the default model. Prints one row per statement and a per-language summary.

    PYTHONPATH=. python bench/experiments/edit_languages.py --threads 1 [--languages fr,zh] [--per-language 1] [--offset 1] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from localpers import default_model_path
from localpers.personalize.editing import EditConfig, edit_facts, editor_for, fact_from_statement
from localpers.engine.engine import Engine

STATEMENTS = {
    "en": ["I'm vegetarian and never eat meat.", "I love listening to jazz."],
    "fr": ["Je suis végétarien et je ne mange pas de viande.", "J'adore écouter du jazz."],
    "de": ["Ich bin Vegetarier und esse kein Fleisch.", "Ich höre sehr gern Jazz."],
    "es": ["Soy vegetariano y no como carne.", "Me encanta escuchar jazz."],
    "zh": ["我是素食者，不吃肉。", "我喜欢听爵士乐。"],
    "ja": ["私はベジタリアンで、肉を食べません。", "ジャズを聴くのが大好きです。"],
    "ko": ["저는 채식주의자라서 고기를 먹지 않아요.", "저는 재즈 듣는 것을 좋아해요."],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads (default: theirs)")
    ap.add_argument("--languages", default=",".join(STATEMENTS), help="comma-separated (default: all)")
    ap.add_argument("--per-language", type=int, default=2, help="statements per language (default: %(default)s)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many statements of each language first")
    ap.add_argument("--out", help="also append one JSON line a statement here")
    args = ap.parse_args()
    engine = Engine(default_model_path(), n_ctx=512, n_threads=args.threads)
    editor = editor_for(str(engine.model_path), EditConfig(threads=args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lang in args.languages.split(","):
            for statement in STATEMENTS[lang][args.offset:args.offset + args.per_language]:
                fact = fact_from_statement(statement)
                t0 = time.perf_counter()
                result = edit_facts(engine, editor, [fact], Path(tmp) / "edit.gguf")
                edit = result.edits[0] if result.edits else None
                answer = result.failed[0][1] if result.failed else result.answers.get(fact.statement, "")
                row = {"lang": lang, "statement": statement, "attribute": (fact.attributes or ("",))[-1],
                       "question": fact.questions[-1], "target": fact.targets[-1], "passed": bool(result.edits),
                       "answer": answer, "seconds": round(time.perf_counter() - t0, 1)}
                if edit:
                    row.update(nll_before=round(edit.nll_before, 2), nll_after=round(edit.nll_after, 2))
                rows.append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print("\n| language | verified | statements |\n|---|---|---|")
    for lang in dict.fromkeys(r["lang"] for r in rows):
        mine = [r for r in rows if r["lang"] == lang]
        print(f"| {lang} | {sum(r['passed'] for r in mine)}/{len(mine)} | "
              + "; ".join(f"{r['statement']} -> {'ok' if r['passed'] else 'FAILED: ' + r['answer'][:60]!s}" for r in mine) + " |")


if __name__ == "__main__":
    main()
