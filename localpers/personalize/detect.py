"""Stated preferences in chat messages, found without a model: `detect_preferences(text)` and
`merge_preferences(existing, new)`.

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

import re

# ---------------------------------------------------------------- sentences

_CODE_FENCE = re.compile(r"```.*?(```|$)", re.S)
_CODE_LINE = re.compile(r"[{}=<>]|;\s*$|^\s*(def|class|import|from|for|while|if|return|#include|public|private)\b|\w\(|\)\s*$")
_SPLIT = re.compile(r"(?<=[.!?;])[\"')\]]*\s+|\n+|(?<=[.!?])$")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def sentences(text: str) -> list[str]:
    """The sentences of a message (code fences and code-like lines dropped), without surrounding quotes."""
    text = _CODE_FENCE.sub("\n", text.translate(_QUOTES))
    lines = [line for line in text.splitlines() if not _CODE_LINE.search(line)]
    out = []
    for part in _SPLIT.split("\n".join(lines)):
        part = (part or "").strip().strip("\"'*-• ").strip()
        if part:
            out.append(part)
    return out


# ---------------------------------------------------------------- rules

# Lead-ins that announce a statement; what follows them is the statement.
_LEAD_IN = re.compile(
    r"^(?:(?:and|but|so|also|oh|well|ok(?:ay)?|hi|hello|hey|actually|honestly|btw|by the way|fyi|for the record|"
    r"just so you know|just to let you know|for your information|note that|keep in mind(?: that)?|"
    r"(?:please |can you |could you |would you )?(?:remember|note|know|keep in mind)(?: that)?|"
    r"i want you to know(?: that)?|you should know(?: that)?|i(?:'d| would) like you to (?:know|remember)(?: that)?)"
    r"[,:!]?\s+)+", re.I)
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
    r"you|your|u)\b|\b(?:it|this|that|these|those)\s*[.!]?$",
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
    """The first-person preference statements in one user message, in order, each a whole sentence with its
    lead-in removed ("Remember that I live in Lyon." -> "I live in Lyon."). Questions, requests, transient
    situations and statements about code or text being worked on are left out. No model is called."""
    found = []
    for sentence in sentences(text):
        if is_preference(sentence):
            statement = _strip_lead_in(sentence.translate(_QUOTES)).rstrip(";, ")
            statement = statement[0].upper() + statement[1:]
            if statement not in found:
                found.append(statement)
    return found


# ---------------------------------------------------------------- merging

_VERB = (r"(?:really |absolutely |strongly |truly |also |just |totally |completely |)"
         r"(?:like|love|enjoy|prefer|adore|hate|dislike|avoid|despise|loathe|detest|can't stand|cannot stand|eat|drink|"
         r"watch|listen to|play|read|wear|use|am a fan of|'m a fan of|am allergic to|'m allergic to|am into|'m into)")
# Single-valued attributes: two statements with the same key are about the same thing, so the later one wins.
_ATTRIBUTES = (
    ("location", re.compile(r"\bi (?:now |currently )?(?:live|reside|am living|'m living) in\b|"
                            r"\bi(?:'ve| have)? moved to\b|\bi am based in\b|\bi'm based in\b", re.I)),
    ("job", re.compile(r"\bi (?:now |currently )?work (?:as|at|for|in)\b|\bmy (?:job|profession) is\b|"
                       r"\bi(?:'m| am) (?:now )?(?:an?|the) (?:\w+ )?(?:teacher|nurse|doctor|engineer|lawyer|student|"
                       r"accountant|developer|programmer|designer|writer|chef|pediatrician|attorney|handyman)\b", re.I)),
    ("diet", re.compile(r"\b(?:vegetarian|vegan|pescatarian|carnivore|omnivore|keto|paleo)\b|\beat meat\b", re.I)),
    ("name", re.compile(r"\bmy name is\b|\bcall me\b", re.I)),
    ("marital status", re.compile(r"\bi(?:'m| am) (?:now |not )?(?:married|single|divorced|engaged|widowed)\b", re.I)),
    ("age", re.compile(r"\bi(?:'m| am) \d+(?: years old)?\b", re.I)),
)
_FAVOURITE = re.compile(r"\bmy (?:\w+ )?favou?rite ([\w ]+?) (?:is|are)\b", re.I)
_WORDS = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the i i'm im my me to of and or any all very really so much too as in on at for with".split())


def _normal(text: str) -> str:
    return " ".join(_WORDS.findall(text.translate(_QUOTES).lower()))


def _key(statement: str) -> tuple[str, str | None]:
    """(attribute key, object) of a statement; object is None for single-valued attributes. Two statements with
    the same key and object are about the same thing, whatever their polarity."""
    s = statement.translate(_QUOTES)
    if m := _FAVOURITE.search(s):
        return ("favourite " + _normal(m.group(1)), None)
    for name, pattern in _ATTRIBUTES:
        if pattern.search(s):
            return (name, None)
    m = re.search(_VERB + r"\s+(.+)$", s, re.I)
    obj = m.group(1) if m else s
    words = [w for w in _WORDS.findall(obj.lower()) if w not in _STOP and w not in ("not", "don", "t", "do")]
    return ("object", " ".join(words))


def merge_preferences(existing: list[str], new: list[str]) -> list[str]:
    """The preferences after `new` (later) statements join `existing` ones, oldest first.

    Rules: a statement equal to a kept one up to case and punctuation is a duplicate and is dropped; a later
    statement about the same single-valued attribute (where I live, my job, my diet, my name, my favourite X, my
    marital status, my age) replaces the earlier one; a later statement about the same thing with the opposite
    polarity ("I like horror films" then "I don't like horror films") replaces it. Nothing else is removed."""
    merged: list[str] = []
    for statement in [*existing, *new]:
        statement = statement.strip()
        if not statement:
            continue
        norm, (key, obj) = _normal(statement), _key(statement)
        kept = []
        for old in merged:
            old_key, old_obj = _key(old)
            same_norm = _normal(old) == norm
            same_attribute = old_key == key and (obj is None or (old_obj == obj and obj != ""))
            if not (same_norm or same_attribute):
                kept.append(old)
        merged = kept + [statement]
    return merged
