"""Learning from the chat: what `localpers serve` keeps of a chat request that names a `user`.

The user's own messages (never the assistant's replies) become history items, each stored once although a
client resends the whole conversation every turn (store.add_chat). The preferences the detector finds in them
(localpers.personalize.detect, rules, no model on the write path) join the user's stated preferences: a repeated one is
merged with the one already stored, and one that contradicts an earlier one replaces it (the later wins). A
new or replaced preference queues an edit job (store), which the server's worker runs in the background.
"""
from __future__ import annotations

import re

from localpers import names
from localpers.personalize.detect import detect_preferences, merge_preferences
from localpers.store.store import Store, check_item


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower().replace("'", "").replace("\u2019", "")))


def learn_from_chat(store: Store, user: str, messages: list[dict]) -> dict:
    """Store the new user messages of a chat request and the preferences stated in them. Returns the ids:
    {"messages": [...], "preferences": [...], "replaced": [...]}."""
    stored = store.add_chat(user, messages)
    statements = [(item_id, s) for item_id, text in stored for s in detect_preferences(text)]
    learned = {"messages": [i for i, _ in stored], "preferences": [], "replaced": []}
    if not statements:
        return learned
    existing = store.items(user, kind=names.PREFERENCE)
    known = {_normal(item["text"]) for item in existing}
    new, seen = [], set()
    for item_id, statement in statements:
        key = _normal(statement)
        if key and key not in known and key not in seen:  # a repeated preference: already stored
            seen.add(key)
            new.append((item_id, statement))
    if not new:
        return learned
    merged = merge_preferences([item["text"] for item in existing], [s for _, s in new])
    left = list(merged)
    keep_old = []
    for item in existing:
        if item["text"] in left:
            left.remove(item["text"])
            keep_old.append(item)
    replaced = [item["id"] for item in existing if item not in keep_old]
    added = [(item_id, s) for item_id, s in new if s in left]
    ids = store.replace_items(
        user, [check_item(s, names.PREFERENCE, {"source": "chat", "message": item_id}) for item_id, s in added],
        replaced)
    learned.update(preferences=ids, replaced=replaced)
    return learned
