"""Detector edge cases any correct preference detector must get right (issue 28), kept apart from
tests/test_detect.py: questions in statement syntax are not statements, and a negated ability is a statement
whose negation is kept (dropping it states the opposite)."""
import pytest

from localpers.personalize.detect import detect_preferences


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
