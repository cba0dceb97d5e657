"""Layer sweep for the ffn_down edit on SmolLM2 (writes docs/edit/sweep.jsonl): for each layer and each of the
first UPQA cluster9 dev items of every attribute type, edit, then ask llama.cpp (with the adapter) the canonical
and the paraphrased question, and measure the torch-side KL on the editor's own neutral chats.

    python bench/sweep_edit_layers.py --layers 3,6,9,12 --items 5 [--covariance 0|1]
"""
import argparse
import json
import time
from pathlib import Path

import torch

from localpers import default_model_path
from localpers.datasets import read_upqa, shared_data_dir
from localpers.editing import NEUTRAL_CHATS, EditConfig, Editor, edit_facts, facts_of
from localpers.engine import Artifacts, Engine
from localpers.evaluation import target_match


def neutral_kl(editor: Editor, base: list[torch.Tensor]) -> float:
    """Mean KL(base || edited) per answer token over NEUTRAL_CHATS, dense edit in the torch weights."""
    kls = []
    for (question, answer), b in zip(NEUTRAL_CHATS, base):
        ids = editor.prompt(question)[0]
        ans = editor.answer_ids(answer)
        with torch.no_grad():
            lp = torch.log_softmax(editor.model(torch.tensor([ids + ans[:-1]]))[0, len(ids) - 1:], -1)
        kls.append(float((b.exp() * (b - lp)).sum(-1).mean()))
    return sum(kls) / len(kls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--items", type=int, default=5)
    ap.add_argument("--covariance", type=int, default=1)
    ap.add_argument("--out", default="docs/edit/sweep.jsonl")
    args = ap.parse_args()
    items = read_upqa(shared_data_dir() / "upqa/upqa_dev_100_cluster9.json")[::10][:args.items]
    engine = Engine(default_model_path(), n_ctx=1024, n_threads=1)
    out = Path(args.out)
    for layer in map(int, args.layers.split(",")):
        editor = Editor(engine.model_path, EditConfig(layer=layer, covariance=bool(args.covariance), threads=1))
        with torch.no_grad():
            base = []
            for question, answer in NEUTRAL_CHATS:
                ids, ans = editor.prompt(question)[0], editor.answer_ids(answer)
                base.append(torch.log_softmax(editor.model(torch.tensor([ids + ans[:-1]]))[0, len(ids) - 1:], -1))
        for item in items:
            facts = facts_of(item.user.preferences, item.user.facts)
            t0 = time.perf_counter()
            result = edit_facts(engine, editor, facts, f"/tmp/sweep-edit-{layer}.gguf")
            seconds = time.perf_counter() - t0
            row = {"layer": layer, "covariance": args.covariance, "item": item.user.id, "seconds": round(seconds, 1),
                   "explicit_ok": bool(result.edits), **result.summary()}
            if result.adapter:
                art = Artifacts(lora=((str(result.adapter), 1.0),))
                answer = engine.chat([{"role": "user", "content": item.question_paraphrased}], artifacts=art,
                                     max_tokens=48)["choices"][0]["message"]["content"]
                row["paraphrased_ok"] = target_match(answer, item.targets)
                row["paraphrased_answer"] = answer
            else:
                row["paraphrased_ok"] = False
            row["neutral_kl"] = round(neutral_kl(editor, base), 4)  # the editor still holds the dense edit
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
