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


# ---------------------------------------------------------------- third round: values, lists, withdrawals

def test_a_drink_said_with_how_often_is_replaced_by_a_change_of_drink(store):
    """"I drink coffee every morning." holds the drink coffee, so "These days I mostly drink tea." replaces it."""
    [coffee] = say(store, "cup", "I drink coffee every morning.")["facts"]
    assert held(store, "cup") == [("likes", "coffee")]
    learned = say(store, "cup", "These days I mostly drink tea.")
    assert learned["replaced"] == [coffee] and held(store, "cup") == [("likes", "tea")]


def test_invariant_each_thing_of_a_listed_like_is_replaced_or_retired_alone(store):
    italian, jazz = say(store, "two", "I love Italian food and jazz music.")["facts"]
    assert held(store, "two") == [("likes", "Italian food"), ("likes", "jazz music")]
    assert [f["statement"] for f in store.facts("two")] == ["I love Italian food.", "I love jazz music."]
    assert say(store, "two", "I don't like jazz anymore.")["retired"] == [jazz]
    assert held(store, "two") == [("likes", "Italian food")]
    assert say(store, "two", "I prefer Thai food these days.")["replaced"] == [italian]
    assert held(store, "two") == [("likes", "Thai food")]


def conversation(*turns):
    """The messages a client sends after `turns` (user messages, an assistant reply after each but the last)."""
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "Noted."}]
    return messages[:-1]


def chat(store, user, *turns):
    """Each turn sent as clients send it: the whole conversation so far. The last turn's learn_from_chat dict."""
    return [learn_from_chat(store, user, conversation(*turns[:n])) for n in range(1, len(turns) + 1)][-1]


@pytest.mark.parametrize("withdrawal", [
    "Oops, ignore that.", "Scratch that.", "Forget what I just said.", "Never mind, I don't live in Paris.",
    "Ignore my last message.", "Sorry! Scratch that.",
])
def test_invariant_a_withdrawal_retires_what_the_users_turn_before_taught_as_a_retirement_does(store, withdrawal):
    """Through the store's retire path: the fact goes, the message it was learned from is marked (retrieval stops
    quoting it), the edit job is queued; the older turn's fact stays."""
    chat(store, "w", "I'm vegan.", "I live in Paris.")
    paris = next(f for f in store.facts("w") if f["attribute"] == "home")
    while job := store.claim_job():   # the edits of what was stated ran
        store.finish_job(job["id"], names.DONE)
    learned = chat(store, "w", "I'm vegan.", "I live in Paris.", withdrawal)
    assert learned["retired"] == [{"id": paris["id"], "attribute": "home"}] and learned["facts"] == []
    assert held(store, "w") == [("diet", "vegan")]
    marked = {i["text"]: i["meta"].get(names.SUPERSEDED_BY) for i in store.items("w", kind="message")}
    assert marked["I live in Paris."] == learned["messages"][0] and marked["I'm vegan."] is None
    queued = [j["kind"] for j in store.jobs("w") if j["state"] == names.QUEUED]
    assert queued == [names.EDIT]


def test_invariant_a_withdrawal_withdraws_nothing_but_the_users_turn_before(store):
    # an older turn: only the turn before goes
    chat(store, "old", "I live in Paris.", "I love jazz.", "Scratch that.")
    assert held(store, "old") == [("home", "Paris")]
    # a fact the turn before only restated was learned from an older turn: it stays
    chat(store, "again", "I live in Paris.", "What's the weather like?", "I live in Paris.", "Scratch that.")
    assert held(store, "again") == [("home", "Paris")]
    # another conversation: its turn is not this one's turn before
    chat(store, "conv", "I live in Paris.")
    assert chat(store, "conv", "Scratch that.")["retired"] == []
    chat(store, "conv", "I love jazz.")
    chat(store, "conv", "I live in Paris.", "Scratch that.")   # conversation one, continued
    assert held(store, "conv") == [("likes", "jazz")]
    # another participant's message in between: the user's own turn before
    group = [{"role": "user", "name": "cara", "content": "I live in Lyon."},
             {"role": "user", "name": "bob", "content": "I love jazz."},
             {"role": "user", "name": "cara", "content": "Scratch that."}]
    learn_from_chat(store, "cara", group[:2])
    assert learn_from_chat(store, "cara", group)["retired"] and held(store, "cara") == []
    # a turn before that stated nothing: nothing
    assert chat(store, "none", "I'm vegan.", "What should I cook?", "Oops, ignore that.")["retired"] == []
    assert held(store, "none") == [("diet", "vegan")]


