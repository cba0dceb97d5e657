"""Stated preferences in chat messages, found without a model: `detect_preferences(text)` and
`merge_preferences(existing, new)`.

A placeholder with the contract's signatures: a sentence is a stated preference when, after an optional
"remember that", it is a first-person statement ("I ...", "I'm ...", "my ... is ...") and not a question. The
`chatkv` engineer's detector (measured on UPQA and PrefEval) replaces these bodies.
"""
from __future__ import annotations

import re

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_LEAD_IN = re.compile(r"^(?:(?:please )?remember(?: that)?|by the way|btw|also|and|but)[,:]?\s+", re.I)
_FIRST_PERSON = re.compile(r"^(?:i|i'm|i am|i've|i have|my)\b", re.I)
_REQUEST = re.compile(r"^i(?:'d| would) like you\b|^i need you\b|^i want you\b", re.I)
_NEGATION = re.compile(r"\b(?:don't|do not|doesn't|does not|never|no longer|not|am not|'m not)\b", re.I)


def detect_preferences(text: str) -> list[str]:
    """The first-person preference statements in one user message, in order, each a whole sentence."""
    found = []
    for sentence in _SENTENCE.findall(text):
        sentence = _LEAD_IN.sub("", sentence.strip())
        if sentence and not sentence.endswith("?") and _FIRST_PERSON.match(sentence) and not _REQUEST.match(sentence):
            found.append(sentence[0].upper() + sentence[1:])
    return found


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "")))


def merge_preferences(existing: list[str], new: list[str]) -> list[str]:
    """The preferences after `new` (later) statements join `existing` ones, oldest first: a statement equal to a
    kept one up to case and punctuation replaces it; so does its negation ("I like X" / "I don't like X")."""
    merged: list[str] = []
    for statement in [*existing, *new]:
        statement = statement.strip()
        if not statement:
            continue
        key = _normal(_NEGATION.sub(" ", statement))
        merged = [old for old in merged if _normal(_NEGATION.sub(" ", old)) != key] + [statement]
    return merged
