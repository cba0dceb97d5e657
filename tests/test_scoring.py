"""Scoring oracles: each task's metrics on tiny hand-written items, answered by a scripted engine whose answers and
option scores are chosen by hand, against values computed by hand. A scorer that points at the wrong option, calls
a right answer wrong, scores the gold against itself or drops a method's artifacts changes a number here.

The scripted engine implements what evaluation.py uses of localpers.engine.engine.Engine: chat, format_chat and
continuation_logprobs (returning, for each option, token ids and log-probabilities whose mean at those ids is the
option's scripted score)."""
import json
import math

import numpy as np
import pytest

from localpers.personalize.datasets import LampItem, PrefEvalItem, UpqaItem
from localpers.engine.engine import Artifacts
from localpers.eval.evaluation import (PREFEVAL_ACK, Journal, locality_kl, NEUTRAL, rouge, run_lamp, run_prefeval,
                                  run_upqa, target_match)
from localpers.personalize.methods import Personalized, User, base

ADAPTER = Artifacts(lora=(("user-adapter.gguf", 1.0),))


def adapted(user, query, engine):
    """A method whose only effect is an adapter (so only the scripted engine's view of artifacts tells)."""
    return Personalized(artifacts=ADAPTER)


class ScriptedEngine:
    """answer(question, artifacts) -> the reply; score(messages, option, artifacts) -> mean log-prob per token."""

    def __init__(self, answer=None, score=None, neutral=None):
        self.answer, self.score, self.neutral = answer, score, neutral
        self.calls = []

    def format_chat(self, messages):
        return json.dumps(messages)

    def chat(self, messages, *, artifacts, max_tokens, temperature):
        assert temperature == 0.0
        self.calls.append(("chat", messages, artifacts))
        return {"choices": [{"message": {"role": "assistant", "content": self.answer(messages[-1]["content"], artifacts)}}]}

    def continuation_logprobs(self, prompt, continuations, *, artifacts):
        messages = prompt if isinstance(prompt, list) else json.loads(prompt)
        out = []
        for option in continuations:
            if self.neutral is not None and len(continuations) == 1 and option in dict(NEUTRAL).values():
                out.append(([0], np.log(np.array([self.neutral(artifacts)]))))  # [1 token, V=2]
                continue
            n = len(option.split())
            logprobs = np.full((n, 3), -50.0)
            logprobs[:, 1] = self.score(messages, option, artifacts)
            out.append(([1] * n, logprobs))
        return out


# ---------------------------------------------------------------- UPQA

def upqa_item(uid, target, candidates):
    return UpqaItem(User(uid, preferences=(f"My favorite {target}.",)), "music", f"q-explicit-{uid}",
                    f"q-para-{uid}", f"q-implicit-{uid}", target, (target,), candidates)


UPQA = [upqa_item("u1", "Jazz music", ("Rap music", "Country music")),
        upqa_item("u2", "Rap music", ("Jazz music", "Country music"))]


def upqa_answer(question, artifacts):
    """u1 states its target only when asked explicitly; u2 states it explicitly and implicitly; the paraphrase gets
    another user's target; with the adapter, u1's implicit answer also states it."""
    uid, kind = question.split("-")[-1], question.split("-")[1]
    table = {("u1", "explicit"): "You love jazz music.", ("u1", "para"): "Rap music, I guess.",
             ("u1", "implicit"): "Some music for you.", ("u2", "explicit"): "Rap music!",
             ("u2", "para"): "Country music.", ("u2", "implicit"): "Rap music playlists."}
    if artifacts == ADAPTER and (uid, kind) == ("u1", "implicit"):
        return "Jazz music, of course."
    return table[uid, kind]


def upqa_score(messages, option, artifacts):
    """u1's question ranks its target first; u2's ranks 'Jazz music' above its target 'Rap music', except with
    the adapter."""
    question = messages[-1]["content"]
    if artifacts == ADAPTER and "u2" in question:
        return {"Jazz music": -1.0, "Rap music": -0.2, "Country music": -1.5}[option]
    return {"Jazz music": -1.0, "Rap music": -2.0, "Country music": -1.5}[option] if "u2" in question else \
        {"Jazz music": -0.5, "Rap music": -2.0, "Country music": -3.0}[option]


