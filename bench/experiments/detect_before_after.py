"""What the detector makes of every shipped UPQA statement and question, one line each, to compare two versions
of localpers/personalize/detect.py (no model is run):

    PYTHONPATH=. python bench/experiments/detect_before_after.py > after.txt   # in this checkout
    (cd OTHER_CHECKOUT && PYTHONPATH=. python /path/to/detect_before_after.py) > before.txt
    diff before.txt after.txt

Each line: the UPQA dev item, the field (input_attribute, question, question_paraphrased, implicit_question,
product_recommendation_question), detect_facts(text) (attribute=value, '-' for a retirement, '~' for a like
stated as a change), is_preference(text), and the text's type as editing reads it (question_types for a question,
detect_attribute for the statement).

With --testers: instead, the inputs two testers typed in real conversations (issue 25's learning loop), each
marked OK when detect_facts gives the facts a person would expect, and the count at the end."""
import json
import sys

from localpers.personalize import detect
from localpers.personalize.datasets import data_path

FIELDS = ("input_attribute", "question", "question_paraphrased", "implicit_question", "product_recommendation_question")
# (message, the facts a person expects: attribute=normalized value; '-' a retirement, '~' a like stated as a change)
TESTERS = [
    ("Big news: I moved to Paris.", ["home=paris"]), ("Hi all, I'm vegan.", ["diet=vegan"]),
    ("Hey, I live in Oslo.", ["home=oslo"]), ("Ok so I'm a nurse.", ["job=nurse"]),
    ("I stopped being vegetarian.", ["-diet=vegetarian"]), ("I quit my job as a nurse.", ["-job=nurse"]),
    ("I no longer live in Oslo.", ["-home=oslo"]), ("I live in St. Louis.", ["home=st louis"]),
    ("I live in Mt. Vernon.", ["home=mt vernon"]), ("I work at the U.S. Census Bureau.", ["employer=u s census bureau"]),
    ("I live in \U0001F30D Zürich.", ["home=z rich"]), ("I'm vegan again.", ["diet=vegan"]),
    ("I live in Oslo;", ["home=oslo"]), ("I'm not allergic to peanuts.", ["-allergy=peanuts"]),
    ("I don't like jazz anymore.", ["-likes=jazz"]), ("Actually I prefer rock now.", ["~likes=rock"]),
    ("I also like rock.", ["likes=rock"]),
    ("I live in \U0001F3E0 Oslo;", ["home=oslo"]),
    ("I'm vegan; I live in \U0001F3E0 Oslo;", ["diet=vegan", "home=oslo"]),
    ("Howdy, I'm vegan.", ["diet=vegan"]), ("Dear assistant, I'm vegan.", ["diet=vegan"]),
    ("Dear assistant, I love sushi.", ["likes=sushi"]), ("Hey \u2014 I live in Ulm.", ["home=ulm"]),
    ("Hey - I live in Ulm.", ["home=ulm"]), ("Hi there \u2014 I'm vegan.", ["diet=vegan"]),
    ("Re: dinner plans: I'm allergic to nuts.", ["allergy=nuts"]), ("I'm no longer into rock.", ["-likes=rock"]),
    ("I'm no longer a fan of rock music.", ["-likes=rock music"]), ("I'm not into tennis anymore.", ["-likes=tennis"]),
    ("Not into tennis anymore, I play football now.", ["-likes=tennis", "~likes=football"]),
    ("I was a nurse until last year.", ["-job=nurse"]),
    # the third tester (withdrawals need the turn before: tests/test_fact_updates.py)
    ("I drink coffee every morning.", ["likes=coffee"]), ("I live in New York City.", ["home=new york city"]),
    ("I like Sunday roast.", ["likes=sunday roast"]),
    ("I love Italian food and jazz music.", ["likes=italian food", "likes=jazz music"]),
    ("I like mac and cheese.", ["likes=mac and cheese"]), ("I love rock and roll.", ["likes=rock and roll"]),
    ("I like salt and pepper chips.", ["likes=salt and pepper chips"]),
    ("These days I mostly drink tea.", ["~likes=tea"]),
    ("I'm not into jazz anymore but I love rock.", ["-likes=jazz", "likes=rock"]),
    # the fourth tester (issue 25's fourth round; "I'm more into rock than jazz these days." with jazz held:
    # tests/test_fact_updates.py)
    ("I like neither jazz nor rock.", ["dislikes=jazz", "dislikes=rock"]),
    ("I love neither coffee nor tea.", ["dislikes=coffee", "dislikes=tea"]),
    ("I love that idea!", []), ("I love this song.", []), ("I love it when it rains.", []),
    ('He asked me "are you vegetarian?" and I said "yes".', []), ("I \u2764\ufe0f jazz", ["likes=jazz"]),
    ("I'm a chef and a writer.", ["job=chef and writer"]), ("I drink coffee at 7am.", ["likes=coffee"]),
    ("I drink 3 cups of coffee a day.", ["likes=coffee"]), ("I play tennis in summer.", ["likes=tennis"]),
    ("I drink coffee in the morning and tea at night.", ["likes=coffee", "likes=tea"]),
    ("I often listen to jazz at night.", ["likes=jazz"]), ("I go swimming twice a week.", ["likes=swimming"]),
    ("I'm a nurse at night.", ["job=nurse"]), ("I'm more into rock than jazz these days.", ["~likes=rock"]),
    # the second tester's give-ups and quotes (the withdrawals need the turn before: tests/test_detect_named_withdrawals.py)
    ("I've given up on jazz.", ["-likes=jazz"]), ("I gave up coffee and tea.", ["-likes=coffee", "-likes=tea"]),
    ("No longer a jazz fan.", ["-likes=jazz"]), ("Not a chef anymore.", ["-job=chef"]),
    ("Not vegetarian anymore.", ["-diet=vegetarian"]), ("I quit coffee and tea.", ["-likes=coffee", "-likes=tea"]),
    ("I gave up on rock music.", ["-likes=rock music"]), ("I prefer tea to coffee these days.", ["~likes=tea"]),
    ('I like "jazz".', ["likes=jazz"]), ("I drink coffee at 7:30.", ["likes=coffee"]),
]


def mark(fact) -> str:
    return "-" if fact.retire else "~" if getattr(fact, "change", False) else ""


def testers() -> None:
    ok = 0
    for text, expected in TESTERS:
        got = [f"{mark(f)}{f.attribute}={f.key}" for f in detect.detect_facts(text)]
        ok += got == expected
        print(f"{'OK ' if got == expected else 'BAD'} {text!r} facts={got}")
    print(f"{ok} of {len(TESTERS)} as a person would expect")


def main() -> None:
    from localpers.personalize.editing import detect_attribute, question_types

    items = json.loads(data_path("upqa").read_text())
    for i, item in enumerate(items):
        for field in FIELDS:
            text = item.get(field)
            if not isinstance(text, str):
                continue
            facts = [f"{mark(f)}{f.attribute}={f.value!r}" for f in detect.detect_facts(text)]
            kind = detect_attribute(text) if field == "input_attribute" else sorted(question_types(text)[0])
            print(f"{i:3d} {field:32s} {text!r} facts={facts} pref={detect.is_preference(text)} type={kind}")


if __name__ == "__main__":
    testers() if "--testers" in sys.argv[1:] else main()
