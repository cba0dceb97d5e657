"""The composer: what one request is served with, for `localpers serve` and `localpers eval` alike.

A composition spec names methods joined by '+' ("edit+rag"); each method (localpers.personalize.methods.METHODS) turns a
user and the query into LoRA adapters and control vectors with their scales, system context (stated
preferences) and retrieved context (history items), and the composer merges them (methods.combine). The
evaluation composes its users as read from the data; the server composes a served user read from the store
(served_user): their stated preferences, their history, and their current registry artifacts for the served
model, which trained methods (edit, perce, logo) serve instead of training. The same spec on the same user's
data gives the same Personalized either way (tests/test_compose.py checks it token for token).

Default: DEFAULT_SPEC = "memory+rag" (since issue 25): `memory` is `edit` for every question and, for a request
that should use a preference ("What should I cook tonight?": methods.asks_to_use), also the `facts` line; it
never differs from `edit` on a question about the user (the gate holds for none of UPQA dev's 200 explicit and
paraphrased questions) and answered more implicit questions with the preference at 0, 5 and 10 distractor turns
(19 items: 9 vs 8 at 0 turns, 6 vs 3 at 10; BENCHMARKS §4, "recall and use"), at one short restatement more
("Pizza."). Before it, "edit+rag", chosen from the measured evaluation (BENCHMARKS.md §6-7): on UPQA `edit`
states the preference far better than `prompt` (explicit 1.00 vs 0.29, paraphrased 0.90 vs 0.21) and adding
`prompt` to it hurts (edit+prompt 0.73 / 0.54); `rag` helps where histories hold the answer (the world: mc_acc
0.27 vs base 0.18, explicit 0.12 vs 0.00) at no measurable locality cost on UPQA (0.000) and retrieves nothing
when nothing matches. On 10 UPQA items edit+rag and edit do not separate (BENCHMARKS, "The assistant loop").
Since issue 25 the `edit` it serves is keyed and trained after earlier chat turns too (editing.chat_context), and
keeps its answers after 10 distractor turns. `facts` (the stated preferences that bear on the question, in a
line before it) is not in the default: beside `edit` it adds nothing measurable at 10 turns and raises the
locality KL on neutral questions from 0.046 to 0.238 nats/token, since a user with at most 3 preferences gets all
of them before every question (BENCHMARKS §4).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localpers import names
from localpers.personalize.datasets import upqa_fact
from localpers.personalize.methods import Personalized, RegisteredArtifact, User, asks_to_use, get_method
from localpers.store.store import NotFoundError, read_routes

DEFAULT_SPEC = f"{names.MEMORY}+{names.RAG}"


@dataclass(frozen=True)
class Composer:
    """A composition spec, checked once (unknown method names raise UserError)."""
    spec: str = DEFAULT_SPEC

    def __post_init__(self):
        object.__setattr__(self, "spec", "+".join(part.strip() for part in self.spec.split("+")))
        object.__setattr__(self, "_method", get_method(self.spec))  # unknown names fail at start-up

    def needs_preferences(self, query: str) -> bool:
        """Does a method of the spec read the served user's stated preferences for `query` (`prompt` lists them,
        `facts` picks those that bear on the question, `memory` does so for a request: methods.asks_to_use)? The
        trained methods serve registry artifacts and `rag` searches the index, so otherwise a request need not
        read (and decrypt) every stored preference: its cost stays independent of their number."""
        parts = set(self.spec.split("+"))
        return bool({names.PROMPT, names.FACTS} & parts) or (names.MEMORY in parts and asks_to_use(query))

    def __call__(self, user: User, query: str, engine) -> Personalized:
        return self._method(user, query, engine)

    def explain(self, user: User, personalized: Personalized) -> dict:
        """The response's `localpers` object: the spec, the registry artifacts served (method, kind, id), the
        ids of the retrieved history items and, when a stated-facts line was put before the question (`facts`,
        `memory` on a request), the ids of its preferences ("stated"). Ids only, never text."""
        served = {path for path, _ in personalized.artifacts.lora + personalized.artifacts.control_vectors}
        artifacts = []
        for a in user.registered or ():
            if a.path in served:
                artifacts.append({"method": a.method, "kind": a.kind, "id": a.id})
            for file, _, source in a.routes:   # routed edits: which fact's adapter (its preference's item id)
                if file in served:
                    artifacts.append({"method": a.method, "kind": a.kind, "id": a.id, "source": source})
        return {"composition": self.spec,
                "artifacts": artifacts,
                "retrieved": list(personalized.retrieved),
                **({"stated": list(personalized.stated)} if personalized.stated else {})}


def served_user(store, user: str, base_model_sha256: str, conversation: list[dict] = (),
                preferences: bool = True) -> User:
    """A served user as the store holds them: stated preferences (items of kind "preference", oldest first; the
    ones imported from UPQA carry their question/target clusters as facts), their history as a search in the
    store's incremental BM25 index (the ranking `rag` gives a loaded history, without reloading and re-indexing
    it per request), and their current artifacts made for this base model. An unknown user is a user with
    nothing yet. History items that are messages of `conversation` (the request's own, stored by earlier turns)
    are not retrieved: the model sees them in the conversation already; nor is a text already retrieved (the
    same words stored as a message and as the preference learnt from it); of a message stating a fact the user
    has since replaced, withdrawn or deleted (meta names.SUPERSEDED_BY) only the sentences still true are, and of
    any other retrieved text (a document, a review) only the sentences stating no fact whose slot the user now
    holds with another value (still_held: not "I live in Oslo." nor a diary's "I live in Oslo" after "I moved to
    Paris."); nor a message that only asks or requests (only_asks: "Any ideas for
    dinner?", "Tell me about my career.": the user's own earlier requests say nothing about them, and the model
    echoed or answered them).
    `preferences=False` (a spec without
    `prompt`, Composer.needs_preferences) leaves the stated preferences and facts out: O(1) in their number."""
    try:
        preferences = store.items(user, kind=names.PREFERENCE) if preferences else []
        artifacts = store.artifacts(user, base_model_sha256=base_model_sha256)
    except NotFoundError:
        return User(id=user, registered=())
    said = {m["content"] for m in conversation}

    def search(query: str, k: int) -> list[tuple[int, str]]:
        if not query.strip():
            return []
        try:
            hits = store.search(user, query, k=min(1000, 2 * k + len(said)))
        except NotFoundError:  # forgotten meanwhile
            return []
        found, texts = [], set(said)
        for hit in hits:  # a text stored twice (a chat message and the preference learnt from it) is shown once
            if hit["kind"] == names.MESSAGE and only_asks(hit["text"]):
                continue
            text = still_held(store, user, hit["text"], superseded=names.SUPERSEDED_BY in hit["meta"])
            if text and text not in texts:
                texts.add(text)
                found.append((hit["id"], text))
                if len(found) == k:
                    break
        return found

    facts = tuple(f for f in (upqa_fact(item["text"], item["meta"]) for item in preferences) if f is not None)
    return User(id=user, preferences=tuple(item["text"] for item in preferences), facts=facts, search=search,
                preference_ids=tuple(item["id"] for item in preferences),
                registered=tuple(RegisteredArtifact(a["method"], a["kind"], a["path"], a["id"], routes_of(a))
                                 for a in artifacts))


# A request's opening: the user asks the assistant to do something ("Tell me about my career.", "Please write me a
# poem.", "Suggest a dinner."); what follows says nothing about the user.
# ... unless a clause of it says something of the user ("Give me a recipe, I'm vegan.": the detector learns nothing
# from a request, but the words are the user's own).
SELF_CLAUSE = re.compile(r"(?:[,;(]|\b(?:since|because|as|and|but|so))\s+i\b", re.I)
# A greeting or filler before what is asked ("hey, tell me ...", "ok so what should i cook"); a sentence of only
# these ("Hi.") asks nothing and says nothing.
OPENING = re.compile(r"^\W*(?:(?:hey|hi|hello|yo|ok(?:ay)?|so|well|um+|hmm+|please|pls|now|and|then)\b[\s,.!]*)+", re.I)
REQUEST = re.compile(r"^(?:tell|give|show|explain|describe|write|list|help|find|make|plan|suggest|recommend|"
                     r"summari[sz]e|translate|draft|create|generate|name|teach|remind|repeat|rewrite|rephrase|"
                     r"proofread|fix|correct|edit|check|say|any\s+(?:ideas?|suggestions?|tips|recommendations?|advice))\b", re.I)
QUESTION = re.compile(   # asked without "?": a question word then an auxiliary, or an auxiliary then its subject
    r"^(?:(?:what|how|why|when|where|who|which|whose)\s+(?:(?!(?:i|we|you|he|she|they|it)\b)\w+\s+)?(?:do|does|did|is|are|was|were|can|could|should|"
    r"would|will|shall|am|have|has)\b|(?:what's|whats|where's|who's|how's)\b|(?:can|could|would|will|should|shall|do|"
    r"does|did|is|are|am|was|were)\s+(?:i|you|u|we|they|he|she|it|my|your|there)\b)", re.I)


def only_asks(text: str) -> bool:
    """Is every sentence of a message (detect.sentences) a question (ending in "?", or opening as one: "what
    cuisine do i like") or a request (REQUEST) without a clause of the user's own
    (SELF_CLAUSE), a greeting or filler before it aside ("hey, tell me ...", "Hi.")? Such a message of the user's
    says nothing about them ("Tell me about my career."): retrieval leaves it out, or the model answers the old
    request ("a joke about a career")."""
    from localpers.personalize.detect import sentences

    said = [OPENING.sub("", s).strip() for s in sentences(text)]
    asks = [s for s in said if s]
    return bool(asks) and all(s.rstrip().endswith(("?", "？")) or (
        (QUESTION.match(s) or REQUEST.match(s)) and not SELF_CLAUSE.search(s)) for s in asks)


LABEL = re.compile(r"^[^:.!?\n]{1,40}:\s*")   # a note's lead-in before what it states ("Diary, 3 May: I live in Oslo")


def still_held(store, user: str, text: str, superseded: bool = True) -> str:
    """A retrieved text without its sentences (detect.sentences) that state a fact the user no longer holds; ""
    when none is left, the text as stored when nothing goes. For a message marked names.SUPERSEDED_BY (it stated a
    fact the user has since replaced, withdrawn or deleted) a sentence goes unless the user holds every fact it
    states (Store.holds_fact); for any other text (documents, reviews, earlier messages: `superseded=False`) a
    sentence goes when a fact it states has its slot held with another value (Store.holds_other_value: the diary's
    "I live in Oslo" once "I moved to Paris.", while a fact the user never stated in chat stays). A retirement
    ("I'm not vegan anymore.") is kept unless the user holds that fact again, a sentence stating nothing is kept, and so is the replaced sentence of a text
    that states the held value too; a sentence is read without a lead-in label ("Diary: ..."). The cost: the detector on the retrieved texts and keyed-hash lookups; nothing more is decrypted."""
    from localpers.personalize.detect import detect_facts, sentences

    said = sentences(text)
    stated = [detect_facts(s) or detect_facts(LABEL.sub("", s.strip())) for s in said]
    # a text that also states the value now held keeps the sentence it corrects ("I live in Oslo. Actually, I live
    # in Paris now.": it tells the change)
    current = set() if superseded else {f.slot for found in stated for f in found
                                        if not f.retire and store.holds_fact(user, f)}

    def held(fact) -> bool:
        if fact.retire:  # a retirement stays true until the fact is held again ("Just kidding." withdrew it)
            return not store.holds_fact(user, fact)
        if superseded:
            return store.holds_fact(user, fact)
        return fact.slot in current or not store.holds_other_value(user, fact)

    kept = [s for s, found in zip(said, stated) if all(held(f) for f in found)]
    return text if len(kept) == len(said) else " ".join(kept)


def routes_of(artifact: dict) -> tuple[tuple[str, str, int | None], ...]:
    """A names.LORA_ROUTES artifact's routes as (adapter file, words, source item id) (store.read_routes); () for
    any other artifact or unreadable routes."""
    if artifact["kind"] != names.LORA_ROUTES:
        return ()
    folder = Path(artifact["path"])
    return tuple((str(folder / r["file"]), r["words"], r["source"]) for r in read_routes(artifact["meta"]) or ())


def last_user_message(messages: list[dict]) -> str:
    """The query a composition retrieves for: the last user message's text ('' when there is none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
