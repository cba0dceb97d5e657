"""The detector on more inputs testers typed (issue 25's learning loop, second round): an emoji in a sentence that
";" ends, greetings and subject lines before a statement, and a like or a state said to be over ("no longer into",
"not into ... anymore", "I was a nurse until last year"). Each kind is an invariant over several phrasings."""
import pytest

from localpers.personalize.detect import detect_facts, sentences


def facts(text):
    return [("-" if f.retire else "~" if f.change else "") + f"{f.attribute}={f.value}" for f in detect_facts(text)]


@pytest.mark.parametrize("message, expected", [
    ("I live in \U0001F3E0 Oslo;", ["home=Oslo"]),
    ("I'm vegan; I live in \U0001F3E0 Oslo;", ["diet=vegan", "home=Oslo"]),
    ("I'm \U0001F331 vegan; I live in \U0001F3E0 Oslo;", ["diet=vegan", "home=Oslo"]),
    ("I love \u2764\ufe0f jazz;", ["likes=jazz"]),
])
def test_invariant_an_emoji_leaves_a_sentence_that_a_semicolon_ends_prose(message, expected):
    """A line ending in ";" is code unless it reads as prose; an emoji in it does not make it code."""
    assert facts(message) == expected


@pytest.mark.parametrize("code", ["return x; \U0001F600", "x = 1; \U0001F3E0", "int \U0001F3E0;"])
def test_a_line_of_code_with_an_emoji_is_still_no_sentence(code):
    assert sentences(code) == [] and detect_facts(code) == []


@pytest.mark.parametrize("message, expected", [
    ("Howdy, I'm vegan.", ["diet=vegan"]),
    ("Greetings, I live in Ulm.", ["home=Ulm"]),
    ("Dear assistant, I'm vegan.", ["diet=vegan"]),
    ("Dear assistant, I love sushi.", ["likes=sushi"]),
    ("Hey \u2014 I live in Ulm.", ["home=Ulm"]),
    ("Hey - I live in Ulm.", ["home=Ulm"]),
    ("Hi there \u2014 I'm vegan.", ["diet=vegan"]),
    ("Hello \u2013 I love jazz.", ["likes=jazz"]),
    ("Re: dinner plans: I'm allergic to nuts.", ["allergy=nuts"]),
    ("Re: I live in Oslo.", ["home=Oslo"]),
])
def test_invariant_a_greeting_a_dash_or_a_subject_line_leave_the_statement(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", [
    "Dear John, I live in Oslo.", "Dear John,\nI live in Oslo.", "John: I live in Oslo.", "Re: my sister is vegan.",
])
def test_invariant_a_letter_to_someone_else_or_a_speaker_label_keeps_its_sentence_out(message):
    """Only a greeting of the assistant opens a statement: a letter to someone else is not the speaker's own."""
    assert facts(message) == []


@pytest.mark.parametrize("message, expected", [
    ("I'm no longer into rock.", ["-likes=rock"]),
    ("I'm no longer a fan of rock music.", ["-likes=rock music"]),
    ("I'm not into tennis anymore.", ["-likes=tennis"]),
    ("I'm not a fan of jazz anymore.", ["-likes=jazz"]),
    ("No longer into rock.", ["-likes=rock"]),
    ("Not into tennis anymore, I play football now.", ["-likes=tennis", "~likes=football"]),
])
def test_invariant_a_like_said_to_be_over_retires_the_like_and_is_no_dislike(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    # as "I don't like X" (a dislike) beside "I don't like X anymore" (a like retired)
    ("I'm not into tennis.", ["dislikes=tennis"]), ("I'm not a fan of jazz.", ["dislikes=jazz"]),
    ("I don't like tennis.", ["dislikes=tennis"]), ("Not into tennis.", []),
])
def test_invariant_a_negated_like_without_anymore_stays_a_dislike(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I was a nurse until last year.", ["-job=nurse"]),
    ("I was married until 2019.", ["-relationship=married"]),
    ("I was vegan until recently.", ["-diet=vegan"]),
    ("I lived in Oslo until 2020.", ["-home=Oslo"]),
    ("I worked as a teacher until March.", ["-job=teacher"]),
])
def test_invariant_a_state_held_until_a_time_is_over(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", [
    "I was at work until 9pm.", "I was up until 3am.", "I was in Paris until Monday.", "I was happy until I met him.",
])
def test_invariant_a_passing_situation_until_a_time_is_no_fact(message):
    """Only a known state (a job, a diet, a home ...) held until a time is retired; a situation is nothing."""
    assert facts(message) == []
