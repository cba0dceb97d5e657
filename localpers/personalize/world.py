"""A synthetic multi-user world with the structure local+global personalization needs.

Communities hold preference distributions over attributes (cuisine, music, hobby, ...) whose logits drift
as a random walk over time steps. A user belongs to one community, with a personal offset to its logits,
and keeps a value per attribute that is re-drawn from their current distribution now and then (so later
statements override earlier ones). Histories run from 1-2 items (cold start) to 50+; items are preference
statements, short posts and reviews, and Q&A, written from varied templates in the user's own style
(an opener, two signature phrases, two favourite adjectives). Each user is asked at their own time step:
one UPQA-style question about a current attribute, and one LongLaMP-style writing task whose gold text is
in their style. Both are written in the real datasets' formats, so every method runs on them unchanged.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

# attribute -> questions (UPQA's four kinds), statement templates, and values: target -> keywords.
ATTRIBUTES = {
    "cuisine": {
        "questions": ("What's my favorite cuisine?", "What kind of food do I like best?",
                      "Where should we go for dinner tonight?", "Which cookbook should I buy?"),
        "ask": "What do you like to eat?",
        "statements": ("My favorite food is {v}.", "I could eat {v} every single day.", "Nothing beats {v} for me."),
        "values": {"Italian food": ("pasta", "pizza", "risotto"), "Japanese food": ("sushi", "ramen", "miso soup"),
                   "Mexican food": ("tacos", "burritos", "guacamole"), "Indian food": ("curry", "naan", "biryani"),
                   "Thai food": ("pad thai", "green curry", "sticky rice"), "French food": ("croissants", "crepes", "onion soup"),
                   "Korean food": ("kimchi", "bibimbap", "bulgogi"), "Greek food": ("gyros", "souvlaki", "feta salad")},
    },
    "music": {
        "questions": ("What's my favorite music genre?", "What kind of music do I listen to most?",
                      "Can you suggest a playlist for my commute?", "Which concert tickets should I look for?"),
        "ask": "What are you listening to these days?",
        "statements": ("I mostly listen to {v}.", "{V} is the soundtrack of my life.", "My playlists are all {v}."),
        "values": {"Jazz": ("saxophone solos", "jam sessions", "vinyl records"), "Hip hop": ("beats", "freestyle battles", "mixtapes"),
                   "Classical music": ("symphonies", "piano sonatas", "the opera"), "Rock": ("guitar solos", "live gigs", "drum fills"),
                   "Country music": ("banjo tunes", "honky-tonk bars", "line dancing"), "Electronic music": ("synths", "techno sets", "festivals")},
    },
    "hobby": {
        "questions": ("What's my hobby?", "What do I enjoy doing in my free time?",
                      "What should I do this weekend?", "Any gear I should buy for my hobby?"),
        "ask": "What do you do in your free time?",
        "statements": ("My hobby is {v}.", "I spend every free evening on {v}.", "{V} keeps me sane."),
        "values": {"Rock climbing": ("bouldering", "the climbing gym", "chalk bags"), "Gardening": ("tomatoes", "compost", "seedlings"),
                   "Painting": ("watercolors", "canvas", "brushes"), "Photography": ("my camera", "golden hour", "lenses"),
                   "Knitting": ("yarn", "scarves", "needles"), "Baking": ("sourdough", "pastries", "the oven"),
                   "Chess": ("openings", "tournaments", "endgames")},
    },
    "travel style": {
        "questions": ("What's my travel style?", "How do I like to travel?",
                      "Can you plan my next vacation?", "What luggage should I get?"),
        "ask": "How do you like to travel?",
        "statements": ("I always travel by {v}.", "{V} is the only way I travel.", "For me a real trip means {v}."),
        "values": {"Backpacking": ("hostels", "night trains", "a heavy backpack"), "Luxury resorts": ("spa days", "room service", "infinity pools"),
                   "Road trips": ("the open highway", "gas station snacks", "motels"), "Camping": ("tents", "campfires", "national parks"),
                   "City breaks": ("museums", "cafes", "walking tours"), "Cruises": ("the deck", "ports of call", "ocean views")},
    },
    "pet": {
        "questions": ("What pet do I have?", "What animal lives with me?",
                      "What should I pick up at the pet store?", "Which pet supplies do I need?"),
        "ask": "Any pets at home?",
        "statements": ("I live with {v}.", "My best friend at home is {v}.", "Coming home to {v} is the best."),
        "values": {"A dog": ("long walks", "the leash", "fetch"), "A cat": ("the litter box", "naps in the sun", "the scratching post"),
                   "A parrot": ("bird seed", "the cage", "mimicked words"), "A rabbit": ("carrots", "hay", "the hutch"),
                   "Goldfish": ("the aquarium", "fish flakes", "bubbles"), "A hamster": ("the wheel", "sunflower seeds", "bedding")},
    },
    "sport": {
        "questions": ("What's my favorite sport?", "Which sport do I love to play?",
                      "What should I watch on TV tonight?", "What sports gear should I buy?"),
        "ask": "Which sport do you play?",
        "statements": ("My sport is {v}.", "I play {v} whenever I can.", "{V} is my thing."),
        "values": {"Soccer": ("goals", "the pitch", "cleats"), "Basketball": ("hoops", "dunks", "pickup games"),
                   "Tennis": ("rackets", "serves", "clay courts"), "Running": ("marathons", "sneakers", "morning miles"),
                   "Swimming": ("laps", "the pool", "goggles"), "Cycling": ("my bike", "hill climbs", "the peloton")},
    },
}

POSTS = ("{open} Spent the whole afternoon on {k} again. {sig}", "{open} Can't stop thinking about {k}. {sig}",
         "{open} Another weekend, another round of {k}. {sig}", "{open} Quick update: {k} made my day. {sig}",
         "{open} Who else is obsessed with {k}? {sig}")
REVIEWS = ("{open} Rating: {stars}/5. The {k} was {adj}, would do it again. {sig}",
           "{open} Honest review: {k} was {adj}. {sig}", "{open} Tried {k} at a new spot today, {adj}. {sig}")
ANSWERS = ("Mostly {v}.", "{V}, no question.", "Definitely {v}.")
WRITING = (
    ("Write a short post about your weekend for your followers.", ("hobby", "cuisine"),
     "{open} This weekend was all about {k0}. {sig0} Then {k1} with friends, {adj}. {sig1}"),
    ("Write a short review of your last trip.", ("travel style", "music"),
     "{open} My last trip: {k0} all the way, {adj}. {sig0} The soundtrack was {k1}. {sig1}"),
    ("Write a short note about your week.", ("sport", "pet"),
     "{open} Busy week of {k0}, {adj}. {sig0} Evenings with {k1} at home. {sig1}"),
)
OPENERS = ("Hey all!", "Okay so", "Well,", "Hi friends,", "Update:", "Alright,", "Morning folks!", "So yeah,",
           "Guess what?", "Hello world!")
SIGNATURES = ("Stay curious!", "Peace out.", "No regrets.", "10/10 would recommend.", "Just saying.",
              "You heard it here first.", "Living the dream.", "Onward and upward!", "Catch you later!",
              "Big mood.", "Keep it real.", "Cheers, mates.", "Life is good.", "Worth every penny.",
              "Mark my words.", "Trust the process.", "Good vibes only.", "Rain or shine.", "That's my two cents.",
              "Let's gooo!", "Over and out.", "Carpe diem!", "Small wins count.", "Back to it.")
ADJECTIVES = ("amazing", "solid", "fantastic", "decent", "unreal", "lovely", "wild", "top notch", "so cozy", "brilliant")
BUCKETS = ((1, 2, "1-2"), (3, 9, "3-9"), (10, 49, "10-49"), (50, 10**9, "50+"))


def history_bucket(size: int) -> str:
    return next(name for lo, hi, name in BUCKETS if lo <= size <= hi)


def _softmax_choice(rng: random.Random, values: list[str], logits: list[float]) -> str:
    top = max(logits)
    return rng.choices(values, weights=[math.exp(x - top) for x in logits])[0]


def _fill(template: str, **kw) -> str:
    v = kw.pop("v", "")
    text = template.format(v=v.lower() if v[:1].isupper() and v.split()[0] not in _PROPER else v,
                           V=v[:1].upper() + v[1:], **kw)
    return " ".join(text.split())


_PROPER = {"Italian", "Japanese", "Mexican", "Indian", "Thai", "French", "Korean", "Greek"}


def generate_world(users: int = 1000, communities: int = 8, steps: int = 12, seed: int = 0,
                   change_prob: float = 0.15, drift: float = 0.6) -> dict:
    """The world as plain data: {"config", "communities", "users", "upqa", "longlamp_questions",
    "longlamp_outputs"}; the last three are in UPQA's and LongLaMP's file formats."""
    if users < 1 or communities < 1 or steps < 2:
        raise ValueError("need users >= 1, communities >= 1 and steps >= 2")
    rng = random.Random(seed)
    names = list(ATTRIBUTES)
    # community -> attribute -> per-step logits over the attribute's values (a drifting random walk)
    trajectories = []
    for _ in range(communities):
        by_attribute = {}
        for a in names:
            logits = [rng.gauss(0, 1.5) for _ in ATTRIBUTES[a]["values"]]
            walk = []
            for _ in range(steps):
                walk.append(logits)
                logits = [x + rng.gauss(0, drift) for x in logits]
            by_attribute[a] = walk
        trajectories.append(by_attribute)

    world = {"config": {"users": users, "communities": communities, "steps": steps, "seed": seed,
                        "change_prob": change_prob, "drift": drift},
             "communities": [{a: {"first": _top(a, t[a][0]), "last": _top(a, t[a][-1])} for a in names}
                             for t in trajectories],
             "users": [], "upqa": [], "longlamp_questions": [], "longlamp_outputs": {"task": "LongLaMP_world", "golds": []},
             # the generative truth, for scoring only (bayes_predictive): never written, never read by a method
             "truth": {"trajectories": trajectories, "items": {}}}
    for u in range(users):
        user_id = f"u{u:05d}"
        community = rng.randrange(communities)
        offsets = {a: [rng.gauss(0, 1.0) for _ in ATTRIBUTES[a]["values"]] for a in names}

        def draw(a: str, t: int) -> str:
            values = list(ATTRIBUTES[a]["values"])
            return _softmax_choice(rng, values, [c + o for c, o in zip(trajectories[community][a][t], offsets[a])])

        query_step = rng.randrange(1, steps)
        timeline = []    # timeline[t][a]: the user's value at step t
        for t in range(query_step + 1):
            timeline.append({a: draw(a, t) if t == 0 or rng.random() < change_prob else timeline[-1][a] for a in names})
        style = {"open": rng.choice(OPENERS), "sigs": rng.sample(SIGNATURES, 2), "adjs": rng.sample(ADJECTIVES, 2)}
        size = min(120, max(1, round(math.exp(rng.gauss(2.0, 1.3)))))
        item_steps = sorted(rng.randrange(query_step) for _ in range(size))
        drawn = [_history_item(rng, f"{user_id}-{i}", t, timeline[t], style) for i, t in enumerate(item_steps)]
        profile = [item for item, _ in drawn]
        world["truth"]["items"][user_id] = [(a, timeline[item["step"]][a], item["step"]) for item, a in drawn]
        now = timeline[query_step]

        asked = rng.choice(names)
        question, paraphrased, implicit, product = ATTRIBUTES[asked]["questions"]
        world["upqa"].append({
            "user_id": user_id, "step": query_step, "history_size": size, "input_attribute": "",
            "attribute_type": asked, "question": question, "question_paraphrased": paraphrased,
            "implicit_question": implicit, "product_recommendation_question": product, "target": now[asked],
            "candidates": [v for v in ATTRIBUTES[asked]["values"] if v != now[asked]], "profile": profile,
        })
        task, (a0, a1), template = rng.choice(WRITING)
        gold = _fill(template, open=style["open"], k0=rng.choice(ATTRIBUTES[a0]["values"][now[a0]]),
                     k1=rng.choice(ATTRIBUTES[a1]["values"][now[a1]]), adj=style["adjs"][0],
                     sig0=style["sigs"][0], sig1=style["sigs"][1])
        world["longlamp_questions"].append({"id": user_id, "user_id": user_id, "step": query_step,
                                            "history_size": size, "input": task, "profile": profile})
        world["longlamp_outputs"]["golds"].append({"id": user_id, "output": gold})
        world["users"].append({"id": user_id, "community": community, "step": query_step, "history_size": size,
                               "values": now, "style": style})
    return world


def _top(attribute: str, logits: list[float]) -> str:
    values = list(ATTRIBUTES[attribute]["values"])
    return values[max(range(len(values)), key=logits.__getitem__)]


def _history_item(rng: random.Random, item_id: str, step: int, values: dict, style: dict) -> tuple[dict, str]:
    """An item and the attribute it is about."""
    a = rng.choice(list(ATTRIBUTES))
    spec, value = ATTRIBUTES[a], values[a]
    kind = rng.choices(("preference", "post", "review", "qa"), weights=(3, 3, 2, 2))[0]
    keyword = rng.choice(spec["values"][value])
    sig, adj = rng.choice(style["sigs"]), rng.choice(style["adjs"])
    opener = style["open"] if rng.random() < 0.7 else ""
    if kind == "preference":
        text = _fill(rng.choice(spec["statements"]), v=value)
    elif kind == "post":
        text = _fill(rng.choice(POSTS), open=opener, k=keyword, sig=sig)
    elif kind == "review":
        text = _fill(rng.choice(REVIEWS), open=opener, k=keyword, adj=adj, sig=sig, stars=rng.randint(3, 5))
    else:
        text = f"Q: {spec['ask']} A: " + _fill(rng.choice(ANSWERS), v=value)
    return {"id": item_id, "text": text, "step": step, "kind": kind}, a


WORLD_FILES = {"upqa": "upqa.json", "longlamp_questions": "longlamp_questions.json",
               "longlamp_outputs": "longlamp_outputs.json"}


def write_world(world: dict, directory: str | Path) -> Path:
    """Write world.json (config, communities, users) and the task files in the datasets' formats."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = {k: world[k] for k in ("config", "communities", "users")}
    (directory / "world.json").write_text(json.dumps(summary, indent=1))
    for key, name in WORLD_FILES.items():
        (directory / name).write_text(json.dumps(world[key], indent=1))
    return directory


