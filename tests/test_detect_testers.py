"""The detector on inputs two testers typed in real conversations (issue 25's learning loop): lead-ins before a
colon, greetings, ending a state, abbreviations, an emoji before the value, trailing adverbs, a sentence ended by
";" or ":". Each kind is an invariant over several phrasings, not the testers' one string."""
import pytest

from localpers.personalize.detect import detect_facts, sentences


def facts(text):
    return [("-" if f.retire else "") + f"{f.attribute}={f.value}" for f in detect_facts(text)]


@pytest.mark.parametrize("message, expected", [
    ("Big news: I moved to Paris.", ["home=Paris"]),
    ("Quick update everyone: I'm vegan.", ["diet=vegan"]),
    ("Some exciting personal news: I'm engaged.", ["relationship=engaged"]),
    ("Fun fact: I speak Danish.", ["language=Danish"]),
    ("PS: I love jazz.", ["likes=jazz"]),
    ("Big news - I moved to Paris.", ["home=Paris"]),
    ("So, big news, I moved to Paris.", ["home=Paris"]),
    ("News flash: I'm vegan.", ["diet=vegan"]),
])
def test_invariant_a_headline_before_a_colon_leaves_the_statement_after_it(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", [
    "Example: I love jazz.", "Translate: I live in Oslo.", "John: I live in Oslo.", "My sister's news: she is vegan.",
])
def test_invariant_a_label_that_is_no_headline_keeps_its_sentence_out(message):
    """Only a headline noun (news, update, fact ...) opens a statement: a speaker's name or a task label does not."""
    assert facts(message) == []


@pytest.mark.parametrize("message, expected", [
    ("Hi all, I'm vegan.", ["diet=vegan"]),
    ("Hey, I live in Oslo.", ["home=Oslo"]),
    ("Ok so I'm a nurse.", ["job=nurse"]),
    ("Hi Anna, I live in Lyon.", ["home=Lyon"]),
    ("Good morning everyone, I'm a nurse.", ["job=nurse"]),
    ("Hello there! I love jazz.", ["likes=jazz"]),
    ("Hi im vegan", ["diet=vegan"]), ("Hi Im vegan", ["diet=vegan"]), ("Hey My name is Bo.", ["name=Bo"]),
    ("Hey We live in Oslo.", ["home=Oslo"]),
    ("Alright, I'm a nurse.", ["job=nurse"]),
    ("Anyway, I love jazz.", ["likes=jazz"]),
])
def test_invariant_a_greeting_and_whom_it_greets_leave_the_statement(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I stopped being vegetarian.", ["-diet=vegetarian"]),
    ("I've stopped being vegan.", ["-diet=vegan"]),
    ("I have given up being vegetarian.", ["-diet=vegetarian"]),
    ("I quit my job as a nurse.", ["-job=nurse"]),
    ("I left my job as a nurse to become a teacher.", ["-job=nurse"]),
    ("I stopped working as a teacher.", ["-job=teacher"]),
    ("I stopped being a nurse last year.", ["-job=nurse"]),
    ("I no longer live in Oslo.", ["-home=Oslo"]),
    ("I stopped living in Oslo.", ["-home=Oslo"]),
    ("I'm not vegetarian anymore.", ["-diet=vegetarian"]),
    ("I gave up vegetarianism.", ["-diet=vegetarian"]),
    ("I quit my job.", ["-job="]), ("I got laid off from my job last week.", ["-job="]),
    ("I quit my job to travel.", ["-job="]),
    ("I quit veganism.", ["-diet=vegan"]),
])
def test_invariant_ending_a_state_retires_it_and_states_nothing(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I live in St. Louis.", ["home=St. Louis"]),
    ("I live in Mt. Vernon.", ["home=Mt. Vernon"]),
    ("I work at the U.S. Census Bureau.", ["employer=U.S. Census Bureau"]),
    ("I live in Washington D.C.", ["home=Washington D.C."]),
    ("I moved to St. Louis last year.", ["home=St. Louis"]),
    ("My name is Dr. Ann Lee.", ["name=Dr. Ann Lee"]),
    ("I live in the U.S. I love jazz.", ["home=the U.S.", "likes=jazz"]),
])
def test_invariant_an_abbreviations_dot_ends_no_sentence(message, expected):
    assert facts(message) == expected


def test_sentences_split_at_an_abbreviation_only_before_a_first_person_subject():
    assert sentences("Dr. Smith is nice. I am vegan.") == ["Dr. Smith is nice.", "I am vegan."]
    assert sentences("I love jazz, rock, etc. I am vegan.") == ["I love jazz, rock, etc.", "I am vegan."]
    assert sentences("I like e.g. jazz. I am vegan.") == ["I like e.g. jazz.", "I am vegan."]


@pytest.mark.parametrize("message, expected", [
    ("I live in \U0001F30D Zürich.", ["home=Zürich"]),
    ("I live in \U0001F1F3\U0001F1F4 Oslo.", ["home=Oslo"]),
    ("I love \u2764\ufe0f Jazz.", ["likes=Jazz"]),
    ("I'm \U0001F331 vegan.", ["diet=vegan"]),
    ("I'm vegan \U0001F331 I live in Oslo.", ["diet=vegan", "home=Oslo"]),   # between sentences: a sentence end
    ("I love jazz \U0001F3B7 My sister is vegan.", ["likes=jazz"]),
])
def test_invariant_an_emoji_before_the_value_is_not_the_end_of_the_sentence(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I'm vegan again.", ["diet=vegan"]), ("I'm vegan now.", ["diet=vegan"]), ("I'm still vegan.", ["diet=vegan"]),
    ("I'm vegan too.", ["diet=vegan"]), ("I live in Oslo again.", ["home=Oslo"]),
    ("I'm single again.", ["relationship=single"]), ("I love jazz again.", ["likes=jazz"]),
    ("I'm vegetarian again, after a year of eating meat.", ["diet=vegetarian"]),
    ("I went back to being vegetarian.", ["diet=vegetarian"]),
])
def test_invariant_a_trailing_adverb_is_not_part_of_the_fact(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I live in Oslo;", ["home=Oslo"]), ("I live in Oslo:", ["home=Oslo"]),
    ("I live in Oslo; my sister is a doctor.", ["home=Oslo"]),
    ("I'm vegan;\nI love jazz;", ["diet=vegan", "likes=jazz"]),
])
def test_invariant_a_sentence_may_end_in_a_semicolon_or_a_colon(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("code", ["int x;", "return x;", "i++;", "String name;", "printf(\"I live in Oslo\");"])
def test_a_line_of_code_ending_in_a_semicolon_is_still_no_sentence(code):
    assert sentences(code) == [] and detect_facts(code) == []
