"""Facts about the speaker in chat messages, found without a model: `detect_facts(text)` (atomic facts with an
attribute and a value, or retirements), `detect_preferences(text)` (their first-person statements) and
`merge_preferences(existing, new)`. A message is first reduced to the speaker's own words (quoted speech, pasted
text after an introduction, '>' lines, lyrics and stories dropped), then each sentence is split into clauses, and
each first-person clause gives at most one fact (detect_facts says which). The sentence rules below decide
whether a clause of no known attribute is still a lasting statement about the user (attribute "about").

The write path of `localpers serve` must stay fast (no LLM call per message), so detection is a small set of
readable rules over sentences. A sentence is a stated preference when, after an optional lead-in ("remember
that", "by the way", "due to my allergy,"), its subject is the user ("I", "I'm", "my favourite X is", "my
family ...") and its verb phrase states something lasting about them: a taste (like, love, prefer, hate, avoid,
can't stand, don't enjoy, am allergic to, am not a fan of), a fact (live in, work as, have two dogs, grew up in, am
vegetarian, study law) or a plan of life (want to be a doctor). It is not one when it is a question, a request to
the assistant (I need, I'd like you to, I want to add ...), a transient situation or intent (I'm visiting Rome
next month, I'm looking for a new jacket, I had a long shift today), a thought about the task at hand (I think, I
didn't understand that, I have the following code) or about code and text being worked on.

Measured on UPQA statements and PrefEval preferences (positives) against PrefEval's distractor chats and the
benchmarks' questions (negatives): `python3 bench/bench_detect.py`, figures in BENCHMARKS.md.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path


def normalize_text(text: str) -> str:
    """Text as detection reads it: NFKC, format characters (zero-width spaces and joiners, BOM, bidi marks)
    dropped, control characters (NUL, ...) but newline and tab made sentence separators ("\\n")."""
    text = unicodedata.normalize("NFKC", text)
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cf":
            continue
        out.append("\n" if category == "Cc" and ch not in "\n\t" else ch)
    return "".join(out)

# ---------------------------------------------------------------- sentences

_CODE_FENCE = re.compile(r"```.*?(```|$)", re.S)
_CODE_LINE = re.compile(r"[{}=<>]|^\s*(def|class|import|from|for|while|if|return|#include|public|private)\b|\w\(|\)\s*$")
# A line ending in ";" is code ("return x;", "int n;") unless it reads as prose: a first-person subject and a word,
# or a capitalized first word and at least two more words ("I live in Oslo;" is a sentence that a ";" ends).
_CODE_SEMICOLON = re.compile(r";\s*$")
_PROSE_LINE = re.compile(r"^[\s\"'*•-]*(?:(?:I|I'm|I've|My|We)(?:[ \t]+[\w'.,;:-]+)+|"
                         r"[A-Z][\w']*(?:[ \t]+[\w'.,;:-]+){2,})[ \t]*;\s*$")
_SPLIT = re.compile(r"(?<=[.!?;])[\"')\]]*\s+|\n+|(?<=[.!?;:])$")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
# Abbreviations whose dot ends no sentence ("I live in St. Louis.", "I work at the U.S. Census Bureau."): titles
# and place words before a name, "e.g.", "etc." and dotted initials ("U.S.", "D.C."). Their dot is kept from the
# splitter unless a first-person sentence starts right after it ("I live in the U.S. I love jazz.").
_ABBREVIATIONS = ("St", "Dr", "Mt", "Mr", "Mrs", "Ms", "Mx", "Prof", "Sr", "Jr", "Ft", "Pt", "Ave", "Blvd", "Rd",
                  "Inc", "Ltd", "Co", "Corp", "Bros", "Dept", "Univ", "vs", "approx", "ca", "etc")
_ABBREVIATION = re.compile(r"(?<![\w.])(?:" + "|".join(_ABBREVIATIONS) + r"|(?:[A-Za-z]\.){1,3}[A-Za-z])\."
                           r"(?=[ \t]+(?!(?:I|I'm|I've|I'd|I'll|Im|My|We|We're)\b)\S)")
_KEPT_DOT = "\x04"


def sentences(text: str) -> list[str]:
    """The sentences of a message (code fences and code-like lines dropped), without surrounding quotes. A
    sentence ends at ".", "!", "?" or ";" before a space, at a line break and at the end of the text; not at the
    dot of an abbreviation (_ABBREVIATIONS, dotted initials) that a word other than a first-person subject
    follows."""
    text = _CODE_FENCE.sub("\n", text.translate(_QUOTES))
    lines = [line for line in text.splitlines() if not _CODE_LINE.search(line) and not (
        _CODE_SEMICOLON.search(line) and not _PROSE_LINE.match("".join(ch for ch in line if not _is_emoji(ch))))]
    text = _ABBREVIATION.sub(lambda m: m[0][:-1] + _KEPT_DOT, "\n".join(lines))
    out = []
    for part in _SPLIT.split(text):
        part = (part or "").replace(_KEPT_DOT, ".").strip().strip("\"'*-• ").strip()
        if part:
            out.append(part)
    return out


# ---------------------------------------------------------------- rules

# Lead-ins that announce a statement; what follows them is the statement.
_LEAD_IN = re.compile(
    r"^(?:(?:and|but|so|also|oh|well|ok(?:ay)?|alright|all right|anyway|anyways|yeah|um+|uh+|actually|"
    r"(?:hi|hello|hey|hiya|howdy|greetings|yo|(?:good )?(?:morning|afternoon|evening))(?:\s+(?:all|everyone|"
    r"everybody|guys|folks|there|friend|friends|team|y'all|you|again|(?!(?:Im|My|We|Me)\b)(?-i:[A-Z][a-z]+)))?|"
    r"dear (?:assistant|ai|bot|chatbot|chatgpt|model|friend)|"
    r"honestly|btw|by the way|fyi|for the record|(?:like|as) i (?:said|mentioned|told you)(?: before| earlier)?|"
    r"just so you know|just to let you know|for your information|note that|keep in mind(?: that)?|"
    r"(?:please |can you |could you |would you )?(?:remember|note|know|keep in mind)(?: that)?|"
    r"i want you to know(?: that)?|you should know(?: that)?|i(?:'d| would) like you to (?:know|remember)(?: that)?)"
    r"(?:[,:!]|\s+[-\u2013\u2014])?\s+)+", re.I)
# A short opening phrase before the subject: "Due to my allergies, I ...", "As a vegan, I ...".
_INTRO = re.compile(r"^(?:due to|because of|as an?|as someone who|since|for (?:ethical|health|religious)|"
                    r"being an?|personally|in general|generally)\b[^,]{0,80},\s*(?=(?:i|my)\b)", re.I)

_SUBJECT = re.compile(r"^(?:i\b|i'm\b|i've\b|im\b|my\b)", re.I)
_QUESTION_START = re.compile(
    r"^(?:what|what's|whats|how|why|when|where|who|whom|whose|which|can|could|would|will|should|shall|do|does|did|"
    r"is|are|am|was|were|have|has|any|anything|is there|are there|tell me|give me|suggest|recommend|list|write|"
    r"please|help)\b", re.I)

# The user's life on "My ...": favourites, name, family, pets, job.
_MY = re.compile(
    r"^my\s+(?:(?:all[- ]time |absolute |very |most )?favou?rite\b|name\b|(?:whole |entire )?family\b|parents\b|"
    r"(?:wife|husband|partner|spouse|boyfriend|girlfriend|fianc[eé]e?|kids?|children|sons?|daughters?|brothers?|"
    r"sisters?|siblings?|mother|father|mom|mum|dad|grand\w+|dogs?|cats?|pets?|job|profession|career|hobby|hobbies|"
    r"diet|religion|hometown|home town|first language|native language|age|birthday|goal|dream))\b", re.I)

# Verb phrases right after "I" that are not statements about the user: modals and requests, thoughts about the
# task, transient situations and intents, events of the day.
_NOT_AFTER_I = re.compile(
    r"^(?:'d|'ll|would|will|could|should|might|must|may|shall|can(?! ?'?t| ?not| only| never| no longer)|"
    r"need(?! to (?:avoid|stay away))|needs|needed|am in need|'m in need|am in the market|'m in the market|"
    r"was wondering|wonder|think|thought|guess|suppose|assume|understand|know|mean|meant|see|saw|noticed|found that|"
    r"tried|try|got|get (?:an?|the|this)\b|have (?:a|an|one|some|two|few|several|another) (?:question|problem|issue|"
    r"error|doubt|task|request|idea)|have (?:the following|this|these|written|been (?:looking|trying|asked|reading|"
    r"hearing|thinking|wondering|working on))|'ve (?:been (?:looking|trying|asked|reading|hearing|thinking|wondering|"
    r"working on)|heard|got|tried|written|seen (?:that|this|it))|heard|"
    r"(?:do not|don't|dont|did not|didn't|did'nt|didnt|cannot|can't|cant) (?:understand|get it|know|see|think|"
    r"remember|follow|agree)|"
    r"hope (?:you|that|it|this|u)\b|was hoping|am hoping|'m hoping|"
    r"want (?:you|u|to (?!be\b|become\b|live\b|have\b|work\b|retire\b|move\b))|wanted|wanna|"
    r"(?:'m|am) (?:(?:just |currently |also |really |now )?(?:looking|planning|visiting|heading|headed|traveling|"
    r"travelling|flying|attending|trying|considering|thinking|wondering|struggling|writing|reading|working on|"
    r"preparing|getting ready|about to|interested in (?:starting|exploring|trying|getting|learning|finding|buying|"
    r"switching|incorporating|taking)|training for|searching|shopping|going (?:on|to (?!\w+ school\b))|"
    r"here|back|done|bored|curious|confused|stuck|sure|not sure|unsure|sorry|glad|happy to|excited|so excited|"
    r"ready|tired of (?:this|that|it)|asking|having (?:trouble|issues|a problem|problems)|using (?:this|the|a)\b|"
    r"new to (?:this|the)|a (?:bit |little )?(?:confused|lost)|able to|unable to (?!work|drive|eat|walk))))",
    re.I)
_TRANSIENT = re.compile(
    r"\b(?:today|tonight|tomorrow|yesterday|this (?:morning|afternoon|evening|weekend|week)|last night|"
    r"next (?:week|month|year|semester|weekend|summer|winter|spring|fall)|soon|upcoming|right now|at the moment)\b",
    re.I)
# Sentences about the task being worked on, not about the user.
_TASK = re.compile(
    r"\b(?:code|function|script|program|stack trace|error|bug|widgets?|layout|class|method|variable|loop|compile|"
    r"essay|paragraph|article|email|letter|sentence|text above|the above|following|answer|response|prompt|example|"
    r"you|your|u(?!\.[a-z]))\b|\b(?:it|this|that|these|those)\s*[.!]?$",
    re.I)
_PREFERENCE_WORDS = re.compile(
    r"\b(?:like|likes|liked|love|loves|enjoy|prefer|hate|dislike|avoid|adore|favou?rite|fan|allergic|intolerant|"
    r"vegetarian|vegan|pescatarian|halal|kosher|diet)\b", re.I)


def _strip_lead_in(sentence: str) -> str:
    for _ in range(3):
        stripped = _INTRO.sub("", _LEAD_IN.sub("", sentence)).strip()
        if stripped == sentence:
            break
        sentence = stripped
    return sentence


def is_preference(sentence: str) -> bool:
    """Is this one sentence a first-person statement of a lasting preference or fact about the user?"""
    s = sentence.translate(_QUOTES).strip()
    if s.endswith("?") or len(s.split()) < 2 or len(s) > 400:
        return False
    clause = _strip_lead_in(s)
    if _QUESTION_START.match(clause) and not _SUBJECT.match(clause):
        return False
    if not _SUBJECT.match(clause):
        return False
    if _TASK.search(clause):
        return False
    if re.match(r"my\b", clause, re.I):
        # "my spouse and I are looking to ...": the verb phrase after the subject decides, as after "I".
        if not _MY.match(clause):
            return False
        rest = re.sub(r"^my\s+[\w' -]*?\band i\b\s*(?:are|'re)?", "I'm", clause, flags=re.I)
        if rest != clause:
            clause = rest
        else:
            return not _TRANSIENT.search(clause) or bool(_PREFERENCE_WORDS.search(clause))
    after = re.sub(r"^(?:i|im)\b\s*", "", clause, flags=re.I)
    if clause.lower().startswith("im "):
        after = "'m " + after
    after = re.sub(r"^(?:also|really|truly|honestly|just|currently|still|definitely|generally|usually|always|"
                   r"absolutely|totally)\s+", "", after, flags=re.I)
    if _NOT_AFTER_I.match(after):
        return False
    # Past events and dated plans are situations, not lasting facts, unless they state a taste.
    if _TRANSIENT.search(clause) and not _PREFERENCE_WORDS.search(clause):
        return False
    return True


def detect_preferences(text: str) -> list[str]:
    """The first-person statements of the facts a user message states (detect_facts; retirements left out), in
    order, each once, lead-in removed ("Remember that I live in Lyon." -> "I live in Lyon."); a sentence of
    several facts gives one statement per fact ("I'm vegan and I live in Oslo." -> "I'm vegan.", "I live in
    Oslo."). No model is called."""
    return list(dict.fromkeys(f.statement for f in detect_facts(text) if not f.retire))


# ---------------------------------------------------------------- merging

_WORDS = re.compile(r"[a-z0-9]+")


def _normal(text: str) -> str:
    return " ".join(_WORDS.findall(text.translate(_QUOTES).lower()))


def merge_preferences(existing: list[str], new: list[str]) -> list[str]:
    """The preferences after `new` (later) statements join `existing` ones, oldest first, by the rules the store
    applies to learned facts (store.learn_chat), in one pass: a statement is keyed by the slot of each fact it
    states (detect_facts: the attribute for where I live, my diet, job, name, favourite X ...; the thing for a
    like or dislike), else by its words; a later statement of the same key replaces the earlier one ("I like
    horror films" then "I don't like horror films"), a retirement ("I'm not vegetarian anymore") removes it (one
    of another value removes nothing: "I don't live in Paris anymore" keeps "I live in Oslo"), and a statement
    also removes the ones whose facts it supersedes (StatedFact.supersedes: "I don't like jazz anymore" removes
    "I love jazz music", "Actually I prefer rock now" removes "I love jazz"). A statement of several facts ("I
    love Italian food and jazz music.", "I'm vegan and I live in Oslo.") of which only some are replaced stays as
    the sentences of the others ("I love Italian food."), in its place. Nothing else is removed."""
    merged: list[tuple[str, tuple[StatedFact, ...] | None]] = []  # (statement, the facts it holds; None: its words)
    for statement in [*existing, *new]:
        statement = statement.strip()
        if not statement:
            continue
        found = detect_facts(statement)
        if not found:
            words = _normal(statement)
            merged = [(text, facts) for text, facts in merged if facts is not None or _normal(text) != words]
            merged.append((statement, None))
            continue
        kept = []
        for text, facts in merged:
            left = facts if facts is None else tuple(f for f in facts if not any(_replaces(n, f) for n in found))
            if left is None or left == facts:
                kept.append((text, facts))
            else:  # "I love Italian food and jazz music." after "I hate jazz music.": "I love Italian food."
                kept += [(f.statement, (f,)) for f in left]
        held = tuple(f for f in found if not f.retire)
        merged = kept + ([(statement, held)] if held else [])
    return [text for text, _ in merged]


def _replaces(new: StatedFact, held: StatedFact) -> bool:
    """Does `new` (a later fact) replace or retire `held`? The rules of _add, over a held statement's facts."""
    if held.slot == new.slot and not (new.retire and new.key and held.key != new.key):
        return True
    return (held.attribute, held.key) in {(f.attribute, f.key) for f in new.supersedes}


# ---------------------------------------------------------------- facts about the speaker

# Single-valued attributes (one fact each: a new value replaces the old): name, age, home, origin, job, study, diet,
# relationship, religion and each "favourite <thing>" (its thing in American spelling: "favourite color").
# Multi-valued attributes: one fact per thing (slot = attribute group and the thing); likes and dislikes of one
# thing share a slot, so "I hate jazz" replaces "I love jazz".
_SLOT_GROUP = {"likes": "taste", "dislikes": "taste", "allergy": "allergy", "language": "language", "pets": "pets",
               "restriction": "restriction", "about": "about"}


@dataclass(frozen=True)
class StatedFact:
    """One atomic fact about the speaker found in a message.

    `attribute`: a single-valued one (name, age, home, origin, job, study, diet, relationship, religion,
    "favourite <thing>") or a multi-valued one (likes, dislikes, allergy (intolerances too), restriction (keto,
    gluten-free, halal ...: beside the diet), language, pets, about); `value` as said, names and places
    capitalized, closed-vocabulary values in lower case ("Lyon", "vegetarian"); a retirement of value "" retires
    the attribute whatever it holds ("Please forget where I live."); `statement`: the first-person sentence it came from ("I live in Lyon.", what editing turns into an
    edit); `retire`: True for "I'm not vegetarian anymore" (diet=vegetarian is withdrawn, nothing is stated);
    `change`: True for a like stated as a change ("Actually I prefer rock now.": see `supersedes`).

    `slot` is what an update replaces (single-valued: the attribute; multi-valued: the attribute group and the
    thing, "taste:jazz"); `key` the normalized value that makes two statements the same fact."""
    attribute: str
    value: str
    statement: str
    retire: bool = False
    change: bool = False  # a like stated as a change: "Actually I prefer rock now.", "I drink tea instead."
    withdrawal: bool = False  # a retirement of what the previous turn stated, withdrawn ("Scratch that.")

    @property
    def key(self) -> str:
        return norm_value(self.value)

    @property
    def slot(self) -> str:
        if self.attribute in _SLOT_GROUP:
            return f"{_SLOT_GROUP[self.attribute]}:{self.key}"
        return self.attribute

    @property
    def supersedes(self) -> tuple[StatedFact, ...]:
        """The other facts this one retires or replaces where the user holds them (the store's update rules,
        Store._learn; the fact's own slot is not among them):

        - a retirement of a like, dislike or allergy: the same attribute's value said another way: the value with
          or without a generic head noun of localpers/data/detect/kinds.json ("jazz" and "jazz music", "Italian"
          and "Italian food"), and singular or plural ("peanut", "peanuts"). A shared word is not enough: "jazz"
          never retires "jazz dancing" ("dancing" is no head noun), nor "rock" "rock climbing";
        - a like stated as a change (`change`): the likes of the other values of its kind (music genres,
          cuisines, sports, drinks: kinds.json), each as it may be held ("jazz", "jazz music"). A like of no known
          kind replaces nothing (a held fact is never dropped on a guess); "I also like rock." is no change;
        - anything else: nothing."""
        if self.retire and self.key and self.attribute in ("likes", "dislikes", "allergy") and not self.withdrawal:
            return tuple(StatedFact(self.attribute, v, self.statement, retire=True)
                         for v in sorted(_forms(self.key) - {self.key}))
        if self.change and self.attribute == "likes" and not self.retire:
            kind = kind_of(self.key)
            if kind is None:
                return ()
            head, values = _kinds()[2][kind]
            own = _forms(self.key, head, any_group=False)
            nouns = [h for h, g in _kinds()[0].items() if g == head]
            others = {form for value in values for form in (value, *(f"{value} {h}" for h in nouns))} - own
            return tuple(StatedFact("likes", v, self.statement) for v in sorted(others))
        return ()

    def __repr__(self):
        return f"{'-' if self.retire else ''}{self.attribute}={self.value!r} ({self.statement!r})"


_ARTICLES = re.compile(r"^(?:a|an|the|some|my)\s+", re.I)


# British spellings compared as American ones ("favourite colour" is the attribute "favourite color").
_AMERICAN = {"colour": "color", "colours": "colors", "flavour": "flavor", "flavours": "flavors", "theatre": "theater",
             "centre": "center", "humour": "humor", "neighbour": "neighbor", "neighbourhood": "neighborhood",
             "programme": "program", "jewellery": "jewelry", "harbour": "harbor", "honour": "honor",
             "behaviour": "behavior", "catalogue": "catalog", "grey": "gray", "aeroplane": "airplane",
             "moustache": "mustache", "doughnut": "donut", "pyjamas": "pajamas", "yoghurt": "yogurt",
             "organisation": "organization", "labour": "labor", "armour": "armor", "savoury": "savory"}


@functools.cache
def _kinds() -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str | None, tuple[str, ...]]], frozenset[str]]:
    """localpers/data/detect/kinds.json, parsed once: (head noun -> its group, value -> its kind, kind -> (the head
    group its values take or None, its values), the things said with "and" that are one ("mac and cheese")), head
    nouns and values as norm_value writes them."""
    data = json.loads((Path(__file__).resolve().parents[1] / "data" / "detect" / "kinds.json").read_text("utf-8"))
    heads = {norm_value(h): group for group, nouns in data["heads"].items() for h in nouns}
    kinds = {kind: (spec["head"], tuple(norm_value(v) for v in spec["values"])) for kind, spec in data["kinds"].items()}
    return (heads, {v: kind for kind, (_, values) in kinds.items() for v in values}, kinds,
            frozenset(norm_value(v) for v in data["whole"]))


