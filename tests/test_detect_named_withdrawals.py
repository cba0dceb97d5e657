"""The detector on the faults a second tester typed (issue 25): a withdrawal that names what it withdraws, a
withdrawal followed by the bare contrary ("Just kidding, I still am."), and give-ups said without a verb the
detector knew. Each kind is an invariant over several phrasings; the chat tests learn the conversation end to end."""
import pytest

from localpers.personalize.detect import detect_facts
from localpers.serve.learn import learn_from_chat
from localpers.store.store import Store


def facts(text, previous=None):
    return [("-" if f.retire else "~" if f.change else "") + f"{f.attribute}={f.value}"
            for f in detect_facts(text, previous=previous)]


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as s:
        yield s


def chat(store, user, *turns):
    """Each turn sent as clients send it: the whole conversation so far (assistant replies between)."""
    for n in range(1, len(turns) + 1):
        messages = []
        for turn in turns[:n]:
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "Noted."}]
        learn_from_chat(store, user, messages[:-1])


def held(store, user):
    return sorted((f["attribute"], f["value"]) for f in store.facts(user))


CHEF_IN_LYON = "I'm a chef and I live in Lyon."


@pytest.mark.parametrize("withdrawal, expected", [
    ("Forget what I just said about being a chef, I'm a pilot.", ["job=pilot"]),
    ("Forget what I said about being a chef.", ["-job=chef"]),
    ("Scratch what I said about being a chef.", ["-job=chef"]),
    ("Forget what I said about Lyon.", ["-home=Lyon"]),
    ("Ignore what I said about where I live.", ["-home=Lyon"]),
    ("Oops, forget what I said about my job.", ["-job=chef"]),
])
def test_invariant_a_withdrawal_that_names_its_fact_withdraws_only_that_fact(withdrawal, expected):
    assert facts(withdrawal, previous=CHEF_IN_LYON) == expected


@pytest.mark.parametrize("withdrawal, kept", [
    ("Forget what I just said about being a chef, I'm a pilot.", [("home", "Lyon"), ("job", "pilot")]),
    ("Scratch what I said about being a chef.", [("home", "Lyon")]),
    ("Forget what I said about Lyon.", [("job", "chef")]),
])
def test_invariant_a_named_withdrawal_in_a_chat_keeps_the_facts_it_does_not_name(store, withdrawal, kept):
    chat(store, "n", CHEF_IN_LYON, withdrawal)
    assert held(store, "n") == kept


def test_a_named_withdrawal_inside_one_message_drops_only_the_named_fact():
    assert facts(CHEF_IN_LYON + " Forget what I said about Lyon.") == ["job=chef"]


@pytest.mark.parametrize("previous, withdrawal, expected", [
    ("I'm not vegetarian anymore.", "Just kidding, I still am.", ["-diet=vegetarian"]),
    ("I'm a chef.", "No wait, I'm not.", ["-job=chef"]),
    ("I'm a chef.", "Wait, no, I'm not.", ["-job=chef"]),
    ("I'm a chef.", "Just kidding, I'm not.", ["-job=chef"]),
])
def test_invariant_a_withdrawal_then_the_bare_contrary_withdraws_the_turn_before(previous, withdrawal, expected):
    found = detect_facts(withdrawal, previous=previous)
    assert facts(withdrawal, previous=previous) == expected and all(f.withdrawal for f in found)


def test_a_retirement_withdrawn_by_i_still_am_restores_the_fact_and_learns_no_about(store):
    chat(store, "v", "I'm vegetarian.", "I'm not vegetarian anymore.", "Just kidding, I still am.")
    assert held(store, "v") == [("diet", "vegetarian")]


def test_no_wait_im_not_withdraws_the_job_of_the_turn_before(store):
    chat(store, "c", "I'm a chef.", "No wait, I'm not.")
    assert held(store, "c") == []


@pytest.mark.parametrize("message, expected", [
    ("I've given up on jazz.", ["-likes=jazz"]),
    ("I gave up on rock music.", ["-likes=rock music"]),
    ("I gave up coffee and tea.", ["-likes=coffee", "-likes=tea"]),
    ("I quit coffee and tea.", ["-likes=coffee", "-likes=tea"]),
    ("No longer a jazz fan.", ["-likes=jazz"]),
    ("Not a chef anymore.", ["-job=chef"]),
    ("Not vegetarian anymore.", ["-diet=vegetarian"]),
])
def test_invariant_a_give_up_said_on_a_list_or_without_a_subject_retires_each_thing(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", ["Not sure anymore.", "Not a problem anymore.", "I quit smoking and drinking.",
                                     "I gave up on him."])
def test_invariant_a_give_up_of_no_known_thing_or_fact_retires_nothing(message):
    assert [f for f in facts(message) if f.startswith("-")] == []


@pytest.mark.parametrize("stated, given_up, kept", [
    ("I love jazz and I drink coffee.", "I've given up on jazz.", [("likes", "coffee")]),
    ("I drink coffee and tea. I'm a chef.", "I gave up coffee and tea.", [("job", "chef")]),
    ("I'm a chef and I'm vegetarian.", "Not a chef anymore.", [("diet", "vegetarian")]),
    ("I'm a chef and I'm vegetarian.", "Not vegetarian anymore.", [("job", "chef")]),
])
def test_invariant_a_give_up_in_a_chat_retires_the_held_fact_and_keeps_the_rest(store, stated, given_up, kept):
    chat(store, "g", stated, given_up)
    assert held(store, "g") == kept


def test_a_preference_of_one_drink_to_another_these_days_replaces_the_other(store):
    assert facts("I prefer tea to coffee these days.") == ["~likes=tea"]
    assert facts("I prefer tea to coffee.") == ["likes=tea"]
    chat(store, "p", "I drink coffee every morning.", "I prefer tea to coffee these days.")
    assert held(store, "p") == [("likes", "tea")]


@pytest.mark.parametrize("message, expected", [
    ('I like "jazz".', ["likes=jazz"]),
    ('I like "jazz" and "rock".', ["likes=jazz", "likes=rock"]),
    ('He said "I love jazz".', []),
    ('She yelled "I am vegan" at me.', []),
])
def test_invariant_a_name_in_quotes_is_the_thing_and_quoted_speech_stays_out(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", ["I drink coffee at 7:30.", "I drink coffee at 7:30 am.", "I drink coffee at 16:00."])
def test_invariant_a_clock_time_is_no_part_of_the_value(message):
    assert facts(message) == ["likes=coffee"]


@pytest.mark.parametrize("message, previous, expected", [
    ("Forget what I said about being a chef.", "I live in Lyon.", []),
    ("Forget what I said about being a chef, I'm a pilot.", "I live in Lyon.", ["job=pilot"]),
    ("I'm a chef. Forget what I said about Lyon.", None, ["job=chef"]),
    ("Forget what I said about my job.", None, ["-job="]),
])
def test_invariant_a_named_withdrawal_of_nothing_said_withdraws_nothing_else(message, previous, expected):
    assert facts(message, previous=previous) == expected