def test_a_withdrawal_in_the_same_request_or_in_posted_messages_withdraws_the_turn_before(store):
    learned = learn_from_chat(store, "one", conversation("I'm vegan.", "I live in Paris.", "Oops, ignore that."))
    assert held(store, "one") == [("diet", "vegan")] and len(learned["retired"]) == 1
    from localpers.serve.learn import learn_from_messages
    learn_from_messages(store, "posted", ["I'm vegan.", "I live in Paris.", "Forget what I just said."])
    assert held(store, "posted") == [("diet", "vegan")]


def test_a_store_made_before_chat_seen_kept_item_ids_is_migrated_and_withdraws_nothing_it_cannot_find(tmp_path):
    import sqlite3

    with Store.open(tmp_path) as s:
        learn_from_chat(s, "mig", conversation("I live in Paris."))
    db = sqlite3.connect(tmp_path / "localpers.db")
    db.executescript("CREATE TABLE old (user_id INTEGER NOT NULL, digest BLOB NOT NULL, PRIMARY KEY (user_id, digest));"
                     "INSERT INTO old SELECT user_id, digest FROM chat_seen; DROP TABLE chat_seen;"
                     "ALTER TABLE old RENAME TO chat_seen;")   # chat_seen as it was made before its item column
    db.close()
    with Store.open(tmp_path) as s:
        assert chat(s, "mig", "I live in Paris.", "Scratch that.")["retired"] == []   # its item is unknown
        assert held(s, "mig") == [("home", "Paris")]
        assert chat(s, "mig", "I live in Paris.", "Scratch that.", "I love jazz.", "Scratch that.")["retired"]
        assert held(s, "mig") == [("home", "Paris")]


@pytest.mark.parametrize("first, then, kept", [
    ("I drink coffee every morning.", "I switched from coffee to tea.", [("likes", "tea")]),
    ("I drink coffee every morning.", "I gave up coffee, I drink tea now.", [("likes", "tea")]),
    ("I drink coffee.", "Lately I've been drinking tea.", [("likes", "tea")]),
    ("I drink coffee.", "I stopped drinking coffee.", []),
    ("I love jazz music.", "I'm not into jazz anymore but I love rock.", [("likes", "rock")]),
    ("I love jazz music.", "Jazz isn't my thing anymore, I prefer rock.", [("likes", "rock")]),
    ("I love jazz music.", "Not a jazz fan anymore, I love rock now.", [("likes", "rock")]),
])
def test_invariant_a_compound_change_leaves_the_new_like_and_the_rest(store, first, then, kept):
    say(store, "cc", "I live in Oslo.", first)
    say(store, "cc", then)
    assert held(store, "cc") == [("home", "Oslo"), *kept]


@pytest.mark.parametrize("existing, new, merged", [
    (["I love Italian food and jazz music."], ["I don't like jazz music anymore."], ["I love Italian food."]),
    (["I love Italian food and jazz music."], ["I hate jazz music."], ["I love Italian food.", "I hate jazz music."]),
    (["I love Italian food and jazz music."], ["I love Italian food."], ["I love jazz music.", "I love Italian food."]),
    (["I love Italian food and jazz music.", "I live in Oslo."], ["Actually I prefer rock now."],
     ["I love Italian food.", "I live in Oslo.", "Actually I prefer rock now."]),
    (["I'm vegan and I live in Oslo."], ["I live in Paris."], ["I'm vegan.", "I live in Paris."]),
    (["I'm vegan and I live in Oslo."], ["I love jazz."], ["I'm vegan and I live in Oslo.", "I love jazz."]),
    (["I live in Oslo."], ["I don't live in Paris anymore."], ["I live in Oslo."]),
])
def test_invariant_merge_replaces_or_retires_each_fact_of_a_statement_alone(existing, new, merged):
    """A statement of several facts (a listed like, two clauses) is keyed by each of them: a later statement that
    replaces or retires one leaves the others, each as its own sentence; one of another value retires nothing."""
    assert merge_preferences(existing, new) == merged


