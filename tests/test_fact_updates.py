"""The store's update rules for what replaces or retires what (issue 25's learning loop, testers' conversations):
a retirement names a held value another way ("jazz" for "jazz music"), a like stated as a change replaces the
held like of its kind, and a negated allergy never becomes an allergy. Through learn_from_chat, as `serve` learns."""
import pytest

from localpers import names
from localpers.personalize.detect import StatedFact, detect_facts, kind_of, merge_preferences
from localpers.serve.learn import learn_from_chat, learn_from_text
from localpers.store.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as s:
        yield s


def say(store, user, *texts):
    learned = None
    for text in texts:
        learned = learn_from_chat(store, user, [{"role": "user", "content": text}])
    return learned


def held(store, user):
    return sorted((f["attribute"], f["value"]) for f in store.facts(user))


# ---------------------------------------------------------------- a retirement said another way

@pytest.mark.parametrize("stated, retired", [
    ("I love jazz music.", "I don't like jazz anymore."),
    ("I love jazz.", "I don't like jazz music anymore."),
    ("I love Italian food.", "I don't like Italian cuisine anymore."),
    ("I love Italian food.", "I no longer like Italian."),
    ("I love horror movies.", "I don't like horror anymore."),
    ("I have a peanut allergy.", "I'm not allergic to peanuts anymore."),
    ("I'm allergic to peanuts.", "I don't have a peanut allergy."),
])
def test_invariant_a_retirement_retires_the_held_value_with_or_without_its_head_noun_or_plural(store, stated, retired):
    [fact] = say(store, "ret", stated)["facts"]
    learned = say(store, "ret", retired)
    assert [f["id"] for f in learned["retired"]] == [fact["id"]] and held(store, "ret") == []


@pytest.mark.parametrize("stated, retired", [
    ("I like jazz dancing.", "I don't like jazz anymore."),
    ("I like rock climbing.", "I don't like rock anymore."),
    ("I love Italian food.", "I don't like Italian movies anymore."),
    ("I hate jazz music.", "I don't like jazz anymore."),   # a dislike is not a like
])
def test_invariant_a_shared_word_or_another_head_retires_nothing(store, stated, retired):
    say(store, "kept", stated)
    before = held(store, "kept")
    assert say(store, "kept", retired)["retired"] == [] and held(store, "kept") == before


# ---------------------------------------------------------------- a like stated as a change

@pytest.mark.parametrize("change", [
    "Actually I prefer rock now.", "Actually, I prefer rock.", "I like rock instead.", "These days I'm into rock.",
    "I listen to rock music now.",
])
def test_invariant_a_like_stated_as_a_change_replaces_the_held_like_of_its_kind(store, change):
    [jazz] = say(store, "chg", "I love jazz music.")["facts"]
    say(store, "chg", "I live in Oslo.", "I love sushi.")
    learned = say(store, "chg", change)
    assert learned["replaced"] == [{"id": jazz["id"], "attribute": "likes"}]
    assert [a for a, _ in held(store, "chg")] == ["home", "likes", "likes"]
    assert ("likes", "sushi") in held(store, "chg") and not any("jazz" in v for _, v in held(store, "chg"))


@pytest.mark.parametrize("first, then, kept", [
    ("I love jazz music.", "I also like rock.", [("likes", "jazz music"), ("likes", "rock")]),
    ("I love jazz music.", "I like rock now too.", [("likes", "jazz music"), ("likes", "rock")]),
    ("I love jazz music.", "I like rock.", [("likes", "jazz music"), ("likes", "rock")]),
    # a kind nobody listed: nothing is dropped on a guess
    ("I love knitting.", "Actually I prefer crochet now.", [("likes", "crochet"), ("likes", "knitting")]),
    # another kind: a cuisine does not replace a music genre
    ("I love jazz.", "I prefer Thai food these days.", [("likes", "Thai food"), ("likes", "jazz")]),
    # a held dislike of the kind is no like
    ("I hate jazz.", "Actually I prefer rock now.", [("dislikes", "jazz"), ("likes", "rock")]),
])
def test_invariant_an_added_like_or_one_of_no_known_kind_keeps_every_held_like(store, first, then, kept):
    say(store, "add", first)
    learned = say(store, "add", then)
    assert learned["replaced"] == [] and held(store, "add") == kept


def test_a_change_and_the_like_it_replaces_in_one_message_keep_the_change():
    assert [(f.attribute, f.value) for f in detect_facts("I love jazz music. Actually I prefer rock now.")] == [
        ("likes", "rock")]
    assert merge_preferences(["I love jazz music.", "I live in Oslo."], ["Actually I prefer rock now."]) == [
        "I live in Oslo.", "Actually I prefer rock now."]
    assert merge_preferences(["I love jazz music."], ["I don't like jazz anymore."]) == []
    assert merge_preferences(["I like jazz dancing."], ["I don't like jazz anymore."]) == ["I like jazz dancing."]


