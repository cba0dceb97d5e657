"""Readers for the evaluation data: UPQA (plain and the 9-synonym cluster variant), PrefEval's explicit
preferences with their 4-option classification task and distractor conversations, and the LaMP/LongLaMP
JSON formats. Every reader checks what it reads: a malformed item raises UserError naming the file and
the item's index, so a bad file is one clear line, not a traceback deep in the evaluation."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from localpers.errors import UserError
from localpers.personalize.methods import Fact, User
from localpers.store.store import PROFILE_SKIP_FIELDS, profile_entry, upqa_user


# The development data shipped inside the package (CC BY-NC 4.0, see localpers/data/LICENSE.CC-BY-NC-4.0 and
# localpers/data/README.md for sources and formats): `localpers eval upqa|prefeval` runs on it without --data.
DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # localpers/data
DATA_FILES = {
    "upqa": "upqa/upqa_dev_100.json",
    "upqa_cluster9": "upqa/upqa_dev_100_cluster9.json",
    "prefeval": "prefeval/mcq_dev",
    "prefeval_dev_70": "prefeval/prefeval_dev_70.json",
    "inter_turns": "prefeval/inter_turns.json",
    "neutral": "neutral/neutral_questions.json",
    "type_words": "attributes/type_words.json",
}


def data_path(name: str) -> Path:
    """A shipped development data file or folder by its name in DATA_FILES (e.g. "upqa")."""
    path = DATA_DIR / DATA_FILES[name]
    if not path.exists():
        raise UserError(f"{path}: the packaged development data is missing (reinstall localpers, or pass --data PATH)")
    return path


def load_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def _items(path: Path, data, what: str) -> list[dict]:
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise UserError(f"{path}: expected a JSON list of {what} objects")
    return data


def _field(path: Path, index: int, item: dict, name: str, kind=str):
    """item[name], checked to be a `kind` (str, or list of str); empty strings and lists count as missing."""
    value = item.get(name)
    ok = isinstance(value, str) if kind is str else (
        isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value))
    if not ok or not value or (kind is str and not value.strip()):
        expected = "a non-empty string" if kind is str else "a non-empty list of strings"
        raise UserError(f"{path}: item {index}: field {name!r} must be {expected}")
    return value


# ---------------------------------------------------------------- UPQA

@dataclass(frozen=True)
class UpqaItem:
    user: User
    attribute_type: str                 # canonical attribute type; mc_acc groups items by it
    question: str                       # explicit question
    question_paraphrased: str
    implicit_question: str
    target: str                         # canonical target
    targets: tuple[str, ...]            # every accepted answer (the synonym cluster, canonical last)
    candidates: tuple[str, ...] = ()    # mc_acc candidates besides the target
    meta: tuple[tuple[str, object], ...] = ()   # extra fields kept in the report rows (world: step, history)
    product_question: str = ""          # product_recommendation_question, when the item has one


UPQA_FACT_FIELDS = ("attribute_type", "question", "target")


def _cluster(value) -> tuple[str, ...]:
    """A UPQA field as a cluster, canonical value last: a string is a cluster of one, a list (cluster9) is
    itself; anything else is empty."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    return tuple(v for v in value if isinstance(v, str) and v.strip()) if isinstance(value, list) else ()


def upqa_fact(statement: str, fields: dict) -> Fact | None:
    """The Fact of a UPQA item, or of a stored preference that carries a UPQA item's fields in its meta (store
    imports keep them): the questions, targets and attribute types as clusters. None without a question and a
    target (a preference said in a chat has none: editing builds its questions from templates)."""
    questions, targets, attributes = (_cluster(fields.get(k)) for k in ("question", "target", "attribute_type"))
    if not (questions and targets):
        return None
    return Fact(statement, questions, targets, attributes)


