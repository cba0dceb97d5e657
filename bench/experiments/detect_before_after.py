"""What the detector makes of every shipped UPQA statement and question, one line each, to compare two versions
of localpers/personalize/detect.py (no model is run):

    PYTHONPATH=. python bench/experiments/detect_before_after.py > after.txt   # in this checkout
    (cd OTHER_CHECKOUT && PYTHONPATH=. python /path/to/detect_before_after.py) > before.txt
    diff before.txt after.txt

Each line: the UPQA dev item, the field (input_attribute, question, question_paraphrased, implicit_question,
product_recommendation_question), detect_facts(text) (attribute=value, '-' for a retirement, '~' for a like
stated as a change), is_preference(text), and the text's type as editing reads it (question_types for a question,
detect_attribute for the statement)."""
import json

from localpers.personalize import detect
from localpers.personalize.datasets import data_path

FIELDS = ("input_attribute", "question", "question_paraphrased", "implicit_question", "product_recommendation_question")


def main() -> None:
    from localpers.personalize.editing import detect_attribute, question_types

    items = json.loads(data_path("upqa").read_text())
    for i, item in enumerate(items):
        for field in FIELDS:
            text = item.get(field)
            if not isinstance(text, str):
                continue
            facts = [f"{'-' if f.retire else '~' if getattr(f, 'change', False) else ''}{f.attribute}={f.value!r}"
                     for f in detect.detect_facts(text)]
            kind = detect_attribute(text) if field == "input_attribute" else sorted(question_types(text)[0])
            print(f"{i:3d} {field:32s} {text!r} facts={facts} pref={detect.is_preference(text)} type={kind}")


if __name__ == "__main__":
    main()
