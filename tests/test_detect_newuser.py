"""The fact detector on what a new-user tester typed (localpers.personalize.detect.detect_facts): moving, retractions
(also of the previous chat turn), the diet beside restrictions and intolerances, compound and "we" statements,
and values (case, a place with its region, emoji, British spelling, a later statement of the same thing). Learned
through the store's facts index where the outcome depends on it. No model files."""
import pytest

from localpers import names
from localpers.personalize.detect import detect_facts, norm_value
from localpers.serve.learn import learn_from_chat
from localpers.store.store import Store


def facts(text, previous=None):
    return [("-" if f.retire else "") + f"{f.attribute}={f.key}" for f in detect_facts(text, previous=previous)]


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as s:
        yield s


def current(store, user):
    return {f["attribute"]: f["value"] for f in store.facts(user)}


def chat(store, user, *turns):
    """Each turn as the client sends it: the whole conversation so far (user turns, assistant replies between)."""
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn}]
        learn_from_chat(store, user, messages)
        messages += [{"role": "assistant", "content": "Noted."}]


# ---------------------------------------------------------------- 1. moving

@pytest.mark.parametrize("message", [
    "I moved from Lyon to Paris.", "I moved from Lyon to Paris last year.", "I moved to Paris two years ago.",
    "Last year I moved from Lyon to Paris.", "We moved from Lyon to Paris.", "I moved to Paris from Lyon.", "I relocated from Lyon to Paris in 2021.", "I moved to Paris.",
    "I live in Paris now.", "I moved from Lyon to Paris to be with my wife.",
])
def test_invariant_a_move_states_the_new_home_only(message):
    assert facts(message) == ["home=paris"]


def test_moving_away_without_a_destination_retires_the_home():
    assert facts("I moved away from Lyon.") == ["-home=lyon"] and facts("I moved here from Lyon.") == ["-home=lyon"]


def test_a_move_from_the_held_home_replaces_it(store):
    chat(store, "mo", "I live in Lyon.", "I moved from Lyon to Paris last year.")
    assert current(store, "mo") == {"home": "Paris"}


# ---------------------------------------------------------------- 2. retractions

def test_just_kidding_as_the_next_turn_retires_what_the_previous_turn_stated(store):
    assert facts("Just kidding, I'm not.", previous="I'm vegetarian.") == ["-diet=vegetarian"]
    chat(store, "jk", "I live in Lyon.", "I'm vegetarian.", "Just kidding, I'm not.")
    assert current(store, "jk") == {"home": "Lyon"}


def test_a_retraction_without_a_previous_turn_states_nothing():
    assert facts("Just kidding, I'm not.") == [] and facts("Scratch that.") == []


@pytest.mark.parametrize("message, previous", [
    ("Never mind, I'll order pizza.", "I'm vegetarian, what should I cook?"),  # withdraws the question
    ("Not really.", "I'm vegetarian."),  # may answer the assistant
    ("Wait, no.", "I live in Lyon."),
])
def test_invariant_only_a_plain_withdrawal_retires_the_previous_turn(message, previous):
    assert facts(message, previous=previous) == []


def test_just_kidding_withdraws_every_fact_of_the_previous_turn():
    assert facts("Just kidding.", previous="I'm vegetarian and I live in Lyon.") == ["-diet=vegetarian", "-home=lyon"]