def test_upqa_accuracies_and_mc_choice_against_hand_computed_values():
    engine = ScriptedEngine(upqa_answer, upqa_score, neutral=lambda a: [0.9, 0.1] if a == ADAPTER else [0.5, 0.5])
    results, counts, rows = run_upqa(engine, UPQA, {"base": base, "edit": adapted}, max_tokens=8)
    assert results["base"] == {"explicit_acc": 1.0, "paraphrased_acc": 0.0, "implicit_acc": 0.5, "mc_acc": 0.5,
                               "locality_kl": 0.0}
    assert results["edit"]["implicit_acc"] == 1.0  # the adapter reached the served path
    assert results["edit"]["mc_acc"] == 1.0  # and the option scoring
    # u1's row: mc_choice is u1's own target (option 0 of [target, *candidates]); u2 ranks a candidate first
    by_user = {(r["id"], r["method"]): r for r in rows}
    assert by_user["u1", "base"]["mc_choice"] == "Jazz music" and by_user["u1", "base"]["mc_ok"] is True
    assert by_user["u2", "base"]["mc_choice"] == "Jazz music" and by_user["u2", "base"]["mc_ok"] is False
    assert [by_user["u1", "base"][f"{k}_ok"] for k in ("explicit", "paraphrased", "implicit")] == [True, False, False]
    # locality: KL([.5, .5] || [.9, .1]) = .5 ln(.5/.9) + .5 ln(.5/.1), per token, averaged over users and prompts
    assert results["edit"]["locality_kl"] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0))
    assert counts["edit"] == {"explicit_acc": 2, "paraphrased_acc": 2, "implicit_acc": 2, "mc_acc": 2, "locality_kl": 2}


def test_locality_kl_is_zero_for_a_method_equal_to_base():
    engine = ScriptedEngine(neutral=lambda a: [0.7, 0.3])
    base_logprobs = [np.log(np.array([[0.7, 0.3]]))] * len(NEUTRAL)
    assert locality_kl(engine, adapted, [User("u")], base_logprobs) == pytest.approx(0.0)


def test_target_match_counts_content_tokens_not_shared_ones():
    assert target_match("You love jazz music.", ("Jazz music",), ("Rap music",))
    assert not target_match("Some music for you.", ("Jazz music",), ("Rap music",))  # 'music' is shared
    assert not target_match("Rap music.", ("Jazz music",), ("Rap music",))
    assert target_match("Dancing, mostly at clubs.", ("Dancing at the club",))  # stemmed: club(s), dance(ing)
    assert not target_match("", ("Dancing at the club",))


def test_target_match_needs_the_answer_not_the_second_person():
    # "You're" is you + re: words that only turn the statement to the second person are not what it states
    assert target_match("Your food preference is vegetarian.", ("You're vegetarian.",))
    assert not target_match("You're right, you're welcome.", ("You're vegetarian.",))
    assert not target_match("You are.", ("You're vegetarian.",))


# ---------------------------------------------------------------- PrefEval

PREFEVAL = [PrefEvalItem("food/0", "I'm vegetarian.", "Dinner?", ("Lentil curry", "Steak", "Fried chicken", "Tuna"),
                         User("p0")),
            PrefEvalItem("travel/1", "I hate flying.", "How to get to Rome?",
                         ("Night train", "Cheap flight", "Business class flight", "Private jet"), User("p1"))]
DISTRACTORS = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
               [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]]


def prefeval_score(messages, option, artifacts):
    """The food item always favours its following option; the travel item favours it only without distractor
    turns (3 messages: preference, acknowledgement, question), else 'Cheap flight'."""
    assert messages[0]["content"] in ("I'm vegetarian.", "I hate flying.") and messages[1]["content"] == PREFEVAL_ACK
    favoured = {"I'm vegetarian.": "Lentil curry",
                "I hate flying.": "Night train" if len(messages) == 3 else "Cheap flight"}[messages[0]["content"]]
    return -0.1 if option == favoured else -1.0 - 0.1 * len(option)


def test_prefeval_followed_against_hand_computed_values():
    engine = ScriptedEngine(score=prefeval_score)
    results, counts, rows = run_prefeval(engine, PREFEVAL, DISTRACTORS, {"base": base}, turns=[0, 2], seed=3)
    assert results["base"] == {"followed@0": 1.0, "followed@2": 0.5}
    assert counts["base"] == {"followed@0": 2, "followed@2": 2}
    for row in rows:
        shown = [PREFEVAL[0 if row["id"] == "food/0" else 1].options[i] for i in row["order"]]
        assert sorted(row["order"]) == [0, 1, 2, 3]
        chosen = shown[int(np.argmax(row["scores"]))]
        assert row["followed"] == (chosen in ("Lentil curry", "Night train"))
    # the options are shown shuffled: the following option is not always first (else 'chosen == 0' would pass)
    assert any(row["order"][0] != 0 for row in rows)


