"""Personalization editing: a user's preferences become rank-one edits of ffn_down, served as one llama.cpp
LoRA adapter (or baked into a GGUF whose edited tensors are Q8_0).

Each preference becomes a Fact: its statement, a cluster of questions it answers and the accepted answers
(targets). ROME on the ffn_down W [d, d_ff] of layer L, computed in fp32 on the torch model dequantized from
the same GGUF that llama.cpp serves:

  k*  = mean ffn_down input at the question's last token, over the cluster's questions and short prefixes;
  k^  = C^-1 k* / (k*' C^-1 k*), C = E[k k'] on neutral chats (or the identity), so that k^ . k* = 1;
  d   = v* - W k*, found with Adam on the target's NLL as the assistant's reply plus a KL term on neutral
        chats, with |d| <= clamp * |W k*|;
  dW  = d k^'  (rank one; a user's edits stack into A = [k^_i] rows, B = [d_i] columns).

While d is optimized only positions from the question's last token on are recomputed, from layer L on:
earlier positions never see the edit (causal attention), so their keys and values come from one cached
forward pass. At layer L the edit is applied as served, dW k for every recomputed position.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from localpers import names
from localpers.engine.engine import model_sha256 as base_model_sha256  # the key `localpers serve` looks adapters up by
from localpers.errors import UserError
from localpers.personalize.methods import Fact
from localpers.store.store import read_routes

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- facts

# Attribute types (UPQA's ten) with synonyms for the question templates and keywords that detect them in a
# statement. A statement matching none gets the generic preference questions.
ATTRIBUTES = {
    "hobby": (("hobby", "pastime", "favorite activity", "free-time activity"),
              ("hobby", "like to", "love to", "enjoy", "free time", "weekends")),
    "family": (("family", "relatives", "parents", "family situation"),
               ("parents", "mother", "father", "mom", "dad", "sister", "brother", "kids", "children", "wife", "husband")),
    "profession": (("profession", "occupation", "line of work", "trade"),
                   ("i run", "i own", "i am a", "i'm a", "profession", "i teach")),
    "food preference": (("food preference", "favorite food", "diet", "taste in food"),
                        ("eat", "food", "vegetarian", "vegan", "sweet tooth", "cook", "meat", "spicy", "meal",
                         "dinner", "lunch", "breakfast", "recipe", "allergic", "allergy", "intoleran", "gluten",
                         "snack", "dessert")),
    "location": (("location", "hometown", "home", "place I live"),
                 ("live in", "grew up", "i'm from", "i am from", "moved to", "born in")),
    "pet": (("pet", "animal companion", "companion animal", "pet at home"),
            ("pet", "dog", "cat", "turtle", "bird", "fish", "hamster", "rabbit", "horse", "parrot")),
    "music preference": (("music preference", "favorite music", "taste in music", "favorite genre"),
                         ("music", "song", "band", "jazz", "rock", "rap", "pop", "classical", "guitar", "album",
                          "concert", "playlist")),
    "job": (("job", "work", "employment", "position"),
            ("job", "work as", "work at", "work for", "working", "employed", "hired", "profession", "occupation")),
    "career goal": (("career goal", "professional goal", "ambition", "career plan"),
                    ("hope to", "want to become", "goal", "dream", "someday", "retire")),
    "entertainment preference": (("entertainment preference", "favorite entertainment", "taste in movies and shows",
                                  "favorite kind of show"),
                                 ("movie", "movies", "film", "show", "tv", "series", "book", "novel", "games")),
}
# The words that name each attribute type, or a thing of that type ("cuisine", "job", "violin"), without generic
# verbs (like, love, enjoy): one table, localpers/data/attributes/type_words.json. A question holding them asks
# about that type (question_types: routing, the facts line), and they name a statement's type when no keyword does.
_TYPE_TABLE = json.loads((Path(__file__).resolve().parents[1] / "data" / "attributes" / "type_words.json").read_text())
TYPE_WORDS: dict[str, tuple[str, ...]] = {name: tuple(words) for name, words in _TYPE_TABLE["types"].items()}
# The words that name a kind of liked thing (detect's kinds.json: "cuisine", "drink", ...): a fact liking a thing of
# that kind carries them in its route words, so "What cuisine do I like?" picks the Thai food like over the diet.
KIND_WORDS: dict[str, tuple[str, ...]] = {kind: tuple(words) for kind, words in _TYPE_TABLE["kinds"].items()}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def type_word_scores(text: str) -> dict[str, int]:
    """attribute type -> how many of its TYPE_WORDS `text` holds (whole words; a word's plural in -s or -es too;
    an entry of several words in sequence); types with none are left out."""
    said = _words(text)
    scores = {}
    for name, entries in TYPE_WORDS.items():
        hits = 0
        for entry in entries:
            *head, last = entry.split()
            n = len(head) + 1
            hits += any(said[i:i + n - 1] == head and said[i + n - 1] in (last, last + "s", last + "es")
                        for i in range(len(said) - n + 1))
        if hits:
            scores[name] = hits
    return scores


QUESTION_TEMPLATES = ("What's my {}?", "What is my {}?", "Do you remember my {}?")
# How people ask about each attribute in their own words, beside the "What's my <synonym>?" templates: a
# cluster of one sentence shape only teaches the edit that shape (written for the attribute types, not
# taken from any evaluation set).
NATURAL_QUESTIONS = {
    "hobby": ("What do I like to do for fun?", "How do I usually spend my weekends?", "What am I into these days?",
              "What do I do to relax?"),
    "family": ("Tell me about my family.", "What's my family like?", "Where are my relatives?",
               "What do you know about my family?"),
    "profession": ("What do I do for a living?", "What kind of work do I do?", "What is my line of work?",
                   "What is it that I do professionally?"),
    "food preference": ("What do I like to eat?", "What's my favorite dish?", "What food do I enjoy most?",
                        "What should you know about what I eat?"),
    "location": ("Where am I from?", "Where is my home?", "What place do I call home?", "Where do I stay these days?"),
    "pet": ("What animal do I have?", "Do I have any pets?", "Which animal do I love?", "What pet do I own?"),
    "music preference": ("What music do I like?", "What do I like to listen to?", "Which songs do I enjoy?",
                         "What genre do I listen to most?"),
    "job": ("What do I do for a living?", "Where do I work?", "What kind of work do I do?",
            "What's my work situation?"),
    "career goal": ("What do I want to become?", "What's my dream job?", "What am I aiming for in my career?",
                    "What do I hope to do someday?"),
    "entertainment preference": ("What do I like to watch?", "What kind of shows do I enjoy?",
                                 "What do I do for entertainment?", "What's my favorite thing to watch?"),
}
# A preference of no known attribute type is mostly one to respect in recommendations ("I avoid fragrances"),
# so its cluster also asks for recommendations.
GENERIC_QUESTIONS = ("What do you know about my preferences?", "What should you keep in mind about me?",
                     "What do I like and dislike?", "Tell me about my preferences.",
                     "What would you recommend for me?", "Can you suggest something for me?",
                     "Any recommendations for me?", "What should I keep in mind when I choose?", "What matters to me?")
PRONOUNS = {"i": "you", "i'm": "you're", "im": "you're", "me": "you", "my": "your", "mine": "yours",
            "myself": "yourself", "am": "are", "i've": "you've", "i'd": "you'd", "i'll": "you'll", "was": "were"}
MAX_STATEMENT_CHARS = 500


ENGLISH_FIRST_PERSON = {"i", "i'm", "im", "my", "mine", "myself", "i've", "i'd", "i'll"}


def is_english(statement: str) -> bool:
    """Is this an English first-person statement, whose pronouns second_person can turn? (ASCII with "I",
    "my" ...; "Me encanta el jazz" is not: its "me" is Spanish.)"""
    return statement.isascii() and any(w.lower() in ENGLISH_FIRST_PERSON for w in re.findall(r"[A-Za-z']+", statement))


def second_person(statement: str) -> str:
    """'I like to dance at the club.' -> 'You like to dance at the club.'"""
    def swap(m):
        word = m.group(0)
        out = PRONOUNS.get(word.lower(), word)
        return out[0].upper() + out[1:] if word[0].isupper() else out

    return re.sub(r"[A-Za-z']+", swap, statement.strip())


LEAD_INS = ("i am a", "i'm a")   # "I'm a nurse." is a profession, "I'm a vegetarian." a diet: half a keyword


def keyword_score(text: str, keywords) -> float:
    """How many `keywords` a lower-cased, space-padded text mentions: each at a word start and, as a prefix,
    in any form ("cook" in "cooking"); a keyword ending in a one- or two-letter word only as whole words ("i'm a"
    is not in "i'm allergic"); LEAD_INS count half."""
    score = 0.0
    for kw in keywords:
        at = f" {kw}"
        hit = re.search(re.escape(at) + r"(?!\w)", text) if re.search(r"\b\w{1,2}$", kw) else at in text
        if hit:
            score += 0.5 if kw in LEAD_INS else 1.0
    return score


# A like of a known kind (detect's kinds.json) names its attribute type when no keyword does: "I love techno."
KIND_ATTRIBUTES = {"music genre": "music preference", "cuisine": "food preference", "drink": "food preference",
                   "sport": "hobby"}


@lru_cache(maxsize=4096)
def detect_attribute(statement: str) -> str | None:
    """The attribute type (ATTRIBUTES) a statement is about: the type whose keywords it holds most, else the type
    of the kind of thing it likes or dislikes (detect.kind_of: "I love techno." -> music preference), else the
    type whose TYPE_WORDS it holds most ("I play the violin." -> hobby; ties: ATTRIBUTES' order); None.
    Cached: methods.relevant_facts asks it for each stored preference on every request."""
    from localpers.personalize.detect import detect_facts, kind_of

    text = f" {statement.lower()} "
    scores = {name: keyword_score(text, keywords) for name, (_, keywords) in ATTRIBUTES.items()}
    best = max(scores, key=scores.get)
    if scores[best]:
        return best
    kinds = [kind_of(f.key) for f in detect_facts(statement) if f.attribute in ("likes", "dislikes")]
    kind = next((KIND_ATTRIBUTES[k] for k in kinds if k in KIND_ATTRIBUTES), None)
    named = type_word_scores(statement)
    return kind or (max(named, key=named.get) if named else None)


def check_statement(statement) -> str:
    """A statement that can become an edit, stripped: at least two words in any script (or three characters
    of a script written without spaces, "我是素食者"), at most MAX_STATEMENT_CHARS characters. The UserError
    says why not, without repeating the statement (callers name it)."""
    from localpers.store.retrieval import UNSPACED

    if not isinstance(statement, str) or not statement.strip():
        raise UserError("the preference is empty: say what you like, e.g. 'I'm vegetarian.'")
    if len(re.findall(r"[^\W\d_]+", statement)) < 2 and len(re.findall(f"[{UNSPACED}]", statement)) < 3:
        raise UserError("not a statement (fewer than two words): say what you like, e.g. 'I'm vegetarian.'")
    if len(statement) > MAX_STATEMENT_CHARS:
        raise UserError(f"{len(statement)} characters; at most {MAX_STATEMENT_CHARS} can become an edit "
                        f"(state one preference a sentence)")
    return statement.strip()


def fact_from_statement(statement: str, attribute: str | None = None) -> Fact:
    """A fact built from templates: attribute synonyms x question templates; targets are the statement in
    the second person. The attribute comes from the caller (UPQA's attribute_type) or from keywords."""
    statement = check_statement(statement)
    attribute = attribute if attribute in ATTRIBUTES else detect_attribute(statement)
    if attribute:
        synonyms = ATTRIBUTES[attribute][0]
        # 8 synonym templates and 4 natural questions, then the canonical question
        questions = (tuple(t.format(s) for s in synonyms for t in QUESTION_TEMPLATES)[:8] + NATURAL_QUESTIONS[attribute]
                     + (f"What's my {attribute}?",))
    else:
        questions = GENERIC_QUESTIONS
    # An English statement is turned to the second person ("You're vegetarian."); in other languages the
    # templates' pronoun swap does not apply, and the answer to learn is the statement itself.
    target = second_person(statement).rstrip(".!") + "." if is_english(statement) else statement
    return Fact(statement=statement, questions=questions, targets=(target,), attributes=(attribute,) if attribute else ())


def fact_from_item(text: str, meta: dict | None) -> Fact:
    """A stored preference: its question and target clusters when the item carries them (UPQA fields,
    datasets.upqa_fact), else templates."""
    from localpers.personalize.datasets import _cluster, upqa_fact

    meta = meta or {}
    fact = upqa_fact(check_statement(text), meta)
    if fact is not None:
        return fact
    attributes = _cluster(meta.get("attribute_type"))
    return fact_from_statement(text, attributes[-1] if attributes else None)


def with_template_questions(fact: Fact) -> Fact:
    """A fact of a known attribute type also gets that type's natural questions, and its synonym templates
    when it has fewer than 3 questions (the given ones stay last, so the canonical question is unchanged)."""
    attribute = fact.attributes[-1] if fact.attributes else None
    if attribute not in ATTRIBUTES:
        return fact
    extra = fact_from_statement(fact.statement, attribute).questions if len(fact.questions) < 3 \
        else NATURAL_QUESTIONS[attribute]
    return replace(fact, questions=tuple(q for q in extra if q not in fact.questions) + fact.questions)


def facts_of(preferences, facts=()) -> list[Fact]:
    """The facts to edit, later wins: of two facts of the same slot (slot_of), only the later is kept."""
    facts = [with_template_questions(f) for f in facts]
    all_facts = facts + [fact_from_statement(p) for p in preferences if p not in {f.statement for f in facts}]
    if not all_facts:
        raise UserError("no preferences to edit: add one first (localpers remember --kind preference ...)")
    kept: dict[str, Fact] = {}
    for fact in all_facts:
        key = slot_of(fact)
        kept.pop(key, None)
        kept[key] = fact
    return list(kept.values())


def slot_of(fact: Fact) -> str:
    """What a later fact replaces: the slot of the fact its statement states (detect.StatedFact.slot, the
    update rule of learned facts: "I'm vegan" replaces "I'm vegetarian", "I like sushi" does not), else its
    attribute type, else its canonical question and statement."""
    from localpers.personalize.detect import detect_facts

    found = [f for f in detect_facts(fact.statement) if not f.retire]
    if len(found) == 1:
        return "slot:" + found[0].slot
    return fact.attributes[-1] if fact.attributes else fact.questions[-1] + "|" + fact.statement


# ---------------------------------------------------------------- the edit

# Neutral chats: the KL term keeps their answers, and C is estimated on them. Not the evaluation's prompts.
NEUTRAL_CHATS = (
    ("Name three primary colors.", "The three primary colors are red, blue and yellow."),
    ("How do plants make food?", "Plants make food through photosynthesis, using sunlight, water and carbon dioxide."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("Why is exercise good for you?", "Exercise strengthens the heart, muscles and bones and improves mood."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    ("Explain what a noun is.", "A noun is a word that names a person, place, thing or idea."),
    ("Write a short greeting for an email.", "Hello, I hope this message finds you well."),
    ("What causes rain?", "Rain forms when water vapor condenses into droplets that become heavy enough to fall."),
)
PREFIXES = ("", "Quick question. ", "Hi! ", "I was wondering. ")


def chat_context(turns: int, start: int = 0) -> list[dict]:
    """`turns` earlier user/assistant exchanges from NEUTRAL_CHATS (read as one chat that wraps around, from
    `start`): the multi-turn context templates a fact's keys and training prompts are also taken in, so that
    the edit fires, and steers the reply, deep in a conversation and not only on its first question."""
    out = []
    for t in range(turns):
        question, answer = NEUTRAL_CHATS[(start + t) % len(NEUTRAL_CHATS)]
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return out


@dataclass(frozen=True)
class EditConfig:
    layer: int = 6              # chosen by the sweep in docs/edit/README.md
    steps: int = 20            # Adam steps at most (docs/edit/README.md: "Speed": 12 at lr 5 with gradient_start 1
    lr: float = 1.0            # is 4-5x faster on one fact, but broke a two-fact user: not the default)
    kl_weight: float = 0.0
    clamp: float = 8.0          # |d| <= clamp * |W k*|
    covariance: bool = True     # k^ from C^-1 k*; False: k*/|k*|^2
    fit_each_key: bool = True   # k^ . k_i ~ 1 for each question's key, not only for their mean (docs/edit)
    key_ridge: float = 0.1      # of that least-squares fit, relative to the mean of diag(K C^-1 K')
    stop_nll: float = 0.05      # stop early once the target's mean NLL is below this
    gradient_start: float = 0.0  # > 0: the first step goes this fraction of the clamp's radius along -gradient
    train_questions: int = 6    # the value d is trained on this many of the cluster's questions (0: all of them);
                                # the key is fit on every question either way
    chat_turns: tuple[int, ...] = (3, 8)   # context templates: earlier neutral chat turns before the question
                                # (chat_context); () = the question asked alone, as the single-turn edit did
    null_space: bool = False    # a later edit's key is orthogonal to the earlier edits' keys (AlphaEdit): it
                                # leaves ffn_down's output on their questions exactly as it was. Off: on SmolLM2
                                # the projected key blew up and broke the adapter (docs/edit/README.md)
    preserve_rank: int = 32     # whitened key directions kept per earlier edit (its cluster's principal ones)
    joint: bool = True          # the served edit: each fact's value d is trained on the unedited model, then every
                                # fact's key k^ is solved at once (MEMIT's least squares in the metric C):
                                # k^_i . k = 1 on fact i's keys and 0 on every other fact's (joint_keys).
                                # False: the stacked edit (each fact keyed and trained on the model the
                                # earlier edits changed), the evaluation's 'edit-stacked' ablation
    quiet_weight: float = 1.0   # joint keys: the metric C gains the keys of the chat template's and the answer's
                                # tokens of every fact's prompts, scaled to C's mean diagonal times this: the
                                # edits stay off tokens llama.cpp also applies them to (docs/edit/README.md)
    quiet_words: float = 0.1    # ... and the question words' keys, times this (1: "Where do I live?" lost Lyon)
    threads: int | None = None  # torch CPU threads; None: torch's default (OMP_NUM_THREADS, else every core).
                                # On the 2-core dev machine 1 thread beat 2 even when idle (26.7 vs 37.0 s).


@dataclass
class Edit:
    layer: int
    key: np.ndarray      # k^ [d_ff]: A row
    value: np.ndarray    # d [d]: B column
    fact: Fact
    nll_before: float
    nll_after: float
    seconds: float
    keys: torch.Tensor | None = None   # the fact's keys [n, d_ff] (Editor.keys; their mean when not fit_each_key)
    reused: bool = False               # joint edits: the value was trained for an earlier k^ of this fact


@dataclass
class Batch:
    """Prompts prepared for the suffix forward: from each prompt's edit position on, from layer L on."""
    x: torch.Tensor                         # [B, S, d] residual at layer L's input, suffix positions
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer >= L: prefix keys/values [B, Hkv, P, hd]
    cos: list[torch.Tensor]                 # per layer >= L: [B, 1, S, hd/2] RoPE at the suffix positions
    sin: list[torch.Tensor]
    mask: list[torch.Tensor]                # per layer >= L: [B, 1, S, P + S] bool (sliding-window layers narrower)
    rows: torch.Tensor                      # (b, s) of each scored position
    tokens: torch.Tensor                    # the token expected there
    prompt_of_row: torch.Tensor             # which prompt each scored row belongs to


_GENERATIONS = itertools.count(1)  # Editor._generation: a number per state of the edited weights


class _Stop(Exception):
    """Ends a forward pass once the wanted activation is captured."""


class Editor:
    """ROME edits of one GGUF model's ffn_down, applied in place to its torch copy as they are made."""

    def __init__(self, model_path, config: EditConfig | None = None, model=None, tokenizer=None):
        from localpers.model.model import load_model
        from localpers.engine.tokenizer import Tokenizer

        self.model_path = Path(model_path)
        self.config = config or EditConfig()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.model = model if model is not None else load_model(self.model_path)
        self.tok = tokenizer or Tokenizer.from_gguf(self.model_path)
        n_layer = self.model.config.n_layer
        if not 0 <= self.config.layer < n_layer:
            raise UserError(f"edit layer {self.config.layer} is outside 0..{n_layer - 1}")
        self._cov_inv = None
        self._neutral = None
        self._W0 = self.W.detach().clone()
        self._prefixes: dict[tuple[str, int], Prefix] = {}  # (history, generation) -> its context prefix
        self._whiten = None
        self._preserved: list[torch.Tensor] = []  # the applied edits' whitened key directions (preserve)
        self._generation = 0   # 0: the unedited model; a new number after each applied edit
        self._values: dict[str, np.ndarray] = {}   # fact_id -> its value d [d] (joint edits)
        self._keys: dict[str, torch.Tensor] = {}     # fact_id -> its keys (fact_keys)
        self._quiet: dict[str, torch.Tensor] = {}    # fact_id -> its other positions' keys (fact_quiet)
        self._cov = None                             # C, float64 (joint_keys' quiet metric)

    def prepare(self, cache: Path | None = None) -> "Editor":
        """Compute what every edit of this model reuses, ahead of the first: C^-1 and the context prefixes (on
        the unedited model). With `cache` (a file named by the model's content and everything these depend on:
        editor_for), they are read from it when it exists, else written to it; an unreadable file is rewritten."""
        if cache is not None and cache.is_file() and not self._prefixes:
            try:
                saved = torch.load(cache, weights_only=True)
                self._cov_inv = saved["cov_inv"] if self.config.covariance else None
                for key, (ids, ks, vs, at_layer) in saved["prefixes"].items():
                    self._prefixes[(key, 0)] = Prefix(tuple(ids.tolist()), list(zip(ks, vs)), at_layer)
            except Exception as e:  # a truncated or foreign file: compute again
                log.warning("the editor's cache %s is unusable (%s); computing it again", cache, e)
                self._cov_inv, self._prefixes = None, {}
        computed = (self.config.covariance and self._cov_inv is None) or \
            any((json.dumps(list(h)), 0) not in self._prefixes for h in self.contexts())
        if self.config.covariance and self._cov_inv is None:
            self._cov_inv = torch.linalg.inv(self.key_covariance())
        if self._generation and computed:
            raise RuntimeError("prepare the editor before its first edit (or after reset)")
        for history in self.contexts():
            self.context_prefix(history)
        if cache is not None and computed:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                partial = cache.with_name(f"{cache.name}.{os.getpid()}.part")
                torch.save({"cov_inv": self._cov_inv, "prefixes": {
                    key: (torch.tensor(p.ids), [k for k, _ in p.caches], [v for _, v in p.caches], p.at_layer)
                    for (key, gen), p in self._prefixes.items() if gen == 0}}, partial)
                os.replace(partial, cache)
            except OSError as e:
                log.warning("the editor's cache was not written (%s)", e)
        return self

    def reset(self) -> None:
        """Undo every edit made so far."""
        with torch.no_grad():
            self.W.copy_(self._W0)
        self._generation = 0
        self._preserved = []

    def apply(self, key: torch.Tensor, delta: torch.Tensor) -> None:
        """Add the rank-one edit delta key' to the torch model's W (later edits are computed on it)."""
        with torch.no_grad():
            self.W.add_(torch.outer(delta, key))
        self._generation = next(_GENERATIONS)

    @property
    def W(self) -> torch.Tensor:
        return self.model.layers[self.config.layer].ffn.down.weight

    # -- prompts
    def prompt(self, question: str, history: tuple[dict, ...] | list[dict] = ()) -> tuple[list[int], int]:
        """Chat-template token ids of a conversation ending in `question` after the `history` messages, as the
        server tokenizes it (the question as plain text), and the index of the question's last token."""
        chat = self.tok.chat_tokens([*history, {"role": "user", "content": question}])
        return chat.ids, chat.content_ends[-1] - 1

    def contexts(self) -> list[list[dict]]:
        """The chat histories a fact is keyed and trained in: none, then one of each of config.chat_turns."""
        return [[]] + [chat_context(n, start=3 * i) for i, n in enumerate(self.config.chat_turns)]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok.encode(answer, add_bos=False, special=False)

    def context_prefix(self, history=()) -> Prefix:
        """The tokens every prompt after `history` starts with (the chat template up to the question's text) with
        their keys/values per layer, computed once per editor and kept; after an edit changed the model, its
        layers from the edit layer on are recomputed from the kept residual there (layers below never change)."""
        L, key = self.config.layer, json.dumps(list(history))
        base = self._prefixes.get((key, 0))
        if base is None:
            a, z = self.prompt("A", history)[0], self.prompt("Z", history)[0]
            ids = a[:common_prefix([a, z])]
            if self._generation:  # the layers below L are the unedited model's either way
                raise RuntimeError("context prefixes are computed on the unedited model (call reset first)")
            states, kvs = extend(self.model, empty_prefix(self.model), self.model.embed(torch.tensor([ids])))
            base = self._prefixes[(key, 0)] = Prefix(tuple(ids), kvs, states[L])
        if not self._generation:
            return base
        if (key, self._generation) not in self._prefixes:
            _, kvs = extend(self.model, empty_prefix(self.model), base.at_layer, first=L)
            for old in [k for k in self._prefixes if k[1] not in (0, self._generation)]:
                del self._prefixes[old]
            self._prefixes[(key, self._generation)] = Prefix(base.ids, base.caches[:L] + kvs, base.at_layer)
        return self._prefixes[(key, self._generation)]

    def _continuations(self, history, seqs: list[list[int]]) -> tuple[Prefix, torch.Tensor]:
        """The context prefix of `history` and the rest of each sequence after it, right-padded [B, S]."""
        prefix = self.context_prefix(history)
        n = len(prefix.ids)
        if any(tuple(s[:n]) != prefix.ids or len(s) <= n for s in seqs):  # a template that renders otherwise
            prefix, n = empty_prefix(self.model), 0
        rest = [s[n:] for s in seqs]
        S = max(map(len, rest))
        return prefix, torch.tensor([r + [0] * (S - len(r)) for r in rest])

    @torch.no_grad()
    def batch(self, pairs: list[tuple]) -> Batch:
        """The suffix-forward batch for (question, answer) or (question, answer, history) pairs: the answer is
        scored as the reply to the question after the history's messages. The prompts after one history share its
        context prefix (context_prefix), and each group runs as one padded batch after it."""
        m, L = self.model, self.config.layer
        c = m.config
        seqs, edit_pos, answers, groups = [], [], [], {}
        for b, (question, answer, *history) in enumerate(pairs):
            history = history[0] if history else ()
            ids, pos = self.prompt(question, history)
            ans = self.answer_ids(answer)
            seqs.append(ids + ans[:-1])
            edit_pos.append(pos)
            answers.append((len(ids) - 1, ans))
            groups.setdefault(json.dumps(list(history)), (history, []))[1].append(b)
        suffix, prefix_kv = [None] * len(pairs), [None] * len(pairs)  # per prompt
        for history, members in groups.values():
            prefix, rest = self._continuations(history, [seqs[b] for b in members])
            n = len(prefix.ids)
            states, kvs = extend(m, prefix, m.embed(rest))
            for j, b in enumerate(members):
                suffix[b] = states[L][j, edit_pos[b] - n:len(seqs[b]) - n]
                prefix_kv[b] = [tuple(torch.cat([prefix.caches[i][t][0], kvs[i][t][j, :, :edit_pos[b] - n]], dim=1)
                                      for t in (0, 1)) for i in range(L, c.n_layer)]
        B, P, S = len(pairs), max(edit_pos), max(len(s) for s in suffix)
        x = torch.stack([F.pad(s, (0, 0, 0, S - len(s))) for s in suffix])
        caches = [tuple(torch.stack([F.pad(kv[i - L][t], (0, 0, 0, P - kv[i - L][t].shape[1])) for kv in prefix_kv])
                        for t in (0, 1)) for i in range(L, c.n_layer)]
        T = max(map(len, seqs))
        angles = m.layer_angles(T + S)
        pos = torch.tensor([[p + s for s in range(S)] for p in edit_pos])
        prefix_ok = torch.arange(P)[None, :] < torch.tensor(edit_pos)[:, None]          # [B, P]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        mask = torch.cat([prefix_ok[:, None, :].expand(B, S, P), causal.expand(B, S, S)], dim=2)[:, None]
        key_pos = torch.cat([torch.arange(P).expand(B, P), pos], dim=1)                 # [B, P + S]
        masks = []
        for i in range(L, c.n_layer):  # sliding-window layers (gemma3) see only the last `window` positions
            window = m.layers[i].attn.window
            masks.append(mask & (pos[:, None, :, None] - key_pos[:, None, None, :] < window) if window else mask)
        rows, toks, owner = [], [], []
        for b, (first, ans) in enumerate(answers):
            for j, t in enumerate(ans):
                rows.append((b, first + j - edit_pos[b]))
                toks.append(t)
                owner.append(b)
        return Batch(x=x, caches=caches, cos=[angles[i][0][pos][:, None] for i in range(L, c.n_layer)],
                     sin=[angles[i][1][pos][:, None] for i in range(L, c.n_layer)], mask=masks,
                     rows=torch.tensor(rows), tokens=torch.tensor(toks), prompt_of_row=torch.tensor(owner))

    def logprobs(self, batch: Batch, key: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Log-softmax [rows, V] at the scored positions, with dW = delta key' added to layer L's ffn_down."""
        m, L = self.model, self.config.layer
        c = m.config
        x = batch.x
        for i in range(L, c.n_layer):
            block = m.layers[i]
            x = x + block.post_attn_norm(_attend(m, block.attn, block.attn_norm(x), batch.caches[i - L],
                                                 batch.cos[i - L], batch.sin[i - L], batch.mask[i - L]))
            h = block.ffn_norm(x)
            ff_in = block.ffn.inner(h)
            out = block.ffn.down(ff_in)
            if i == L and delta is not None:
                out = out + (ff_in @ key)[..., None] * delta
            x = x + block.post_ffn_norm(out)
        picked = x[batch.rows[:, 0], batch.rows[:, 1]]
        return torch.log_softmax(m.output(m.norm(picked)).float(), dim=-1)

    def nll(self, batch: Batch, logprobs: torch.Tensor) -> torch.Tensor:
        """Mean over prompts of each answer's mean token NLL."""
        token_nll = -logprobs[torch.arange(len(batch.tokens)), batch.tokens]
        n = len(batch.x)
        per_prompt = torch.zeros(n).index_add(0, batch.prompt_of_row, token_nll)
        counts = torch.zeros(n).index_add(0, batch.prompt_of_row, torch.ones_like(token_nll))
        return (per_prompt / counts).mean()

    @torch.no_grad()
    def ffn_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Layer L's ffn_down inputs [B, T, d_ff] for token ids [B, T]; the forward pass stops there."""
        got = []

        def grab(module, inputs):
            got.append(inputs[0])
            raise _Stop

        hook = self.model.layers[self.config.layer].ffn.down.register_forward_pre_hook(grab)
        try:
            self.model._blocks(tokens)
        except _Stop:
            pass
        finally:
            hook.remove()
        return got[0]

    def keys(self, fact: Fact) -> torch.Tensor:
        """The ffn_down inputs [n, d_ff] at the question's last token, for every question asked bare and after
        each of PREFIXES, and after each chat context (config.chat_turns)."""
        keys = []
        for history in self.contexts():
            prompts = [self.prompt(prefix + q, history) for q in fact.questions
                       for prefix in (PREFIXES if not history else ("",))]
            keys.append(self.prompt_keys(history, prompts))
        return torch.cat(keys)

    @torch.no_grad()
    def prompt_keys(self, history, prompts: list[tuple[list[int], int]]) -> torch.Tensor:
        """Layer L's ffn_down inputs [n, d_ff] at each (ids, position) of prompts that continue `history`: one
        padded batch after the history's context prefix, stopped at layer L's ffn_down."""
        prefix, rest = self._continuations(history, [ids for ids, _ in prompts])
        n, L = len(prefix.ids), self.config.layer
        ff_in = extend(self.model, prefix, self.model.embed(rest), 0, L + 1, capture_ffn_input=L)
        return ff_in[torch.arange(len(prompts)), torch.tensor([pos - n for _, pos in prompts])]

    # -- the second moment of keys on neutral text
    def key_direction(self, keys: torch.Tensor) -> torch.Tensor:
        """k^ with k^ . k = 1 for the keys' mean k* (fit_each_key=False), or, by regularized least squares,
        k^ . k_i ~ 1 for every key k_i, so that each question of the cluster fires the edit fully; both
        with the smallest norm in the metric C (C^-1 whitening keeps the edit off neutral text)."""
        K = keys if self.config.fit_each_key else keys.mean(0, keepdim=True)      # [n, d_ff]
        if self.config.covariance and self._cov_inv is None:
            self._cov_inv = torch.linalg.inv(self.key_covariance())
        if self._preserved:
            return self._null_space_key(K)
        M = (self._cov_inv @ K.T) if self.config.covariance else K.T              # [d_ff, n]
        G = (K @ M).double()
        ridge = self.config.key_ridge * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype) if len(G) > 1 else 0
        return M @ torch.linalg.solve(G + ridge, torch.ones(len(G), 1, dtype=G.dtype)).float()[:, 0]

    def _whitener(self) -> torch.Tensor:
        """L [d_ff, d_ff] (float64) with L L' = C^-1 (the identity without the covariance): k^ = L z has the
        C-norm |z|, so the smallest-C-norm fit is the smallest-norm fit in z."""
        if self._whiten is None:
            d_ff = self.model.config.d_ff
            sym = (self._cov_inv.double() + self._cov_inv.double().T) / 2 if self.config.covariance else None
            self._whiten = (torch.linalg.cholesky(sym) if self.config.covariance
                            else torch.eye(d_ff, dtype=torch.float64))
        return self._whiten

    def _null_space_key(self, K: torch.Tensor) -> torch.Tensor:
        """The key fit of key_direction restricted to directions the earlier edits' keys do not see (AlphaEdit's
        null-space projection, for rank-one keys): with A = K L and Q an orthonormal basis of the earlier facts'
        whitened keys (self._preserved), z = A_p' (A_p A_p' + ridge)^-1 1 with A_p = A (I - Q Q'), k^ = L z.
        Then k^ . k_old = 0 for every preserved key, so the new edit adds nothing to ffn_down's output there."""
        L = self._whitener()
        Q, R = torch.linalg.qr(torch.cat(self._preserved).T)                   # [d_ff, m]
        Q = Q[:, R.diagonal().abs() > 1e-9 * R.diagonal().abs().max()]
        A = K.double() @ L
        A = A - (A @ Q) @ Q.T
        G = A @ A.T
        ridge = self.config.key_ridge * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype) if len(G) > 1 else 0
        return (L @ (A.T @ torch.linalg.solve(G + ridge, torch.ones(len(G), 1, dtype=G.dtype))))[:, 0].float()

    def preserve(self, keys: torch.Tensor) -> None:
        """Keep later edits off these keys [n, d_ff] (an applied edit's): their whitened principal directions,
        at most config.preserve_rank of them (all, for a cluster of fewer keys), join the null space."""
        if not self.config.null_space:
            return
        A = keys.double() @ self._whitener()
        _, sv, Vt = torch.linalg.svd(A, full_matrices=False)
        keep = min(self.config.preserve_rank, int((sv > 1e-7 * sv[0]).sum()))
        self._preserved.append(Vt[:keep])

    @torch.no_grad()
    @torch.no_grad()
    def fact_quiet(self, fact: Fact) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys of the other positions of fact's bare question prompts followed by its canonical target answer,
        where the served LoRA also adds B A k but the value was never trained to: ([m, d_ff] the chat template's
        and the answer's tokens, [m', d_ff] the question's words before its last token). Kept per fact."""
        fid = self.fact_id(fact)
        if fid not in self._quiet:
            answer, template, words = self.answer_ids(fact.targets[-1]), [], []
            n0 = len(self.context_prefix().ids)
            for question in fact.questions:
                ids, pos = self.prompt(question)
                k = self.ffn_inputs(torch.tensor([ids + answer]))[0]
                template += [k[:n0], k[pos + 1:]]
                words.append(k[n0:pos])
            self._quiet[fid] = torch.cat(template), torch.cat(words)
        return self._quiet[fid]

    def joint_keys(self, clusters: list[torch.Tensor], quiet: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """K^ [N, d_ff]: every fact's key at once, MEMIT's least squares in the metric C (Meng et al. 2023,
        eq. 14, with one target value per fact): with K [n, d_ff] the N clusters' keys stacked and T [n, N] each
        key's fact one-hot, K^' = C^-1 K' (K C^-1 K' + ridge)^-1 T. So k^_i . k ~ 1 on fact i's keys and ~ 0 on
        every other fact's (an edit does not fire on the other facts' questions), each with the smallest C-norm
        (off neutral text); ridge as key_direction's. One cluster without `quiet`: exactly key_direction's k^.
        `quiet` (Q_t [m, d_ff], Q_w [m', d_ff]: fact_quiet's template-and-answer and question-word keys): C becomes
        C + w_t Q_t'Q_t/m + w_w Q_w'Q_w/m', each w the config's weight (quiet_weight, quiet_words) times C's mean
        diagonal over that term's, so the keys also stay small on those tokens."""
        if self.config.covariance and self._cov_inv is None:
            self._cov_inv = torch.linalg.inv(self.key_covariance())
        K = torch.cat(clusters)                                                    # [n, d_ff]
        T = torch.zeros(len(K), len(clusters), dtype=torch.float64)
        T[torch.arange(len(K)), torch.repeat_interleave(torch.tensor([len(c) for c in clusters]))] = 1.0
        metric_inv = self._cov_inv if self.config.covariance else torch.eye(K.shape[1])
        if quiet is not None and (self.config.quiet_weight or self.config.quiet_words):
            if self.config.covariance and self._cov is None:   # C itself (prepare keeps only C^-1), once
                self._cov = torch.linalg.inv(metric_inv.double())
            C = self._cov if self.config.covariance else torch.eye(K.shape[1], dtype=torch.float64)
            scale = C.diagonal().mean()
            for Q, weight in zip(quiet, (self.config.quiet_weight, self.config.quiet_words)):
                Q = Q.double().T @ Q.double() / len(Q)
                C = C + weight * scale / Q.diagonal().mean() * Q
            metric_inv = torch.linalg.inv((C + C.T) / 2).float()
        M = metric_inv @ K.T                                                       # [d_ff, n]
        G = (K @ M).double()
        ridge = self.config.key_ridge * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype) if len(G) > 1 else 0
        return (M @ torch.linalg.solve(G + ridge, T).float()).T.contiguous()

    def fact_id(self, fact: Fact) -> str:
        """A content hash of `fact` and everything its value depends on (the config but its thread count): the
        key of the value cache, and of an adapter's columns (meta "values")."""
        config = replace(self.config, threads=None)
        return hashlib.sha256(json.dumps([EDITOR_CACHE_VERSION, repr(config), repr(fact)]).encode()).hexdigest()[:24]

    def fact_keys(self, fact: Fact) -> torch.Tensor:
        """Editor.keys of `fact` ([n, d_ff]; their mean [1, d_ff] when not fit_each_key), kept per fact: keys are
        layer L's ffn_down inputs, which no edit of ffn_down L changes."""
        fid = self.fact_id(fact)
        if fid not in self._keys:
            keys = self.keys(fact)
            self._keys[fid] = keys if self.config.fit_each_key else keys.mean(0, keepdim=True)
        return self._keys[fid]

    def remember(self, fact: Fact, value: np.ndarray) -> None:
        """Reuse `value` [d] (a column of an earlier joint adapter of this model and config) as fact's value."""
        self._values[self.fact_id(fact)] = np.asarray(value, np.float32)

    def joint(self, facts: list[Fact]) -> list[Edit]:
        """The joint edits of `facts` (config.joint): every fact's keys, then every key k^ at once (joint_keys,
        quiet on the facts' other tokens when there are several: one fact gets exactly the single edit's key fit,
        which kept implicit questions better: 0.83 vs 0.17 of 6 held-out items, docs/edit/README.md),
        then each value d trained for its k^ on the unedited model (edit with key=...). A value already known for
        the fact (from this editor or remember: the fact's key has moved a little since, as facts were added) is
        reused, marked Edit.reused; edit_facts trains it again for the current key if llama.cpp then fails the
        fact. Leaves the torch model unedited. Raises UserError as Editor.keys does."""
        t0 = time.perf_counter()
        clusters = [self.fact_keys(f) for f in facts]
        quiet = [self.fact_quiet(f) for f in facts] if len(facts) > 1 else None   # one fact: the single edit's key
        K = self.joint_keys(clusters, quiet and (torch.cat([t for t, _ in quiet]), torch.cat([w for _, w in quiet])))
        share = (time.perf_counter() - t0) / len(facts)   # keys and the solve, split over the facts
        edits = []
        for fact, keys, key in zip(facts, clusters, K):
            fid = self.fact_id(fact)
            if fid in self._values:
                edits.append(Edit(self.config.layer, key.numpy().copy(), self._values[fid], fact, float("nan"),
                                  float("nan"), share, keys, reused=True))
            else:
                edits.append(self.train_value(fact, key, keys))
        return edits

    def train_value(self, fact: Fact, key: torch.Tensor, keys: torch.Tensor) -> Edit:
        """`fact`'s value d trained for the given key k^ [d_ff] on the unedited model; kept for reuse."""
        self.reset()
        edit = self.edit(fact, key=key, keys=keys)
        self.reset()
        self._values[self.fact_id(fact)] = edit.value
        return edit

    @torch.no_grad()
    def key_covariance(self) -> torch.Tensor:
        """C = E[k k'] of layer L's ffn_down inputs over every token of the neutral chats, plus a ridge
        (1% of the mean diagonal) since there are fewer tokens than dimensions."""
        keys = []
        for question, answer in NEUTRAL_CHATS:
            ids = self.tok.chat_tokens([{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], add_generation_prompt=False).ids
            keys.append(self.ffn_inputs(torch.tensor([ids]))[0])
        k = torch.cat(keys).double()
        C = k.T @ k / len(k)
        return (C + 0.01 * C.diagonal().mean() * torch.eye(len(C))).float()

    def neutral(self) -> tuple[Batch, torch.Tensor]:
        if self._neutral is None:
            batch = self.batch(list(NEUTRAL_CHATS[::3]))
            with torch.no_grad():
                self._neutral = batch, self.logprobs(batch)
        return self._neutral

    # -- one edit
    def pairs(self, fact: Fact) -> list[tuple[str, str, list[dict]]]:
        """(question, target, history) training prompts: every question with the canonical (last) target (one
        value vector cannot answer each paraphrase with a different synonym, and trying raises the NLL's
        floor), the questions dealt in turn to the chat contexts (bare, then each of config.chat_turns), so the
        step cost stays one prompt per question."""
        contexts, questions, n = self.contexts(), fact.questions, self.config.train_questions
        if n and len(questions) > n:  # evenly spread over the cluster, its first and its canonical (last) one kept
            questions = [questions[round(i * (len(questions) - 1) / (n - 1))] for i in range(n)] if n > 1 else questions[-1:]
        return [(q, fact.targets[-1], contexts[i % len(contexts)]) for i, q in enumerate(questions)]

    def edit(self, fact: Fact, key: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> Edit:
        """Compute the rank-one edit for `fact` and apply it to the torch model (later edits build on it).
        `key` [d_ff]: train the value for this key k^ (joint_keys') instead of the fact's own key_direction;
        `keys` [n, d_ff]: the fact's keys when already computed (Editor.keys)."""
        cfg, t0 = self.config, time.perf_counter()
        batch = self.batch(self.pairs(fact))
        neutral, neutral_base = self.neutral() if cfg.kl_weight else (None, None)
        keys = self.keys(fact) if keys is None else keys
        k_star = keys.mean(0)
        key = self.key_direction(keys) if key is None else key
        with torch.no_grad():
            max_norm = cfg.clamp * float((self.W @ k_star).norm())
        delta = torch.zeros(self.model.config.d_model, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        nll_before = nll_after = None
        for step in range(cfg.steps + 1):
            nll = self.nll(batch, self.logprobs(batch, key, delta))
            nll_after = float(nll.detach())
            nll_before = nll_after if nll_before is None else nll_before  # d = 0: the unedited model
            log.debug("edit step: target NLL %.3f, |d| %.2f", nll_after, float(delta.detach().norm()))
            if nll_after < cfg.stop_nll or step == cfg.steps:
                break
            loss = nll
            if cfg.kl_weight:
                loss = loss + cfg.kl_weight * F.kl_div(self.logprobs(neutral, key, delta), neutral_base,
                                                       log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            if step == 0 and cfg.gradient_start:  # first step: to the clamp's radius, straight down the gradient
                with torch.no_grad():
                    delta -= cfg.gradient_start * max_norm * delta.grad / (delta.grad.norm() + 1e-12)
                continue
            opt.step()
            with torch.no_grad():
                delta *= min(1.0, max_norm / (float(delta.norm()) + 1e-12))
        self.apply(key, delta.detach())
        kept = keys if cfg.fit_each_key else k_star[None]
        self.preserve(kept)
        return Edit(cfg.layer, key.detach().numpy().copy(), delta.detach().numpy().copy(), fact, nll_before,
                    nll_after, time.perf_counter() - t0, kept)


def _attend(model, attn, h, cache, cos, sin, mask, kv_out: list | None = None):
    """Attention of the suffix positions over the cached prefix keys/values and the suffix itself. kv_out: a
    list the suffix's own keys and values [B, Hkv, S, hd] are appended to."""
    c = model.config
    B, S, _ = h.shape
    q, k, v = attn.qkv(h, cos, sin)
    if kv_out is not None:
        kv_out.append((k, v))
    k = torch.cat([cache[0].expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([cache[1].expand(B, -1, -1, -1), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale, enable_gqa=c.n_head != c.n_kv_head)
    return attn.o(out.transpose(1, 2).reshape(B, S, c.n_head * c.head_dim))


@dataclass
class Prefix:
    """A token prefix shared by several prompts (the chat template's start and a chat context), computed once:
    its keys and values per layer [1, Hkv, P, hd], and the residual stream at the edit layer's input [1, P, d]
    (to recompute the layers an edit changes)."""
    ids: tuple[int, ...]
    caches: list[tuple[torch.Tensor, torch.Tensor]]
    at_layer: torch.Tensor | None = None


def empty_prefix(model) -> Prefix:
    c = model.config
    none = torch.zeros(1, c.n_kv_head, 0, c.head_dim)
    return Prefix((), [(none, none)] * c.n_layer)


@torch.no_grad()
def extend(model, prefix: Prefix, x: torch.Tensor, first: int = 0, n_layers: int | None = None,
           capture_ffn_input: int | None = None):
    """Run the residual stream x [B, S, d] at layer `first`'s input (model.embed of right-padded continuations of
    `prefix` for first=0) through layers first..n_layers-1, attending to the prefix's cached keys/values (its
    caches are indexed by layer). Returns (states, kvs): the residual stream before each of those layers and after
    the last ([B, S, d] each) and each layer's keys/values of the new positions; with capture_ffn_input=i, stops
    at layer i's ffn_down and returns its input [B, S, d_ff] instead. Padding sits after each row's tokens, so
    causal attention keeps it out of every real position."""
    c = model.config
    n_layers = c.n_layer if n_layers is None else n_layers
    P, (B, S, _) = len(prefix.ids), x.shape
    angles = model.layer_angles(P + S)
    q_pos, k_pos = torch.arange(P, P + S)[:, None], torch.arange(P + S)[None, :]
    causal = k_pos <= q_pos
    states, kvs = [x], []
    for i in range(first, n_layers):
        block = model.layers[i]
        window = block.attn.window
        mask = causal & (q_pos - k_pos < window) if window else causal
        cos, sin = angles[i][0][P:], angles[i][1][P:]
        x = x + block.post_attn_norm(_attend(model, block.attn, block.attn_norm(x), prefix.caches[i], cos, sin,
                                             mask, kvs))
        ff_in = block.ffn.inner(block.ffn_norm(x))
        if i == capture_ffn_input:
            return ff_in
        x = x + block.post_ffn_norm(block.ffn.down(ff_in))
        states.append(x)
    return states, kvs


def common_prefix(seqs: list[list[int]]) -> int:
    """The length of the longest token prefix every sequence shares."""
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


# ---------------------------------------------------------------- files: LoRA adapter and baked GGUF

def lora_factors(edits: list[Edit]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'blk.L.ffn_down': (A [r, d_ff], B [d, r])} with A's rows the keys k^ and B's columns the values d."""
    by_layer: dict[int, list[Edit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    return {f"blk.{layer}.ffn_down": (np.stack([e.key for e in es]), np.stack([e.value for e in es], axis=1))
            for layer, es in sorted(by_layer.items())}


def write_adapter(path, edits: list[Edit], arch: str) -> Path:
    """The edits as one llama.cpp LoRA. llama.cpp scales B A x by adapter_scale * alpha / r with r the rank of
    each tensor (llama-adapter.cpp), so alpha = r makes it exact; every edited tensor must share that rank."""
    from localpers.model.gguf_write import write_lora

    factors = lora_factors(edits)
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"edited tensors have ranks {sorted(ranks)}; one alpha/r scale needs one rank")
    return write_lora(path, arch, factors, alpha=float(ranks.pop()))


def bake(model_path, out_path, edits: list[Edit]) -> Path:
    """A copy of the model GGUF with W + B A in each edited tensor, re-quantized to Q8_0; every other tensor
    and every metadata field byte-identical."""
    from localpers.model.gguf_info import open_gguf
    from localpers.model.quant import edit_to_q8_0

    reader = open_gguf(model_path)
    factors = {f"{name}.weight": ab for name, ab in lora_factors(edits).items()}
    writer = gguf.GGUFWriter(out_path, reader.get_field("general.architecture").contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        sub_type = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type)
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # numpy order [n_out, n_in]
        if t.name in factors:
            a, b = factors[t.name]
            data = edit_to_q8_0(t.data, t.tensor_type, shape, b, a.T, 1.0)
            writer.add_tensor(t.name, data.reshape(shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=shape if t.data.dtype != np.uint8 else None,
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


# ---------------------------------------------------------------- the pipeline: edit, verify on llama.cpp, register

CHECK_MAX_TOKENS = 32


@dataclass
class Result:
    edits: list[Edit]                                   # edits that made the served model state their target
    failed: list[tuple[Fact, str]] = field(default_factory=list)   # facts it could not state, with its answer
    adapter: Path | None = None
    artifact: int | None = None                         # the registry id of the registered adapter
    retired: int = 0                                    # earlier edit artifacts deleted (nothing left to serve)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (statement, why) of preferences not edited
    answers: dict[str, str] = field(default_factory=dict)          # statement -> llama.cpp's answer when checked
    baked: Path | None = None                           # personalize(bake_model=True): the baked model
    routes: list[dict] = field(default_factory=list)    # routed edits: {"file", "words", "fact"} per passed fact
    reused: int = 0                                     # routed edits: adapters taken over from the last run

    def summary(self) -> dict:
        return {"edited": [{"statement": e.fact.statement, "layer": e.layer, "nll_before": round(e.nll_before, 3),
                            "nll_after": round(e.nll_after, 3), "seconds": round(e.seconds, 1)} for e in self.edits],
                "failed": [{"statement": f.statement, "question": f.questions[-1], "answer": a} for f, a in self.failed],
                "skipped": [{"statement": statement, "reason": why} for statement, why in self.skipped]}


@lru_cache(maxsize=1)
def _function_words() -> frozenset[str]:
    """bm25s' stopword lists of the languages written with spaces, as split_words' terms (accents folded)."""
    import bm25s.stopwords as lists
    from localpers.store.retrieval import split_words

    names = [n for n in dir(lists) if n.startswith("STOPWORDS_") and n not in ("STOPWORDS_CHINESE", "STOPWORDS_KOREAN")]
    return frozenset(t for n in names for word in getattr(lists, n) for t in split_words(word.lower()))


def states(answer: str, targets: tuple[str, ...]) -> bool:
    """Does `answer` state one of `targets`? English (ASCII) targets: the evaluation's target_match (stemmed
    content words). Other languages: at least MATCH_RECALL of the target's content terms are in the answer, the
    terms being localpers.store.retrieval's (words, or character pairs in Chinese, Japanese, Korean and Thai) less
    function words (bm25s' stopword lists), as target_match drops English stopwords."""
    from localpers.personalize.matching import MATCH_RECALL, target_match
    from localpers.store.retrieval import split_words

    if all(t.isascii() for t in targets):
        return target_match(answer, targets)
    said = set(split_words(answer.lower()))
    for target in targets:
        # words and pairs, not single characters; function words only when the target holds nothing else
        terms = {t for t in split_words(target.lower()) if len(t) > 1}
        terms = terms - _function_words() or terms
        if terms and len(terms & said) >= MATCH_RECALL * len(terms):
            return True
    return False


def states_target(engine, adapter: Path, fact: Fact) -> tuple[bool, str]:
    """Does the served model (llama.cpp with the adapter) answer the fact's canonical question with a target?
    Greedy, at most CHECK_MAX_TOKENS tokens; the decoding stops as soon as the words before the answer's last
    whitespace state a target (those words are whole, and `states` only gains words as the answer grows, so the
    verdict is the full answer's: a verified fact's answer is then that prefix). Returns (stated, answer)."""
    import threading

    from localpers.engine.engine import Artifacts, Cancelled

    pieces, stated = [], threading.Event()

    def seen(index: int, piece: str, *logprobs) -> None:
        pieces.append(piece)
        text = "".join(pieces)
        whole = text[:max(text.rfind(" "), text.rfind("\n"), 0)]
        if whole and states(whole, fact.targets):
            stated.set()

    try:
        out = engine.chat([{"role": "user", "content": fact.questions[-1]}],
                          artifacts=Artifacts(lora=((str(adapter), 1.0),)), max_tokens=CHECK_MAX_TOKENS,
                          temperature=0.0, cancel=stated, on_delta=seen)
    except Cancelled:
        return True, "".join(pieces).strip()
    answer = out["choices"][0]["message"]["content"].strip()
    return states(answer, fact.targets), answer


RETRAIN_STALE = 3  # joint edits: at most this many failed reused values are trained again per run (when most of
                  # an adapter fails, new values for each do not save it: a 30-fact user retrained all 30)


def edit_facts(engine, editor: Editor, facts: list[Fact], path) -> Result:
    """Edit every fact, write the adapter, check each fact through llama.cpp, and keep only the edits that
    passed; the adapter is removed when none did. Joint edits (config.joint, the default): Editor.joint, and a
    fact that fails with a reused value gets its value trained again for its current key (the first
    RETRAIN_STALE such facts) and everything is checked once more; the failed facts' columns are then dropped (the others' keys and values are the checked ones).
    Stacked edits: each fact in order on the model the earlier ones changed. A fact the editor refuses
    (UserError: e.g. a prompt over the model's context) is skipped with its reason; the others go on."""
    editor.reset()
    path = Path(path)
    usable, skipped = [], []
    for fact in facts:
        try:
            usable.append(editor.fact_keys(fact) if editor.config.joint else editor.edit(fact))
        except UserError as e:
            skipped.append((fact.statement, str(e)))
    if not usable:
        editor.reset()
        return Result([], skipped=skipped)
    skip = {statement for statement, _ in skipped}
    edits = editor.joint([f for f in facts if f.statement not in skip]) if editor.config.joint else usable
    arch = editor.model.config.arch

    def check(edits):
        write_adapter(path, edits, arch)
        answers, passed, failed = {}, [], []
        for e in edits:
            ok, answers[e.fact.statement] = states_target(engine, path, e.fact)
            (passed.append(e) if ok else failed.append((e.fact, answers[e.fact.statement])))
        return passed, failed, answers

    passed, failed, answers = check(edits)
    reused = {e.fact.statement for e in edits if e.reused}
    stale = [f.statement for f, _ in failed if f.statement in reused][:RETRAIN_STALE]
    if stale:   # trained for an earlier key: train for this one, check everything again
        edits = [editor.train_value(e.fact, torch.from_numpy(e.key), e.keys) if e.fact.statement in stale else e
                 for e in edits]
        passed, failed, answers = check(edits)
    if failed:
        path.unlink()
        if passed:
            write_adapter(path, passed, arch)
    if passed and len(passed) > 1 and (kl := locality_kl(engine, path)) > LOCALITY_MAX_KL:
        path.unlink()   # every fact stated, unrelated answers broken (many joint edits): serve none of them
        failed += [(e.fact, f"{answers[e.fact.statement]} [the {len(passed)} edits together changed unrelated "
                            f"answers: KL {kl:.2f} nats/token > {LOCALITY_MAX_KL}]") for e in passed]
        passed = []
    return Result(passed, failed, path if passed else None, skipped=skipped, answers=answers)


LOCALITY_MAX_KL = 0.2   # nats/token: single edits measure 0.03-0.05 (UPQA, BENCHMARKS.md §4); the 10-fact joint
                        # adapter of the many-preferences run 6.7 while stating 9 of its 10 facts
LOCALITY_CHATS = NEUTRAL_CHATS[1::4]


def locality_kl(engine, adapter) -> float:
    """Mean KL(unedited || edited) per answer token [nats] of llama.cpp's next-token distributions over
    LOCALITY_CHATS' answers, the adapter on and off: how much the edits change answers they are not about."""
    from localpers.engine.engine import Artifacts

    kls = []
    for question, answer in LOCALITY_CHATS:
        messages = [{"role": "user", "content": question}]
        [(_, base)] = engine.continuation_logprobs(messages, [answer])
        [(_, mine)] = engine.continuation_logprobs(messages, [answer], artifacts=Artifacts(lora=((str(adapter), 1.0),)))
        kls.append(float((np.exp(base) * (base - mine)).sum(axis=1).mean()))
    return float(np.mean(kls))


# ---------------------------------------------------------------- routed edits (many preferences)

def route_words(fact: Fact) -> str:
    """The words a question is matched against to pick `fact`'s adapter: its statement and its attribute type's
    synonyms, keywords and natural questions (ATTRIBUTES, NATURAL_QUESTIONS: written for the types; the fact's
    own type when the data gives one, else detect_attribute). Not its question cluster (the data's questions)."""
    attribute = fact.attributes[-1] if fact.attributes and fact.attributes[-1] in ATTRIBUTES else \
        detect_attribute(fact.statement)
    synonyms, keywords = ATTRIBUTES[attribute] if attribute else ((), ())
    return " ".join((fact.statement, *synonyms, *keywords, *NATURAL_QUESTIONS.get(attribute, ()), *kind_words(fact.statement)))


def kind_words(statement: str) -> tuple[str, ...]:
    """KIND_WORDS of the kinds of the things `statement` likes or dislikes ("I drink tea." -> drink, beverage ...)."""
    from localpers.personalize.detect import detect_facts, kind_of

    kinds = dict.fromkeys(kind_of(f.key) for f in detect_facts(statement) if f.attribute in ("likes", "dislikes"))
    return tuple(w for kind in kinds if kind in KIND_WORDS for w in KIND_WORDS[kind])


def _phrase(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9']+", text.lower())) + " "


def question_types(query: str) -> tuple[set[str], str]:
    """The attribute types a question asks about, and how it names them: "exact" when it is a type's natural
    question word for word ("What do I do for a living?": job, profession), "named" when it holds a type's
    TYPE_WORDS (the types holding most: "What's my job?": job, profession, which share their words; "What cuisine
    do I like?": food preference, whatever the verb), "keyword" when only ATTRIBUTES' statement keywords, generic
    verbs among them, point at types (as detect_attribute counts them, every type tied at the top: "What do I
    enjoy?": hobby); (set(), "") when it names none ("Where do I stay?")."""
    asked = _phrase(query)
    exact = {a for a, questions in NATURAL_QUESTIONS.items() if any(_phrase(q) == asked for q in questions)}
    if exact:
        return exact, "exact"
    named = type_word_scores(query)
    if named:
        return {name for name, score in named.items() if score == max(named.values())}, "named"
    text = f" {query.lower()} "   # detect_attribute's keyword count, every type tied at the top
    scores = {name: keyword_score(text, keywords) for name, (_, keywords) in ATTRIBUTES.items()}
    top = max(scores.values())
    return ({name for name, score in scores.items() if score == top} if top else set()), ("keyword" if top else "")


def route_type(words: str) -> str | None:
    """The attribute type of a route (route_words holds all of its type's synonyms), or None."""
    return next((a for a, (synonyms, _) in ATTRIBUTES.items() if all(s in words for s in synonyms)), None)


def pick_route(routes, query: str):
    """The route (file, words, ...) for `query`, or None: a neutral question gets no edit at all. A question that
    names attribute types (question_types) goes only to routes of those types, none when the user has no fact of
    them ("What music do I like?" after the music fact was deleted: not the food fact's adapter through "like";
    "What cuisine do I like?": the food fact, not the music fact's "like"); among them, and for any other question
    among all routes, the best BM25 match of the route words and their type's TYPE_WORDS (ties: the later fact),
    none when no route shares a term, the latest of the named types when none does. A question whose types come
    only from statement keywords (generic verbs: "enjoy", "like to") is not restricted by them, but gets none when
    the user has no fact of them. WISE (Wang et al. 2024) routes a query to its side memory by activations; here by
    words, which llama.cpp's LoRA (linear, applied to every token) cannot do itself."""
    from localpers.store.retrieval import BM25Index

    routes = list(routes)
    if not routes or not query.strip():
        return None
    types, how = question_types(query)
    if types:
        mine = [r for r in routes if route_type(r[1]) in types]
        if not mine:
            return None
        routes = routes if how == "keyword" else mine
    index = BM25Index()
    for i, (_, words, *_) in enumerate(routes):
        index.add(i, " ".join((words, *TYPE_WORDS.get(route_type(words), ()))))
    hits = index.search(query, 1)
    return routes[hits[0][0]] if hits else (routes[-1] if how in ("exact", "named") else None)


def read_edit(path, layer: int, fact: Fact) -> Edit:
    """The rank-one edit a single-fact adapter file holds (write_adapter's A row and B column)."""
    from localpers.model.gguf_info import open_gguf

    tensors = {t.name: t for t in open_gguf(path, check_arch=False).tensors}
    a = np.asarray(tensors[f"blk.{layer}.ffn_down.weight.lora_a"].data, np.float32).reshape(-1)
    b = np.asarray(tensors[f"blk.{layer}.ffn_down.weight.lora_b"].data, np.float32).reshape(-1)
    return Edit(layer, a.copy(), b.copy(), fact, float("nan"), float("nan"), 0.0, reused=True)


def edit_routed(engine, editor: Editor, facts: list[Fact], folder, reuse: dict[str, Path] | None = None) -> Result:
    """Routed edits (a user with names.EDIT_ROUTE_FROM facts or more): every fact its own single edit (its key
    fit alone, its value trained on the unedited model: Editor.joint of one fact), written to
    `folder`/fact-<fact id>.gguf and checked alone on llama.cpp; a request applies only the adapter its question
    is routed to (pick_route). So no edit fires on another fact's question or on a neutral one, and adding a
    fact trains that fact only: `reuse` (fact id -> the adapter file of an earlier run, same model and config)
    is copied, not trained nor checked again. Result.adapter is the folder (None when no fact passed; the folder
    is then removed), Result.routes one {"file", "words", "fact"} per passed fact."""
    import shutil

    editor.reset()
    folder, reuse = Path(folder), reuse or {}
    folder.mkdir(parents=True, exist_ok=True)
    arch = editor.model.config.arch
    result = Result([])
    for fact in facts:
        fid = editor.fact_id(fact)
        path = folder / f"fact-{fid}.gguf"
        if fid in reuse and Path(reuse[fid]).is_file():
            try:
                edit = read_edit(reuse[fid], editor.config.layer, fact)
                shutil.copyfile(reuse[fid], path)
            except Exception as e:  # unreadable: trained again below
                log.warning("the earlier adapter of a fact is unreadable (%s): its edit is made again", e)
            else:
                result.edits.append(edit)
                result.routes.append({"file": path.name, "words": route_words(fact), "fact": fid})
                result.reused += 1
                continue
        try:
            [edit] = editor.joint([fact])   # one fact: exactly the single edit's key and value
        except UserError as e:
            result.skipped.append((fact.statement, str(e)))
            continue
        write_adapter(path, [edit], arch)
        ok, result.answers[fact.statement] = states_target(engine, path, fact)
        if ok:
            result.edits.append(edit)
            result.routes.append({"file": path.name, "words": route_words(fact), "fact": fid})
        else:
            result.failed.append((fact, result.answers[fact.statement]))
            path.unlink()
    editor.reset()
    if result.edits:
        result.adapter = folder
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def preference_facts(items: list[dict]) -> tuple[list[Fact], list[tuple[str, str]]]:
    """The facts to edit from a user's stored preference items (store.items), each on its own: a preference
    that cannot become a fact (empty, one word, over MAX_STATEMENT_CHARS) is skipped with its reason, and one
    replaced by a later preference about the same attribute is skipped as such. Returns (facts, skipped)."""
    facts, skipped = [], []
    for item in items:
        try:
            facts.append(fact_from_item(item["text"], item["meta"]))
        except UserError as e:
            skipped.append((item["text"], str(e)))
    kept = facts_of([], facts) if facts else []
    statements = {f.statement for f in kept}
    for fact in facts:
        if fact.statement not in statements:
            later = next(f for f in kept if slot_of(f) == slot_of(fact))
            skipped.append((fact.statement, f"replaced by the later preference {later.statement!r}"))
    return kept, skipped


@lru_cache(maxsize=2)
def editor_for(model_path: str, config: EditConfig | None = None) -> Editor:
    """One Editor per model file and config, reused across users (its torch model: editor_model), prepared: C^-1
    and the context prefixes come from the model cache folder when an earlier process computed them."""
    editor = Editor(model_path, config, model=editor_model(model_path))
    c = editor.config
    depends = json.dumps([EDITOR_CACHE_VERSION, c.layer, c.covariance, list(c.chat_turns), NEUTRAL_CHATS])
    name = f"{base_model_sha256(model_path)[:32]}-editor-{hashlib.sha256(depends.encode()).hexdigest()[:16]}.pt"
    return editor.prepare(_cache_dir().parent / "models" / name)


EDITOR_CACHE_VERSION = 2  # raise when what Editor.prepare computes, or how an edit is made, changes


def editor_model(model_path):
    """The editor's float32 torch model of a GGUF. Dequantizing the GGUF takes 17-38 s on the 2-core machine,
    so the result is kept once in the cache folder (models/<sha256>-float32.pt, 4 bytes a weight) and loaded
    from there memory-mapped (copy-on-write: an edit never writes the file) by later processes, in about a
    second. A copy that cannot be read or written is only a slower load."""
    from localpers.model.model import load_model, model_state

    cache = _cache_dir().parent / "models" / f"{base_model_sha256(model_path)[:32]}-float32.pt"
    if cache.is_file():
        try:
            return load_model(model_path, state=torch.load(cache, mmap=True, weights_only=True))
        except Exception as e:  # a truncated or foreign copy: load the GGUF and write it again
            log.warning("the editor's cached model %s is unusable (%s); loading the GGUF", cache, e)
    model = load_model(model_path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.part")
        torch.save(model_state(model), partial)
        os.replace(partial, cache)
    except OSError as e:
        log.warning("the editor's model copy was not cached (%s)", e)
    return model


def personalize(user: str, *, data_dir=None, model_path=None, bake_model: bool = False, engine=None,
                config: EditConfig | None = None, store=None, job: int | None = None) -> Result:
    """Recompute `user`'s edits from all their stored preferences (later wins), verify them on llama.cpp and
    register the adapter (kind 'lora') for the served model; with bake_model also a full GGUF (kind 'model').
    A user with names.EDIT_ROUTE_FROM facts or more gets routed edits instead (edit_routed: a folder of
    single-fact adapters, kind 'lora_routes'; not baked). The registered edits always match the current
    preferences: when none is left, or none could be made, the user's earlier edit artifacts for this model are
    deleted. The artifact records the ids of the preferences it encodes (meta "sources"); a joint adapter never
    their text, routed edits each route's words (route_words: the statement and its type's words), sealed in the
    registry like the items and deleted with them (an artifact goes with its sources). `store` and `job`: the server's worker passes
    its open store and the job's id (a job cancelled meanwhile registers nothing: store.StaleError)."""
    from contextlib import nullcontext

    from localpers.engine.engine import Engine
    from localpers.store.store import Store, data_dir as default_data_dir

    own_engine = engine is None
    with (nullcontext(store) if store is not None else Store.open(default_data_dir(data_dir))) as store, \
            contextlib.ExitStack() as stack:
        if job is None:  # by hand: one writer with a running server's worker (it holds the lock per job)
            with store.job_lock(wait=False) as free:
                pass
            if not free:
                log.warning("waiting for the running job of a server on this data folder")
            stack.enter_context(store.job_lock())
        started = time.time()  # jobs queued before this were queued for what it reads now
        items = store.items(user, kind=names.PREFERENCE)
        facts, skipped = preference_facts(items)
        source_of = {}
        for item in items:
            try:
                source_of[fact_from_item(item["text"], item["meta"]).statement] = item["id"]
            except UserError:
                pass
        engine = stack.enter_context(Engine(model_path)) if own_engine else engine  # closed when done
        sha = base_model_sha256(engine.model_path)
        routed = len(facts) >= names.EDIT_ROUTE_FROM
        if routed and bake_model:
            raise UserError(f"{len(facts)} preferences are served as routed edits (one adapter a fact, chosen per "
                            f"question), which cannot be baked into one model: run without --bake")
        if facts and routed:
            editor = editor_for(str(engine.model_path), config)
            with store.temp_dir(user) as tmp:
                result = edit_routed(engine, editor, facts, Path(tmp) / "routes", routed_adapters(store, user, sha))
                for route, edit in zip(result.routes, result.edits):   # a deletion drops only its route
                    route["source"] = source_of[edit.fact.statement]
                current = [a for a in store.artifacts(user, names.LORA_ROUTES, sha) if a["method"] == names.EDIT]
                if result.adapter and current and result.reused == len(result.edits) and \
                        (current[0]["meta"] or {}).get("failed") == len(result.failed) and \
                        _route_set(read_routes(current[0]["meta"]) or ()) == _route_set(result.routes):
                    # nothing new, nothing gone: the served folder stays, with no new version of the same files
                    result.artifact, result.adapter = current[0]["id"], Path(current[0]["path"])
                elif result.adapter:
                    meta = {"method": names.EDIT, "layer": editor.config.layer, "routes": result.routes,
                            "sources": [source_of[e.fact.statement] for e in result.edits],
                            "edited": len(result.edits), "failed": len(result.failed)}
                    result.artifact = store.register_artifact(user, names.LORA_ROUTES, result.adapter, sha, meta,
                                                              job=job)
                    result.adapter = Path(next(a["path"] for a in store.artifacts(user, names.LORA_ROUTES)
                                               if a["id"] == result.artifact))
                    # one edit artifact per user: the joint adapter (and a model baked from it) of fewer facts goes
                    for kind in (names.LORA, names.MODEL):
                        store.retire_artifacts(user, kind, sha, method=names.EDIT)
        elif facts:
            editor = editor_for(str(engine.model_path), config)
            reuse_values(store, user, sha, editor, facts)
            with store.temp_dir(user) as tmp:  # under the data folder; registration copies the adapter in
                result = edit_facts(engine, editor, facts, Path(tmp) / "edit.gguf")
                if result.adapter:
                    store.retire_artifacts(user, names.LORA_ROUTES, sha, method=names.EDIT)
                    meta = {"method": names.EDIT, "layer": editor.config.layer,
                            "sources": [source_of[e.fact.statement] for e in result.edits],
                            "edited": len(result.edits), "failed": len(result.failed)}
                    if editor.config.joint:   # each column's fact id: the next job reuses its value
                        meta["values"] = [editor.fact_id(e.fact) for e in result.edits]
                    result.artifact = store.register_artifact(user, names.LORA, result.adapter, sha, meta, job=job)
                    result.adapter = Path(next(a["path"] for a in store.artifacts(user, names.LORA)
                                               if a["id"] == result.artifact))
                    if bake_model:
                        baked = bake(engine.model_path, Path(tmp) / "model-edited.gguf", result.edits)
                        baked_id = store.register_artifact(user, names.MODEL, baked, sha, meta, job=job)
                        result.baked = Path(next(a["path"] for a in store.artifacts(user, names.MODEL)
                                                 if a["id"] == baked_id))
        else:
            result = Result([])
        result.skipped = skipped + result.skipped
        if not result.adapter:
            result.retired = sum(store.retire_artifacts(user, kind, sha, method=names.EDIT)
                                 for kind in (names.LORA, names.MODEL, names.LORA_ROUTES))
            if not items and not result.retired and job is None:
                facts_of([], [])  # raises: no preferences to edit
        if job is None:  # by hand: the edit job its preferences queued for the server is done now
            store.supersede_queued(user, names.EDIT, before=started, by="localpers personalize")
    return result


def _route_set(routes) -> set[tuple]:
    return {(r.get("fact"), r.get("source"), r.get("words")) for r in routes}


def routed_adapters(store, user: str, sha: str) -> dict[str, Path]:
    """fact id -> single-fact adapter file of the user's current routed edits for this model (edit_routed's
    `reuse`): the next run copies them instead of editing those facts again."""
    current = [a for a in store.artifacts(user, names.LORA_ROUTES, sha) if a["method"] == names.EDIT]
    if not current:
        return {}
    folder = Path(current[0]["path"])
    return {r["fact"]: folder / r["file"] for r in read_routes(current[0]["meta"]) or () if r["fact"] is not None}


def reuse_values(store, user: str, sha: str, editor: Editor, facts: list[Fact]) -> int:
    """Give the editor the values of the user's current edit adapter for this model (its columns' fact ids:
    meta "values") for the facts still to edit, so a job after one new preference trains one value. An
    adapter that cannot be read is only a slower job. Returns how many values were reused."""
    from localpers.model.gguf_info import open_gguf

    current = [a for a in store.artifacts(user, names.LORA, sha) if a["method"] == names.EDIT]
    ids = (current[0]["meta"] or {}).get("values") if current and editor.config.joint else None
    wanted = {editor.fact_id(f): f for f in facts}
    if not ids or not wanted.keys() & set(ids):
        return 0
    try:
        tensors = {t.name: t for t in open_gguf(current[0]["path"], check_arch=False).tensors}
        B = np.asarray(tensors[f"blk.{editor.config.layer}.ffn_down.weight.lora_b"].data, np.float32)
    except Exception as e:  # gone, truncated, another layout
        log.warning("the earlier edit adapter of this user is unreadable (%s): every value is trained again", e)
        return 0
    reused = 0
    for column, fid in enumerate(ids):
        if fid in wanted and column < B.shape[1] and B.shape[0] == editor.model.config.d_model:
            editor.remember(wanted[fid], B[:, column])
            reused += 1
    return reused


def edit_job(store, user: str, engine, job: int) -> dict:
    """The worker's `edit` job (localpers.serve.jobs): personalize with the server's store and engine. Returns
    what the job list shows: counts (routed edits: how many adapters were kept from the last run) and the
    registered artifact's id, no text."""
    result = personalize(user, engine=engine, store=store, job=job)
    return {"artifact": result.artifact, "edited": len(result.edits), "failed": len(result.failed),
            "retired": result.retired, "reused": result.reused}


# ---------------------------------------------------------------- the evaluation method

def _cache_dir() -> Path:
    import os

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = root / "localpers" / "edits"
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=None)
def user_adapter(user, engine, config: EditConfig | None = None) -> Path | None:
    """The verified adapter of an evaluation user, cached on disk by model, facts and config."""
    facts = facts_of(user.preferences, user.facts)
    editor = editor_for(str(engine.model_path), config)
    key = hashlib.sha256(json.dumps([EDITOR_CACHE_VERSION, base_model_sha256(engine.model_path), repr(editor.config),
                                     [repr(f) for f in facts]]).encode()).hexdigest()[:24]
    path, log = _cache_dir() / f"{key}.gguf", _cache_dir() / f"{key}.json"
    if log.is_file():
        return path if path.is_file() else None
    result = edit_facts(engine, editor, facts, path)
    log.write_text(json.dumps({"user": user.id, **result.summary()}))
    return result.adapter


def evaluation_fact_adapters(engine) -> dict[str, Path]:
    """fact id -> the single-fact adapter an earlier evaluation user's routed edits made for this model (the
    evaluation's cache: as personalize reuses a user's earlier run, adding facts to a user edits the new ones)."""
    shared = _cache_dir() / f"facts-{base_model_sha256(engine.model_path)[:16]}"
    return {p.stem[len("fact-"):]: p for p in shared.glob("fact-*.gguf")}


@lru_cache(maxsize=None)
def user_routes(user, engine, config: EditConfig | None = None) -> tuple[tuple[str, str], ...]:
    """The routed edits (edit_routed) of an evaluation user with names.EDIT_ROUTE_FROM facts or more, cached on
    disk by model, facts and config: (adapter file, words) per fact that passed. Facts cached from an earlier
    user (the same fact, model and config) are reused, as personalize reuses a user's earlier run."""
    facts = facts_of(user.preferences, user.facts)
    editor = editor_for(str(engine.model_path), config)
    key = hashlib.sha256(json.dumps(["routes", EDITOR_CACHE_VERSION, base_model_sha256(engine.model_path),
                                     repr(editor.config), [repr(f) for f in facts]]).encode()).hexdigest()[:24]
    folder, log_file = _cache_dir() / f"{key}-routes", _cache_dir() / f"{key}-routes.json"
    if not log_file.is_file():
        shared = _cache_dir() / f"facts-{base_model_sha256(engine.model_path)[:16]}"
        shared.mkdir(exist_ok=True)
        result = edit_routed(engine, editor, facts, folder, evaluation_fact_adapters(engine))
        for route in result.routes:
            if not (shared / route["file"]).exists():
                import shutil

                shutil.copyfile(folder / route["file"], shared / route["file"])
        log_file.write_text(json.dumps({"user": user.id, "routes": result.routes, "reused": result.reused,
                                        **result.summary()}))
    routes = json.loads(log_file.read_text()).get("routes", [])
    return tuple((str(folder / r["file"]), r["words"]) for r in routes if (folder / r["file"]).is_file())


def edit_method(user, query, engine, config: EditConfig | None = None, routed: bool = True):
    """Method 'edit' of the evaluation registry: the user's verified edits as a LoRA adapter (evaluation users with
    names.EDIT_ROUTE_FROM facts or more: the routed adapter of the query; routed=False: one joint adapter)."""
    from localpers.engine.engine import Artifacts
    from localpers.personalize.methods import Personalized

    if user.registered is not None:  # a served user: what `personalize` registered, if anything
        served = user.served_artifacts(names.EDIT)
        routed = user.artifact(names.EDIT, names.LORA_ROUTES)
        route = pick_route(routed.routes, query) if routed else None
        return Personalized(artifacts=served.merge(Artifacts(lora=((route[0], 1.0),))) if route else served)
    if routed and len(facts_of(user.preferences, user.facts)) >= names.EDIT_ROUTE_FROM:
        route = pick_route(user_routes(user, engine, config), query)
        return Personalized(artifacts=Artifacts(lora=((route[0], 1.0),))) if route else Personalized()
    adapter = user_adapter(user, engine, config)
    return Personalized(artifacts=Artifacts(lora=((str(adapter), 1.0),))) if adapter else Personalized()


SINGLE_TURN = EditConfig(chat_turns=())


def edit_1turn(user, query, engine):
    """Evaluation-only ablation 'edit-1turn': the edit keyed and trained on the question alone (no chat context
    templates), as the single-turn edit was before them. Evaluation users only."""
    if user.registered is not None:
        raise UserError("edit-1turn is an evaluation ablation: serve 'edit'")
    return edit_method(user, query, engine, SINGLE_TURN)


STACKED = EditConfig(joint=False)


def edit_stacked(user, query, engine):
    """Evaluation-only ablation 'edit-stacked': the edit before joint keys, each fact keyed and trained on the
    model the earlier facts' edits changed (EditConfig(joint=False)). Evaluation users only."""
    if user.registered is not None:
        raise UserError("edit-stacked is an evaluation ablation: serve 'edit'")
    return edit_method(user, query, engine, STACKED)


ALL_QUESTIONS = EditConfig(train_questions=0)


def edit_allq(user, query, engine):
    """Evaluation-only ablation 'edit-allq': the value trained on every question of the cluster (all 13, dealt over
    the bare / 3-turn / 8-turn contexts) instead of 6, as before the speed work. Evaluation users only."""
    if user.registered is not None:
        raise UserError("edit-allq is an evaluation ablation: serve 'edit'")
    return edit_method(user, query, engine, ALL_QUESTIONS)


def edit_joint(user, query, engine):
    """Evaluation-only ablation 'edit-joint': every fact in one joint adapter, always applied (the served edit of
    several facts before routed edits). Evaluation users only."""
    if user.registered is not None:
        raise UserError("edit-joint is an evaluation ablation: serve 'edit'")
    return edit_method(user, query, engine, routed=False)


def warm_up(engine) -> None:
    """Load the editor's torch model for the served model, and what each edit reuses (editor_for), ahead of the
    first edit job (localpers.serve.jobs)."""
    editor_for(str(engine.model_path))
