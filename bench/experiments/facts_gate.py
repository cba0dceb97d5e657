"""How often the `facts` line comes with a question, and where routed edits send one (no model is run).

    python bench/experiments/facts_gate.py

Prints, for relevant_facts (localpers/personalize/methods.py), the fraction of UPQA dev's explicit / paraphrased /
implicit questions that get their user's preference, and how many (user, neutral question) pairs get one: a line on
a neutral question is what made replies recite the preference (issue 25). Then routed edits (editing.pick_route) for
the many-preferences users of `localpers eval upqa --many-preferences 10,30`: how many of each fact's explicit /
paraphrased / implicit questions go to that fact's adapter, how many to none, and how many of the neutral
questions reach an adapter."""
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
    from localpers.eval.evaluation import many_preference_items, many_user
    from localpers.personalize.editing import facts_of, pick_route, route_words

    for n in (10, 30):
        chosen = many_preference_items(items, n, 0)
        user = many_user(chosen)
        routes = [(f.statement, route_words(f)) for f in facts_of(user.preferences, user.facts)]
        for kind in ("question", "question_paraphrased", "implicit_question"):
            got = [pick_route(routes, getattr(it, kind)) for it in chosen]
            right = sum(g is not None and g[0] == it.user.preferences[0] for g, it in zip(got, chosen))
            print(f"routed, {n} facts, {kind:22s} to its fact {right} of {n}, to none {sum(g is None for g in got)}")
        print(f"routed, {n} facts, neutral questions reaching an adapter: "
              f"{sum(pick_route(routes, q) is not None for q in neutral)} of {len(neutral)}")


if __name__ == "__main__":
    main()
