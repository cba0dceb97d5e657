"""Sweep of the ffn_down edit's settings on SmolLM2 (appends to docs/edit/sweep.jsonl): for each setting and
one UPQA dev item per attribute type, edit the way `localpers eval --method edit` does, then ask llama.cpp
(with the adapter) the paraphrased and implicit questions, and measure the KL on neutral prompts two ways:
the torch-side dense edit on the editor's own neutral chats, and the harness's locality_kl through llama.cpp.

    python bench/experiments/sweep_edit.py --set layer=6 --set layer=10 --items 10 [--offset 1] [--data upqa_dev_100.json]
    python bench/experiments/sweep_edit.py --set fit_each_key=0 --set fit_each_key=1,key_ridge=0.1
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from localpers import default_model_path
from localpers.personalize.datasets import DATA_DIR, read_upqa
from localpers.personalize.editing import NEUTRAL_CHATS, EditConfig, Editor, edit_facts, facts_of
from localpers.engine.engine import Artifacts, Engine
from localpers.eval.evaluation import NEUTRAL, answer_logprobs as served_logprobs, locality_kl, target_match
from localpers.personalize.methods import Personalized


def neutral_kl(editor: Editor, base: list[torch.Tensor]) -> float:
    """Mean KL(base || edited) per answer token over NEUTRAL_CHATS, dense edit in the torch weights."""
    kls = []
    for (question, answer), b in zip(NEUTRAL_CHATS, base):
        kls.append(float((b.exp() * (b - answer_logprobs(editor, question, answer))).sum(-1).mean()))
    return sum(kls) / len(kls)


@torch.no_grad()
def answer_logprobs(editor: Editor, question: str, answer: str) -> torch.Tensor:
    ids, ans = editor.prompt(question)[0], editor.answer_ids(answer)
    return torch.log_softmax(editor.model(torch.tensor([ids + ans[:-1]]))[0, len(ids) - 1:], -1)


def parse_setting(text: str) -> EditConfig:
    """'layer=10,fit_each_key=1' -> EditConfig(layer=10, fit_each_key=True)."""
    types = {f.name: f.type for f in dataclasses.fields(EditConfig)}
    values = {}
    for pair in filter(None, text.split(",")):
        name, value = pair.split("=")
        kind = types[name]
        values[name] = bool(int(value)) if kind in (bool, "bool") else (int(value) if kind in (int, "int") else float(value))
    return EditConfig(**values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="EditConfig fields, e.g. layer=10,fit_each_key=1")
    ap.add_argument("--items", type=int, default=10, help="items, one per attribute type")
    ap.add_argument("--offset", type=int, default=0, help="which item of each attribute type (0..9)")
    ap.add_argument("--data", default="upqa/upqa_dev_100.json")
    ap.add_argument("--out", default="docs/edit/sweep.jsonl")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads (default: theirs)")
    args = ap.parse_args()
    items = read_upqa(DATA_DIR / args.data)[args.offset::10][:args.items]
    engine = Engine(default_model_path(), n_ctx=1024, n_threads=args.threads)
    out = Path(args.out)
    for setting in args.set or [""]:
        config = dataclasses.replace(parse_setting(setting), threads=args.threads)
        editor = Editor(engine.model_path, config)
        base = [answer_logprobs(editor, q, a) for q, a in NEUTRAL_CHATS]
        served_base = [served_logprobs(engine, Personalized(), q, a) for q, a in NEUTRAL]
        for item in items:
            facts = facts_of(item.user.preferences, item.user.facts)
            t0 = time.perf_counter()
            result = edit_facts(engine, editor, facts, "/tmp/sweep-edit.gguf")
            row = {"setting": setting, "data": args.data, "item": item.user.id,
                   "seconds": round(time.perf_counter() - t0, 1), "explicit_ok": bool(result.edits), **result.summary()}
            served = Personalized(artifacts=Artifacts(lora=((str(result.adapter), 1.0),))) if result.adapter else None
            for kind, question in (("paraphrased", item.question_paraphrased), ("implicit", item.implicit_question)):
                answer = ""
                if served:
                    answer = engine.chat([{"role": "user", "content": question}], max_tokens=32,
                                         artifacts=served.artifacts)["choices"][0]["message"]["content"]
                row[f"{kind}_ok"], row[f"{kind}_answer"] = target_match(answer, item.targets, item.candidates), answer
            row["neutral_kl"] = round(neutral_kl(editor, base), 4)  # the editor still holds the dense edit
            if served:
                row["locality_kl"] = round(locality_kl(engine, lambda *_: served, [item.user], served_base), 4)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        mine = [r for r in rows if r.get("setting") == setting and r.get("data") == args.data][-len(items):]
        print(f"== {setting or 'default'}: explicit {sum(r['explicit_ok'] for r in mine)}/{len(mine)}, "
              f"paraphrased {sum(r['paraphrased_ok'] for r in mine)}/{len(mine)}, "
              f"implicit {sum(r['implicit_ok'] for r in mine)}/{len(mine)}, "
              f"mean neutral KL {sum(r['neutral_kl'] for r in mine) / len(mine):.4f}, "
              f"mean locality_kl {sum(r.get('locality_kl', 0) for r in mine) / len(mine):.4f}", flush=True)


if __name__ == "__main__":
    main()