def read_upqa(path: str | Path) -> list[UpqaItem]:
    """UPQA items. In the cluster9 variant `attribute_type`, `question` and `target` are 9-element lists
    whose last element is the plain item's value; it is the canonical one and the rest are synonyms.
    World items (localpers.personalize.world) add `user_id`, `profile` (the history) and `candidates`."""
    path = Path(path)
    items = []
    for i, raw in enumerate(_items(path, load_json(path), "UPQA item")):
        kind = list if isinstance(raw.get("target"), list) else str
        for name in ("target", "question", "attribute_type"):
            _field(path, i, raw, name, kind)
        statement = raw.get("input_attribute")
        if not isinstance(statement, str) or not (statement.strip() or raw.get("profile")):
            raise UserError(f"{path}: item {i}: field 'input_attribute' must be a non-empty string")
        # Plain items become 1-element clusters; the canonical value is last either way.
        fact = upqa_fact(statement, raw)
        targets, questions, attributes = fact.targets, fact.questions, fact.attributes
        user = _user(path, i, raw, upqa_user(raw, i), statement)
        if statement.strip():
            user = replace(user, facts=(fact,))
        candidates = raw.get("candidates", [])
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise UserError(f"{path}: item {i}: field 'candidates' must be a list of strings")
        items.append(UpqaItem(
            user=user,
            attribute_type=attributes[-1],
            question=questions[-1],
            question_paraphrased=_field(path, i, raw, "question_paraphrased"),
            implicit_question=_field(path, i, raw, "implicit_question"),
            target=targets[-1],
            targets=targets,
            candidates=tuple(candidates),
            meta=_meta(raw),
            product_question=raw["product_recommendation_question"]
            if isinstance(raw.get("product_recommendation_question"), str) else "",
        ))
    if not items:
        raise UserError(f"{path}: no items")
    # mc_acc ranks a target against the other users' targets for the same attribute type (the same question);
    # they are fixed here, from the whole file, so a --limit subset is scored against the same candidates.
    by_type: dict[str, list[str]] = {}
    for item in items:
        by_type.setdefault(item.attribute_type, [])
        if item.target not in by_type[item.attribute_type]:
            by_type[item.attribute_type].append(item.target)
    return [item if item.candidates else
            replace(item, candidates=tuple(t for t in by_type[item.attribute_type] if t != item.target))
            for item in items]


# ---------------------------------------------------------------- PrefEval

@dataclass(frozen=True)
class PrefEvalItem:
    id: str                      # "<topic>/<index>"
    preference: str
    question: str
    options: tuple[str, ...]     # options[0] follows the preference (PrefEval's convention)
    user: User


