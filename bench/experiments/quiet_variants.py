"""Probe behind docs/edit/README.md "Many preferences: joint keys": which tokens the joint keys' metric keeps quiet.

    PYTHONPATH=. python bench/experiments/quiet_variants.py MODE WEIGHT USERS [seq]

MODE: all (template, question words, answer at WEIGHT), answer (answer tokens only), tmpl (template and answer),
mix (template and answer at 1, question words at WEIGHT: the default is mix 0.1). USERS: `lyon` ("I live in
Lyon." + "I love jazz.", and asks "Where do I live?" / "What music do I like?") or N (the N-fact user of
`localpers eval upqa --many-preferences N`). `seq`: each value trained with the earlier edits applied.
Prints how many facts llama.cpp verifies with the adapter.
"""
import sys
import torch
from pathlib import Path
from dataclasses import replace
from localpers.engine.engine import Engine, Artifacts
from localpers.personalize.editing import editor_for, facts_of, write_adapter, states_target, common_prefix
from localpers.personalize.datasets import read_upqa, data_path
from localpers.eval import evaluation as ev
import localpers
torch.set_num_threads(1)
mp = str(localpers.default_model_path())
mode, w = sys.argv[1], float(sys.argv[2])
if sys.argv[3] == "lyon":
    facts = facts_of(["I live in Lyon.", "I love jazz."])
    asks = ["Where do I live?", "What music do I like?"]
else:
    facts = facts_of(*(lambda u: (u.preferences, u.facts))(ev.many_user(ev.many_preference_items(read_upqa(data_path("upqa")), int(sys.argv[3]), 0))))
    asks = []
ed = editor_for(mp)
clusters = [ed.fact_keys(f) for f in facts]
a, z = ed.prompt("A")[0], ed.prompt("Z")[0]
n0 = common_prefix([a, z])
quiet, qw = [], []
for f in facts:
    ans = ed.answer_ids(f.targets[-1])
    for q in f.questions:
        ids, pos = ed.prompt(q)
        k = ed.ffn_inputs(torch.tensor([ids + ans]))[0]
        if mode == "mix":
            quiet += [k[:n0], k[pos + 1:]]; qw.append(k[n0:pos])
        else:
            quiet += {"all": [k[:pos], k[pos + 1:]], "answer": [k[pos + 1:]], "tmpl": [k[:n0], k[pos + 1:]]}[mode]
Q = torch.cat(quiet).double()
C = torch.linalg.inv(ed._cov_inv.double())
Qc = Q.T @ Q / len(Q)
saved = ed._cov_inv
Cq = C + C.diagonal().mean() / Qc.diagonal().mean() * Qc
if qw:
    Q2 = torch.cat(qw).double(); Q2c = Q2.T @ Q2 / len(Q2)
    Cq = Cq + w * C.diagonal().mean() / Q2c.diagonal().mean() * Q2c
ed._cov_inv = torch.linalg.inv(Cq).float()
K = ed.joint_keys(clusters)
ed._cov_inv = saved
engine = Engine(mp, n_ctx=512, n_threads=1)
seq = len(sys.argv) > 4 and sys.argv[4] == "seq"
if seq:
    ed.reset(); edits = [ed.edit(f, key=K[i], keys=clusters[i]) for i, f in enumerate(facts)]; ed.reset()
else:
    edits = [ed.train_value(f, K[i], clusters[i]) for i, f in enumerate(facts)]
p = Path(f"/tmp/qvar_{mode}_{w}.gguf"); write_adapter(p, edits, "llama")
ok = sum(states_target(engine, p, e.fact)[0] for e in edits)
print(mode, w, sys.argv[4:], "verified", ok, "of", len(edits))
lora = Artifacts(lora=((str(p), 1.0),))
for q in asks:
    print("  ", q, "->", repr(engine.chat([{"role": "user", "content": q}], artifacts=lora, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"][:80]))
