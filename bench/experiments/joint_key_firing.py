"""Why 10 joint edit keys are not local (issue 25): how strongly the keys fire on text they are not about.

    python bench/experiments/joint_key_firing.py [--facts 10] [--generated 64]

The many-preferences user of `localpers eval upqa --many-preferences N` (N UPQA dev statements, one fact each);
its joint keys K^ (Editor.joint_keys with the quiet term, as `personalize` solves them) and, for comparison, the
single-fact keys of its first 3 facts. Prints |k^ . k| (mean, 99th percentile, max over tokens and keys) of layer
L's ffn_down inputs k on: the editor's neutral chats (the text C = E[k k'] is estimated on), PrefEval's distractor
conversations (first two messages of 12), the shipped neutral questions, and, with --generated M, M chats the model
samples itself (user turn at temperature 1, reply at 0.8; fixed seeds). Then the same with C estimated on the
neutral chats and the generated chats together: whether more text in C makes the keys quiet. The keys fire about
0.8-0.9 on their own questions (printed). No value is trained. 1 torch thread, 1 llama.cpp thread."""
import argparse
import json
import time

import torch

import localpers
from localpers.engine.engine import Engine, Sampling
from localpers.eval import evaluation as ev
from localpers.personalize.datasets import data_path, read_neutral, read_upqa
from localpers.personalize.editing import NEUTRAL_CHATS, editor_for, facts_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--generated", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = str(localpers.default_model_path())
    user = ev.many_user(ev.many_preference_items(read_upqa(data_path("upqa")), args.facts, 0))
    facts = facts_of(user.preferences, user.facts)
    ed = editor_for(model)

    def keys(messages):
        ids = ed.tok.chat_tokens(messages, add_generation_prompt=False).ids[:256]
        return ed.ffn_inputs(torch.tensor([ids]))[0]

    def chat(u, a):
        return [{"role": "user", "content": u}, {"role": "assistant", "content": a}]

    texts = {"neutral chats (C's)": torch.cat([keys(chat(q, a)) for q, a in NEUTRAL_CHATS])}
    conversations = json.loads(data_path("inter_turns").read_text())[:12]
    texts["distractor convs"] = torch.cat([keys([{"role": m["role"], "content": m["content"][:400]}
                                                 for m in c["conversation"][:2]]) for c in conversations])
    texts["neutral questions"] = torch.cat([keys([{"role": "user", "content": q}])
                                            for q in read_neutral(data_path("neutral"))])
    if args.generated:
        engine, started, chats = Engine(model, n_ctx=512, n_threads=1), time.time(), []
        for i in range(args.generated):
            u = engine.complete("<|im_start|>user\n", sampling=Sampling(max_tokens=48, temperature=1.0, seed=1000 + i,
                                                                       stop=("<|im_end|>",)))["choices"][0]["text"]
            a = engine.complete([{"role": "user", "content": u.strip()}],
                                sampling=Sampling(max_tokens=96, temperature=0.8, seed=2000 + i))["choices"][0]["text"]
            chats.append((u.strip(), a.strip()))
        engine.close()
        print(f"generated {len(chats)} chats in {time.time() - started:.0f} s")
        texts["generated chats"] = torch.cat([keys(chat(u, a)) for u, a in chats])
    clusters = [ed.fact_keys(f) for f in facts]
    quiet = [ed.fact_quiet(f) for f in facts]
    quiet = (torch.cat([t for t, _ in quiet]), torch.cat([w for _, w in quiet]))

    def report(label):
        K = ed.joint_keys(clusters, quiet)
        single = torch.stack([ed.key_direction(c) for c in clusters[:3]])
        own = [float((c @ K[i]).mean()) for i, c in enumerate(clusters)]
        cross = max(float((c @ K[j]).abs().mean()) for i, c in enumerate(clusters) for j in range(len(K)) if j != i)
        print(f"{label}: {len(facts)} joint keys, own questions {min(own):.2f}-{max(own):.2f}, the other facts' "
              f"(worst mean) {cross:.3f}, |k^| {float(K.norm(dim=1).mean()):.2f}")
        for name, N in texts.items():
            f, s = (N @ K.T).abs(), (N @ single.T).abs()
            print(f"  {name:20s} tokens {len(N):5d}  joint |fire| mean {f.mean():.3f} p99 "
                  f"{f.flatten().quantile(0.99):.2f} max {f.max():.2f}  | single keys mean {s.mean():.3f} max {s.max():.2f}")

    report("C on the 12 neutral chats (the editor's)")
    if args.generated:
        k = torch.cat([texts["neutral chats (C's)"], texts["generated chats"]]).double()
        C = k.T @ k / len(k)
        C = C + 0.01 * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype)
        ed._cov, ed._cov_inv = C, torch.linalg.inv(C).float()
        report(f"C on the neutral chats and {len(chats)} generated chats")


if __name__ == "__main__":
    main()
