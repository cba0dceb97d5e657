"""The served memory (methods.memory, issue 25): Personalization Editing's adapter, and for a request that should use
a preference (methods.asks_to_use) also the stated facts that bear on it; without a model."""
import pytest

from localpers import names
from localpers.personalize.methods import (Personalized, RegisteredArtifact, User, apply, asks_to_use, get_method,
                                           memory)
from localpers.serve.compose import Composer

ADAPTER = RegisteredArtifact(names.EDIT, names.LORA, "/data/edit.gguf", 7)
VERA = User("vera", preferences=("I'm vegetarian.",), registered=(ADAPTER,))


@pytest.mark.parametrize("question", [
    # requests: a preference should shape the answer, not be the answer
    "What should I cook tonight?", "Suggest a dinner for tonight.", "Any gear I should buy for my hobby?",
    "Can you recommend a book for the weekend?", "What's a good outdoor activity I could do this weekend?",
    "Give me some ideas for a date night.", "What's the best way for me to get around the city?",
    "any tips for my garden", "Recommend a podcast.", "What should we watch tonight?",
    "What do you think I should feed my little friends at home?", "Any ideas for dinner?",
    "What's a good restaurant near me?", "What are some good snacks?", "Any ideas about dinner?",
    "Any chance you could suggest a snack?",
])
def test_requests_ask_to_use_the_preference(question):
    assert asks_to_use(question)


@pytest.mark.parametrize("question", [
    # about the user: the edit states the value
    "What is my diet?", "Do I eat meat?", "Where do I live?", "What do I do for work?", "Who keeps me company at home?",
    "What kind of music do I like?", "How would you describe my family background?", "What's my hobby?",
    "Can you tell me where I live?", "Am I vegetarian?", "Any idea where I live?", "Any idea what music I like?",
    "Any clue where I live?", "Any ideas about where I live?", "any idea, where do I live?",
    "Any chance you remember my diet?",
    # neutral: no request word, no advice modal
    "What is the capital of France?", "How do I reverse a list in Python?", "Write a haiku about the sea.",
])
def test_questions_about_the_user_and_neutral_ones_do_not(question):
    assert not asks_to_use(question)


def test_invariant_memory_adds_the_facts_line_to_requests_only():
    """A question about the user: the adapter alone (with the line beside it explicit answers fell). A request
    that should use the preference: the adapter and the stated fact before the question."""
    recall = memory(VERA, "What is my diet?", None)
    assert recall.artifacts.lora == (("/data/edit.gguf", 1.0),) and recall.user_prefix == "" and not recall.system
    use = memory(VERA, "What should I cook tonight?", None)
    assert use.artifacts.lora == (("/data/edit.gguf", 1.0),) and use.user_prefix == "I'm vegetarian.\n\n"
    served = apply(use, [{"role": "user", "content": "What should I cook tonight?"}])
    assert served == [{"role": "user", "content": "I'm vegetarian.\n\nWhat should I cook tonight?"}]
    # a request the preference does not bear on: no line (no recitation on neutral requests)
    assert memory(VERA, "Suggest an opening line for a cover letter.", None).user_prefix == ""
    # a user with nothing: nothing
    assert memory(User("new", registered=()), "What should I cook tonight?", None) == Personalized()
    assert memory(User("new", registered=()), "What is my diet?", None) == Personalized()


def test_memory_composes_and_its_explanation_names_what_was_served():
    composer = Composer(f"{names.MEMORY}+{names.RAG}")
    # the facts line reads the stated preferences, for a request only (a question about the user stays O(1))
    assert composer.needs_preferences("What should I cook tonight?") and not composer.needs_preferences("Where do I live?")
    assert Composer("facts").needs_preferences("Where do I live?") and not Composer("edit+rag").needs_preferences("Any tips?")
    user = User("vera", preferences=VERA.preferences, registered=(ADAPTER,), search=lambda q, k: [(3, "I'm vegetarian.")])
    recall = composer(user, "What is my diet?", None)
    assert composer.explain(user, recall)["artifacts"] == [{"method": names.EDIT, "kind": names.LORA, "id": 7}]
    use = composer(user, "What should I cook tonight?", None)
    assert composer.explain(user, use) == {"composition": "memory+rag", "retrieved": [3],
                                           "artifacts": [{"method": names.EDIT, "kind": names.LORA, "id": 7}]}
    # with the store's ids of the preferences (a served user): the line's preferences are named, by id
    user = User("vera", preferences=("I love jazz.", "I'm vegetarian."), preference_ids=(11, 12), registered=(ADAPTER,))
    assert composer.explain(user, composer(user, "What should I cook tonight?", None))["stated"] == [12]
    assert "stated" not in composer.explain(user, composer(user, "What is my diet?", None))
    assert use.user_prefix.startswith("I'm vegetarian.\n\n<history")
    assert get_method(names.MEMORY) is memory


def test_a_part_composed_twice_is_given_once():
    """`memory+facts` (a tester's spec): the stated-facts line once, not twice."""
    user = User("vera", preferences=VERA.preferences, registered=(ADAPTER,))
    both = get_method(f"{names.MEMORY}+{names.FACTS}")(user, "What should I cook tonight?", None)
    assert both.user_prefix == "I'm vegetarian.\n\n" and both.artifacts.lora == (("/data/edit.gguf", 1.0),)
    assert get_method("prompt+prompt")(user, "Hi", None).system.count("vegetarian") == 1