def test_invariant_when_or_where_one_works_keeps_the_held_employer(store):
    say(store, "w", "I work at Google.", "I work at night.", "I work at home.", "I work for a living.")
    assert ("employer", "Google") in held(store, "w") and [a for a, _ in held(store, "w")].count("employer") == 1


def test_invariant_each_item_of_a_comma_list_is_held_and_retired_alone(store):
    say(store, "l", "I love jazz music, Italian food, and hiking.")
    assert held(store, "l") == [("likes", "Italian food"), ("likes", "hiking"), ("likes", "jazz music")]
    say(store, "l", "I don't like hiking anymore.")
    assert held(store, "l") == [("likes", "Italian food"), ("likes", "jazz music")]
    say(store, "l", "I gave up jazz for rock.")
    assert held(store, "l") == [("likes", "Italian food"), ("likes", "rock")]


def test_invariant_each_listed_allergy_is_held_and_retired_alone(store):
    say(store, "a", "im allergic to nuts, eggs and milk")
    assert held(store, "a") == [("allergy", "eggs"), ("allergy", "milk"), ("allergy", "nuts")]
    say(store, "a", "I'm not allergic to eggs anymore.")
    assert held(store, "a") == [("allergy", "milk"), ("allergy", "nuts")]


# ---------------------------------------------------------------- a withdrawal restores what the turn replaced

def test_invariant_a_withdrawal_restores_what_the_withdrawn_turn_replaced_from_its_message(store):
    """"I moved to Paris." (replacing "I live in Lyon.") then "Oops, ignore that." left no home: the fact the
    withdrawn turn replaced is learned again from its own message (kept, marked, now unmarked), its edit queued;
    the withdrawn turn's message stays marked."""
    lyon = chat(store, "mo", "I live in Lyon.")["messages"][0]
    moved = chat(store, "mo", "I live in Lyon.", "I moved to Paris.")
    while job := store.claim_job():
        store.finish_job(job["id"], names.DONE)
    learned = chat(store, "mo", "I live in Lyon.", "I moved to Paris.", "Oops, ignore that.")
    assert held(store, "mo") == [("home", "Lyon")] and len(learned["retired"]) == 1
    [fact] = store.facts("mo")
    assert learned["facts"] == [{"id": fact["id"], "attribute": "home"}] and fact["message"] == lyon
    assert fact["statement"] == "I live in Lyon."
    marked = {i["id"]: i["meta"].get(names.SUPERSEDED_BY) for i in store.items("mo", kind="message")}
    assert marked[lyon] is None and marked[moved["messages"][0]] == learned["messages"][0]
    assert [j["kind"] for j in store.jobs("mo") if j["state"] == names.QUEUED] == [names.EDIT]