def _head_split(key: str) -> tuple[str, str | None]:
    """A normalized value as (what it names, the group of its generic head noun or None): "jazz music" ->
    ("jazz", "music"), "jazz dancing" -> ("jazz dancing", None)."""
    heads = _kinds()[0]
    for head in sorted(heads, key=len, reverse=True):
        if key.endswith(" " + head) and len(key) > len(head) + 1:
            return key[:-len(head) - 1], heads[head]
    return key, None


def _number_forms(key: str) -> set[str]:
    """A value and its last word in the other number: "peanuts" <-> "peanut", "berries" <-> "berry"."""
    if key.endswith("ies") and len(key) > 4:
        return {key, key[:-3] + "y"}
    if key.endswith("s") and not key.endswith(("ss", "us", "is")) and len(key) > 3:
        return {key, key[:-1]}
    if re.search(r"[^aeiou]y$", key):
        return {key, key[:-1] + "ies"}
    if re.search(r"[a-z]$", key) and not re.search(r"(?:[sxz]|[cs]h)$", key):
        return {key, key + "s"}
    return {key}


def _forms(key: str, group: str | None = None, any_group: bool = True) -> set[str]:
    """The ways one thing may be held as a value (normalized): in either number, and with or without a generic
    head noun: of its own head's group ("jazz music" -> "jazz", "jazz songs"), else of `group`, else (any_group)
    of any group ("jazz" -> "jazz music", "jazz movies", ...)."""
    if not key:
        return set()
    base, own = _head_split(key)
    group = own or group
    heads = [h for h, g in _kinds()[0].items() if g == group or (group is None and any_group)]
    return _number_forms(base) | {key} | {f"{base} {h}" for h in heads}


def kind_of(key: str) -> str | None:
    """The kind (kinds.json: "music genre", "cuisine", "sport", "drink") of a normalized value, with or without
    its head noun or in the other number ("rock music" -> "music genre"), or None."""
    values = _kinds()[1]
    base, _ = _head_split(key)
    return next((values[v] for v in sorted(_number_forms(base) | {key}) if v in values), None)


@functools.lru_cache(maxsize=4096)
def norm_value(value: str) -> str:
    """A value as compared: lower case, words only, British spelling made American, a leading article dropped
    ("a Dog" == "dog", "colour" == "color")."""
    words = _WORDS.findall(normalize_text(value).translate(_QUOTES).lower().replace("'", ""))
    return _ARTICLES.sub("", " ".join(_AMERICAN.get(w, w) for w in words))


# Pasted, quoted and invented text: not the speaker's own statements.
_PASTE_INTRO = re.compile(
    r"\b(?:summari[sz]e|translate|proofread|rewrite|rephrase|paraphrase|fix|correct|edit|improve|polish|check|"
    r"review|reply to|respond to|answer|analy[sz]e|shorten|format|critique|grade)\b[^.?!\n]{0,60}?"
    r"(?:\bthis\b|\bthese\b|\bthe following\b|\bbelow\b|:)"
    r"|\b(?:wrote|writes|said|says|posted|sent(?: me)?|commented|texted|tweeted|messaged)\b[^.?!\n]{0,40}:"
    r"|\bhere(?:'s| is| are)\b[^.?!\n]{0,60}:|\b(?:it|this|that) (?:starts|goes|reads|says|begins)\b[^.?!\n]{0,20}:|"
    r"\b(?:essay|e-?mail|letter|review|post|comment|draft|bio|poem|speech|paragraph|article|tweet|caption|"
    r"lyrics|script|transcript|resume|cv)\b[^.!\n]{0,60}?[:?]|(?:^|\n)\s*(?:dear|hi|hello|hey) [A-Z][\w.]*,[ \t]*\n",
    re.I)
_QUOTED = re.compile(r"\"[^\"\n]*\"|(?<![\w])'[^'\n]*[.!?,]'(?![\w])")
# One to three words in quotes, none of them the speaker's: a name quoted, not speech ('I like "jazz".').
_QUOTED_WORDS = re.compile(r"(\b(?:like|love|enjoy|adore|hate|prefer|dislike|into|fan of|and|or),?\s+)"
                           r"\"(?!(?:i|i'm|im|i've|my|me|we|you|yes|no)\b)([\w'-]+(?: [\w'-]+){0,2})\"", re.I)
_LYRIC_MARK = re.compile(r"^\s*[\[(](?:chorus|verse|bridge|intro|outro|refrain|hook)\b|[♪♫]", re.I | re.M)
_INVENTED = re.compile(
    r"^(?:if|imagine|pretend|suppose|supposing|let's say|lets say|hypothetically|what if|in a world|in my story|"
    r"once upon a time|write|compose|draft)\b|\brole[- ]?play\b|\bonce upon a time\b", re.I)


def _own_text(text: str) -> str:
    """The part of a message that is the speaker's own words: quoted speech removed, text pasted after an
    introduction ("Summarize this review:", "He wrote:", "Dear John,") and '>' quoted lines dropped, nothing of
    a song (repeated lines, [Chorus] marks) or of a story or role-play from its first sentence on."""
    text = text.translate(_QUOTES).strip()
    if len(text) > 1 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1]  # the whole message in quotes: the speaker's own words
    lines = [line for line in text.splitlines() if not line.lstrip().startswith(">")]
    content = [norm_value(line) for line in lines if line.strip()]
    if _LYRIC_MARK.search(text) or (len(content) >= 3 and len(set(content)) < len(content)):
        return ""
    text = "\n".join(lines)
    if m := _PASTE_INTRO.search(text):
        text = text[:m.end()]
    text = _QUOTED_WORDS.sub(r"\1\2", text)  # 'I like "jazz".': a name in quotes is no quoted speech
    text = _QUOTED.sub(" ", text)
    kept = []
    for sentence in sentences(text):
        if _INVENTED.search(_strip_lead_in(sentence)):
            break
        kept.append(sentence)
    return " ".join(kept)


# Who a clause is about.
_RELATION = (r"(?:wife|husband|partner|spouse|boyfriend|girlfriend|fianc[eé]e?|son|daughter|kids?|children|child|"
             r"baby|toddler|brother|sister|sibling|siblings|mother|father|mom|mum|dad|parents?|grand\w+|aunt|uncle|"
             r"cousin|nephew|niece|friend|friends|boss|colleague|coworker|co-worker|roommate|flatmate|housemate|"
             r"neighbou?r|classmate|teammate|family|relatives?|in-laws?|\w+-in-law)")
_SELF_MY = re.compile(r"^my\s+(?:(?:all[- ]time |absolute |very |most )?favou?rite|name|job|profession|occupation|"
                      r"diet|religion|hometown|home town|home|birthday|age|first language|native language|"
                      r"mother tongue|hobby|hobbies|pastimes?|pets? (?:is|are))\b", re.I)
_OTHER_SUBJECT = re.compile(
    r"^(?:(?i:he|she|they|we|you|it|his|her|their|our|your|my\s+(?:[\w-]+\s+){0,2}?" + _RELATION + r"|my\s+\w+)|"
    r"(?!(?:Here|There|This|That|What|Which|Who|Where|When|How|It|Everything|Nothing|Something|Today|Now)\b)"
    r"[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?\s+(?:is|was|lives|works|loves|likes|has|hates|"
                            r"eats|enjoys|said|says))\b")
_ELLIPTIC_OTHER = re.compile(
    r"^(?:but\s+|and\s+|only\s+|just\s+)?(?:(?:he|she|they|my\s+(?:[\w-]+\s+){0,2}?\w+|[A-Z][a-z]+)\s+"
    r"(?:is|was|does|did|has|are|were|do|will|can)(?:\s+(?:too|also|though|instead))?|not me|not mine|"
    r"(?:he|she|they|my\s+\w+)\s+(?:is|was) the \w+)$", re.I)
