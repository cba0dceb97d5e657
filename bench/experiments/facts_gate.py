"""How often the `facts` line comes with a question: UPQA dev (one preference a user) and the shipped neutral questions.

    python bench/experiments/facts_gate.py

Prints, for relevant_facts (localpers/personalize/methods.py), the fraction of UPQA dev's explicit / paraphrased /
implicit questions that get their user's preference, and how many (user, neutral question) pairs get one: a line on
a neutral question is what made replies recite the preference (issue 25). No model is run."""
from localpers.personalize.datasets import data_path, read_neutral, read_upqa
from localpers.personalize.methods import relevant_facts


def main() -> None:
    items = read_upqa(data_path("upqa"))
    neutral = read_neutral(data_path("neutral"))
    for kind in ("question", "question_paraphrased", "implicit_question"):
        given = sum(bool(relevant_facts(it.user.preferences[:1], getattr(it, kind))) for it in items)
        print(f"{kind:22s} {given / len(items):.2f} ({given} of {len(items)})")
    given = sum(bool(relevant_facts(it.user.preferences[:1], q)) for it in items for q in neutral)
    print(f"{'neutral questions':22s} {given / (len(items) * len(neutral)):.3f} ({given} of {len(items) * len(neutral)})")


if __name__ == "__main__":
    main()