def test_invariant_a_withdrawal_restores_only_what_that_turn_replaced_and_nothing_since_changed(store):
    # a message deleted since: nothing to learn again
    lyon = chat(store, "gone", "I live in Lyon.")["messages"][0]
    chat(store, "gone", "I live in Lyon.", "I moved to Paris.")
    store.delete_item("gone", lyon)
    chat(store, "gone", "I live in Lyon.", "I moved to Paris.", "Oops, ignore that.")
    assert held(store, "gone") == []
    # only the slots the withdrawn turn changed: the diet another turn retired stays retired, the message marked
    vegan = chat(store, "part", "I'm vegan and I live in Lyon.")["messages"][0]
    say(store, "part", "I'm not vegan anymore.")
    chat(store, "part", "I'm vegan and I live in Lyon.", "I moved to Paris.", "Scratch that.")
    assert held(store, "part") == [("home", "Lyon")]
    assert next(i for i in store.items("part") if i["id"] == vegan)["meta"][names.SUPERSEDED_BY] is not None
    # the slot holds something said since (another conversation): it stays
    chat(store, "since", "I live in Lyon.", "I moved to Paris.")
    say(store, "since", "I live in Berlin.")
    chat(store, "since", "I live in Lyon.", "I moved to Paris.", "Scratch that.")
    assert held(store, "since") == [("home", "Berlin")]
    # the withdrawal says what holds instead
    chat(store, "rome", "I live in Lyon.", "I moved to Paris.", "Scratch that, I live in Rome.")
    assert held(store, "rome") == [("home", "Rome")]
    # a turn that replaced nothing: nothing comes back
    chat(store, "none", "I live in Paris.", "Oops, ignore that.")
    assert held(store, "none") == []


def test_invariant_a_withdrawn_retirement_learns_the_retired_fact_again(store):
    """"I'm not vegetarian anymore." then "Just kidding.": the retired diet is learned again from its message.
    The detector states the withdrawal of a retirement as a withdrawal fact of its slot (a fake here)."""
    said = {"I'm vegetarian.": [StatedFact("diet", "vegetarian", "I'm vegetarian.")],
            "I'm not vegetarian anymore.": [StatedFact("diet", "vegetarian", "I'm not vegetarian anymore.", retire=True)],
            "Just kidding.": [StatedFact("diet", "vegetarian", "I'm not vegetarian anymore.", retire=True,
                                         withdrawal=True)]}
    extract = lambda text, limit, previous: said[text] if text != "Just kidding." or previous else []
    store.learn_texts("veg", ["I'm vegetarian.", "I'm not vegetarian anymore."], extract)
    assert held(store, "veg") == []
    learned = store.learn_texts("veg2", ["I'm vegetarian.", "I'm not vegetarian anymore.", "Just kidding."], extract)
    assert held(store, "veg2") == [("diet", "vegetarian")] and learned["facts"][-1]["attribute"] == "diet"
    [fact] = store.facts("veg2")
    assert fact["message"] == learned["messages"][0]


def test_a_withdrawn_retirement_in_chat_learns_the_diet_again(store):
    """The tester's case end to end: "I'm not vegetarian anymore." then "Just kidding." left no diet."""
    chat(store, "pat", "I'm vegetarian.", "I'm not vegetarian anymore.", "Just kidding.")
    assert held(store, "pat") == [("diet", "vegetarian")]


def test_invariant_a_withdrawn_retirement_is_no_longer_quoted_once_the_fact_is_held_again(store):
    """After "I'm not vegetarian anymore." + "Just kidding." the diet is held again, so retrieval must not put the
    retirement beside it (compose.still_held kept every retirement sentence); one of a fact not held stays."""
    from localpers.serve.compose import served_user

    chat(store, "pat2", "I'm vegetarian.", "I'm not vegetarian anymore.", "Just kidding.")
    assert held(store, "pat2") == [("diet", "vegetarian")]
    found = [text for _, text in served_user(store, "pat2", "sha").search("Am I vegetarian?", 4)]
    assert "I'm not vegetarian anymore." not in found and "I'm vegetarian." in found
    chat(store, "pat3", "I'm vegan.", "I'm not vegan anymore.")
    found = [text for _, text in served_user(store, "pat3", "sha").search("Am I vegan?", 4)]
    assert "I'm not vegan anymore." in found


def test_a_like_preferred_to_the_held_one_these_days_replaces_it(store):
    """"I'm more into rock than jazz these days." with jazz held: rock is the change, jazz is gone."""
    say(store, "more", "I live in Oslo.", "I love jazz.")
    learned = say(store, "more", "I'm more into rock than jazz these days.")
    assert [r["attribute"] for r in learned["replaced"]] == ["likes"]
    assert held(store, "more") == [("home", "Oslo"), ("likes", "rock")]