def read_prefeval_mcq(path: str | Path) -> list[PrefEvalItem]:
    """PrefEval explicit preferences with `classification_task_options`: one topic file, or a directory
    of them (read in sorted order)."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no .json files")
    items = []
    for file in files:
        for i, raw in enumerate(_items(file, load_json(file), "PrefEval item")):
            preference = _field(file, i, raw, "preference")
            options = _field(file, i, raw, "classification_task_options", list)
            if len(options) < 2:
                raise UserError(f"{file}: item {i}: 'classification_task_options' needs at least 2 options")
            items.append(PrefEvalItem(
                id=f"{file.stem}/{i}", preference=preference, question=_field(file, i, raw, "question"),
                options=tuple(options),
                user=User(id=f"prefeval-{file.stem}-{i}", preferences=(preference,), history=(preference,)),
            ))
    return items


def read_inter_turns(path: str | Path) -> list[list[dict]]:
    """PrefEval's distractor conversations: a list of {"conversation": [{"role", "content"}, ...]}.
    Returns the conversations as lists of (user, assistant) message pairs, flattened to messages."""
    path = Path(path)
    conversations = []
    for i, raw in enumerate(_items(path, load_json(path), "conversation")):
        messages = raw.get("conversation")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in messages):
            raise UserError(f"{path}: item {i}: 'conversation' must be a list of {{role, content}} messages")
        # Keep whole user→assistant turns only.
        turns = [messages[j:j + 2] for j in range(0, len(messages) - 1, 2)
                 if messages[j]["role"] == "user" and messages[j + 1]["role"] == "assistant"]
        conversations.append([m for turn in turns for m in turn])
    if not any(conversations):
        raise UserError(f"{path}: no user/assistant turns")
    return conversations


# ---------------------------------------------------------------- LaMP / LongLaMP

@dataclass(frozen=True)
class LampItem:
    id: str
    input: str
    gold: str
    user: User
    meta: tuple[tuple[str, object], ...] = ()


def _profile(path: Path, index: int, raw: dict) -> list[dict]:
    profile = raw.get("profile")
    if not isinstance(profile, list) or not all(isinstance(p, dict) for p in profile):
        raise UserError(f"{path}: item {index}: field 'profile' must be a list of objects")
    # An entry's text is its text fields (LaMP: title/abstract/text; LongLaMP: reviewText/summary/...) and the
    # values of its other fields (a tag, a score) but its id, parsed as `localpers import` parses it.
    out = []
    for j, p in enumerate(profile):
        try:
            text, others = profile_entry(p)
        except UserError as e:
            raise UserError(f"{path}: item {index}: profile entry {j}: {e}") from None
        extra = [str(v) for k, v in others.items() if k not in PROFILE_SKIP_FIELDS and isinstance(v, (str, int, float))]
        out.append({**p, "text": " ".join([text, *extra])})
    return out


def _user(path: Path, index: int, raw: dict, default_id: str, statement: str = "") -> User:
    """The user behind an item: their statement plus the profile entries marked as preferences (world
    items mark them) are their preferences; the profile is their history."""
    profile = _profile(path, index, raw) if "profile" in raw else []
    preferences = ([statement] if statement.strip() else []) + [p["text"] for p in profile if p.get("kind") == "preference"]
    return User(id=str(raw.get("user_id", default_id)), preferences=tuple(preferences),
                history=tuple(p["text"] for p in profile) or tuple(preferences))


def _meta(raw: dict) -> tuple[tuple[str, object], ...]:
    """Fields the world adds to its items, kept for the breakdown by time step and history size."""
    return tuple((k, raw[k]) for k in ("step", "history_size") if k in raw)


def lamp_outputs_path(questions: Path) -> Path:
    """LaMP ships `*questions.json` beside `*outputs.json`."""
    return questions.with_name(questions.name.replace("questions", "outputs"))


def read_lamp(questions: str | Path, outputs: str | Path | None = None) -> tuple[str, list[LampItem]]:
    """A LaMP or LongLaMP split: the questions file (`id`, `input`, `profile`) and the outputs file
    ({"task": name, "golds": [{"id", "output"}]}); an item's own `output` field is used when there is no
    outputs file. Returns (task name, items)."""
    questions = Path(questions)
    raw_items = _items(questions, load_json(questions), "LaMP question")
    outputs = Path(outputs) if outputs else lamp_outputs_path(questions)
    golds, task = {}, questions.stem
    if outputs != questions and outputs.is_file():
        data = load_json(outputs)
        if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
            raise UserError(f"{outputs}: expected {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}, ...]}}")
        task = str(data.get("task", task))
        for i, g in enumerate(data["golds"]):
            if not isinstance(g, dict) or "id" not in g or not isinstance(g.get("output"), (str, int, float)):
                raise UserError(f"{outputs}: gold {i}: needs 'id' and 'output'")
            golds[str(g["id"])] = str(g["output"])
    items = []
    for i, raw in enumerate(raw_items):
        if "id" not in raw:
            raise UserError(f"{questions}: item {i}: missing field 'id'")
        item_id = str(raw["id"])
        gold = golds.get(item_id, raw.get("output"))
        if not isinstance(gold, (str, int, float)):
            raise UserError(f"{questions}: item {i}: no gold output for id {item_id!r} (in {outputs.name} or 'output')")
        items.append(LampItem(id=item_id, input=_field(questions, i, raw, "input"), gold=str(gold),
                              user=_user(questions, i, raw, f"lamp-{item_id}"), meta=_meta(raw)))
    if not items:
        raise UserError(f"{questions}: no items")
    return task, items


def read_neutral(path: str | Path) -> list[str]:
    """Neutral questions (general knowledge, coding, writing) that no preference bears on: JSON list of
    {"kind", "question"}; the recitation metric asks them of every personalized user."""
    path = Path(path)
    return [_field(path, i, raw, "question") for i, raw in enumerate(_items(path, load_json(path), "neutral question"))]
