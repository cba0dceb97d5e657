"""Multi-turn UPQA (evaluation.run_upqa_turns): the conversation each method is asked, without a model."""
import json

from localpers.eval import evaluation as ev
from localpers.personalize.datasets import read_upqa
from localpers.personalize.methods import base

CONVERSATIONS = [[{"role": "user", "content": f"distractor question {i}"},
                  {"role": "assistant", "content": f"distractor answer {i}"}] for i in range(7)]


class RecordingEngine:
    """Answers the explicit question with the user's target, anything else with 'I do not know.'"""

    def __init__(self, items):
        self.asked, self.targets = [], {item.question: item.target for item in items}

    def chat(self, messages, artifacts, max_tokens, temperature):
        self.asked.append(messages)
        answer = self.targets.get(messages[-1]["content"], "I do not know.")
        return {"choices": [{"message": {"content": answer}}]}


def upqa_items(tmp_path):
    """Three hand-written UPQA items of three attribute types."""
    raw = [{"input_attribute": statement, "attribute_type": kind, "question": f"What's my {kind}?",
            "question_paraphrased": f"Tell me my {kind}.", "implicit_question": f"Guess something about my {kind}.",
            "target": target}
           for statement, kind, target in (("I like to dance at the club.", "hobby", "Dancing at clubs"),
                                            ("I work as an accountant.", "profession", "Accountant"),
                                            ("I have a siamese cat.", "pet", "Siamese cat"))]
    path = tmp_path / "upqa.json"
    path.write_text(json.dumps(raw))
    return read_upqa(path)


def test_invariant_statement_said_first_for_context_methods_edited_in_for_trained(tmp_path):
    items = upqa_items(tmp_path)
    engine = RecordingEngine(items)
    results, counts, rows = ev.run_upqa_turns(engine, items, CONVERSATIONS, {"base": base, "edit": base},
                                              turns=[0, 2, 5], seed=3)
    per_item = 2 * 3 * 3   # methods x turn counts x questions
    assert len(engine.asked) == len(items) * per_item
    for i, item in enumerate(items):
        asked = engine.asked[i * per_item:(i + 1) * per_item]
        said, edited = asked[:9], asked[9:]
        statement = item.user.preferences[0]
        for t, conversation in zip([0, 0, 0, 2, 2, 2, 5, 5, 5], said):
            assert conversation[0] == {"role": "user", "content": statement}
            assert conversation[1]["content"] == ev.PREFEVAL_ACK
            assert len(conversation) == 2 + 2 * t + 1
        for t, conversation in zip([0, 0, 0, 2, 2, 2, 5, 5, 5], edited):
            assert all(m["content"] != statement for m in conversation)
            assert len(conversation) == 2 * t + 1
        # Same distractors for every method, and the T-turn conversation is a prefix of the longest.
        longest = edited[-1][:-1]
        assert said[-1][2:-1] == longest
        assert edited[3][:-1] == longest[:4]
    assert set(results["base"]) == {f"{k}_acc@{t}" for k in ("explicit", "paraphrased", "implicit") for t in (0, 2, 5)}
    assert results["base"]["explicit_acc@5"] == 1.0 and results["base"]["implicit_acc@0"] == 0.0
    assert counts["edit"]["explicit_acc@2"] == len(items)
    assert {row["turns"] for row in rows} == {0, 2, 5}


def test_paired_deltas_per_turn_count(tmp_path):
    items = upqa_items(tmp_path)
    _, _, rows = ev.run_upqa_turns(RecordingEngine(items), items, CONVERSATIONS, {"base": base, "prompt": base},
                                   turns=[0, 4])
    deltas = ev.paired_deltas(rows)
    assert set(deltas["prompt"]) >= {"explicit_acc@0", "explicit_acc@4"}
    assert deltas["prompt"]["explicit_acc@4"]["n"] == len(items)


def test_statement_in_chat():
    assert ev.statement_in_chat("prompt+rag") and ev.statement_in_chat("base")
    assert not ev.statement_in_chat("edit") and not ev.statement_in_chat("edit+rag")
    assert not ev.statement_in_chat("memory") and not ev.statement_in_chat("memory+rag")   # memory holds the edit