_FIRST_PERSON = re.compile(r"^(?:i|i'm|im|i've|i'd|i'll)\b", re.I)
_WE_WITH_ME = re.compile(r"^(?:my\s+[\w -]{1,30}?|[A-Z]\w+)\s+and\s+i\s+(?:are|'re)\b\s*", re.I)

# Verbs and adjectives that may start a clause whose subject ("I") is left out: "I'm vegan and allergic to nuts",
# after an adverb ("and also live in Lyon"); an adverb before anything else starts none ("I love Italian food and
# also jazz music": one list).
_CLAUSE_ADVERB = r"(?:(?:also|now|still|really)\s+)*"
_CLAUSE_VERB = (_CLAUSE_ADVERB + r"(?:live|lived|work|worked|love|like|enjoy|adore|hate|dislike|detest|prefer|avoid|"
                r"have|own|speak|"
                r"has|lives|works|loves|likes|enjoys|hates|speaks|owns|"
                r"study|teach|grew|was|am|come|moved|play|eat|drink|follow|can't|cannot|don't|do not|never|"
                r"no longer|took up|taken up|started|picked up|switched|gave up|quit|stopped)")
_CLAUSE_ADJ = (r"(?:vegetarian|vegan|pescatarian|allergic|married|single|divorced|engaged|widowed|retired|"
               r"gluten|lactose|dairy|keto|paleo|halal|kosher|low[- ]carb|from|an? \w+|\d{1,3}\b)")
_CLAUSE_SPLIT = re.compile(
    r"(\s*(?:,\s*(?:and|but|while|yet|so)\s+|\s+(?:and|but|while|whereas|although|though|yet)\s+|,\s*|"
    r"\s+who\s+(?=\w+s\b)))"
    r"(?!i\s+(?:are|were)\b)(?=(?:i\b|i'm\b|im\b|i've\b|my\b|he\b|she\b|they\b|we\b|not me\b|so (?:am|do|have) i\b|"
    r"me too\b|(?:now|these days|nowadays|lately|also|plus),?\s+i\b|"
    r"[A-Z][a-z]+\s+(?:is|was|does|lives|works)\b|(?<=who\s)\w+s\b|" + _CLAUSE_VERB + r"\b|" + _CLAUSE_ADVERB
    + _CLAUSE_ADJ + r"))", re.I)
# A third-person verb after "who" ("I'm a nurse who lives in Lyon"), said of the speaker.
_THIRD_PERSON_VERB = {"is": "am", "has": "have", "does": "do", "was": "was"}
# A first-person clause that only points at another clause's predicate ("He's vegan but I'm not", "me too").
_ELLIPTIC_SELF = re.compile(r"^(?:i(?:'m| am| do| did| have| was| will| can|'d|'ll)(?: not|n't)?|i (?:don't|didn't|"
                            r"can't|won't|haven't|wasn't)|me(?: too| neither| either)?|so (?:am|do|have) i|"
                            r"neither (?:am|do) i|same(?: here)?)(?: too| either| also| neither)?$", re.I)

_ADVERBS = (r"(?:also|really|now|currently|still|actually|recently|just|definitely|totally|absolutely|generally|"
            r"usually|always|honestly|truly|officially|finally|originally|personally|mostly|strictly|kind of|"
            r"pretty much|basically)")
_TRAILING = re.compile(r"(?:\s*,)?\s+(?:now|nowadays|these days|again|instead|once again|once more|at the moment|currently|"
                       r"anymore|any more|as well|too|also|lately|since then|for good|by now|full[- ]time|a lot|very much|so much|"
                       r"the most|a bit|though|etc|and so on|and stuff)\s*$", re.I)
_NEG_BE = r"(?P<neg>not |no longer |not really )?"
_NEG_DO = r"(?P<neg>don't |do not |dont |no longer |never |didn't |do no longer )?"
# The diet (one value: which foods of animal origin one eats) and the dietary restrictions beside it (several:
# "I'm vegetarian and gluten-free"); intolerances are allergies ("I'm lactose intolerant" -> allergy=lactose).
_DIET = (r"(?P<v>vegetarian|veggie|vegan|pescatarian|pescetarian|flexitarian|raw vegan|plant[- ]based|carnivore|"
         r"omnivore)")
_RESTRICTION = (r"(?P<v>keto(?:genic)?|paleo|gluten[- ]free|dairy[- ]free|lactose[- ]free|nut[- ]free|sugar[- ]free|"
                r"low[- ]carb|low[- ]fat|low[- ]sodium|low[- ]salt|halal|kosher|whole30)")
_RESTRICTIONS = {"keto", "ketogenic", "paleo", "gluten free", "dairy free", "lactose free", "nut free", "sugar free",
                 "low carb", "low fat", "low sodium", "low salt", "halal", "kosher", "whole30"}
# "I don't eat meat", "I stopped eating meat and fish": a diet (value "no meat ..."), not a dislike.
_NO_MEAT = r"(?P<v>meat(?:(?:,| or| and| nor|, or|, and) (?:fish|seafood|poultry|eggs|dairy|any animal products))*)"
_PROFESSION = (
    r"(?:teacher|nurse|doctor|physician|surgeon|dentist|engineer|developer|programmer|coder|designer|architect|"
    r"lawyer|attorney|accountant|pharmacist|electrician|plumber|carpenter|mechanic|chef|cook|baker|waiter|"
    r"waitress|barista|bartender|writer|author|journalist|editor|artist|painter|musician|singer|photographer|"
    r"student|professor|lecturer|researcher|scientist|librarian|farmer|driver|pilot|firefighter|police officer|"
    r"cop|officer|soldier|veterinarian|vet|therapist|psychologist|psychiatrist|consultant|manager|analyst|"
    r"cashier|secretary|receptionist|clerk|salesman|saleswoman|salesperson|entrepreneur|freelancer|translator|"
    r"interpreter|paramedic|midwife|banker|economist|social worker|caregiver|carer|nanny|housewife|homemaker|"
    r"stay[- ]at[- ]home (?:mom|mum|dad|parent)|retiree|handyman|pediatrician|tutor|coach|trainer|janitor|"
    r"cleaner|gardener|hairdresser|barber|tailor|butcher|fisherman|miner|welder|builder|plumber|nurse practitioner|"
    r"dietitian|nutritionist|optician|physiotherapist|physical therapist|radiologist|technician|scientist|"
    r"biologist|chemist|physicist|mathematician|statistician|data scientist|sysadmin|administrator|"
    r"civil servant|diplomat|politician|judge|paralegal|realtor|real estate agent|agent|broker|trader|"
    r"investor|ceo|cto|founder|owner|teaching assistant|professor|principal|instructor|educator|dancer|actor|"
    r"actress|comedian|youtuber|streamer|influencer|blogger|programmer|intern|apprentice|resident|surgeon)")
_PET = (r"(?:dogs?|cats?|pupp(?:y|ies)|kittens?|rabbits?|bunn(?:y|ies)|hamsters?|parrots?|birds?|fish|goldfish|"
        r"turtles?|tortoises?|snakes?|lizards?|geckos?|horses?|pon(?:y|ies)|guinea pigs?|ferrets?|chickens?|"
        r"pets?|budgies?|canar(?:y|ies)|rats?|mice|iguanas?)")
_LIKE = r"(?P<verb>like|love|enjoy|adore|prefer|dig|fancy|appreciate|eat|drink|listen to|watch|read|play)"
_DISLIKE = r"(?P<verb>hate|dislike|detest|loathe|despise|can't stand|cannot stand|can't bear|avoid|steer clear of)"
_END = r"(?:,?\s+(?:for|because|since|due to|by choice|after|ever since)\b.*)?$"
# How or when one works, said before the employer: "I work from home for Google", "I work nights at the hospital".
_WORK_HOW = (r"(?:(?:from home|at home|remotely|online|nights|at night|part[- ]time|full[- ]time|freelance|"
             r"on weekends|at weekends)\s+)*")
# What follows "I work at/for" that is when or where one works, or why, not an employer: "I work at night", "I work
# at home", "I work for a living" (times the frequencies of _FREQUENCY also say: "at weekends", "at the weekend").
_NOT_EMPLOYER = re.compile(
    r"^(?:(?:an? |the |my )?(?:(?:late |odd |all |weird |irregular |unsocial |unsociable |long |strange |crazy )?"
    r"(?:night|nights|nite|nites|nighttime|night time|night shifts?|midnight|dawn|noon|hours|times))|(?:the )?moment|"
    r"home|(?:my )?(?:own )?(?:home|house|place|flat|apartment|desk|computer|laptop|kitchen table|own pace|"
    r"own hours)|(?:an? |the )?(?:office|desk|computer)|myself|me|free|fun|money|tips|(?:a )?living|nothing|"
    r"\d.*)$", re.I)

# (attribute, pattern) in order; the first that matches a clause (normalized: "i'm", "don't", adverbs dropped)
# gives its fact. A pattern's `neg` group marks a negation, `v` the value, `a` the favourite's thing.
_PATTERNS = [(attribute, re.compile(pattern, re.I)) for attribute, pattern in [
    ("name", r"^my name(?: is|'s) (?P<v>[\w' -]{1,40}|(?:dr|mr|mrs|ms|prof)\. [\w' -]{1,36})$"),
    ("name", r"^(?:you can )?call me (?P<v>[\w' -]{1,40})$"),
    ("name", r"^i'm called (?P<v>[\w' -]{1,40})$"),
    ("name", r"^i go by (?P<v>[\w' -]{1,40})$"),
    ("favourite", r"^my (?:all[- ]time |absolute |very |most )?favou?rite (?P<a>[\w -]+?) (?:is|are|'s) (?P<v>.+)$"),
    ("age", r"^i'm " + _NEG_BE + r"(?P<v>\d{1,3})(?: years old| years| yo| y/o)?$"),
    ("age", r"^i'm an? (?P<v>\d{1,3})[- ]years?[- ]old\b.*$"),
    ("age", r"^i (?:just )?turned (?P<v>\d{1,3})$"),
    ("age", r"^my age is (?P<v>\d{1,3})$"),
    ("diet", r"^i'm " + _NEG_BE + r"(?:an? |on an? |on the )?(?:strict |full |committed )?" + _DIET
     + r"(?: diet| dieter| eater| person)?" + _END),
    ("diet", r"^i (?:only |strictly |exclusively )?(?:follow|keep|eat|'ve gone|have gone|went|turned|became|"
             r"switched to|'m following) (?:only |strictly |exclusively )?(?:an? |the )?(?:strict )?" + _DIET
             + r"(?: diet| food| foods| meals| dishes)?" + _END),
    ("no meat", r"^i (?:don't|no longer|never|stopped|quit|gave up|have stopped|'ve stopped|have given up) "
                r"(?:eat(?:ing)? |eating )?(?:any )?" + _NO_MEAT + _END),
    ("diet", r"^i eat (?P<v>meat)" + _END),
    ("restriction", r"^i'm " + _NEG_BE + r"(?:an? |on an? |on the )?(?:strict )?" + _RESTRICTION
     + r"(?: diet| dieter| eater| person)?" + _END),
    ("restriction", r"^i " + _NEG_DO + r"(?:follow|keep|eat|'ve gone|have gone|went|turned|switched to|'m following|"
                    r"'m on|am on) (?:an? |the )?(?:strict )?" + _RESTRICTION + r"(?: diet)?" + _END),
    ("allergy", r"^i'm " + _NEG_BE + r"(?P<v>lactose|gluten|dairy|fructose|histamine|wheat|soy)[- ]intolerant$"),
    ("diet", r"^my diet is (?:an? )?(?P<v>[\w -]+?)(?: one)?$"),
    ("allergy", r"^i'm " + _NEG_BE + r"(?:severely |very |mildly )?(?:allergic|intolerant) to (?P<v>.+)$"),
    ("allergy", r"^i " + _NEG_DO + r"have an? (?:severe |mild )?(?P<v>[\w -]+?) (?:allergy|intolerance)$"),
    ("home", r"^i " + _NEG_DO + r"(?:live|reside|stay) in (?P<v>.+)$"),
    ("home", r"^i'm " + _NEG_BE + r"(?:living|based|residing|settled) in (?P<v>.+)$"),
    ("home", r"^i (?:moved|relocated|have moved|'ve moved|have relocated|'ve relocated) (?:back )?"
             r"(?:(?:here )?from .+? )?to (?P<v>.+)$"),
    ("home", r"^i (?:moved|have moved|'ve moved) out of (?P<gone>.+)$"),
    ("home", r"^i (?:moved|relocated|have moved|'ve moved) (?:here |away )?from (?P<gone>.+)$"),
    ("home", r"^my home is (?:in )?(?P<v>.+)$"),
    ("origin", r"^i'm " + _NEG_BE + r"(?:originally )?from (?P<v>.+)$"),
    ("origin", r"^i (?:grew up|was born|was raised|was brought up) in (?P<v>.+)$"),
    ("origin", r"^i (?:originally )?come from (?P<v>.+)$"),
    ("origin", r"^my (?:hometown|home town) is (?P<v>.+)$"),
    ("study", r"^i " + _NEG_DO + r"(?:study|major in) (?P<v>.+)$"),
    ("study", r"^i'm " + _NEG_BE + r"(?:studying|majoring in|doing a degree in|doing a phd in) (?P<v>.+)$"),
    ("job", r"^i " + _NEG_DO + r"work as (?:an? |the )?(?P<v>.+)$"),
    ("employer", r"^i " + _NEG_DO + r"work " + _WORK_HOW + r"(?:for|at|@) ?(?P<v>.+)$"),
    ("employer", r"^i'm " + _NEG_BE + r"(?:working|employed|working full[- ]time) " + _WORK_HOW
     + r"(?:for|at) (?P<v>.+)$"),
    ("job", r"^i'm " + _NEG_BE + r"(?:an? |the )?(?P<v>(?:[\w-]+ ){0,2}" + _PROFESSION + r")$"),
    ("job", r"^i'm " + _NEG_BE + r"(?P<v>retired|unemployed|self[- ]employed|between jobs)$"),
    ("job", r"^my (?:job|profession|occupation) is (?:an? |the )?(?P<v>.+)$"),
    ("relationship", r"^i'm " + _NEG_BE + r"(?P<v>married|single|divorced|engaged|widowed|separated|in a relationship)$"),
    ("religion", r"^i'm " + _NEG_BE + r"(?:an? |a practicing |a devout |a practising )?(?P<v>muslim|christian|catholic|"
                 r"protestant|jewish|hindu|buddhist|sikh|atheist|agnostic|mormon|orthodox|jain|pagan|religious)$"),
    ("religion", r"^my religion is (?P<v>.+)$"),
    ("language", r"^i " + _NEG_DO + r"speak (?P<v>[\w ,-]+?)(?: fluently| natively| well)?$"),
    ("language", r"^i'm " + _NEG_BE + r"fluent in (?P<v>.+)$"),
    ("language", r"^my (?:first|native|mother) (?:language|tongue) is (?P<v>.+)$"),
    ("pets", r"^i " + _NEG_DO + r"(?:have|own|have got|got|'ve got) (?P<v>(?:an? |one |two |three |four |five |six "
             r"|\d+ |some |several )?(?:[\w-]+ ){0,2}?" + _PET + r")(?: at home)?(?: (?:named|called) [\w' -]{1,40})?$"),
    ("pets", r"^my pets? (?:is|are) (?P<v>(?:an? |two |three |\d+ )?(?:[\w-]+ ){0,2}?" + _PET + r")$"),
    ("favourite", r"^my (?P<a>hobby|hobbies|pastime|pastimes) (?:is|are|include|includes) (?P<v>.+)$"),
    ("dislikes", r"^i " + _DISLIKE + r" (?P<v>.+)$"),
    ("dislikes", r"^i'm (?P<neg2>not|no longer) (?:an? )?(?:big |huge |great )?(?:fan of|into|keen on|a fan of) "
                 r"(?P<v>.+)$"),
    ("dislikes", r"^i'm (?P<neg2>not|no longer) an? (?:big |huge |great )?(?P<v>[\w -]+?) fan$"),
    ("dislikes", r"^i (?P<neg2>don't|never|can't) (?:really )?(?P<verb2>like|love|enjoy|eat|drink|watch|listen to|"
                 r"care for|wear|use|play) (?P<v>.+)$"),
    ("likes", r"^i'm (?:an? |(?:much |way |a lot |far )?more |mostly |mainly )?(?:big |huge |great |massive )?"
              r"(?:fan of|lover of|into|passionate about|obsessed with|"
              r"crazy about|keen on|a fan of) (?P<v>.+)$"),
    ("likes", r"^i'm an? (?:big |huge |great |massive |die-hard |lifelong )?(?P<v>[\w -]+?) fan$"),
    ("likes", r"^i " + _NEG_DO + r"(?:really |absolutely |totally |truly |do )?" + _LIKE + r" (?P<v>.+)$"),
]]
_ANYMORE = re.compile(r"\b(?:any ?more|no longer|not \w+ any ?more|used to|stopped|quit)\b", re.I)
_VALUE_CUT_WORDS = (r"\s+(?:over|rather than|instead of|more than|better than|(?-i:than)|with my|with \w+ \w+|since|"
                    r"while|when|whenever|for (?:\d|a |an |the |many |several |years|ages|a while)|because|but|"
                    r"although|though|"
                    r"who|which|where)\b.*$")
