"""The detector's bounds and combinations that a sample of detect.py's mutants (issue 28; seed 11, after the testers'
rounds) found untested: the 400-character sentence bound, a statement stating no fact in merge_preferences, a
retirement of another value beside a stated one, and a value cut before its qualifier."""
from __future__ import annotations

from localpers.personalize.detect import detect_facts, is_preference, merge_preferences


def test_invariant_a_sentence_of_400_characters_is_read_and_one_of_401_is_not():
    sentence = "I love " + "a" * 393
    assert len(sentence) == 400 and is_preference(sentence)
    assert not is_preference(sentence + "a")


def test_invariant_merge_keeps_a_statement_that_states_no_fact_by_its_words():
    assert merge_preferences([], ["Lorem ipsum dolor sit.", "I live in Oslo."]) == [
        "Lorem ipsum dolor sit.", "I live in Oslo."]
    assert merge_preferences(["Lorem ipsum dolor sit."], ["lorem ipsum dolor sit"]) == ["lorem ipsum dolor sit"]


def test_invariant_retiring_another_value_keeps_the_one_stated_beside_it():
    found = detect_facts("I live in Oslo. I don't live in Paris anymore.")
    assert [(f.attribute, f.value, f.retire) for f in found] == [("home", "Oslo", False), ("home", "Paris", True)]


def test_invariant_a_value_ends_before_its_qualifier():
    for text, value in (("I live in Oslo with my wife.", "Oslo"), ("I love jazz more than rock.", "jazz"),
                        ("I love jazz, especially bebop.", "jazz")):
        [fact] = detect_facts(text)
        assert fact.value == value, text


def test_invariant_a_second_predicate_after_and_gets_its_subject_back():
    found = detect_facts("I am married and have two kids of my own.")
    assert [(f.attribute, f.statement) for f in found] == [
        ("relationship", "I am married."), ("about", "I have two kids of my own.")]
    assert [(f.attribute, f.value) for f in detect_facts("I am native american and live in oklahoma.")][-1] == (
        "home", "Oklahoma")
