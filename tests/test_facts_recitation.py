"""The `facts` method (stated preferences that bear on the question, in a line before it) and the recitation
metrics (evaluation.run_recitation, restates_only), without a model."""
import json

from localpers.eval import evaluation as ev
from localpers.personalize.datasets import data_path, read_neutral, read_upqa
from localpers.personalize.methods import FACTS_TOP_K, Personalized, User, apply, facts, get_method, relevant_facts

PREFERENCES = ("I live in Lyon.", "I love jazz.", "I have two cats.", "I'm vegetarian.", "I work as a nurse.",
               "I like to go hiking.")


def test_facts_are_stated_before_the_question_that_bears_on_them():
    user = User("u", preferences=("I'm vegetarian.", "I love jazz."))
    p = facts(user, "What should I cook tonight?", None)
    assert p.user_prefix == "I'm vegetarian.\n\n" and not p.system and not p.artifacts.lora
    # next to the question, wherever the conversation is
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "What should I cook tonight?"}]
    assert apply(p, messages)[-1]["content"] == "I'm vegetarian.\n\nWhat should I cook tonight?"
    assert apply(p, messages)[:2] == messages[:2]
    assert facts(User("v"), "What should I cook tonight?", None) == Personalized()


def test_invariant_a_neutral_question_gets_no_facts_line_however_few_the_preferences():
    # stating the preferences before every question made the model recite them (9 of 72 neutral replies)
    user = User("u", preferences=("I'm vegetarian.", "I love jazz."))
    for question in ("What is the capital of France?", "How do I reverse a list in Python?",
                     "Write a haiku about the sea."):
        assert facts(user, question, None) == Personalized(), question
        assert relevant_facts(PREFERENCES, question) == [], question


def test_a_question_about_the_user_gets_every_preference_of_a_user_with_few():
    # "selfies" names no attribute type the detector knows: the question about "my" hobby still gets it
    few = ("I like taking and posting selfies.", "I love jazz.")
    assert relevant_facts(few, "What's my hobby?") == list(few)
    assert relevant_facts(few, "What do I enjoy doing in my free time?") == list(few)
    # with more than FACTS_TOP_K, only those that share a term (BM25 over the attribute words), at most k
    found = relevant_facts(PREFERENCES, "What's my hobby?")
    assert found == ["I like to go hiking."]


def test_invariant_implicit_questions_find_the_preference_through_its_attribute_type():
    # no word shared with the statement: found through the attribute type's keywords
    assert relevant_facts(PREFERENCES, "What should I cook tonight?") == ["I'm vegetarian."]
    assert relevant_facts(PREFERENCES, "Any songs to put on?") == ["I love jazz."]
    found = relevant_facts(PREFERENCES, "Where do I live and what is my job?")
    assert "I live in Lyon." in found and len(found) <= FACTS_TOP_K
    assert found == [p for p in PREFERENCES if p in found]   # in the order stated
    assert relevant_facts(PREFERENCES, "Zxqv?") == []


def test_facts_composes_with_other_methods():
    p = get_method("base+facts")(User("u", preferences=("I love jazz.",)), "What music do I like?", None)
    assert p.user_prefix == "I love jazz.\n\n"


def items(tmp_path):
    raw = [{"input_attribute": "I'm vegetarian.", "attribute_type": "food preference",
            "question": "What's my food preference?", "question_paraphrased": "What do I eat?",
            "implicit_question": "What should I cook tonight?",
            "product_recommendation_question": "Any snacks you'd recommend?", "target": "Vegetarian"},
           {"input_attribute": "I love jazz.", "attribute_type": "music preference",
            "question": "What's my music preference?", "question_paraphrased": "What do I listen to?",
            "implicit_question": "What should I play at the party?", "target": "Jazz"}]
    path = tmp_path / "upqa.json"
    path.write_text(json.dumps(raw))
    return read_upqa(path)


def test_restates_only_is_the_preference_without_an_answer(tmp_path):
    veg = items(tmp_path)[0]
    assert veg.product_question == "Any snacks you'd recommend?"
    q = veg.implicit_question
    assert ev.restates_only("You are vegetarian.", veg, q)
    assert ev.restates_only("You're vegetarian and you're vegetarian.", veg, q)
    assert not ev.restates_only("Since you are vegetarian, try a chickpea curry with spinach and rice.", veg, q)
    assert not ev.restates_only("How about pasta?", veg, q)   # not about the preference at all


def test_restates_only_on_the_issues_replies(tmp_path):
    veg, jazz = items(tmp_path)
    # the replies issue 25 quotes: the preference said back, once or twice, instead of a dish
    assert ev.restates_only("You're vegetarian and You're vegetarian. You're vegan.", veg, veg.implicit_question)
    assert ev.restates_only("You are vegetarian.", veg, veg.product_question)
    assert not ev.restates_only("Roasted chickpeas, hummus with carrots, or trail mix: all vegetarian.", veg,
                                veg.product_question)
    # the question's own words are not an answer either
    assert ev.restates_only("You love jazz, so play jazz at the party.", jazz, jazz.implicit_question)
    assert not ev.restates_only("Put on Kind of Blue by Miles Davis: classic jazz that suits a party.", jazz,
                                jazz.implicit_question)


class ScriptedEngine:
    """Recites the user's preference on one neutral question when a LoRA is applied, else answers plainly."""

    def __init__(self):
        self.calls = 0

    def chat(self, messages, artifacts, max_tokens, temperature):
        self.calls += 1
        question = messages[-1]["content"]
        if artifacts.lora and "mountain" in question:
            answer = "You are vegetarian and you love jazz."
        elif artifacts.lora and "cook" in question:
            answer = "You are vegetarian."
        else:
            answer = "Mount Everest." if "mountain" in question else "A pasta dish with tomatoes and basil."
        return {"choices": [{"message": {"content": answer}}]}


def test_recitation_counts_neutral_replies_that_state_the_value_and_restatements(tmp_path):
    from localpers.engine.engine import Artifacts

    upqa = items(tmp_path)
    neutral = ["What is the tallest mountain in the world?", "How do I reverse a list in Python?"]
    edited = lambda user, query, engine: Personalized(artifacts=Artifacts(lora=(("x.gguf", 1.0),)))
    base = lambda user, query, engine: Personalized()
    engine = ScriptedEngine()
    results, counts, rows = ev.run_recitation(engine, upqa, {"base": base, "edited": edited}, neutral)
    assert results["base"] == {"recite_neutral": 0.0, "restate_implicit": 0.0, "restate_product": 0.0}
    assert results["edited"]["recite_neutral"] == 0.5            # each user: 1 of 2 neutral replies states it
    assert results["edited"]["restate_implicit"] == 0.5          # the vegetarian's "What should I cook?"
    assert counts["edited"]["restate_product"] == 1              # the jazz item has no product question
    # base replies depend on no user: generated once per question
    assert engine.calls == 4 + 4 + 1 + 3   # base 1st user, edited 1st, base 2nd (neutral reused), edited 2nd
    assert ev.paired_deltas(rows)["edited"]["recite_neutral"]["delta"] == 0.5


def test_shipped_neutral_questions_cover_knowledge_coding_and_writing():
    path = data_path("neutral")
    assert len(read_neutral(path)) >= 20
    assert {q["kind"] for q in json.loads(path.read_text())} == {"knowledge", "coding", "writing"}
