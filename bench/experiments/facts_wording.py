"""How the stated-facts line is worded, on the default model without any edit (issue 25, a tester's fault: after
"About me: I'm vegetarian." the model answered "as a vegetarian, I'm not equipped ...", the fact read as its own).

    PYTHONPATH=. python bench/experiments/facts_wording.py [--items 20] [--max-tokens 48] [--wordings a,b] [--probe a,b]

UPQA dev items [::100/items]: each item's implicit question when methods.asks_to_use calls it a request (the
questions `memory` gives the line to) and its product question, the item's statement in the line before the
question, greedy. Per wording: `uses`, replies stating the preference (matching.target_match, the evaluation's
scoring), and `as its own`, replies where the assistant claims it ("I'm ...", "I am ...", "as a ...", "I love ..."
within three words of a content word of the statement, and no "you" in the rest of its sentence: "As a nurse, you
...", "I'm glad you're into jazz" address the user). Prints a few `as its own` replies per wording."""
import argparse
import re

from localpers.engine.engine import Engine
from localpers.personalize.datasets import data_path, read_upqa
from localpers.personalize.matching import target_match
from localpers.personalize.methods import asks_to_use, facts_prefix

WORDINGS = {
    "about": "About me: {s}\n\n{q}",
    "told": "The user told you: {s}\n\n{q}",
    "remember": "Remember what I told you about myself: \"{s}\"\n\n{q}",
    "you_know": "You know this about me, the user: {s}\n\n{q}",
    "context": "For context, about me (the user asking): {s}\n\n{q}",
    "plain": "{s}\n\n{q}",
    "served": None,   # methods.facts_prefix, what `facts` and `memory` serve
}
PROBE = ("What should I cook tonight?", "Suggest a dinner for tonight.", "Can you give me a recipe for lunch?",
         "What should I order at a restaurant?")
STOP = {"i", "i'm", "im", "am", "a", "an", "the", "to", "my", "me", "is", "are", "and", "of", "in", "at", "for", "do",
        "not", "like", "love", "have", "with", "on", "be", "it", "was", "will", "really", "very", "every", "day"}
CLAIM = r"\b(as an?|i'm|i am|i have|i live|i like|i love|i work|i enjoy|i play|i eat|my favou?rite)\b(\W+[\w'-]+){{0,3}}?\W+{w}"


def as_its_own(reply: str, statement: str) -> bool:
    words = {w for w in re.findall(r"[a-z][a-z'-]{2,}", statement.lower()) if w not in STOP}
    # the claim's sentence from the claim on: "I'm glad you're into jazz", "As a nurse, you ..." address the user
    return any(not re.search(r"\byou", reply.lower()[m.start():][:re.search(r"[.!?\n]|$", reply[m.start():]).end()])
               for w in words for m in re.finditer(CLAIM.format(w=re.escape(w[:max(4, len(w) - 2)])), reply.lower()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--wordings", default=",".join(WORDINGS))
    ap.add_argument("--probe", default="", help="wordings to ask recall_use_probe's requests after \"I'm vegetarian.\"")
    args = ap.parse_args()
    items = read_upqa(data_path("upqa"))[::100 // args.items][:args.items]
    asked = [(it, q) for it in items for q in (it.implicit_question, it.product_question)
             if q and (q == it.product_question or asks_to_use(q))]
    engine = Engine(None, n_ctx=1024, n_threads=1)
    for name in args.wordings.split(","):
        uses = own = 0
        shown = 0
        for it, q in asked:
            s = it.user.preferences[0]
            content = facts_prefix([s]) + q if WORDINGS[name] is None else WORDINGS[name].format(s=s, q=q)
            reply = engine.chat([{"role": "user", "content": content}], max_tokens=args.max_tokens,
                                temperature=0.0)["choices"][0]["message"]["content"]
            uses += target_match(reply, it.targets, it.candidates)
            if as_its_own(reply, s):
                own += 1
                if shown < 3:
                    shown += 1
                    print(f"  {name} as its own: {s!r} / {q!r} -> {reply[:140]!r}")
        print(f"{name:9s} {len(asked)} requests: uses {uses} ({uses / len(asked):.2f}), as its own {own} "
              f"({own / len(asked):.2f})", flush=True)
    for name in args.probe.split(",") if args.probe else ():   # the tester's case: recall_use_probe's requests
        s, own = "I'm vegetarian.", 0
        for q in PROBE:
            content = facts_prefix([s]) + q if WORDINGS[name] is None else WORDINGS[name].format(s=s, q=q)
            reply = engine.chat([{"role": "user", "content": content}], max_tokens=args.max_tokens,
                                temperature=0.0)["choices"][0]["message"]["content"]
            own += as_its_own(reply, s)
        print(f"{name:9s} {s!r}, {len(PROBE)} requests: as its own {own}", flush=True)


if __name__ == "__main__":
    main()