@pytest.mark.parametrize("statement, attribute", [
    # a tester's cases: "i'm a" inside "I'm allergic" made an allergy a profession, and "I'm a vegetarian." tied
    ("I'm allergic to peanuts.", "food preference"), ("I'm a vegetarian.", "food preference"),
    ("I'm lactose intolerant.", "food preference"), ("I'm a nurse.", "profession"), ("I am a teacher.", "profession"),
    ("I work as a teacher.", "job"), ("I love cooking.", "food preference"), ("I'm vegetarian.", "food preference"),
])
def test_attribute_keywords_match_at_word_starts_and_lead_ins_count_half(statement, attribute):
    from localpers.personalize.editing import detect_attribute

    assert detect_attribute(statement) == attribute


def test_an_allergy_reaches_food_requests_and_not_questions_about_work():
    from localpers.personalize.editing import pick_route
    from localpers.personalize.methods import relevant_facts

    facts = ("I'm allergic to peanuts.", "I live in Lisbon.")
    assert relevant_facts(facts, "What should I cook tonight?") == ["I'm allergic to peanuts."]
    assert relevant_facts(facts, "Any ideas for dinner?") == ["I'm allergic to peanuts."]
    from localpers.personalize.editing import facts_of, route_words

    routes = [(f"fact-{i}.gguf", route_words(f)) for i, f in enumerate(facts_of(list(facts), []))]
    assert pick_route(routes, "What do I do for a living?") is None


def test_invariant_food_and_music_requests_in_other_words_reach_the_facts_they_bear_on():
    """A tester's requests ("Suggest a snack for me.", "Recommend me an album.") reached no fact: the food and
    music words hold snacks, desserts, gluten, albums, concerts and playlists."""
    from localpers.personalize.methods import asks_to_use, relevant_facts

    facts = ("I'm allergic to peanuts.", "I'm gluten-free.", "I love techno.", "I live in Lisbon.")
    for request in ("Suggest a snack for me.", "Can you recommend a dessert?", "What should I cook tonight?"):
        assert asks_to_use(request), request
        assert relevant_facts(facts, request) == ["I'm allergic to peanuts.", "I'm gluten-free."], request
    for request in ("Recommend me an album.", "Recommend a concert for me this weekend.",
                    "Make me a playlist for the gym."):
        assert asks_to_use(request), request
        assert relevant_facts(facts, request) == ["I love techno."], request


def test_a_request_naming_a_type_in_its_own_words_reaches_the_fact_of_that_type():
    """The table's type words (editing.TYPE_WORDS) index a preference too: "cuisine" reaches a food fact, "hobby" a
    violin (a statement no keyword types), and neither reaches the music fact through a verb."""
    from localpers.personalize.methods import relevant_facts

    facts = ("I like Thai food.", "I love jazz music.", "I play the violin.", "I live in Paris.")
    assert relevant_facts(facts, "Which cuisine should I try tonight?") == ["I like Thai food."]
    assert relevant_facts(facts, "Can you recommend a hobby for me?") == ["I play the violin."]
    assert relevant_facts(facts, "What is the capital of France?") == []


def test_the_facts_line_is_the_users_own_words_in_the_evaluation_and_served_alike():
    """The line is the user's statement said again before the question, not "About me: ..." (the 135M model took
    that for its own identity: "as a vegetarian, I'm not equipped ...", a tester's chat); the evaluation's `facts`
    and the served `memory` give the same text."""
    from localpers.personalize.methods import facts, facts_prefix, memory

    user = User("ann", preferences=("I'm vegetarian.", "I live in Lyon."), registered=())
    line = facts(user, "What should I cook tonight?", None).user_prefix
    assert line == facts_prefix(["I'm vegetarian."]) == "I'm vegetarian.\n\n"
    assert memory(user, "What should I cook tonight?", None).user_prefix == line
    assert facts_prefix([]) == ""


@pytest.mark.slow
def test_the_assistant_does_not_take_the_stated_fact_for_its_own_on_the_default_model(default_model_path):
    """A tester's case on the real engine: with the line before "What should I cook tonight?" or "What should I
    order at a restaurant?" the reply does not speak as a vegetarian ("as a vegetarian AI, I'm designed ..." after
    "About me: I'm vegetarian.")."""
    import re

    from localpers.engine.engine import Engine
    from localpers.personalize.methods import facts_prefix

    engine = Engine(default_model_path, n_ctx=512, n_threads=1)
    try:
        replies = [engine.chat([{"role": "user", "content": facts_prefix(["I'm vegetarian."]) + question}],
                               max_tokens=40, temperature=0.0)["choices"][0]["message"]["content"]
                   for question in ("What should I cook tonight?", "What should I order at a restaurant?")]
    finally:
        engine.close()
    for reply in replies:
        assert not re.search(r"\b(as an?|i'm|i am)\s+(a\s+)?vegetarian\b", reply.lower()), reply
