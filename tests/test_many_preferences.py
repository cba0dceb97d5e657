"""Many preferences per user (evaluation.run_upqa_many, `localpers eval upqa --many-preferences`) and the paired
bootstrap interval, without a model."""
import json
from collections import Counter

import numpy as np
import pytest

from localpers.cli.cli import main
from localpers.errors import UserError
from localpers.eval import evaluation as ev
from localpers.personalize.datasets import data_path, read_upqa
from localpers.personalize.detect import detect_facts
from localpers.personalize.methods import Personalized, base

# Seven statements of four attribute types, one atomic fact each, all in different slots.
RAW = [("I like to dance at the club.", "hobby", "Dancing at clubs"),
       ("I love to ride horses.", "hobby", "Horse riding"),
       ("I work as an accountant.", "profession", "Accountant"),
       ("I live in texas.", "location", "Texas"),
       ("I grew up in california.", "location", "California"),
       ("I have a siamese cat.", "pet", "Siamese cat"),
       ("I have three dogs.", "pet", "Three dogs")]


def upqa_items(tmp_path, extra=()):
    raw = [{"input_attribute": statement, "attribute_type": kind, "question": f"What's my {kind}?",
            "question_paraphrased": f"Tell me my {kind}.", "implicit_question": f"Guess my {kind}.", "target": target}
           for statement, kind, target in (*RAW, *extra)]
    path = tmp_path / "upqa.json"
    path.write_text(json.dumps(raw))
    return read_upqa(path)


def test_invariant_a_many_preference_user_holds_every_fact_side_by_side():
    items = read_upqa(data_path("upqa"))
    chosen = ev.many_preference_items(items, 31, seed=0)
    facts = [detect_facts(item.user.preferences[0]) for item in chosen]
    assert all(len(f) == 1 and not f[0].retire for f in facts)         # one atomic fact each
    assert len({f[0].slot for f in facts}) == 31                        # no update replaces another
    assert Counter(item.attribute_type for item in chosen[:10]) == Counter(set(i.attribute_type for i in items))
    assert set(Counter(item.attribute_type for item in chosen[:30]).values()) == {3}
    assert ev.many_preference_items(items, 10, seed=0) == chosen[:10]   # the user grows: 10 are the first of 31
    assert ev.many_preference_items(items, 10, seed=1) != chosen[:10]


def test_statements_that_would_replace_each_other_are_not_combined(tmp_path):
    # "I live in ohio." replaces "I live in texas." (home is single-valued): one user holds one of them; "I am
    # married and have two kids." is two facts, not one atomic fact of its item
    items = upqa_items(tmp_path, extra=[("I live in ohio.", "location", "Ohio"),
                                        ("I am married and have two kids.", "family", "Two kids")])
    chosen = ev.many_preference_items(items, 7, seed=0)
    statements = {item.user.preferences[0] for item in chosen}
    assert "I am married and have two kids." not in statements
    assert len({"I live in ohio.", "I live in texas."} & statements) == 1
    with pytest.raises(UserError, match="only 7 statements"):
        ev.many_preference_items(items, 8, seed=0)


class FirstOfTypeEngine:
    """States, for a question about a type, the first statement of that type in the system message (what a model
    that keeps only one fact per type would say); else 'I do not know.'. Log-probabilities: uniform, shifted by
    a LoRA, so that locality_kl is 0 without one and positive with one."""

    def __init__(self, items):
        self.by_question = {}
        for item in items:
            for question in (item.question, item.question_paraphrased):
                self.by_question.setdefault(question, []).append((item.user.preferences[0], item.target))

    def chat(self, messages, artifacts, max_tokens, temperature):
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        held = [target for statement, target in self.by_question.get(messages[-1]["content"], ()) if statement in system]
        return {"choices": [{"message": {"content": f"You said: {held[0]}." if held else "I do not know."}}]}

    def continuation_logprobs(self, messages, options, artifacts):
        logits = np.zeros((3, 5))
        if artifacts.lora:
            logits[:, 0] = 2.0
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return [(np.array([0, 1, 2]), lp) for _ in options]


def listing(user, query, engine):
    return Personalized(system="\n".join(user.preferences))


