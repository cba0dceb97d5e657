"""The preference detector and the merge rules (localpers.personalize.detect): no model, no data files."""
import pytest

from localpers.personalize.detect import detect_preferences, merge_preferences, sentences


@pytest.mark.parametrize("message, expected", [
    ("I'm vegetarian.", ["I'm vegetarian."]),
    ("I don't like horror films", ["I don't like horror films."]),
    ("remember that I live in Lyon", ["I live in Lyon."]),
    ("Please remember that I am allergic to nuts!", ["I am allergic to nuts!"]),
    ("Just so you know, I hate cilantro.", ["I hate cilantro."]),
    ("I'm not a fan of jazz.", ["I'm not a fan of jazz."]),
    ("My favorite color is blue", ["My favorite color is blue."]),
    ("Due to my religion, I do not eat pork.", ["I do not eat pork."]),
    ("I am vegetarian. What should I cook tonight?", ["I am vegetarian."]),
    ("I have two cats. I never wear wool; it itches.", ["I have two cats.", "I never wear wool."]),
])
def test_statements_found_with_lead_in_removed_as_whole_sentences(message, expected):
    assert detect_preferences(message) == expected


@pytest.mark.parametrize("message", [
    "Do I like horror films?", "Am I vegetarian?", "What is my diet?",            # questions
    "My friend likes horror films.", "She is vegetarian.", "You are vegetarian.",  # not the first person
    "Suggest a dinner for tonight.", "I need a recipe for lasagna.", "I would like a recipe.",  # requests
    "I think this code is wrong.", "I like it.", "i didn't understand that",      # about the task at hand
    "I'm visiting Paris next month.", "I'm looking for a new jacket.",           # transient situations
    "I had such a long shift today, barely got any sleep",
    "```python\nI = 3  # I like this\n```",
])
def test_invariant_non_statements_yield_nothing(message):
    assert detect_preferences(message) == []


def test_sentences_split_messages_and_drop_code():
    text = "I live in Lyon. I love cycling!\nfor i in range(3):\n    print(i)\nAny route?"
    assert sentences(text) == ["I live in Lyon.", "I love cycling!", "Any route?"]


def test_merge_drops_duplicates_and_later_contradiction_wins():
    merged = merge_preferences(["I like horror films.", "I live in Paris.", "I have two dogs."],
                               ["i like horror films", "I don't like horror films.", "I live in Lyon"])
    assert merged == ["I have two dogs.", "I don't like horror films.", "I live in Lyon"]


@pytest.mark.parametrize("old, new", [
    ("I'm vegetarian.", "I eat meat now."),
    ("My favorite food is pizza.", "My favourite food is sushi."),
    ("I work as an accountant.", "I work as a baker."),
    ("I work at a bakery.", "I work for Google."),
    ("I love jazz.", "I hate jazz."),
])
def test_merge_later_statement_replaces_same_attribute(old, new):
    assert merge_preferences([old, "I have a cat."], [new]) == ["I have a cat.", new]


def test_merge_keeps_occupation_and_employer_apart():
    assert merge_preferences(["I am a software engineer."], ["I work at Google."]) == \
        ["I am a software engineer.", "I work at Google."]


def test_merge_keeps_unrelated_statements_in_order():
    assert merge_preferences(["I love jazz.", "I have a cat."], ["I hate rap."]) == \
        ["I love jazz.", "I have a cat.", "I hate rap."]
