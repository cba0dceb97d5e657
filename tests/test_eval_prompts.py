"""What the model is shown: every prompt the evaluation tasks send to the engine, against a reviewed golden file.

The scoring oracles (test_scoring.py) check the numbers a scripted engine's answers give; they do not look at the
prompts' wording, roles or order, which decide what a real model answers ("Options:" spelled otherwise, a role
renamed, the neutral question not sent, distractor turns cut differently). Here a recording engine runs each task
on tiny items with the context methods (base, prompt, rag, prompt+rag) and the exact calls are compared with
tests/fixtures/eval_prompts.json.

A deliberate change of a prompt: rerun with LOCALPERS_WRITE_GOLDEN=1, review the golden file's diff, commit it."""
import json
import os
from pathlib import Path

import numpy as np

from localpers.personalize.datasets import LampItem, PrefEvalItem, UpqaItem
from localpers.eval.evaluation import locality_kl, run_lamp, run_prefeval, run_upqa, run_upqa_turns
from localpers.personalize.methods import User, get_method

GOLDEN = Path(__file__).parent / "fixtures" / "eval_prompts.json"
METHODS = ("base", "prompt", "rag", "prompt+rag")


class RecordingEngine:
    """Answers every chat with a fixed reply and scores every option by its length; records each call."""

    def __init__(self):
        self.calls = []

    def format_chat(self, messages):
        return json.dumps(messages)

    def chat(self, messages, *, artifacts, max_tokens, temperature, **kw):
        self.calls.append({"call": "chat", "messages": messages, "max_tokens": max_tokens, "temperature": temperature})
        return {"choices": [{"message": {"role": "assistant", "content": "Jazz, I think."}}]}

    def continuation_logprobs(self, prompt, continuations, *, artifacts):
        messages = prompt if isinstance(prompt, list) else json.loads(prompt)
        self.calls.append({"call": "score", "messages": messages, "options": list(continuations)})
        out = []
        for option in continuations:
            n = max(1, len(option.split()))
            logprobs = np.full((n, 4), -3.0)
            logprobs[:, 1] = -0.1 * len(option)
            out.append(([1] * n, logprobs))
        return out


USER = User("u1", preferences=("I love jazz music.", "I'm vegetarian."),
            history=("Jazz music all evening at the club, great saxophone solos.", "Cooked a lentil curry for friends.",
                     "My bike needs new tyres."))
DISTRACTORS = [[{"role": "user", "content": "What is 2+2? " * 20}, {"role": "assistant", "content": "4."}],
               [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]]


def recorded() -> dict:
    methods = {name: get_method(name) for name in METHODS}
    upqa = [UpqaItem(USER, "music", "What's my favorite music genre?", "What kind of music do I listen to most?",
                     "Can you suggest a playlist for my commute?", "Jazz music", ("Jazz music",),
                     ("Rock music", "Country music"))]
    prefeval = [PrefEvalItem("food/0", "I'm vegetarian.", "What should I cook tonight?",
                             ("Lentil curry", "Steak", "Fried chicken", "Tuna"), USER)]
    lamp = [LampItem("i0", "Which category does this article belong to? Article: jazz festival opens", "music", USER),
            LampItem("i1", "Which category does this article belong to? Article: new vegan cafe", "food", USER)]
    out = {}
    tasks = {
        "upqa": lambda e: run_upqa(e, upqa, methods, max_tokens=8),
        "upqa_mc_only": lambda e: run_upqa(e, upqa, methods, max_tokens=8, answers=False),
        "upqa_turns": lambda e: run_upqa_turns(e, upqa, DISTRACTORS, methods, turns=[0, 2], max_tokens=8, seed=1,
                                               max_chars=40),
        "prefeval": lambda e: run_prefeval(e, prefeval, DISTRACTORS, methods, turns=[0, 2], seed=3, max_chars=40),
        "lamp_classification": lambda e: run_lamp(e, "LaMP_2", lamp, methods),
        "lamp_generation": lambda e: run_lamp(e, "LongLaMP_2", lamp, methods, max_tokens=16),
        "locality": lambda e: locality_kl(e, methods["prompt"], [USER], [np.zeros((1, 4))] * 8),
    }
    for name, run in tasks.items():
        engine = RecordingEngine()
        run(engine)  # locality_kl's base logprobs are dummies: only its prompts matter here
        out[name] = engine.calls
    return out


def test_the_prompts_each_task_sends_equal_the_reviewed_golden_file():
    calls = recorded()
    if os.environ.get("LOCALPERS_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(calls, indent=1, ensure_ascii=False) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(calls) == set(golden)
    for task in golden:
        assert len(calls[task]) == len(golden[task]), f"{task}: {len(calls[task])} calls, golden {len(golden[task])}"
        for i, (got, want) in enumerate(zip(calls[task], golden[task])):
            assert got == want, f"{task}, call {i} differs from tests/fixtures/eval_prompts.json"


def test_the_golden_file_shows_each_method_its_own_context():
    """The golden file itself is no tautology: the methods' prompts differ where they should."""
    golden = json.loads(GOLDEN.read_text())
    systems = {json.dumps(c["messages"][0]) for c in golden["upqa"] if c["messages"][0]["role"] == "system"}
    assert any("I love jazz music." in s for s in systems)              # prompt: the stated preferences
    users = {c["messages"][-1]["content"] for c in golden["upqa"]}
    item = "<item>\nJazz music all evening at the club, great saxophone solos.\n</item>"
    assert any(s.startswith("<history") and item in s for s in users)  # rag's items, one <item> each
    assert not any("bike" in json.dumps(c) for c in golden["upqa"])     # an unrelated item is not retrieved
    turns = [c for c in golden["prefeval"] if c["call"] == "score"]
    assert {len(c["messages"]) for c in turns} >= {3, 7}                # 0 and 2 distractor turns
    assert all("What should I cook tonight?\n\nOptions:" in c["messages"][-1]["content"] for c in turns)