# ---------------------------------------------------------------- the Bayes ceiling (scoring only)


def bayes_predictive(world: dict, user_ids=None, *, samples: int = 2000, seed: int = 0,
                     evidence: str = "all") -> dict[str, dict[str, float]]:
    """What is attainable at all: the posterior predictive P(value of the asked attribute at the query step |
    the attribute values the user's items reveal, with their steps), under the world's TRUE generative
    parameters (world["truth"]: every community's logit trajectories; the change probability), for each user
    of `user_ids` (default: all). Scoring only: it reads the truth, so no method may call it.

    Model (generate_world): community c ~ uniform; per attribute, the user's offsets o ~ N(0, I) are
    integrated out by Monte Carlo (`samples` draws, common to all communities); the value at step t is the
    draw at the last redraw j <= t (j = 0, or a step j >= 1 that redrew, probability change_prob each), from
    softmax(logits[c][a][j] + o). Given c and o the attributes are independent chains, so
        P(c | items) ∝ prod_a mean_o P(chain of a's observed values | c, o)
    and the prediction is sum_c P(c | items) E_o[P(v_s | a's last observed value, c, o) | a's observations].
    evidence: "all" (the Bayes ceiling: every attribute's items inform the community), "asked" (only the
    asked attribute's own items: the time-aware population prior, no community inference across
    attributes), "oracle" (the user's true community, offsets still unknown).
    Returns user id -> {value: probability} over the asked attribute's values."""
    import numpy as np

    if evidence not in ("all", "asked", "oracle"):
        raise ValueError(f"evidence must be all, asked or oracle, not {evidence!r}")
    cfg, truth = world["config"], world["truth"]
    q, steps = cfg["change_prob"], cfg["steps"]
    trajectories = truth["trajectories"]
    k = len(trajectories)
    rng = np.random.default_rng(seed)
    probs = {}  # attribute -> [k, steps, samples, n_values]: softmax(logits + offsets)
    for a, spec in ATTRIBUTES.items():
        logits = np.array([t[a] for t in trajectories])[:, :, None, :]          # [k, T, 1, n]
        x = logits + rng.standard_normal((samples, len(spec["values"])))[None, None]
        x = np.exp(x - x.max(-1, keepdims=True))
        probs[a] = x / x.sum(-1, keepdims=True)
    mixes = {}

    def redraw(a: str, start: int | None, end: int):
        """Sum over the steps j in (start, end] that may hold the last redraw before `end` of
        P(last redraw at j) * softmax at j: [k, samples, n] (start None: from the first draw, j = 0)."""
        key = (a, start, end)
        if key not in mixes:
            js = range(0 if start is None else start + 1, end + 1)
            w = np.array([(1 - q) ** end if (start is None and j == 0) else q * (1 - q) ** (end - j) for j in js])
            mixes[key] = np.einsum("j,kjsn->ksn", w, probs[a][:, list(js)])
        return mixes[key]

    community_of = {u["id"]: u["community"] for u in world["users"]}
    asked = {e["user_id"]: e for e in world["upqa"]}
    out = {}
    for uid in user_ids if user_ids is not None else list(asked):
        entry, observed = asked[uid], {}
        for a, value, t in truth["items"][uid]:
            observed.setdefault(a, {})[t] = value
        log_lik, last = {}, {}
        for a, by_step in observed.items():
            values = list(ATTRIBUTES[a]["values"])
            prev, ll = None, np.zeros((k, samples))
            for t in sorted(by_step):
                v = values.index(by_step[t])
                p = redraw(a, None if prev is None else prev[0], t)[..., v]
                if prev is not None and prev[1] == v:
                    p = p + (1 - q) ** (t - prev[0])
                ll += np.log(np.maximum(p, 1e-300))
                prev = (t, v)
            log_lik[a], last[a] = ll, prev
        target_attribute, s = entry["attribute_type"], entry["step"]

        def log_mean(ll):
            top = ll.max(axis=1, keepdims=True)
            return (top[:, 0] + np.log(np.exp(ll - top).mean(axis=1)))

        if evidence == "oracle":
            log_post = np.where(np.arange(k) == community_of[uid], 0.0, -np.inf)
        else:
            used = observed if evidence == "all" else [a for a in observed if a == target_attribute]
            log_post = sum((log_mean(log_lik[a]) for a in used), np.zeros(k))
        post = np.exp(log_post - log_post.max())
        post /= post.sum()
        if target_attribute in observed:
            t, v = last[target_attribute]
            pred = redraw(target_attribute, t, s).copy()
            pred[..., v] += (1 - q) ** (s - t)
            w = np.exp(log_lik[target_attribute] - log_lik[target_attribute].max(axis=1, keepdims=True))
            pred = np.einsum("ks,ksn->kn", w / w.sum(axis=1, keepdims=True), pred)
        else:
            pred = redraw(target_attribute, None, s).mean(axis=1)
        out[uid] = dict(zip(ATTRIBUTES[target_attribute]["values"], map(float, post @ pred)))
    return out
