"""Personalization methods, as a registry of plain functions.

A method takes a user's data and the current query and returns what it adds to the served path: llama.cpp
artifacts (LoRA adapters, a control vector) and prompt context (a system message, a prefix to the user's
last message). The evaluation sends every request through the engine with exactly that, so its numbers are
what a user gets. Methods that train (edit, perce, logo) compute their artifacts once per user and cache
them (User is hashable, so functools.lru_cache on the user works). Names joined by '+' compose:
"edit+prompt" merges the artifacts and concatenates the contexts.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from localpers import names
from localpers.engine import Artifacts
from localpers.errors import check_choice
from localpers.retrieval import BM25Index


@dataclass(frozen=True)
class Fact:
    """A preference with the questions it answers and the accepted answers, for methods that edit weights
    (UPQA gives them; cluster9 gives 9 of each, the canonical one last)."""
    statement: str
    questions: tuple[str, ...]
    targets: tuple[str, ...]
    attributes: tuple[str, ...] = ()    # attribute-type synonyms, canonical last


@dataclass(frozen=True)
class RegisteredArtifact:
    """A current artifact of the store's registry, as the served path sees it."""
    method: str     # names.EDIT, names.PERCE, ...
    kind: str       # names.LORA, names.CONTROL_VECTOR
    path: str


@dataclass(frozen=True)
class User:
    id: str
    preferences: tuple[str, ...] = ()   # what the user stated about themselves ("I'm vegetarian.")
    history: tuple[str, ...] = ()       # the user's own items (posts, reviews, profile entries), oldest first
    facts: tuple[Fact, ...] = ()        # preferences the data gives as question/answer clusters
    # None: an evaluation user (trained methods compute their artifacts on demand, cached). A tuple: a served
    # user (trained methods use only these current registry artifacts; nothing is trained on a request).
    registered: tuple[RegisteredArtifact, ...] | None = None

    def artifact(self, method: str, kind: str) -> RegisteredArtifact | None:
        """The registered artifact of `method` and `kind` (served users only), or None."""
        return next((a for a in self.registered or () if a.method == method and a.kind == kind), None)


@dataclass(frozen=True)
class Personalized:
    artifacts: Artifacts = field(default_factory=Artifacts)
    system: str = ""          # appended to the system message
    user_prefix: str = ""     # put before the last user message (retrieved context sits next to the question)


Method = Callable[[User, str, object], Personalized]   # (user, query, engine) -> Personalized


def base(user: User, query: str, engine) -> Personalized:
    return Personalized()


def prompt(user: User, query: str, engine) -> Personalized:
    if not user.preferences:
        return Personalized()
    lines = "\n".join(f"- {p}" for p in user.preferences)
    return Personalized(system=f"The user has told you about themselves:\n{lines}\n"
                               "Take this into account in your answers.")


RAG_TOP_K = 4


def retrieve(history: tuple[str, ...], query: str, k: int = RAG_TOP_K) -> list[str]:
    """The k history items with the best BM25 score for `query`, best first (ties: most recent first);
    items sharing no term with the query are left out."""
    index = BM25Index()
    for i, text in enumerate(history):
        index.add(i, text)
    return [history[i] for i, _ in index.search(query, k)]


def rag(user: User, query: str, engine) -> Personalized:
    found = retrieve(user.history, query)
    if not found:
        return Personalized()
    lines = "\n".join(f"- {t}" for t in found)
    return Personalized(user_prefix=f"Some things I wrote before:\n{lines}\n\n")


# name -> function, or "module:function" for methods whose module is imported only when used.
METHODS: dict[str, Method | str] = {
    names.BASE: base,
    names.PROMPT: prompt,
    names.RAG: rag,
    names.EDIT: "localpers.editing:edit_method",
}


def combine(parts: list[Personalized]) -> Personalized:
    artifacts = Artifacts()
    for p in parts:
        artifacts = artifacts.merge(p.artifacts)
    return Personalized(artifacts=artifacts,
                        system="\n\n".join(p.system for p in parts if p.system),
                        user_prefix="".join(p.user_prefix for p in parts))


def get_method(spec: str) -> Method:
    """The method named `spec`; 'a+b' composes a and b."""
    functions = []
    for name in spec.split("+"):
        target = METHODS[check_choice("method", name.strip(), METHODS)]
        if isinstance(target, str):
            module, attr = target.split(":")
            target = getattr(importlib.import_module(module), attr)
        functions.append(target)
    if len(functions) == 1:
        return functions[0]
    return lambda user, query, engine: combine([f(user, query, engine) for f in functions])


def apply(personalized: Personalized, messages: list[dict]) -> list[dict]:
    """The conversation as the method serves it: its system text joined to (or before) the conversation's
    system message, its user prefix before the last user message."""
    messages = [dict(m) for m in messages]
    if personalized.user_prefix:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = personalized.user_prefix + messages[last]["content"]
    if personalized.system:
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] += "\n\n" + personalized.system
        else:
            messages.insert(0, {"role": "system", "content": personalized.system})
    return messages