_VALUE_CUT = re.compile(_VALUE_CUT_WORDS + r"|,.*$", re.I)
# A favourite is often a title ("Gone with the Wind", "Stand by Me", "When Harry Met Sally"): only a clause cuts it
_FAVOURITE_CUT = re.compile(r"\s+(?:rather than|instead of|more than|better than|(?-i:than)|with my|since|while|"
                            r"because|but|although|though|which)\b.*$|,.*$", re.I)
_PRONOUN_VALUE = re.compile(r"^(?:it|this|that|these|those|them|you|him|her|one|so|too|very|much|to)$", re.I)


def _known_thing(text: str) -> bool:
    """Is `text` a thing kinds.json knows: a value of a kind or a value with a head noun ("coffee", "jazz music")?"""
    key = norm_value(_without_frequency(_VALUE_CUT.sub("", _TRAILING.sub("", _TIME_TAIL.sub("", text))), "likes"))
    return bool(key) and (kind_of(key) is not None or _head_split(key)[1] is not None)


_DOING = {"drinking": "drink", "eating": "eat", "listening to": "listen to", "watching": "watch", "playing": "play",
          "reading": "read"}


_THING_PERSON = re.compile(r"^i'm (?P<not>not (?:really )?)?(?:(?:much |way |a lot |far )?more of |more |really |"
                           r"definitely |totally |such )?an? "
                           r"(?:(?:big|huge|real|total|massive|serious|die-hard|true) )?(?P<x>[\w -]+?) (?:person|guy|"
                           r"girl|gal|drinker|lover|addict|fanatic|enthusiast|snob|nut|junkie|fiend)"
                           r"(?P<end>(?: (?:now|these days|nowadays|lately))*)$", re.I)


