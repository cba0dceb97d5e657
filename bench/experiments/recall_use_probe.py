"""Recall or use: what one stated preference's adapter and its stated-facts line each do to requests and to
questions about the user, on the default model (issue 25).

    PYTHONPATH=. python bench/experiments/recall_use_probe.py ["I'm vegetarian."]

Stores the statement as a chat message in a temporary data folder, runs `personalize` (one verified edit), then
prints the greedy reply (40 tokens) to each question under: base; the `facts` line (methods.facts_prefix before the
question); the statement as a system message; the adapter at scale 1 and 0.5; the adapter and the line. Also
prints which questions methods.asks_to_use calls requests (those `memory` adds the line to), and how many of
UPQA dev's questions of each kind it calls requests."""
import sys
import tempfile

from localpers.engine.engine import Artifacts, Engine
from localpers.personalize import editing
from localpers.personalize.datasets import data_path, read_upqa
from localpers.personalize.methods import asks_to_use, facts_prefix
from localpers.serve.learn import learn_from_chat
from localpers.store.store import Store

QUESTIONS = ("What should I cook tonight?", "Suggest a dinner for tonight.", "Can you give me a recipe for lunch?",
             "What should I order at a restaurant?", "What is my diet?", "Do I eat meat?")


def main() -> None:
    statement = sys.argv[1] if len(sys.argv) > 1 else "I'm vegetarian."
    items = read_upqa(data_path("upqa"))
    for field in ("question", "question_paraphrased", "implicit_question", "product_question"):
        asked = [getattr(i, field) for i in items if getattr(i, field)]
        print(f"UPQA dev {field}: {sum(map(asks_to_use, asked))} of {len(asked)} are requests")
    with tempfile.TemporaryDirectory() as data_dir:
        with Store.open(data_dir) as store:
            learn_from_chat(store, "u", [{"role": "user", "content": statement}])
        editing.personalize("u", data_dir=data_dir, config=editing.EditConfig(threads=1))
        with Store.open(data_dir) as store:
            [artifact] = store.artifacts("u")
        engine = Engine(None, n_ctx=1024, n_threads=1)

        def reply(messages, lora=()):
            out = engine.chat(messages, artifacts=Artifacts(lora=lora), max_tokens=40, temperature=0.0)
            return out["choices"][0]["message"]["content"].strip().replace("\n", " ")

        adapter = artifact["path"]
        for q in QUESTIONS:
            asked, line = [{"role": "user", "content": q}], [{"role": "user", "content": facts_prefix([statement]) + q}]
            print(f"\n## {q}  (request: {asks_to_use(q)})")
            print(" base        :", reply(asked))
            print(" facts line  :", reply(line))
            print(" system      :", reply([{"role": "system", "content": f"The user says: {statement}"}] + asked))
            print(" adapter 1.0 :", reply(asked, ((adapter, 1.0),)))
            print(" adapter 0.5 :", reply(asked, ((adapter, 0.5),)))
            print(" adapter+line:", reply(line, ((adapter, 1.0),)))


if __name__ == "__main__":
    main()