def test_the_kinds_lexicon_is_read_from_the_package_data():
    assert (kind_of("rock"), kind_of("rock music"), kind_of("italian food"), kind_of("tea")) == (
        "music genre", "music genre", "cuisine", "drink")
    assert kind_of("rock climbing") == "sport" and kind_of("jazz dancing") is None and kind_of("knitting") is None
    assert StatedFact("likes", "knitting", "I like knitting.", change=True).supersedes == ()
    assert StatedFact("likes", "rock", "I like rock.").supersedes == ()   # no change: replaces nothing


# ---------------------------------------------------------------- a negated allergy

@pytest.mark.parametrize("text", [
    "I'm not allergic to peanuts.", "I am not allergic to peanuts.", "I'm NOT allergic to peanuts!",
    "I don't have a peanut allergy.", "I'm not lactose intolerant.",
])
def test_invariant_a_negated_allergy_is_never_held_nor_learned_as_an_allergy(store, text):
    assert all(f.retire for f in detect_facts(text))
    learned = say(store, "nut", text)
    assert (learned["facts"], learned["replaced"]) == ([], [])
    assert held(store, "nut") == [] and store.items("nut", kind=names.PREFERENCE) == []
    learn_from_text(store, "nut2", text)
    assert held(store, "nut2") == []
    say(store, "nut3", "I'm allergic to peanuts.", "I'm lactose intolerant.")
    say(store, "nut3", text)
    assert len(held(store, "nut3")) == 1 and all(a == "allergy" for a, _ in held(store, "nut3"))
    assert not any(detect_facts(text)[0].key in {v.lower(), v.lower().rstrip("s")} for _, v in held(store, "nut3"))


def test_invariant_a_like_replaced_or_retired_by_another_name_is_not_retrieved(store):
    """The message of a like that a change replaced, or a retirement named another way, is marked superseded, so
    retrieval no longer quotes it (compose.still_held); the change and the retirement themselves are."""
    from localpers.serve.compose import served_user

    def retrieved(user, question):
        return [text for _, text in served_user(store, user, "sha").search(question, 4)]

    say(store, "rj", "I love jazz music.", "Actually I prefer rock music now.")
    found = retrieved("rj", "Do I like jazz music or rock music?")
    assert "I love jazz music." not in found and "Actually I prefer rock music now." in found
    say(store, "rk", "I love jazz music.", "I don't like jazz anymore.")
    assert retrieved("rk", "Do I like jazz music?") == ["I don't like jazz anymore."]
    say(store, "rl", "I like jazz dancing.", "I don't like jazz anymore.")
    assert "I like jazz dancing." in retrieved("rl", "Do I like jazz dancing?")


@pytest.mark.parametrize("text", ["I quit my job.", "I lost my job last month.", "I got laid off from my job."])
def test_invariant_leaving_ones_job_retires_the_held_job_whatever_it_is_and_keeps_the_rest(store, text):
    say(store, "quit", "I'm a nurse.", "I work at St. Mary's Hospital.", "I live in Oslo.")
    learned = say(store, "quit", text)
    assert [f["attribute"] for f in learned["retired"]] == ["job"] and learned["facts"] == []
    assert [a for a, _ in held(store, "quit")] == ["employer", "home"]


@pytest.mark.parametrize("added, change", [
    ("I also like rock.", "Actually I prefer rock now."),
    ("I like rock music too.", "These days I'm into rock music."),
    ("I love rock.", "I listen to rock instead."),
])
def test_invariant_a_change_to_a_like_held_already_still_replaces_the_held_likes_of_its_kind(store, added, change):
    [jazz] = say(store, "again", "I love jazz music.")["facts"]
    say(store, "again", "I love sushi.", added)
    before = [f["id"] for f in store.facts("again") if "rock" in f["value"]]
    learned = say(store, "again", change)
    assert learned["replaced"] == [{"id": jazz["id"], "attribute": "likes"}] and learned["facts"] == []
    assert [f["id"] for f in store.facts("again") if "rock" in f["value"]] == before   # not stored again
    assert not any("jazz" in v for _, v in held(store, "again")) and ("likes", "sushi") in held(store, "again")


@pytest.mark.parametrize("stated, retired", [
    ("I love rock.", "I'm no longer into rock."),
    ("I love rock.", "I'm no longer a fan of rock music."),
    ("I love tennis.", "I'm not into tennis anymore."),
    ("I'm a nurse.", "I was a nurse until last year."),
])
def test_invariant_a_like_or_state_said_to_be_over_retires_the_held_fact_and_adds_no_dislike(store, stated, retired):
    say(store, "over", "I live in Oslo.")
    say(store, "over", stated)
    learned = say(store, "over", retired)
    assert len(learned["retired"]) == 1 and learned["facts"] == [] and held(store, "over") == [("home", "Oslo")]


def test_a_subjectless_end_of_a_like_retires_it_and_adds_the_new_one(store):
    say(store, "sub", "I love tennis.")
    say(store, "sub", "Not into tennis anymore, I play football now.")
    assert held(store, "sub") == [("likes", "football")]
