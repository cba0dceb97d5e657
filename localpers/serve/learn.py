"""Learning from the chat: what `localpers serve` keeps of a chat request that names a `user`.

The user's own messages (never the assistant's replies, nor in a group chat the messages whose `name` is another
participant's) become history items, each stored once although a client resends the whole conversation every
turn. The facts the detector finds in them (localpers.personalize.detect.detect_facts: rules, no model on the
write path) become the user's preferences through the store's facts index, in the same transaction
(store.learn_chat): a fact already held is kept, one about an attribute already held replaces it (the later
wins), "no longer"/"not anymore" retires one (also when it names the held value another way: "jazz" for "jazz
music"), a like stated as a change ("Actually I prefer rock now.") replaces the held like of its kind, and a turn
that opens with a withdrawal ("Scratch that.", "Oops, ignore that.", "Just kidding, I'm not.") retires the facts
learned from the user's own message just before it in the conversation (nothing older, nothing of another
conversation or participant; docs/reference.md) and learns again what that message replaced or retired; one restated
after its edit failed queues the edit again; at most names.MAX_FACTS_PER_MESSAGE per message. A new, replaced or
retired fact queues an edit job (store), which the server's worker runs in the background.
"""
from __future__ import annotations

from localpers import names
from localpers.personalize.detect import detect_facts
from localpers.store.store import Store


def learn_from_chat(store: Store, user: str, messages: list[dict]) -> dict:
    """Store the new user messages of a chat request and learn the facts stated in them. Returns ids:
    {"messages": [...], "preferences": [...], "facts": [{"id", "attribute"}], "replaced": [{"id", "attribute"}],
    "retired": [{"id", "attribute"}], "retried": [{"id", "attribute"}]} ("preferences": the new facts' ids;
    "retried": facts held already, restated after their edit failed: their edit is queued again). Ids and attribute names, no text."""
    return _report(store.learn_chat(user, messages, detect_facts, names.MAX_FACTS_PER_MESSAGE))


def detect(text: str) -> list:
    """The facts a message states as learning reads them: detect_facts, at most names.MAX_FACTS_PER_MESSAGE."""
    return detect_facts(text, names.MAX_FACTS_PER_MESSAGE)[:names.MAX_FACTS_PER_MESSAGE]


def learn_from_text(store: Store, user: str, text: str, *, source: str = "remember", facts: list | None = None) -> dict:
    """`localpers remember TEXT` (and a fact corrected on the page, source "page"): the text as a message the user
    typed, learned as in chat. `facts`: what detect(text) gave, when the caller ran it already (to check the text
    before any write): learned as they are, the detector is not run again."""
    extract = detect_facts if facts is None else (
        lambda said, limit, previous: facts if said == text else detect_facts(said, limit, previous))
    return _report(store.learn_text(user, text, extract, names.MAX_FACTS_PER_MESSAGE, source=source))


def learn_from_messages(store: Store, user: str, texts: list[str], *, source: str = "memories") -> dict:
    """POST /v1/users/{user}/memories with a chat: the user's own messages (texts, in order) stored and learned
    from as learn_from_text does, in one transaction; learn_from_chat's dict."""
    return _report(store.learn_texts(user, texts, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source))


def _report(out: dict) -> dict:
    return {"messages": out["messages"], "preferences": [f["id"] for f in out["facts"]], "facts": out["facts"],
            "replaced": out["replaced"], "retired": out["retired"], "retried": out["retried"]}


def changed(learned: dict) -> bool:
    """Did learning store, replace or retire a fact, or queue again the edit of one whose edit failed?"""
    return bool(learned["facts"] or learned["replaced"] or learned["retired"] or learned.get("retried"))