def _given_up(clause: str) -> str:
    """A normalized clause of a like given up or taken up said as a like: "i stopped drinking coffee", "i gave up
    coffee", "i'm over jazz" -> "i no longer drink coffee" ...; "i have been drinking tea" -> "i drink tea", "i have
    tea every morning" -> "i like tea every morning". Only of a thing kinds.json knows when no verb says what was
    done with it ("I quit smoking." stays as it is)."""
    doing = "|".join(_DOING)
    said, clause = clause, re.sub(r"^(i (?:have |'ve )?(?:gave|given) up) on\b", r"\1", clause, flags=re.I)  # "up on jazz"
    if m := re.match(r"^i (?:have |'ve )?(?:stopped|quit|gave up|given up|cut out) (" + doing + r") (.+)$", clause,
                     re.I):
        return f"i no longer {_DOING[m[1].lower()]} {m[2]}"
    if (m := re.match(r"^i (?:have |'ve )?(?:stopped|quit|gave up|given up|cut out|ditched|dropped) (.+)$|"
                      r"^i'm (?:so |totally |completely |well )?(?:over|off|done with|through with) (.+)$",
                      clause, re.I)) \
            and all(_known_thing(x) for x in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", m[1] or m[2])):
        return f"i no longer like {m[1] or m[2]}"  # "i gave up coffee and tea": each a known thing
    if (m := re.match(r"^i (?:have|'ve) been (" + doing + r") (.+)$", clause, re.I)) and _known_thing(m[2]):
        return f"i {_DOING[m[1].lower()]} {m[2]}"
    # "i took up golf", "i started playing golf", "i switched to tea" (a change: _CHANGE): a like of a known thing
    if (m := re.match(r"^i (?:have |'ve )?(?:took up|taken up|started|picked up|got into|gotten into|switched to|"
                      r"switched over to)(?: (?:" + doing + r"))? (.+)$", clause, re.I)) and _known_thing(m[1]):
        return f"i like {m[1]}"
    # "i'm a tea person", "i'm more of a coffee guy now": a like of a known thing ("i'm not a coffee person": a dislike)
    if (m := _THING_PERSON.match(clause)) and _known_thing(m["x"]):
        verb = "don't like" if m["not"] else "like"  # "i'm not a coffee person": a dislike
        return f"i {verb} {m['x']}{m['end']}"
    # "i have coffee every morning": a habit of a known thing (a frequency said), not a possession
    if (m := re.match(r"^i (?:have|grab|get|order|take) (.+)$", clause, re.I)) and _FREQUENCY.search(clause) \
            and _known_thing(m[1]):
        return f"i like {m[1]}"
    return said


# A like said with the thing as subject or as a switch: "Rock is my thing now.", "Jazz isn't my thing anymore.", "I
# switched from coffee to tea.", "No more coffee for me." (each only of a thing kinds.json knows).
_MY_THING = re.compile(r"(?P<at>^|,\s*(?:and |but )?|\s(?:and|but)\s+)(?P<x>[\w' -]{1,30}?)(?:\s|(?='s))"
                       r"(?P<be>is|'s|isn't|isnt|is not|is no longer) (?:really )?my "
                       r"(?:thing|jam|cup of tea|go-to|drink|sport|music|genre)"
                       r"(?P<end>(?: (?:now|these days|nowadays|any ?more))*)(?=\s*[,;.!]|\s+(?:and|but)\b|$)", re.I)
_SWITCH = re.compile(r"^i(?: have|'ve)? (?:just |recently |now )?(?:switched|changed|gone over|went over) (?:over )?"
                     r"(?:from (?P<old>[\w' -]+?) )?to (?P<new>[\w' -]+?)"
                     r"(?P<end>(?: (?:now|these days|lately))*[.!]*)$", re.I)
# A known thing given up for another: "I gave up tennis for golf.", "I replaced coffee with tea." (a like retired,
# a like stated; a change only when said as one: "... for golf now").
_TRADE = re.compile(r"^i(?: have|'ve)? (?:just |recently |finally )?(?:gave up|given up|quit|stopped|ditched|dropped|"
                    r"traded|swapped|exchanged|replaced|switched|substituted)"
                    r"(?: (?:drinking|eating|playing|watching|listening to))? (?P<old>[\w' -]+?) "
                    r"(?:for|with|in favou?r of) (?P<new>[\w' -]+?)"
                    r"(?P<end>(?: (?:now|these days|lately|instead))*[.!]*)$",
                    re.I)
# "I prefer tea to coffee (these days).": a like of the first (a change when said as one), of known things only.
_PREFER_TO = re.compile(r"^(?P<i>i (?:really |much |actually )?prefer) (?P<new>[\w' -]+?) (?:to|over) (?P<old>[\w' -]+?)"
                        r"(?P<end>(?: (?:now|these days|nowadays|lately|instead))*[.!]*)$", re.I)
_NO_MORE = re.compile(r"^no more (?P<x>[\w' -]+?) for me\b", re.I)
# "I like neither jazz nor rock.": said as "I don't like jazz or rock." (a dislike of each, never a like)
_NEITHER = re.compile(r"\b(?P<i>I|i)(?: (?:really|truly|actually|much|particularly|especially))? (?P<verb>like|love|"
                      r"enjoy|adore|eat|drink|listen to|watch|play|care for) neither (?P<x>[^,;.!?]+?) nor\b", re.I)


def _things_said(sentence: str) -> str:
    """`sentence` with the likes said of a thing, as a switch, a trade or as "no more X for me" said in the first
    person ("Rock is my thing now." -> "I like rock now.", "I gave up tennis for golf." -> "I no longer like tennis,
    I like golf."), where kinds.json knows the things, and "neither ... nor" said as "don't ... or" ("I like neither
    jazz nor rock." -> "I don't like jazz or rock.", of any thing)."""
    def thing(m):
        if not _known_thing(m["x"]):
            return m[0]
        x = m["x"]
        if not m["at"] and re.match(r"[A-Z][a-z]", x) and kind_of(norm_value(x.split()[0])) != "cuisine":
            x = x[0].lower() + x[1:]  # "Tea is my drink": capitalized as the sentence's first word only
        if m["be"].lower() in ("is", "'s"):
            return f"{m['at']}I like {x}{m['end']}"
        gone = re.search(r"any ?more", m["end"], re.I) or "longer" in m["be"].lower()
        return m["at"] + ("I no longer like " if gone else "I don't like ") + x

    def switched(m):
        if not _known_thing(m["new"]):
            return m[0]
        old = f"I no longer like {m['old']}, " if m["old"] and _known_thing(m["old"]) else ""
        return f"{old}I like {m['new']} now" + re.sub(r"[^.!]", "", m["end"])

    def traded(m):
        if not (_known_thing(m["old"]) and _known_thing(m["new"])):
            return m[0]
        new = _TIME_TAIL.sub("", m["new"])  # "... for tea a year ago": the like is of tea, not of its time
        return f"I no longer like {m['old']}, I like {new}{m['end']}"

    sentence = _NEITHER.sub(lambda m: f"{m['i']} don't {m['verb']} {m['x']} or", sentence)
    sentence = _MY_THING.sub(thing, sentence)
    sentence = _SWITCH.sub(switched, sentence)
    sentence = _TRADE.sub(traded, sentence)
    sentence = _PREFER_TO.sub(lambda m: f"{m['i']} {m['new']}{m['end']}"
                              if _known_thing(m["new"]) and _known_thing(m["old"]) else m[0], sentence)
    return _NO_MORE.sub(lambda m: f"I no longer like {m['x']}" if _known_thing(m["x"]) else m[0], sentence)


_OVER = {"was": "i'm no longer ", "lived in": "i no longer live in ", "worked as": "i no longer work as ",
         "worked at": "i no longer work at ", "worked for": "i no longer work for "}


def _normal_clause(clause: str) -> str:
    c = clause.translate(_QUOTES).strip().rstrip(".!;:, ")
    c = re.sub(r"^i am\b", "i'm", c, flags=re.I)
    c = re.sub(r"^im\b", "i'm", c, flags=re.I)
    c = re.sub(r"\b(?:do not|dont)\b", "don't", c, flags=re.I)
    c = re.sub(r"\b(?:cannot|can not|cant)\b", "can't", c, flags=re.I)
    c = re.sub(r"^i(?:'ve| have) got\b", "i have", c, flags=re.I)
    c = re.sub(r"^i've\b", "i have", c, flags=re.I)
    c = re.sub(r"^i have been\b(?! \w+ing\b| to\b)", "i'm", c, flags=re.I)
    c = re.sub(r"\s+(?:lol|haha+|hehe|lmao|xd|:\)|:d|;\))$", "", c, flags=re.I)
    c = re.sub(r"^i used to be\b", "i'm no longer", c, flags=re.I)
    # Ending a state: "I stopped being vegetarian", "I quit my job as a nurse", "I stopped living in Oslo"
    c = re.sub(r"^i (?:have |'ve )?(?:stopped|quit|gave up|given up) being\b", "i'm no longer", c, flags=re.I)
    c = re.sub(r"^i (?:have |'ve )?(?:stopped|quit|gave up|given up|dropped|abandoned) (vegetarian|vegan|pescatarian)ism\b",
               r"i'm no longer \1", c, flags=re.I)
    c = re.sub(r"^i (?:went|have gone|'ve gone) back to being\b", "i'm", c, flags=re.I)  # "... to being vegetarian"
    c = re.sub(r"^i (?:have |'ve )?(?:quit|left|lost|gave up|given up) my (?:job|position|career|work) as\b|"
               r"^i (?:have |'ve )?(?:stopped|quit) working as\b", "i no longer work as", c, flags=re.I)
    c = re.sub(r"^i (?:have |'ve )?(?:stopped|quit) (?:living|residing) in\b", "i no longer live in", c, flags=re.I)
    # "I was a nurse until last year", "I lived in Oslo until 2020": a state that is over
    c = re.sub(r"^i (was|lived in|worked as|worked at|worked for) (.+?),? until\b.*$",
               lambda m: _OVER[m[1].lower()] + m[2], c, flags=re.I)
    # "I was vegetarian (but now ...)": a diet, restriction, marriage or job that is over
    c = re.sub(r"^i was (?=(?:an? )?(?:strict )?(?:vegetarian|vegan|pescatarian|pescetarian|flexitarian|keto|paleo|"
               r"gluten[- ]free|dairy[- ]free|married|engaged|single|in a relationship)\b)", "i'm no longer ", c, flags=re.I)
    # "I'm vegan now, not vegetarian": the statement; what it is not is said by the replacement
    if not re.match(r"^i(?:'m)? (?:not|no longer|don't|never|can't)\b", c, re.I):
        c = re.sub(r"\s*,?\s+(?:and |but )?not (?:an? )?[\w -]+$", "", c, flags=re.I)
    c = re.sub(r"^i used to\b", "i no longer", c, flags=re.I)
    for _ in range(3):
        c = re.sub(r"^(i(?:'m)?|i don't|i'm not) " + _ADVERBS + r"\b,? ?", r"\1 ", c, flags=re.I)
        c = re.sub(r"^(i|i'm) not " + _ADVERBS + r"\b ", r"\1 not ", c, flags=re.I)
    c = re.sub(r"^i (?:often|sometimes|occasionally|regularly|frequently|normally|typically) ", "i ", c, flags=re.I)
    c = _given_up(c)
    if (m := re.match(r"^i go (\w+ing)\b(.*)$", c, re.I)) and _known_thing(m[1]):  # "I go swimming twice a week"
        c = f"i like {m[1]}{m[2]}"
    c = re.sub(r"^i'm no longer\b", "i'm no longer", c, flags=re.I)
    c = re.sub(r"^(i) (?:do )?no longer\b", r"\1 no longer", c, flags=re.I)
    c = re.sub(r"\s*,?\s*\bnot (?:any ?more|anymore)\b", "", c, flags=re.I)
    c = re.sub(r"\s+(?:again|now|still|too|these days|nowadays|instead)(?=\s*,)", "", c, flags=re.I)  # "... again, after"
    for _ in range(2):
        c = _TRAILING.sub("", c)
    return c.strip()


def _clean_value(value: str, attribute: str) -> str:
    if attribute in ("home", "origin"):  # "Paris, Texas": a place and its region stay one value
        value = re.sub(r",\s+(?=[A-Z][\w.'-]*(?:\s+[A-Z][\w.'-]*)*(?:,|$))", "\x01", value.strip())
        value = re.sub(r"\s+to (?:be|work|study|live|join|get|take|start|look|find|care|help|stay)\b.*$", "", value)
        if attribute == "home":  # "I moved to Paris from Lyon"
            value = re.sub(r"\s+from\s+.*$", "", value)
    if "," in value and (attribute in _LISTED or attribute.startswith("favourite ")):
        # "jazz, rock and blues", "nuts, eggs and milk", "My hobbies are hiking, reading and cooking": a list keeps
        # its commas
        listed = re.sub(_VALUE_CUT_WORDS, "", value.strip(), flags=re.I)
        bare = _without_frequency(_TRAILING.sub("", listed).strip(" ,.;:!-"), attribute)
        value = listed if (_parts_of(attribute, bare) or list_parts(bare)) else _VALUE_CUT.sub("", value.strip())
    elif attribute.startswith("favourite"):   # the attribute is "favourite <thing>" by now
        value = _FAVOURITE_CUT.sub("", value.strip())
    elif attribute != "name":
        value = _VALUE_CUT.sub("", value.strip())
    value = value.replace("\x01", ", ")
    if attribute in ("job", "study", "employer"):  # "a graphic designer in Berlin": the job; the place is another fact
        value = re.sub(r"\s+(?:in|at|from|near)\s+[A-Z].*$", "", value)
        # "I left my job as a nurse to become a teacher": the job; what it was left for is not part of it
        value = re.sub(r"\s+to (?:become|be|work|study|start|join|pay|support|take|focus)\b.*$", "", value)
    if attribute in ("likes", "dislikes"):  # "I drink mostly tea", "lots of tea": the thing
        value = re.sub(r"^(?:to|mostly|mainly|only|just|usually|primarily|largely|exclusively|a lot of|lots of|"
                       r"plenty of|(?:an?|my|one|two|three|four|five|\d+|a few|a couple of|several) "
                       r"(?:cups?|glass(?:es)?|mugs?|bottles?|pints?|cans?|shots?|bowls?) of|an?|some|(?:way )?too much|"
                       r"so much)\s+", "", value.strip(), flags=re.I)
        if (inner := _WHEN_IN_LIST.sub("", value)) != value and list_parts(_without_frequency(inner, attribute)):
            value = inner  # "coffee in the morning and tea at night": each thing without its time
    value = _TRAILING.sub("", value).strip(" ,.;:!-")
    if attribute != "name":
        value = _without_frequency(value, attribute)
    if re.search(r"(?:^|\s)(?:[A-Za-z]\.)+[A-Za-z]$", value):  # "Washington D.C": the initials keep their last dot
        value += "."
    return value


# How often or at what time of day something is done, at the end of a value: not part of it ("I drink coffee every
# morning." -> coffee, "I play tennis on weekends." -> tennis); "I like Sunday roast." keeps its words.
_DAY = r"(?:(?:mon|tues|wednes|thurs|fri|satur|sun)day|week ?day|week ?end)"
_PART = r"(?:morning|evening|afternoon|night|lunch ?time|bed ?time)"
_WHEN = (
    r"(?:almost |nearly |pretty much |just about |like )?(?:every|each)(?: single| other)? (?:" + _DAY + r"|day|night|"
    r"morning|evening|afternoon|week|month|year|summer|winter|spring|fall|autumn|season|holiday|meal)s?"
    r"(?: " + _PART + r"s?)?|every (?:so often|now and (?:then|again)|once in a while|chance i get|time i can)|"
    r"(?:on|at|over|during)(?: the)? " + _DAY + r"s?(?: " + _PART + r"s?)?|"
    r"(?:late )?at night|at nights|(?:in|during) the " + _PART + r"s?|"
    r"(?:in|during) (?:the )?(?:summer|winter|spring|fall|autumn)s?|in (?:the )?(?:summer|winter)time|"
    r"(?:at|around|by|before|after) (?:\d{1,2}(?::\d\d)? ?(?:am|pm|a\.m\.?|p\.m\.?|o'clock)|\d{1,2}:\d\d|noon|midnight)|"
    r"(?:a|per) (?:day|week|month|year)|"
    r"(?:before|after|at) (?:bed|bedtime|work|school|class|dinner|lunch|breakfast|the gym|the office|home|"
    r"(?:a |my )?(?:workouts?|meals?|runs?))|for (?:breakfast|lunch|dinner|dessert|brunch|a snack|snacks)|"
    r"with (?:breakfast|lunch|dinner|(?:every |most |all |my )?meals?)|"
    r"most (?:days|mornings|evenings|nights|afternoons|weekends|weeks|of the time)|"
    r"daily|nightly|weekly|monthly|often|usually|sometimes|regularly|occasionally|frequently|always|constantly|"
    r"religiously|all the time|from time to time|once in a while|all day(?: long)?|all year(?: round)?|"
    r"year[- ]round|on a (?:daily|weekly|regular) basis|whenever i (?:can|get the chance)|"
    r"in my (?:free|spare) time|(?:once|twice|three times|\d+ times|a (?:couple|few) (?:of )?times) "
    r"(?:a|per|every|each) (?:day|week|month|year)")
_FREQUENCY = re.compile(r"(?:\s*,)?\s+(?:" + _WHEN + r")\s*$", re.I)
# ... before the next thing of a list: "coffee in the morning and tea (at night)"
_WHEN_IN_LIST = re.compile(r"(?:\s*,)?\s+(?:" + _WHEN + r")(?=\s*,|\s+(?:and|or|&)\s+)", re.I)
# Nouns in "-ing" that are no activity: "I eat pudding every day" -> pudding.
_ING_NOUNS = {"pudding", "stuffing", "icing", "frosting", "dressing", "filling", "topping", "dumpling", "herring",
              "ling", "ring", "king", "thing", "wing", "string", "spring", "evening", "morning", "ceiling",
              "clothing", "bedding", "wedding", "building", "painting", "writing", "ping"}


def _without_frequency(value: str, attribute: str) -> str:
    """`value` without how often or when it is done ("coffee every morning" -> "coffee"), unless it is an
    activity that kinds.json does not list ("working on weekends" stays: what is liked or hated is that)."""
    kept = " " + value
    for _ in range(3):
        kept = _TRAILING.sub("", _FREQUENCY.sub("", kept)).rstrip(" ,.;:!-")
    kept = kept.strip()
    if kept == value or not kept:  # "I read at night.": no value (a statement about the user, not a like)
        return kept
    first = kept.split()[0]
    if attribute in ("likes", "dislikes") and first.lower().endswith("ing") and first.islower() \
            and first.lower() not in _ING_NOUNS and kind_of(norm_value(kept)) is None:
        return value
    return kept


_LIST_SEP = re.compile(r"\s*,\s*(?:(?:and|&)(?:\s+also)?\s+|or\s+|also\s+)?|"
                       r"\s+(?:(?:and|&)(?:\s+also)?|or|nor|as well as)\s+",
                       re.I)


def list_parts(value: str) -> list[str] | None:
    """The things a like's value lists, each as it would be said alone ("Italian food and jazz music" -> ["Italian
    food", "jazz music"]; "jazz, rock and blues"; "Italian and French food" -> ["Italian food", "French food"]), or
    None when it names one thing. Never split on a bare "and" beside a thing kinds.json does not know: a value
    without commas is a list only when each of its parts is a value of a kind there or ends in one of its head
    nouns, and the whole is no value it lists ("rock and roll", "gin and tonic"); "mac and cheese", "salt and
    pepper chips" are one thing. A comma list ended by "and" or "or" ("jazz music, Italian food, and hiking",
    "reading, writing and painting") lists each of its items, known or not, its last "X and Y" split at its first
    "and" unless kinds.json lists it whole ("pizza, sushi and mac and cheese", "pizza, mac and cheese"); a comma
    before a qualifier ("jazz, especially bebop") or without a closing "and" makes no list."""
    value = re.sub(r"^(?:both|either|neither)\s+", "", value.strip(), flags=re.I)
    if kind_of(norm_value(value)) is not None:
        return None
    return _known_parts(value) or _comma_parts(value) or _also_parts(value)


def _known_parts(value: str) -> list[str] | None:
    """list_parts of things kinds.json knows, each of them, or None."""
    parts = [p.strip() for p in _LIST_SEP.split(value)]
    if len(parts) < 2 or not all(parts):
        return None
    keys = [norm_value(p) for p in parts]
    if not all(key and (kind_of(key) or _head_split(key)[1]) for key in keys):
        return None
    # "Italian and French food": the last part's head noun is the earlier parts' too, where their kind takes it
    base, group = _head_split(keys[-1])
    if group is not None:
        head = " ".join(parts[-1].split()[len(base.split()) - len(keys[-1].split()):])  # "food" of "French food"
        kinds = _kinds()[2]
        parts = [p if _head_split(k)[1] or kind_of(k) is None or kinds[kind_of(k)][0] != group else f"{p} {head}"
                 for p, k in zip(parts, keys)]
    return parts


# A comma followed by one of these is no list item: a qualifier, a remark ("jazz, especially bebop", "Paris, it's
# lovely", "jazz, rock, etc.").
_NOT_ITEM = re.compile(r"^(?:especially|particularly|mostly|mainly|mostly|like|such as|including|except|but|not|even|"
                       r"which|who|it|it's|its|that|this|because|so|as|too|though|also|etc|and so on|i|i'm|im|you|"
                       r"when|where|if|whatever|anything|everything|something|stuff|things|lol|haha)\b", re.I)


def _comma_parts(value: str) -> list[str] | None:
    """The items of a comma list ended by "and"/"or" (list_parts), or None."""
    chunks = [c.strip() for c in value.split(",")]
    if len(chunks) < 2 or not all(chunks):
        return None
    if m := re.match(r"^(?:and|or|&)(?:\s+also)?\s+(.+)$", chunks[-1], re.I):  # "..., and hiking"
        last = [m[1]]
    elif norm_value(chunks[-1]) in _kinds()[3]:  # "pizza, mac and cheese": its "and" is the list's
        last = [chunks[-1]]
    elif (m := re.match(r"^(.+?)\s+(?:and|or|&)(?:\s+also)?\s+(.+)$", chunks[-1], re.I)) \
            and kind_of(norm_value(chunks[-1])) is None:
        last = [m[1], m[2]]
    else:
        return None
    items = [item for chunk in chunks[:-1] + last for item in (_known_parts(chunk) or [chunk])]
    if any(not item or _NOT_ITEM.match(item) or len(item.split()) > 6 for item in items):
        return None
    return items


def _also_parts(value: str) -> list[str] | None:
    """The two sides of "X and also Y", "X, also Y" (list_parts: "also" says a second thing, known or not), or
    None."""
    sides = re.split(r"(?:\s*,\s*|\s+)(?:and|&)\s+also\s+|\s*,\s*also\s+", value, maxsplit=1, flags=re.I)
    if len(sides) != 2:
        return None
    items = [item for side in sides for item in (_known_parts(side) or [side.strip()])]
    if any(not item or _NOT_ITEM.match(item) or len(item.split()) > 6 for item in items):
        return None
    return items


# Attributes of several values whose value may list several (_listed): likes and dislikes split by list_parts,
# allergies and languages at every "and", "or" and comma ("peanuts and shellfish", "English, French and Spanish").
_LISTED = ("likes", "dislikes", "allergy", "language")


def _parts_of(attribute: str, value: str) -> list[str] | None:
    """The things `value` of `attribute` lists (one fact each), or None."""
    if attribute in ("likes", "dislikes"):
        return list_parts(value)
    if attribute not in ("allergy", "language"):
        return None
    parts = [p.strip() for p in _LIST_SEP.split(re.sub(r"^(?:both|either)\s+", "", value.strip(), flags=re.I))]
    if len(parts) < 2 or any(not p or _NOT_ITEM.match(p) or len(p.split()) > 6 for p in parts):
        return None
    return parts


def _listed(fact: StatedFact) -> list[StatedFact]:
    """A like, dislike or its retirement whose value lists several things (list_parts): one fact per thing, each
    with its own statement ("I love Italian food and jazz music." -> "I love Italian food.", "I love jazz
    music."), so each is later replaced or retired alone; a thing kinds.json does not know is read as its
    statement alone reads ("I love hiking." -> likes=hiking; left out when that is no like). Any other fact as
    it is."""
    parts = _parts_of(fact.attribute, fact.value)
    if not parts:
        return [fact]
    at = fact.statement.lower().find(fact.value.lower())
    out = []
    for part in parts:
        one = replace(fact, value=part, statement=fact.statement if at < 0 else
                      fact.statement[:at] + part + fact.statement[at + len(fact.value):])
        if at >= 0 and not _known_thing(part):
            alone = _fact_of_clause(one.statement, one.statement)
            if alone is None or (alone.attribute, alone.retire) != (fact.attribute, fact.retire):
                continue
            one = replace(one, value=alone.value)
        out.append(one)
    return out or [fact]


# When something happened, at the end of a clause: not part of a value ("I moved to Paris last year" -> Paris).
_TIME_TAIL = re.compile(
    r"(?:\s*,)?\s+(?:(?:back )?in (?:\d{4}|january|february|march|april|may|june|july|august|september|october|"
    r"november|december|the (?:spring|summer|fall|autumn|winter))|last (?:year|month|week|spring|summer|fall|autumn|"
    r"winter)|this (?:year|month|spring|summer|fall|autumn|winter)|(?:about |almost |over )?(?:a|an|one|two|three|four|"
    r"five|six|seven|eight|nine|ten|\d+|a few|a couple of|several|many) (?:years?|months?|weeks?|days?) ago|"
    r"(?:a )?(?:year|month|week) ago|recently|a while ago|a while back)$", re.I)
# Names of places and people: capitalized when typed in lower case or shouted; other values in lower case when
# shouted ("IM VEGETARIAN" -> vegetarian). Closed-vocabulary attributes are always lower case ("I'm Vegan").
_PROPER = {"name", "home", "origin", "language", "religion"}
_LOWER = {"diet", "restriction", "relationship"}
_SMALL_WORDS = {"of", "de", "la", "le", "upon", "on", "the", "and", "del", "da", "di", "am", "im", "an", "sur"}


def _cased(value: str, attribute: str, shouted: bool) -> str:
    """`value` cased by its attribute: a name or place capitalized when shouted or typed in lower case ("new york"
    -> "New York"; not "a small town"), a closed-vocabulary value or a shouted one in lower case."""
    lowered = value == value.lower() and not re.match(r"(?:a|an|the|my|our|some|this|that)\b", value, re.I)
    if (attribute in _PROPER and (shouted or lowered)) or (attribute == "employer" and shouted):
        words = value.lower().split(" ")
        return " ".join(w if i and w in _SMALL_WORDS else w[:1].upper() + w[1:] for i, w in enumerate(words))
    if attribute in _LOWER or shouted:
        return value.lower()
    return value


# "I quit my job.", "I got laid off from my job last week": the job held, whatever it is, is over.
_JOB_GONE = re.compile(r"^i (?:have |'ve |just )?(?:quit|left|lost|resigned from|got fired from|was fired from|"
                       r"was laid off from|got laid off from) my (?:job|position|work)"
                       r"(?:\s+(?:to|because|since|after|and|yesterday|today|last|this)\b.*)?$", re.I)


_JOB_CLAUSE = re.compile(r"i'm (?:not |no longer )?(?:an? |the )?(?:[\w-]+ ){0,2}" + _PROFESSION, re.I)


def _fact_of_clause(clause: str, statement: str) -> StatedFact | None:
    """The fact one first-person clause states (or retires), or None."""
    c = _normal_clause(clause)
    for _ in range(2):
        c = _TRAILING.sub("", _TIME_TAIL.sub("", c))
    if _JOB_CLAUSE.fullmatch(kept := _FREQUENCY.sub("", c)):  # "I'm a nurse at night": the job
        c = kept
    gone_for_good = bool(_ANYMORE.search(clause))
    letters = re.sub(r"[^A-Za-z]", "", clause)
    shouted = len(letters) > 3 and letters.isupper()
    for attribute, pattern in _PATTERNS:
        m = pattern.match(c)
        if not m:
            continue
        groups = m.groupdict()
        value = groups.get("v") or groups.get("gone")
        if not value:
            continue
        negated = bool(groups.get("neg") or groups.get("neg2") or groups.get("gone"))
        if attribute == "favourite":
            attribute = "favourite " + norm_value(groups["a"])
        value = _clean_value(value, attribute)
        if attribute == "employer":  # "I work at night", "I work at home": when or where, no employer
            when = re.split(r",|\s+and\s+", value, maxsplit=1)[0]  # "night and sleep during the day"
            if _NOT_EMPLOYER.match(when) or _FREQUENCY.match(" at " + when):
                return None
            value = re.sub(r"^(?:an?|the)\s+", "", value, flags=re.I)
        words = [len(p.split()) for p in _parts_of(attribute, value) or [value]]
        if not value or _PRONOUN_VALUE.match(value) or max(words) > 8:
            return None
        value = _cased(value, attribute, shouted)
        if attribute == "diet" and value == "veggie":  # "I'm veggie": a vegetarian's diet
            value = "vegetarian"
        if attribute == "no meat":  # "I don't eat meat (anymore)": the diet of one who eats no meat
            return StatedFact("diet", "no " + value.lower(), statement)
        if attribute == "diet" and norm_value(value) in _RESTRICTIONS:  # "My diet is keto."
            attribute = "restriction"
        if attribute == "dislikes" and groups.get("neg2") and gone_for_good:
            return StatedFact("likes", value, statement, retire=True)  # "I don't like jazz anymore"
        if attribute == "likes" and negated:
            return StatedFact("likes", value, statement, retire=True)  # "I no longer eat fish"
        retire = negated and attribute not in ("dislikes",)
        return StatedFact(attribute, value, statement, retire=retire)
    return None


def _clauses(sentence: str) -> list[str] | None:
    """The clauses of a sentence with the speaker as subject, each made a whole first-person clause ("I'm vegan
    and allergic to nuts" -> ["I'm vegan", "I'm allergic to nuts"]; "I'm a nurse who lives in Lyon" -> ["I'm a
    nurse", "I live in Lyon"]); clauses about someone else are left out, and None says the whole sentence is
    about someone else ("I'm not vegetarian, my wife is")."""
    pieces = _CLAUSE_SPLIT.split(sentence)
    parts, separators = pieces[0::2], [""] + pieces[1::2]
    first = parts[0].strip()
    if not (_FIRST_PERSON.match(first) or _SELF_MY.match(first) or _WE_WITH_ME.match(first)
            or re.match(r"^(?:call me|my)\b", first, re.I) or _OTHER_SUBJECT.match(first)):
        return []  # "Let's start again, I have 100 coins.": the sentence is not a statement about anyone
    out, subject, other = [], None, None
    for part, separator in zip(parts, separators):
        part = part.strip().strip(",;")
        # "..., now I drink tea": said at the end ("I drink tea now"), where it still says a change (_is_change)
        part = re.sub(r"^(now|these days|nowadays|lately)\s*,?\s+((?:i|i'm|im|my)\b.*?)([.!]*)$", r"\2 \1\3", part,
                      flags=re.I)
        part = re.sub(r"^(?:then|today|also|plus)\s*,?\s+(?=(?:i|i'm|im|my)\b)", "", part, flags=re.I)
        if not part:
            continue
        if other and _SO_AM_I.match(part.rstrip(".!")):
            # "My wife is vegetarian and so am I": the other's predicate, said of the speaker
            verb, rest = other
            out.append("I'm " + rest if verb.lower() in ("is", "are", "'s") else _first_person(f"{verb} {rest}"))
            subject, other = None, None
            continue
        other = None
        if _ELLIPTIC_OTHER.match(part.rstrip(".!")):
            # "I'm not vegetarian, my wife is.": nothing about the wife; the speaker's own clauses stand
            subject = None
            continue
        if m := _WE_WITH_ME.match(part):  # "my wife and I are vegetarian": true of the speaker too
            part = "I'm " + part[m.end():]
        if separator.strip().lower() == "who":
            # "I'm a nurse who lives in Lyon": the speaker; "I have a sister who lives in Lyon": not
            if subject is None or not out or not re.fullmatch(
                    r"(?:i'm|im|i am) (?!.*\b(?:with|of|to|for|at|in|on|someone|somebody|anyone|people|one|ones|"
                    r"person|guy|girl|friends?)\b)(?:an? )?(?:[\w-]+ ){0,2}[\w-]+", out[-1].strip(), re.I):
                subject = None
                continue
            out.append(_first_person(part))
        elif _ELLIPTIC_SELF.match(part.rstrip(".!")):
            subject = None  # "He's vegan but I'm not": about the other's predicate
        elif _FIRST_PERSON.match(part) or _SELF_MY.match(part) or re.match(r"^call me\b", part, re.I):
            subject = "I'm" if re.match(r"^(?:i'm|im|i am)\b", part, re.I) else "I"
            if _blocked(_normal_clause(part)):
                subject = None  # "I'm bored at home and have a camera": what follows is the same situation
            out.append(part)
        elif _OTHER_SUBJECT.match(part) or re.match(r"^my\b", part, re.I):
            subject = None
            if m := _OTHER_PREDICATE.match(part.rstrip(".!")):
                other = (m["verb"], m["rest"])
        elif subject is not None:
            verb_first = re.match(_CLAUSE_VERB + r"\b", part, re.I) and not re.match(r"^(?:am|was)\b", part, re.I)
            if subject == "I" and not verb_first and out:  # "I have two kids and a dog": one object
                out[-1] += separator + part
                continue
            out.append(_first_person(part) if verb_first else "I'm " + re.sub(r"^(?:am|'m)\s+", "", part))
    return out


# "... and so am I", "I am too", "me too": the speaker shares the previous clause's predicate.
_SO_AM_I = re.compile(r"^(?:so (?:am|do|have) i|i(?:'m| am| do| have) too|me too|same here)$", re.I)
# "She's vegan" is "she is" ("'s" right after the subject), unless a verb follows ("My wife's sister is vegan": whose)
# or it is "has" ("He's got a dog", "She's been vegan").
_OTHER_PREDICATE = re.compile(
    r"^(?:he|she|they|my\s+(?:[\w-]+\s+){0,2}?\w+|[A-Z][a-z]+)(?:\s+|(?='s\s+(?!(?:got|gotten|been|had|done|gone)\b)"
    r"(?!.*\b(?:is|are|was|were|lives|works|loves|likes|has|eats|speaks|enjoys|hates|follows)\b)))"
    r"(?P<verb>is|are|'s|lives|works|loves|likes|has|eats|speaks|enjoys|hates|follows)\s+(?P<rest>.+)$", re.I)
# "We live in Paris", "we're vegetarian": true of the speaker too (a company's "we" is not: no such verb).
_WE = re.compile(r"(^|,\s*(?:and |but )?|\s(?:and|but)\s+)we(?:(?P<be>'re| are)(?: both| all| also)? "
                 r"(?=(?:vegetarian|vegan|pescatarian)s?\b)|(?: both| all)? (?=(?:just |recently |now |also )?"
                 r"(?:live|lived|moved|relocated|have moved|'ve moved|have relocated|'ve relocated|reside)\b))", re.I)


def _we_as_me(sentence: str) -> str:
    """A sentence with "we live ...", "we're vegetarian(s)" said of the speaker ("I live ...", "I'm vegetarian")."""
    said = _WE.sub(lambda m: m[1] + ("I'm " if m["be"] else "I "), sentence)
    return re.sub(r"\b(I'm )(vegetarian|vegan|pescatarian)s\b", r"\1\2", said) if said != sentence else sentence


def _first_person(predicate: str) -> str:
    """A predicate said of the speaker: "lives in Lyon" -> "I live in Lyon", "is a nurse" -> "I'm a nurse"."""
    verb, _, rest = predicate.partition(" ")
    if verb.lower() in _THIRD_PERSON_VERB:
        verb = _THIRD_PERSON_VERB[verb.lower()]
    elif re.fullmatch(r"(?:live|work|love|like|enjoy|hate|speak|own)s", verb, re.I):
        verb = verb[:-1]
    return f"I {verb} {rest}".replace("I am ", "I'm ").strip()


def detect_facts(text: str, limit: int | None = None, previous: str | None = None) -> list[StatedFact]:
    """The facts about the speaker stated (or retired) in one user message, in order, at most `limit`.

    A sentence is split into clauses ("I'm vegetarian and I live in Lyon." -> diet=vegetarian, home=Lyon); each
    first-person clause gives at most one fact: a known attribute (StatedFact) when one of the patterns matches,
    else, when it is a lasting first-person statement by the rules of is_preference, a fact of attribute
    "about". "not", "no longer", "anymore" retire a single-valued fact ("I'm not vegetarian anymore" ->
    -diet=vegetarian) or a like ("I don't like jazz anymore"); "I don't like jazz" is a dislike. A later fact of
    the same slot replaces an earlier one of the message ("I love sushi. I hate sushi." -> dislikes=sushi), and
    so does one it supersedes (StatedFact.supersedes); "I stopped being vegetarian", "I quit my job as a nurse"
    retire; a like said with "now", "instead", "these days", "actually ... prefer" (and not "also", "too") is a
    change (StatedFact.change); detection stops once `limit` facts were detected (replaced ones count).

    Retractions: "Just kidding, I'm not.", "Scratch that", "Wait, no: ..." withdraw the sentence before, or, at
    the start of a message, the facts of `previous` (the user's message before it in the chat, as text; they
    become retirements with `withdrawal` set, which the store retires only where that message taught them):
    "Scratch that.", "Oops, ignore that.", "Forget what I just said.", "Ignore my last message." also when a
    statement follows ("Scratch that, I love rock."), "Just kidding.", "Not true." only alone, "Never mind.",
    "Forget it." only alone after a `previous` that asked nothing ("Just kidding, I still am.", "No wait, I'm not."
also withdraw it); "Forget what I said about Lyon, ..." withdraws only the facts it names (by value or by the
attribute's words), nothing when it names none of them; what follows the retraction is read as a
    statement ("Not true, I'm not vegetarian."). A value leaves out how often or when ("I drink coffee every
    morning." -> coffee); a like of several things kinds.json knows, a comma list ended by "and" and a list of
    allergies or languages are one fact per thing (list_parts, _parts_of).
    "Forget that I'm vegetarian." retires the fact it names; "Please forget where I live." retires the attribute
    whatever its value (a retirement with value ""). "We live in Paris" and "My wife is vegetarian and so am I"
    are the speaker's too. Left out: statements about anyone else ("My sister is vegan.", and the whole of "I'm
    not vegetarian, my wife is."), quoted speech, text pasted after an introduction ("Proofread this email:", "He
    wrote:"), '>' lines, song lyrics, stories and role-play, questions, requests, plans and situations. No model
    is called."""
    found: list[StatedFact] = []
    before = 0  # where the facts of the previous sentence start in `found`
    first = True  # no sentence of this message read yet
    detected = 0
    for sentence in sentences(_no_emoji(_own_text(_translate(normalize_text(text))))):
        s = sentence.strip()
        if (m := _WITHDRAW_NAMED.match(s)) and ((said := [  # "Forget what I said about Lyon, ...": the facts it names
                f for f in (found[before:] if not first else detect_facts(previous) if previous else [])
                if _names(m["what"], f)]) or not _forgets(s)):  # naming nothing said, it withdraws nothing
            if not first:
                found = [f for f in found if f not in said]
            else:
                found = _add(found, [StatedFact(f.attribute, f.value, f.statement, retire=True, withdrawal=True)
                                     for f in said])
            first, s = False, s[m.end():].strip(" ,;:.!-")
            if not s:
                continue
        if m := _FORGET.match(s):  # "Forget that I'm vegetarian.", "Please forget where I live."
            named = _FORGET_ATTRIBUTE.get(m["what"].lower().rstrip(".!"))
            gone = [StatedFact(named, "", s, retire=True)] if named else [
                StatedFact(f.attribute, f.value, f.statement, retire=True)
                for f in detect_facts(m["what"]) if not f.retire]
            if gone:
                found, before, first = _add(found, gone), len(found), False
                continue
        if first and _ONLY_INTERJECTIONS.match(s):  # "Oops. Ignore that.": the withdrawal still opens the turn
            continue
        if m := _RETRACT.match(s):  # "I'm vegetarian. Just kidding, I'm not.": the previous sentence is withdrawn
            said = s[m.start("said"):]  # "Scratch that last part.": "that" names something else
            s = re.sub(r"^(?:lol|haha+|sorry|please|pls|plz|thanks|thx)?[.!]*$", "", s[m.end():].strip(" ,;:.!-"),
                       flags=re.I)
            bare = not s or _ELLIPTIC_SELF.match(s.rstrip(".!")) or re.fullmatch(
                r"(?:(?:i'm |i am |i )?not|i(?:'m| am)? still(?: am| do| is)?|i do|i am|i'm not|i don't|i do not)[.!]*",
                s, re.I)
            if not first:
                del found[before:]
            elif previous and (_WITHDRAW_ANYWAY.match(said) or bare and (_WITHDRAW.match(said) or s and _WITHDRAW_CONTRARY.match(said) or (
                    _WITHDRAW_UNSURE.match(said) and "?" not in previous))):  # the previous turn
                found = _add(found, [StatedFact(f.attribute, f.value, f.statement, retire=True, withdrawal=True)
                                     for f in detect_facts(previous)])   # its retirements too: the store restores
            if bare:
                first = False
                continue
        if _RETRACT_AFTER.search(s):  # "I'm vegan, just kidding."
            continue
        s = _FILLER_AFTER.sub("", s)
        before, first = len(found), False
        if s.endswith("?"):  # "I'm vegetarian, what should I cook?": the statement before the question counts
            m = _STATEMENT_THEN_QUESTION.match(s)
            s = m.group(1) if m else ""
        if not s or len(s) > 400:
            continue
        s = _IVE.sub("I've", s)  # "Ive switched to tea": the apostrophe left out
        s = _strip_lead_in(s)
        s = _COLON_LEAD_IN.sub("", s)
        s = re.sub(r"^(?:these days|nowadays|now|since (?:last|this) \w+|as of (?:now|today)|lately|currently|"
                   r"recently|at the moment|for (?:the )?record|last (?:year|month|week|spring|summer|fall|autumn|"
                   r"winter)|(?:a|two|three|four|five|a few|several) (?:years?|months?) ago|in \d{4})\s*,?\s+"
                   r"(?=i\b|i'm\b|my\b|we\b)", "", s, flags=re.I)
        s = _INTRO.sub("", s)
        for _ in range(2):  # "Sorry, I meant I live in Paris."
            s = re.sub(r"^(?:not anymore|no longer|nope|no|yes|yeah|yep|sure|right|lol|haha|wait|hmm+|so|well|sorry|"
                       r"oops|i mean|i meant)(?:\s+to say)?(?:\s*[,!.:]\s*|\s+(?:that\s+)?)"
                       r"(?=i\b|i'm\b|my\b)", "", s, flags=re.I)
        s = _SUBJECTLESS_END.sub("I'm ", s)  # "Not into tennis anymore, I play football now."
        if (m := _SUBJECTLESS_GIVEN_UP.match(s)) and _known_thing(re.split(r"\s+(?:for|with|to|and)\s+", m["x"])[0]):
            s = "I " + s  # "Switched to tea.", "Gave up tennis for golf."
        if (m := _SUBJECTLESS_LIKE.match(s)) and _known_thing(m["x"]):
            s = "I " + s  # "Love jazz, rock and blues."
        s = re.sub(r"^(i (?:really )?(?:love|like|enjoy|adore|hate|prefer))\s*:\s*", r"\1 ", s, flags=re.I)  # "I love:"
        s = _things_said(s)  # "Rock is my thing now.", "I switched from coffee to tea."
        s = _we_as_me(s)
        if _INVENTED.search(s):
            break
        clauses = _clauses(s)
        if not clauses:
            continue
        whole = s if len(clauses) == 1 and len(_CLAUSE_SPLIT.split(s)) == 1 else None
        new = []
        for clause in clauses:
            fact = _statement_fact(clause, whole=whole)
            if fact is None:
                continue
            kinds = set()  # of a listed change, the first like of each kind is the change ("... rock and techno")
            for fact in _listed(fact):
                kind = kind_of(fact.key) or fact.key
                if fact.attribute == "likes" and not fact.retire and kind not in kinds \
                        and _is_change(sentence if whole else clause):
                    fact = replace(fact, change=True)  # "Actually I prefer rock now.": replaces a like of its kind
                kinds.add(kind)
                new.append(fact)
        new = _jobs_together(new)  # "I'm a chef and a writer.": both jobs, never the last one only
        found, detected = _add(found, new), detected + len(new)
        if limit is not None and detected >= limit:  # the work is bounded: at most `limit` facts are detected
            break
    return found[:limit] if limit is not None else found


def _jobs_together(new: list[StatedFact]) -> list[StatedFact]:
    """The facts of one sentence with the jobs it states (job is single-valued: a later one replaces an earlier)
    held as one job, in the sentence's order ("I'm a chef and a writer." -> job "chef and writer", stated "I'm a
    chef and writer."); any other list as it is."""
    jobs = [f for f in new if f.attribute == "job" and not f.retire]
    if len(jobs) < 2:
        return new
    value = " and ".join(dict.fromkeys(f.value for f in jobs))
    both = StatedFact("job", value, jobs[0].statement.replace(jobs[0].value, value, 1))
    at = new.index(jobs[0])
    return [f for f in new[:at] if f not in jobs] + [both] + [f for f in new[at:] if f not in jobs]


_DIET_WORD = r"(?:vegetarian|vegan|pescatarian|pescetarian|flexitarian|keto|paleo|gluten[- ]free|dairy[- ]free)"
# A like ended without a subject: "No longer into rock.", "Not a fan of tennis anymore, ..." (said of the speaker).
_SUBJECTLESS_END = re.compile(r"^(?=no longer (?:into|(?:an? )?(?:big |huge )?fan of|keen on|an? (?:big |huge )?"
                              r"[\w-]+ fan|(?:an? )?" + _PROFESSION + r"|" + _DIET_WORD + r")\b|"
                              r"not (?:an? )?(?:" + _PROFESSION + r"|" + _DIET_WORD + r") any ?more\b|not (?:really )?"
                              r"(?:into|(?:an? )?(?:big |huge )?fan of|keen on|an? (?:big |huge )?[\w-]+ fan)\b"
                              r"[^,;.]*\bany ?more\b)", re.I)


# A like given up or switched, the subject left out: "Switched to tea.", "Gave up tennis for golf." (read as said
# with "I" only before a thing kinds.json knows: "Switched to Python 3 and it broke." is about no one).
_SUBJECTLESS_GIVEN_UP = re.compile(r"^(?:just |recently |finally )?(?:gave up|given up|quit|stopped|switched|swapped|"
                                   r"traded|ditched|dropped|cut out)(?: (?:from|to|over to))?"
                                   r"(?: (?:drinking|eating|playing|watching|listening to|reading))? (?P<x>[^,;.!?]+)",
                                   re.I)
# A like of a known thing, the subject left out: "Love jazz, rock and blues." (not "Love it!", "Like I said").
_SUBJECTLESS_LIKE = re.compile(r"^(?:really |absolutely |totally )?(?:love|like|adore|enjoy|hate|prefer|dig)\s+"
                               r"(?P<x>[^,;.!?]+)", re.I)
# "Ive", typed for "I've" (no English word is spelled so).
_IVE = re.compile(r"\bive\b", re.I)


# A headline before a colon (or a comma, a dash) that announces the statement after it: "Big news: I moved to
# Paris.", "Quick update everyone: I'm vegan.", "PS: ...". At most three words before a headline noun; only before
# a first-person subject.
_COLON_LEAD_IN = re.compile(
    r"^(?:re:\s+(?:[\w' -]{1,40}:\s+)?(?=(?:i|i'm|im|i've|my|we)\b)|"  # a subject line: "Re: dinner plans: I'm ..."
    r"(?:[\w'-]+ ){0,3}?(?:news|update|updates|correction|edit|ps|p\.s\.|note|fact|facts|about me|info|background|"
    r"context|heads[- ]up|confession|reminder|announcement|change|question|news flash)(?: (?:everyone|everybody|all|"
    r"guys|folks|here|again))?\s*(?::|,|\s-|\s\u2013|\s\u2014)\s*(?=(?:i|i'm|im|i've|my|we)\b))", re.I)


def _add(found: list[StatedFact], new: list[StatedFact]) -> list[StatedFact]:
    """`found` with `new` facts after it; a stated fact replaces the earlier ones of its slot, a retirement the
    earlier statement of its value; either drops the earlier statements it supersedes (StatedFact.supersedes)."""
    for fact in new:
        if fact in found:
            continue
        gone = {(f.attribute, f.key) for f in fact.supersedes}
        found = [f for f in found if (f.slot != fact.slot or (fact.retire and f.key != fact.key and fact.key))
                 and (f.retire or (f.attribute, f.key) not in gone)]
        found.append(fact)
    return found


# A like stated as a change ("Actually I prefer rock now.", "I drink tea instead.", "These days I'm into
# techno."), unless said as an addition ("I also like rock now.", "I like rock too.").
_CHANGE = re.compile(r"\b(?:now|nowadays|these days|instead|lately|switched to|moved on to|(?:actually|rather)\b.*"
                     r"\bprefer)\b", re.I)
_ADDITION = re.compile(r"\b(?:also|too|as well|as much as|in addition|besides)\b", re.I)


def _is_change(text: str) -> bool:
    return bool(_CHANGE.search(text)) and not _ADDITION.search(text)


# Withdrawing what was just said; discourse fillers at the end of a sentence ("I'm vegan, by the way."). An
# interjection may come first ("Oops, ignore that.", "Sorry! Scratch that.").
_INTERJECTION = (r"(?:(?:oops|whoops|oopsie|sorry|oh|ah|uh|um+|hmm+|wait|actually|ok(?:ay)?|lol|haha+|my bad|no|nope|"
                 r"pls|plz|"
                 r"my mistake|please|ugh|damn|dang|crap|argh|(?:i made|that was) an? (?:mistake|typo))"
                 r"(?:\s*[,!.]+\s*|\s+))")
_ONLY_INTERJECTIONS = re.compile(r"^(?:" + _INTERJECTION + r"?)*(?:oops|whoops|oopsie|sorry|ugh|argh|my bad|"
                                 r"my mistake)[.!]*$", re.I)
# Withdrawing phrases that name the speaker's own words: they withdraw the previous turn even when a statement
# follows ("Scratch that, I love rock."); "that" only where nothing but punctuation or a statement follows it
# ("Ignore that typo." names something else).
_THAT = r"(?:that|this|it)(?=\s*(?:[,;:.!-]|$|(?:i|i'm|im|my|lol|haha+|please|pls|plz|sorry|thanks|thx)\b))"
_SAID = r"(?:what|everything|anything) i (?:just )?(?:said|wrote|typed|told you)"
_ANYWAY = (r"scratch " + _THAT + r"|strike " + _THAT + r"|(?:please\s+)?(?:ignore|disregard) (?:" + _THAT + r"|" + _SAID
           + r"|(?:my |the |that )?(?:last|previous) (?:message|comment|sentence|one)|the last thing i said)|forget "
           + _SAID + r"|forget (?:i|that i) (?:just )?(?:said|mentioned) (?:that|it|anything)|i take (?:that|it) back|"
           r"take that back|(?:delete|undo|cancel) " + _THAT + r"|wrong (?:chat|window|conversation|person|thread)|"
           r"that (?:message |last message )?(?:was (?:meant |supposed to be )?for (?:someone else|my \w+)|"
           r"(?:wasn't|was not) (?:meant )?for you)|never ?mind " + _SAID)
# A withdrawal that names what it withdraws: "Forget what I just said about being a chef, I'm a pilot.",
# "Scratch what I said about Lyon." (what follows the comma is a statement).
_WITHDRAW_NAMED = re.compile(r"^" + _INTERJECTION + r"*(?:please\s+)?(?:forget|scratch|ignore|disregard|strike|never ?mind) "
                             r"(?:what|everything|the part|the bit) (?:i (?:just )?(?:said|wrote|typed|told you) )?"
                             r"about (?P<what>[^,;.!?]+)[,;:.!\s-]*", re.I)
# The words that name an attribute's facts: "about my job", "about where I live".
_ATTRIBUTE_WORDS = {"home": r"live|living|home|city|address|moved?", "job": r"job|work|working|career|profession",
                    "diet": r"diet|eat|eating|food", "allergy": r"allerg\w*", "likes": r"likes?|love|into|fan",
                    "dislikes": r"dislikes?|hate", "employer": r"employer|company|work for", "name": r"name",
                    "age": r"age|old", "origin": r"from|grew up|born|hometown"}


def _forgets(sentence: str) -> bool:
    """Whether `sentence` is a "Forget ..." that retires a fact or an attribute by itself ("Forget what I said about
    my job." -> the job, whatever its value)."""
    m = _FORGET.match(sentence)
    return bool(m) and bool(_FORGET_ATTRIBUTE.get(m["what"].lower().rstrip(".!")) or any(
        not f.retire for f in detect_facts(m["what"])))


def _names(what: str, fact: StatedFact) -> bool:
    """Whether the words after "about" name `fact`: its value ("about being a chef", "about Lyon") or, where no
    value of the turn is named, its attribute's words ("about my job", "about where I live")."""
    what = what.lower()
    if fact.value and re.search(r"\b" + re.escape(fact.value.lower()) + r"\b", what):
        return True
    words = _ATTRIBUTE_WORDS.get(fact.attribute)
    return bool(words) and bool(re.search(r"\b(?:" + words + r")\b", what))


_WITHDRAW_ANYWAY = re.compile(r"^(?:" + _ANYWAY + r")\b", re.I)
# ... and those that withdraw it only said alone: "Just kidding, I'm actually vegan." says what holds instead,
# and "Forget it.", "Never mind." withdraw the turn only when it asked nothing ("Never mind." after "I'm
# vegetarian, what should I cook?" drops the question, not the diet).
_WITHDRAW = re.compile(r"^(?:(?:just |only )?(?:kidding|joking)|jk|j/k|lol jk|forget that|that's not true|"
                       r"that is not true|not true|that was a joke|i lied|i was (?:just )?(?:joking|kidding)|"
                       r"(?:i made|that was) an? (?:mistake|typo))\b", re.I)
# ... and those that withdraw it only with the bare contrary after them: "No wait, I'm not." ("Wait, no." alone
# may answer the assistant).
_WITHDRAW_CONTRARY = re.compile(r"^(?:no,? wait|wait,? no|actually,? no|oops,? no)\b", re.I)
_WITHDRAW_UNSURE = re.compile(r"^(?:forget it|(?:nvm|never ?mind)(?: " + _THAT + r")?)\b", re.I)
_RETRACT = re.compile(r"^" + _INTERJECTION + r"*(?P<said>(?:just |only )?(?:kidding|joking)|jk|j/k|lol jk|not really|"
                      r"scratch that|(?:nvm|never ?mind)(?: " + _THAT + r")?|i was (?:just )?(?:joking|kidding)|"
                      r"forget (?:that|it|what i said)|that's not (?:true|right|correct)|"
                      r"that is not (?:true|right|correct)|that's wrong|not true|that was a joke|no,? wait|"
                      r"wait,? no|actually,? no|oops,? no|i lied|(?:i made|that was) an? (?:mistake|typo)|"
                      + _ANYWAY + r")\b[,;:.!\s-]*", re.I)
_RETRACT_AFTER = re.compile(r"[,;.!]?\s*(?:(?:just |only )?(?:kidding|joking)|jk|j/k|not really)\s*[.!]*$", re.I)
_FILLER_AFTER = re.compile(
    r"(?:\s*,)?\s+(?:by the way|btw|actually|also|fyi|just so you know|just to let you know|honestly|to be honest|"
    r"tbh|for the record|for your information|for what it's worth|lol|haha+|though|anyway)\s*(?=[.!]*$)", re.I)
# "Forget that I'm vegetarian", "Please forget where I live": what to forget, a statement or an attribute.
_FORGET = re.compile(r"^(?:(?:ok(?:ay)?|and|also|oh)[,!]?\s+)?(?:please\s+|can you\s+|could you\s+)?"
                     r"(?:forget|don't remember|stop remembering)\s+(?:that\s+|(?:(?:what|everything) i (?:said|told you) )?about\s+)?"
                     r"(?P<what>(?!i (?:just )?(?:said|mentioned|told you)\b)(?:i|i'm|im|my|where|what|how|who)\b.*?)"
                     r"(?:,?\s+please)?[.!]*$", re.I)
_FORGET_ATTRIBUTE = {
    **dict.fromkeys(["where i live", "where i'm living", "where i stay", "my address", "my home", "my city",
                     "where my home is", "my location"], "home"),
    **dict.fromkeys(["where i'm from", "where i am from", "where i come from", "where i grew up", "my hometown",
                     "where i was born"], "origin"),
    **dict.fromkeys(["where i work", "my employer", "who i work for"], "employer"),
    **dict.fromkeys(["what i do", "what i do for a living", "my job", "my profession", "my occupation"], "job"),
    **dict.fromkeys(["my name", "what my name is", "what i'm called"], "name"),
    **dict.fromkeys(["my age", "how old i am"], "age"),
    **dict.fromkeys(["my diet", "what i eat", "what my diet is"], "diet"),
    **dict.fromkeys(["my religion"], "religion"),
    **dict.fromkeys(["what i study", "my major", "my studies"], "study"),
    **dict.fromkeys(["my relationship status", "whether i'm married", "if i'm married"], "relationship"),
}


def _no_emoji(text: str) -> str:
    """Emoji (and their modifiers, joiners, variation selectors) as sentence ends: "I'm vegan 🌱" -> "I'm vegan"."""
    hearts = ("\u2764\u2665\U0001F495\U0001F496\U0001F497\U0001F60D\U0001F970"   # red, suit, two, sparkling, growing, eyes
              "\U0001F493\U0001F498\U0001F499\U0001F49A\U0001F49B\U0001F49C\U0001F49D\U0001F49E"   # and every colour
              "\U0001F5A4\U0001F90D\U0001F90E\U0001F9E1\U0001FA75\U0001FA76\U0001FA77")
    text = re.sub(r"\b([Ii])[ \t]*[" + hearts + r"]\ufe0f?[ \t]*(?=\w)", r"\1 love ", text)  # "I ❤️ jazz": a verb
    out = ["\x02" if _is_emoji(ch) else ch for ch in text]
    text = re.sub(r"[ \t]*\x02[\x02 \t]*(?=[a-z0-9])", " ", "".join(out))  # "I love ❤️ jazz": inside a sentence
    text = re.sub(r"[ \t]*\x02[\x02 \t]*(?=,)", "", text)  # "nuts 🥜, eggs 🥚 and milk": before a list's comma
    # "I live in 🌍 Zürich": after a word no sentence ends on (a preposition, an article, a verb before its
    # object) the emoji is inside the sentence whatever follows
    text = re.sub(r"\b(" + _OPEN_WORD + r")[ \t]*\x02[\x02 \t]*(?=\w)", r"\1 ", text, flags=re.I)
    return re.sub(r"[ \t]*\x02[\x02\s]*([.!?]*)", r"\1\n", text)


def _is_emoji(ch: str) -> bool:
    """An emoji, or one of its modifiers, joiners, variation selectors."""
    return unicodedata.category(ch) == "So" or ch in "\ufe0f\u200d" or 0x1F3FB <= ord(ch) <= 0x1F3FF


_OPEN_WORD = (r"in|at|to|from|of|for|near|with|by|on|into|the|a|an|my|our|and|or|love|like|enjoy|adore|prefer|"
              r"hate|am|'m|is|are|called|named|as|speak|study|eat")


# A few first-person statements in French, Spanish and German (diet and home), read as their English ones.
_FOREIGN = [(re.compile(p, re.I), r) for p, r in [
    (r"\b(?:je suis|soy|ich bin)\s+(?:un |une |ein |eine |)(?:v[ée]g[ée]tarien(?:ne)?|vegetarian[oa]|vegetarier(?:in)?)\b",
     "I'm vegetarian"),
    (r"\b(?:je suis|soy|ich bin)\s+(?:un |une |ein |eine |)(?:v[ée]g[ée]talien(?:ne)?|v[ée]gane?|vegan[oa]|veganer(?:in)?)\b",
     "I'm vegan"),
    (r"\b(?:je ne suis plus|ya no soy|ich bin kein(?:e)? )\s*(?:v[ée]g[ée]tarien(?:ne)?|vegetarian[oa]|vegetarier(?:in)?)\b",
     "I'm no longer vegetarian"),
    (r"\b(?:j'habite|je vis|je demeure)\s+(?:à|a|au|en)\s+", "I live in "),
    (r"\b(?:vivo|resido)\s+en\s+", "I live in "),
    (r"\b(?:ich wohne|ich lebe)\s+in\s+", "I live in "),
]]


def _translate(text: str) -> str:
    translated = text
    for pattern, english in _FOREIGN:
        translated = pattern.sub(english, translated)
    if translated == text:
        return text
    return re.sub(r"(?<=\w)\s+(?:et|y|und)\s+(?=I\b|I'm\b)", " and ", translated)


# The one-line refusal of an explicit preference that states no fact about the speaker.
NO_FACT = ("no fact about you found in {text!r}: state it in the first person as something lasting, e.g. "
           "\"I'm vegetarian.\" or \"I live in Lyon.\"")

_STATEMENT_THEN_QUESTION = re.compile(
    r"^(.+?)(?:\s*[,;:]\s*|\s+(?:so|and|but)\s+)(?:(?:so|and|but)\s+)?(?:what|how|which|where|when|who|why|can|"
    r"could|would|should|do|does|any|is|are|will|got)\b[^,;]*\?$", re.I)


def _clean_statement(text: str) -> str:
    """A clause as the first-person sentence a fact carries (what editing turns into an edit): "IM VEGETARIAN" ->
    "I'm vegetarian.", "i live in Lyon" -> "I live in Lyon."."""
    text = text.strip().rstrip(",;:-").strip()
    letters = re.sub(r"[^A-Za-z]", "", text)
    if len(letters) > 3 and letters.isupper():
        text = text.lower()
    text = re.sub(r"\bim\b", "I'm", text, flags=re.I)
    text = re.sub(r"\bi(?=\b(?:'m|'ve|'d|'ll)?(?:\s|$))", "I", text)
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!" else text + "."


def _statement_fact(clause: str, whole: str | None) -> StatedFact | None:
    statement = _clean_statement(whole or clause)
    normal = _normal_clause(clause)
    if _JOB_GONE.match(normal):
        return StatedFact("job", "", statement, retire=True)
    if _blocked(normal):
        return None
    fact = _fact_of_clause(clause, statement)
    if fact is not None and fact.value and fact.value not in statement:  # "I'm from paris." -> "... Paris."
        fact = StatedFact(fact.attribute, fact.value,
                          re.sub(re.escape(fact.value), lambda _: fact.value, statement, count=1, flags=re.I), fact.retire)
    if fact is not None:
        return fact
    # "I was at work until 9pm": dated as said, whatever its normal form ("i'm no longer at work") reads like
    if is_preference(clause) and not _ANYMORE.search(clause) and not _DATED.search(normal) \
            and not _DATED.search(clause):
        return StatedFact("about", statement.rstrip(".!"), statement)
    return None


# Passing states of the body or mood: situations, not facts ("I'm tired.", "I'm so hungry.").
_PASSING = re.compile(
    r"^i(?:'m| feel| felt| was| get| got)\s+(?:(?:so|very|really|super|a (?:bit|little)|kind of|kinda|pretty|extremely|"
    r"quite|totally|too|getting|feeling|still|just|now|a tad|incredibly|soo+)\s+)*"
    r"(?:tired|sleepy|exhausted|hungry|starving|thirsty|full|sick|ill|unwell|busy|bored|late|running late|early|"
    r"cold|hot|warm|freezing|sweating|sad|angry|mad|upset|annoyed|grumpy|worried|nervous|anxious|stressed|"
    r"stressed out|scared|lonely|drunk|tipsy|hungover|awake|up|away|off|free|out|in a hurry|in a rush|on my way|"
    r"at work|at home|in bed|bored out of my mind|fine|ok|okay|good|great|alright|well|better|worse|in pain|"
    r"sore|burnt out|burned out|overwhelmed|frustrated|excited|happy|relieved|confused|lost)"
    r"(?:\s+(?:today|tonight|right now|now|at the moment|this \w+|again|already|lol|haha|as hell|af|"
    r"(?:after|because|from|since) .+))?$",
    re.I)


# A passing reaction: a like or dislike of a demonstrative or a pronoun ("I love that idea!", "I love this song.", "I
# love it when it rains."): what it points at is no lasting thing about the user.
_REACTION = re.compile(r"^i (?:(?:really|just|absolutely|totally|so|truly|do) )*(?:like|love|enjoy|adore|hate|dislike|"
                       r"detest|loathe|prefer|can't stand) (?:that|this|it|these|those|them|neither)\b", re.I)
# Reported speech whose words were quoted (and dropped): 'He asked me "..." and I said "yes".' -> "I said".
_SPEECH = re.compile(r"^i (?:said|asked|replied|answered|responded|wrote|texted|told (?:him|her|them)|shouted|yelled|"
                     r"whispered)(?: (?:to |back to )?(?:him|her|them|back))?$", re.I)


def _blocked(clause: str) -> bool:
    """A first-person clause that is not about something lasting: a request, a thought about the task, a plan or
    a situation of the day, a passing state, a wish, a question."""
    if _PASSING.match(clause) or _REACTION.match(clause) or _SPEECH.match(clause):
        return True
    if re.match(r"^i (?:wish|wished|dream of|imagine|pretend|suppose|assume)\b", clause, re.I):
        return True
    if _QUESTION_START.match(clause) and not _FIRST_PERSON.match(clause) and not _SELF_MY.match(clause) \
            and not re.match(r"^call me\b", clause, re.I):
        return True
    if _FIRST_PERSON.match(clause) and _NOT_AFTER_I.match(re.sub(r"^i\b\s*", "", clause, flags=re.I)):
        return True
    if _FUTURE.search(clause) and not _PREFERENCE_WORDS.search(clause):
        return True
    return bool(_TASK.search(clause))


# Plans and situations of the day block any fact; a dated past ("last week", "two years ago") and an activity
# in progress ("I'm learning Spanish") block only the generic "about" facts ("I moved to Berlin last year" is
# still a home).
_FUTURE = re.compile(r"\b(?:today|tonight|tomorrow|this (?:morning|afternoon|evening|weekend|week)|"
                     r"next (?:week|month|year|semester|weekend|summer|winter|spring|fall)|soon|upcoming)\b", re.I)
_DATED = re.compile(r"\b(?:yesterday|last (?:night|week|month|year|weekend|summer|winter|spring|fall|time)|ago|"
                    r"right now|at the moment)\b|^i'm \w+ing\b|^i (?:was|went|did|had|got)\b", re.I)
