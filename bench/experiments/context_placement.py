"""Where a stated preference sits in the prompt, without any edit: as the first chat turn (answered), as an
"About me: ..." line before the question (the `facts` method), as a "(Remember: ...)" line, or in the system
message; explicit / paraphrased / implicit accuracy at 0 and 10 distractor turns on 8 UPQA dev items ([1::10]).

    python bench/experiments/context_placement.py
"""
import json, random, sys
from localpers.engine.engine import Engine
from localpers.personalize.datasets import read_upqa, read_inter_turns, data_path
from localpers.personalize.matching import target_match
from localpers.eval.evaluation import distractor_turns, PREFEVAL_ACK
items = read_upqa(data_path("upqa"))
conv = read_inter_turns(data_path("inter_turns"))
sel = items[1::10][:8]
fmts = {
 "chat": None,
 "pre_about": "About me: {s}\n\n{q}",
 "pre_remember": "(Remember: {s})\n{q}",
 "sys": "SYS",
}
with Engine(n_threads=1) as eng:
  for name, f in fmts.items():
    acc = {}
    for it in sel:
      s = it.user.preferences[0]
      d = distractor_turns(conv, 10, random.Random(f"0/{it.user.id}"), 150)
      for T in (0, 10):
        for kind, q in (("exp", it.question), ("par", it.question_paraphrased), ("imp", it.implicit_question)):
          if f is None:
            msgs = [{"role":"user","content":s},{"role":"assistant","content":PREFEVAL_ACK}] + d[:2*T] + [{"role":"user","content":q}]
          elif f == "SYS":
            msgs = [{"role":"system","content":f"The user has told you: {s}"}] + d[:2*T] + [{"role":"user","content":q}]
          else:
            msgs = d[:2*T] + [{"role":"user","content":f.format(s=s,q=q)}]
          a = eng.chat(msgs, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
          ok = target_match(a, it.targets, it.candidates)
          acc.setdefault(f"{kind}@{T}", []).append(ok)
          if T == 0 and kind == "imp" and len(acc[f"{kind}@{T}"]) <= 3: print(name, "|", q, "->", a.replace("\n"," ")[:120])
    print(name, {k: round(sum(v)/len(v),2) for k, v in acc.items()}, flush=True)