# ---------------------------------------------------------------- LaMP

def lamp_items(golds):
    return [LampItem(f"i{n}", f"input {n}", gold, User(f"l{n}")) for n, gold in enumerate(golds)]


@pytest.mark.parametrize("task, golds, predicted, expected", [
    # LaMP_2 labels are the file's gold labels, sorted: a, b, c
    ("LaMP_2", ["b", "c", "a"], ["b", "a", "a"], {"accuracy": 2 / 3}),
    # LaMP_3: ratings 1..5; errors 2, 0, 1 -> MAE 1, RMSE sqrt(5/3)
    ("LaMP_3", ["4", "5", "3"], ["2", "5", "4"], {"accuracy": 1 / 3, "mae": 1.0, "rmse": math.sqrt(5 / 3)}),
    ("LaMP_1", ["[1]", "[2]", "[2]"], ["[1]", "[2]", "[1]"], {"accuracy": 2 / 3}),
])
def test_lamp_classification_against_hand_computed_values(task, golds, predicted, expected):
    items = lamp_items(golds)
    choice = {f"input {n}": label for n, label in enumerate(predicted)}
    engine = ScriptedEngine(score=lambda messages, option, a: 0.0 if choice[messages[-1]["content"]] == option else -9.0)
    results, counts, rows = run_lamp(engine, task, items, {"base": base})
    assert results["base"] == pytest.approx(expected)
    assert [row["output"] for row in rows] == predicted
    assert [row["correct"] for row in rows] == [p == g for p, g in zip(predicted, golds)]


def test_rouge_against_hand_computed_values():
    # unigrams all shared (F = 1); longest common subsequence "the chase the": 3 of 5 tokens each way
    assert rouge("the dog chased the cat", "the cat chased the dog") == pytest.approx({"rouge1": 1.0, "rougeL": 0.6})
    # one shared token: P = 1/2, R = 1/5, F = 2PR / (P + R) = 2/7
    assert rouge("a cat", "the cat chased the dog") == pytest.approx({"rouge1": 2 / 7, "rougeL": 2 / 7})
    assert rouge("nothing in common", "the cat chased the dog") == {"rouge1": 0.0, "rougeL": 0.0}
    # Porter stemming: dogs/dog, chasing/chased, cats/cat match; P = 3/3, R = 3/5, F = 0.75
    assert rouge("dogs chasing cats", "the dog chased the cat") == pytest.approx({"rouge1": 0.75, "rougeL": 0.75})


def test_lamp_generation_scores_the_answer_against_the_gold():
    items = [LampItem("g0", "Write a title.", "the cat chased the dog", User("g0")),
             LampItem("g1", "Write another title.", "the cat chased the dog", User("g1"))]
    answers = {"Write a title.": "the dog chased the cat", "Write another title.": "a cat"}
    engine = ScriptedEngine(answer=lambda question, a: answers[question])
    results, counts, rows = run_lamp(engine, "LongLaMP_2", items, {"base": base}, max_tokens=16)
    assert results["base"] == pytest.approx({"rouge1": (1.0 + 2 / 7) / 2, "rougeL": (0.6 + 2 / 7) / 2})
    assert [row["output"] for row in rows] == ["the dog chased the cat", "a cat"]
    assert counts["base"] == {"rouge1": 2, "rougeL": 2}


def test_a_resumed_journal_reports_the_same_scores(tmp_path):
    engine = ScriptedEngine(score=prefeval_score)
    path, run = tmp_path / "progress.jsonl", {"task": "prefeval"}
    first = run_prefeval(engine, PREFEVAL, DISTRACTORS, {"base": base}, turns=[0, 2], seed=3, journal=Journal(path, run))
    silent = ScriptedEngine(score=lambda *a: pytest.fail("a journaled item was scored again"))
    assert run_prefeval(silent, PREFEVAL, DISTRACTORS, {"base": base}, turns=[0, 2], seed=3,
                        journal=Journal(path, run)) == first
