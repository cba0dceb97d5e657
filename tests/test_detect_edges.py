"""Detector edge cases any correct preference detector must get right (issue 28), kept apart from
tests/test_detect.py: questions in statement syntax are not statements, and a negated ability is a statement
whose negation is kept (dropping it states the opposite)."""
import pytest

from localpers.personalize.detect import detect_facts, detect_preferences, is_preference


@pytest.mark.parametrize("message", [
    "I like jazz?", "I live in Lyon?", "I'm vegetarian?", "I am allergic to nuts?", "My favorite color is blue?",
    "So I love cycling?", "I hate cilantro??", "I work as a nurse?", "I don't eat pork?",
])
def test_invariant_a_question_in_statement_syntax_is_not_a_preference(message):
    assert detect_preferences(message) == []


def test_a_question_next_to_a_statement_leaves_the_statement():
    found = detect_preferences("I like jazz? I live in Lyon.")
    assert len(found) == 1 and "Lyon" in found[0] and "jazz" not in found[0]


@pytest.mark.parametrize("message, negation", [
    ("I can't eat gluten.", "can't"), ("I cannot drink milk.", "cannot"), ("I can not have dairy.", "not"),
    ("I can't stand loud music.", "can't"), ("I don't eat pork.", "don't"), ("I never wear wool.", "never"),
    ("I can\u2019t eat peanuts.", "can"),
])
def test_invariant_a_negated_ability_is_found_with_its_negation(message, negation):
    found = detect_preferences(message)
    assert len(found) == 1, found
    assert negation in found[0].replace("\u2019", "'") and ("n't" in found[0].replace("\u2019", "'")
                                                             or "not" in found[0] or "never" in found[0])


@pytest.mark.parametrize("message, facts", [
    ("Call me Ann and I live in Lyon.", [("name", "Ann", False), ("home", "Lyon", False)]),
    ("I study medicine in Berlin.", [("study", "medicine", False)]),
    ("I love to cook.", [("likes", "cook", False)]),
    ("I hate to run.", [("dislikes", "run", False)]),
    ("I no longer eat fish.", [("likes", "fish", True)]),
    ("These days I live in Lyon.", [("home", "Lyon", False)]),
    ("Currently my job is nurse.", [("job", "nurse", False)]),
    ("I'm a nurse who speaks French.", [("job", "nurse", False), ("language", "French", False)]),
])
def test_invariant_each_fact_keeps_its_value_cleaned_its_retirement_and_its_statement(message, facts):
    """Values without the infinitive's "to" or a study's place, lead-ins ("These days", "Currently") dropped,
    "call me" as a name, a "who" clause said of the speaker, and every fact with the clause that states it
    (mutation survivors of personalize/detect.py, docs/history/mutation/)."""
    found = detect_facts(message)
    assert [(f.attribute, f.value, f.retire) for f in found] == facts
    assert all(isinstance(f.statement, str) and f.statement for f in found), found


@pytest.mark.parametrize("message", ["My wife and I are looking to buy a house.",
                                     "My husband and I are planning a trip."])
def test_invariant_a_plan_we_share_is_not_a_preference(message):
    """"my X and I are ...": the verb phrase after the subject decides, as after "I" (a plan is no preference)."""
    assert not is_preference(message)


@pytest.mark.parametrize("message, value", [
    ("I eat only vegan food.", "vegan"), ("I only eat vegan food.", "vegan"),
    ("I eat vegetarian meals.", "vegetarian"), ("I strictly eat plant-based food.", "plant-based"),
])
def test_invariant_eating_only_diet_food_states_the_diet(message, value):
    """"I eat only vegan food" says the diet (one value: a later "I'm vegetarian." replaces it), not a like of
    "only vegan food" that would stand beside a contradicting diet (a tester's report, issue 25)."""
    [fact] = detect_facts(message)
    assert (fact.attribute, fact.value.lower().replace(" ", "-")) == ("diet", value)
    [later] = detect_facts("I'm vegetarian.")
    assert later.slot == fact.slot


@pytest.mark.parametrize("message, attribute, value", [
    ("My hobby is rock climbing.", "favourite hobby", "rock climbing"),
    ("My pet is a dog.", "pets", "a dog"), ("My pets are two cats.", "pets", "two cats"),
    ("I have a dog named Rex.", "pets", "a dog"), ("I have a cat called Tom.", "pets", "a cat"),
])
def test_invariant_hobbies_and_pets_said_with_my_or_a_name_are_facts(message, attribute, value):
    """Ways a tester stated preferences that were stored as nothing (or as a bare 'about'), issue 25."""
    [fact] = detect_facts(message)
    assert (fact.attribute, fact.value) == (attribute, value)


@pytest.mark.parametrize("message", ["My pet died.", "My dog is sick today."])
def test_a_passing_remark_about_a_pet_is_no_pet_fact(message):
    assert all(f.attribute != "pets" for f in detect_facts(message))