def test_per_fact_accuracy_counts_each_fact_by_its_own_target(tmp_path):
    items = upqa_items(tmp_path)
    timed = []

    def add_fact(user, part):
        timed.append((len(user.preferences), part))
        return {"facts": len(user.preferences), "kept": 4, "edited": 4, "failed": 0, "seconds": 1.5}

    results, counts, rows, timing = ev.run_upqa_many(FirstOfTypeEngine(items), items,
                                                     {"base": base, "edit+rag": listing, "edit": listing},
                                                     sizes=[6, 4],
                                                     seed=0, add_fact=add_fact)
    assert results["base"]["explicit_acc@4"] == 0.0 and results["base"]["locality_kl@6"] == 0.0
    # 4 facts: one per type, every one stated; 6 facts: two types have two, and only the first of each is stated
    assert results["edit+rag"]["explicit_acc@4"] == 1.0 and results["edit+rag"]["paraphrased_acc@4"] == 1.0
    assert results["edit+rag"]["explicit_acc@6"] == pytest.approx(4 / 6) and counts["edit+rag"]["explicit_acc@6"] == 6
    assert results["edit+rag"]["locality_kl@4"] == pytest.approx(0.0)
    # adding the 7th fact is timed once, for the method with a trained part, on the user grown by one fact
    # edit and edit+rag serve one adapter: timed once
    assert timed == [(7, "edit")] and timing["edit"] == timing["edit+rag"] == {"facts": 7, "kept": 4, "edited": 4,
                                                                                "failed": 0, "seconds": 1.5}
    deltas = ev.paired_deltas(rows)["edit+rag"]
    assert deltas["explicit_acc@6"]["n"] == 6 and deltas["explicit_acc@6"]["delta"] == pytest.approx(4 / 6)
    assert {row["facts"] for row in rows} == {4, 6}


def test_a_many_preference_report_shows_the_timing_and_plots_over_sizes(tmp_path):
    items = upqa_items(tmp_path)
    results, counts, rows, timing = ev.run_upqa_many(
        FirstOfTypeEngine(items), items, {"base": base, "edit": listing}, sizes=[4, 6],
        add_fact=lambda user, part: {"facts": 7, "kept": 4, "seconds": 2.0, "edited": 3, "failed": 1})
    report = {"task": "upqa", "model": "fake", "config": {"many_preferences": [4, 6]}, "rules": [],
              "results": results, "counts": counts, "items": rows, "timing": timing}
    paths = ev.write_report(tmp_path / "out", report)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### Adding a fact" in text and "| edit | 7 | 4 | 2.000 | 3 | 1 |" in text
    assert tmp_path / "out" / "explicit_acc_by_facts.png" in paths


def test_invariant_bootstrap_interval_holds_the_mean_and_narrows_with_items():
    assert ev.bootstrap95([0.5, 0.5, 0.5]) == (0.5, 0.5)
    rng = np.random.default_rng(1)
    few, many = rng.integers(0, 2, 10).astype(float), rng.integers(0, 2, 400).astype(float)
    for diffs in (few, many):
        low, high = ev.bootstrap95(diffs)
        assert low <= diffs.mean() <= high
        assert high - low == pytest.approx(2 * ev.ci95(diffs), rel=0.25)   # close to the normal one
    assert np.ptp(ev.bootstrap95(many)) < np.ptp(ev.bootstrap95(few))
    assert ev.bootstrap95(few) == ev.bootstrap95(few)                        # seeded


@pytest.mark.parametrize("argv, message", [
    (["--many-preferences", "10", "--turns", "0,5"], "--many-preferences is a run of its own"),
    (["--many-preferences", "10", "--recitation"], "--many-preferences is a run of its own"),
    (["--many-preferences", "ten"], "--many-preferences must be comma-separated integers"),
    (["--many-preferences", "0,10"], "every size must be at least 1"),
    (["--many-preferences", "80"], "--many-preferences 80: the items give only"),
])
def test_many_preferences_refusals_come_before_the_model(argv, message, capsys, tmp_path):
    assert main(["eval", "upqa", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_adding_a_fact_is_timed_for_the_edit_methods_only():
    add_fact = ev.edit_add_fact(engine=None)   # an engine is needed only for the edit methods
    user = ev.many_user(upqa_items_static())
    assert add_fact(user, "perce") is None and add_fact(user, "logo") is None
    assert ev.trained_part("edit+rag") == "edit" and ev.trained_part("rag+edit-1turn") == "edit-1turn"
    assert ev.trained_part("prompt+rag") is None and ev.trained_part("facts") is None
    assert ev.trained_part("memory+rag") == "edit" and ev.method_parts("memory+rag") == ["edit", "facts", "rag"]


def upqa_items_static():
    from localpers.personalize.datasets import UpqaItem
    from localpers.personalize.methods import User

    return [UpqaItem(user=User(f"u{i}", preferences=(statement,)), attribute_type=kind, question="q",
                     question_paraphrased="p", implicit_question="i", target=target, targets=(target,))
            for i, (statement, kind, target) in enumerate(RAW)]