@pytest.mark.parametrize("message, expected", [
    ("Scratch that, I'm not vegetarian.", ["-diet=vegetarian"]),
    ("Not true, I'm not vegetarian.", ["-diet=vegetarian"]),
    ("Forget that I'm vegetarian.", ["-diet=vegetarian"]),
    ("Please forget that I live in Lyon.", ["-home=lyon"]),
    ("Please forget where I live.", ["-home="]),
    ("Forget my name, please.", ["-name="]),
    ("Forget what I said about my job.", ["-job="]),
    ("Forget that, I'm vegan.", ["diet=vegan"]),
    ("Sorry, I meant I live in Paris.", ["home=paris"]),
    ("I live in Lyon. Wait, no: I live in Paris.", ["home=paris"]),
    ("I'm vegan. No wait, I'm vegetarian.", ["diet=vegetarian"]),
    ("I'm married. Just kidding, I'm not.", []),
])
def test_retractions_and_corrections(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("turns, held", [
    (["I'm vegetarian.", "Scratch that, I'm not vegetarian."], {}),
    (["I'm vegetarian.", "Forget that I'm vegetarian."], {}),
    (["I live in Lyon and I'm vegan.", "Please forget where I live."], {"diet": "vegan"}),
    (["I live in Lyon.", "Sorry, I meant I live in Paris."], {"home": "Paris"}),
    (["I live in Lyon. Wait, no: I live in Paris."], {"home": "Paris"}),
])
def test_retractions_leave_the_store_holding(store, turns, held):
    chat(store, "rt", *turns)
    assert current(store, "rt") == held


# ---------------------------------------------------------------- 3. diet

@pytest.mark.parametrize("message, fact", [
    ("I'm lactose intolerant.", "allergy=lactose"), ("I'm gluten-free.", "restriction=gluten free"),
    ("I'm keto.", "restriction=keto"), ("I follow a low-carb diet.", "restriction=low carb"),
    ("My diet is keto.", "restriction=keto"),
])
def test_restrictions_and_intolerances_sit_beside_the_diet(store, message, fact):
    assert facts(message) == [fact]
    chat(store, "dt", "I'm vegetarian.", message)
    assert current(store, "dt")["diet"] == "vegetarian" and len(store.facts("dt")) == 2


@pytest.mark.parametrize("message, expected", [
    ("I don't eat meat.", ["diet=no meat"]),
    ("I don't eat meat anymore.", ["diet=no meat"]),
    ("I no longer eat meat.", ["diet=no meat"]),
    ("I stopped eating meat and fish.", ["diet=no meat and fish"]),
    ("I'm vegan now, not vegetarian.", ["diet=vegan"]),
    ("I was vegetarian but now I eat fish.", ["-diet=vegetarian", "likes=fish"]),
    ("I eat meat now.", ["diet=meat"]),
    ("I don't eat pork.", ["dislikes=pork"]),
])
def test_diet_statements(message, expected):
    assert facts(message) == expected


def test_invariant_restrictions_are_several(store):
    chat(store, "rs", "I'm vegetarian.", "I'm keto.", "I'm gluten-free.", "I'm not keto anymore.")
    assert sorted((f["attribute"], f["value"]) for f in store.facts("rs")) == \
        [("diet", "vegetarian"), ("restriction", "gluten-free")]


def test_no_longer_eating_meat_replaces_the_meat_eaters_diet(store):
    chat(store, "nm", "I eat meat.", "I don't eat meat anymore.")
    assert current(store, "nm") == {"diet": "no meat"}


def test_vegan_now_not_vegetarian_replaces_vegetarian(store):
    chat(store, "vg", "I'm vegetarian.", "I'm vegan now, not vegetarian.")
    assert current(store, "vg") == {"diet": "vegan"}


# ---------------------------------------------------------------- 4. compound, "we", "so am I"

@pytest.mark.parametrize("message, statements", [
    ("I'm vegetarian and I live in Oslo.", ["I'm vegetarian.", "I live in Oslo."]),
    ("IM VEGETARIAN", ["I'm vegetarian."]),
    ("i'm vegan and i live in oslo", ["I'm vegan.", "I live in Oslo."]),
    ("We live in Paris.", ["I live in Paris."]),
    ("My wife is vegetarian and so am I.", ["I'm vegetarian."]),
    ("I'm vegetarian 🥦", ["I'm vegetarian."]),
])
def test_invariant_each_fact_carries_a_clean_first_person_sentence(message, statements):
    found = detect_facts(message)
    assert [f.statement for f in found] == statements
    for statement in statements:  # what editing is given: a sentence that states the same fact on its own
        again = detect_facts(statement)
        assert [(f.attribute, f.key) for f in again] == [(f.attribute, f.key) for f in found
                                                         if f.statement == statement]


@pytest.mark.parametrize("message, expected", [
    ("We live in Paris.", ["home=paris"]),
    ("We moved to Paris last year.", ["home=paris"]),
    ("We're vegetarian.", ["diet=vegetarian"]),
    ("We are vegans.", ["diet=vegan"]),
    ("We both live in Paris.", ["home=paris"]),
    ("We're all vegetarian and we live in Oslo.", ["diet=vegetarian", "home=oslo"]),
    ("My wife is vegetarian and so am I.", ["diet=vegetarian"]),
    ("My brother loves jazz and I do too.", ["likes=jazz"]),
    ("My wife lives in Paris and so do I.", ["home=paris"]),
])
def test_statements_true_of_the_speaker_too(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", [
    "My sister is vegan.", "My sister is vegan but I'm not.", "They live in Rome.",
    "We're a small company based in Berlin.", "We are looking for a new office.",
    "My brother lives in Rome and so does my sister.", "My mum is vegetarian \U0001F955",
])
def test_invariant_third_party_statements_give_nothing_for_the_user(message):
    assert [f for f in detect_facts(message) if not f.retire] == []


# ---------------------------------------------------------------- 5. values

@pytest.mark.parametrize("message, attribute, value", [
    ("IM VEGETARIAN", "diet", "vegetarian"), ("I'm Vegan.", "diet", "vegan"),
    ("I LIVE IN BERLIN", "home", "Berlin"), ("i live in new york city", "home", "New York City"),
    ("I live in Paris, Texas.", "home", "Paris, Texas"), ("I'm from Springfield, Illinois.", "origin",
                                                           "Springfield, Illinois"),
    ("I live in Bristol, not Bath.", "home", "Bristol"), ("i live in a small town", "home", "a small town"),
    ("I work at a hospital.", "employer", "hospital"), ("i speak french", "language", "French"), ("I'm vegetarian 🥦", "diet", "vegetarian"),
    ("I'm vegan \U0001F331 I live in Oslo.", "home", "Oslo"), ("I love \u2764\ufe0f jazz", "likes", "jazz"),
])
def test_values_as_kept(message, attribute, value):
    assert {f.attribute: f.value for f in detect_facts(message)}[attribute] == value


def test_invariant_british_and_american_spellings_are_one_attribute():
    [uk], [us] = detect_facts("My favourite colour is red."), detect_facts("My favorite color is blue.")
    assert uk.attribute == us.attribute == "favourite color" and uk.slot == us.slot
    assert norm_value("grey colour") == norm_value("gray color")


@pytest.mark.parametrize("message, expected", [
    ("I love sushi. I hate sushi.", ["dislikes=sushi"]),
    ("I hate sushi. Actually, I love sushi.", ["likes=sushi"]),
    ("I live in Lyon. I live in Paris.", ["home=paris"]),
    ("I love jazz. I hate rap.", ["likes=jazz", "dislikes=rap"]),
])
def test_invariant_a_later_fact_of_the_same_slot_replaces_the_earlier_one(message, expected):
    assert facts(message) == expected


def test_detection_stops_after_the_limit_even_when_facts_replace_each_other():
    message = " ".join(f"I live in Town{i}." for i in range(4095))
    assert facts(message) and [f.value for f in detect_facts(message, limit=names.MAX_FACTS_PER_MESSAGE)] == \
        [f"Town{names.MAX_FACTS_PER_MESSAGE - 1}"]
