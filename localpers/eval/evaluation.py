"""Evaluation tasks, metrics, reports and plots.

Every answer and every score comes from the engine with the method's artifacts and context, exactly as
`localpers serve` would answer the user. Decoding is greedy and every shuffle is seeded, so a run is
deterministic for a given seed. Tasks return (results, counts, rows): results[method][metric] = number, the
number of items each mean is over, and the rows of every scored item for report.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from localpers.personalize.datasets import LampItem, PrefEvalItem, UpqaItem
from localpers import names
from localpers.errors import UserError
from localpers.personalize.matching import MATCH_RECALL, content_tokens, target_match
from localpers.personalize.methods import Personalized, User, apply
from localpers.personalize.world import history_bucket

# ---------------------------------------------------------------- scoring rules (also written into report.md)

LOCALITY_USERS = 100  # locality_kl costs 8 scored answers per user: at most this many, evenly spaced over the items
RULES = {
    "match": (f"An answer is correct when, for some accepted target (the cluster9 variant accepts all 9 synonyms), "
              f"at least {MATCH_RECALL:.0%} of the target's content tokens occur in the answer, not counting tokens "
              "it shares with the other users' targets that mc_acc ranks it against (all of them when every one is "
              "shared). Tokens are "
              "rouge-score's: lower-cased alphanumeric words, Porter-stemmed; content tokens drop English "
              "stopwords (bm25s' list). Answers are greedy, at most {max_tokens} tokens."),
    "mc": ("mc_acc: the true target is ranked against the targets of every other user with the same attribute "
           "type (world: every other value of the attribute) by the mean log-probability per token of the "
           "target as the assistant's reply (length-normalised); correct when the true target ranks first."),
    "locality": ("locality_kl: mean over answer tokens of KL(base || method) between next-token distributions, "
                 "on {n} fixed neutral question/answer pairs, for up to {users} users evenly spaced over the items (a merge of "
                 "shards: each shard's; report.json's counts say how many); in nats/token."),
    "upqa_turns": ("Multi-turn: for methods without a trained part the statement is the first user turn "
                   "(answered '{ack}'); for compositions with one (edit ...) it is in the weights instead; then T "
                   "distractor turns from PrefEval's inter_turns (each message cut to {max_chars} characters), then "
                   "the question; {kind}_acc@T by the match rule above."),
    "recitation": ("recite_neutral: over {n} fixed neutral questions (general knowledge, coding, writing; "
                   "localpers/data/neutral), asked of up to {users} users evenly spaced over the items, the fraction "
                   "of greedy replies that state the user's target by the match rule above. restate_implicit / "
                   "restate_product: the fraction of replies to the implicit and the product-recommendation question "
                   "that state the target and add fewer than {new} content tokens of their own (not in the "
                   "statement, the targets or the question; pronouns and contraction endings aside): the preference "
                   "restated instead of used."),
    "many": ("Many preferences: one user per size N holds N UPQA statements at once, each one atomic fact by "
             "detect_facts (exactly one fact, not a retirement) and no two in the same slot (the update rule: a "
             "later fact of a held slot would replace the earlier), drawn round-robin over the attribute types in "
             "a seed-shuffled order (N=10: one per type; N=30: three per type); the N-fact user's statements are "
             "the first N of the larger one's. Each fact's explicit and paraphrased question is asked alone (no "
             "statement in the chat); {kind}_acc@N is the per-fact accuracy by the match rule above, the "
             "targets of the user's other facts of the same type counting as the other users' (they answer the "
             "same question: their shared words are no evidence); "
             "locality_kl@N as above for the N-fact user. add_fact_s: seconds to the verified adapter of a "
             "trained method when fact N+1 is added to the largest user, as personalize recomputes it (the "
             "editor ready before timing): the joint edit of few facts trains their values from the unedited "
             "model; routed edits (2 facts or more) reuse the adapters of the facts made before ('reused') and "
             "edit the new one; every new edit is verified on llama.cpp."),
    "prefeval": ("followed@T: the preference is the first user turn (answered '{ack}'), then T distractor turns "
                 "from PrefEval's inter_turns (each message cut to {max_chars} characters), then the question "
                 "with the options listed in a seeded random order; the model follows the preference when the "
                 "preference-following option has the highest mean log-probability per token as the reply."),
    "lamp": ("Generation tasks: ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemming) of the greedy answer "
             "(at most {max_tokens} tokens) against the gold. Classification (LaMP_1, LaMP_2) and rating "
             "(LaMP_3) tasks: the label with the highest mean log-probability per token is the prediction; "
             "accuracy, and MAE/RMSE for ratings."),
}


def upqa_rules(max_tokens: int) -> list[str]:
    return [RULES["match"].format(max_tokens=max_tokens), RULES["mc"],
            RULES["locality"].format(n=len(NEUTRAL), users=LOCALITY_USERS)]


def locality_users(users: list) -> list:
    """At most LOCALITY_USERS of `users`, evenly spaced: a file's first users may all share one attribute type."""
    return list(users[::max(1, math.ceil(len(users) / LOCALITY_USERS))])


def rouge(prediction: str, gold: str) -> dict[str, float]:
    from rouge_score.rouge_scorer import RougeScorer

    scores = RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(gold, prediction)
    return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


# ---------------------------------------------------------------- the served path

def generate(engine, p: Personalized, messages: list[dict], max_tokens: int) -> str:
    out = engine.chat(apply(p, messages), artifacts=p.artifacts, max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["message"]["content"].strip()


def best_option(engine, p: Personalized, messages: list[dict], options: list[str]) -> tuple[int, list[float]]:
    """The option with the highest mean log-probability per token as the assistant's reply, and the scores."""
    scores = [float(lp[np.arange(len(ids)), ids].mean())  # the conversation tokenized as served (prompt-safe)
              for ids, lp in engine.continuation_logprobs(apply(p, messages), options, artifacts=p.artifacts)]
    return int(np.argmax(scores)), scores


NEUTRAL = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is 12 plus 30?", "12 plus 30 equals 42."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Translate 'thank you' into Spanish.", "In Spanish, 'thank you' is 'gracias'."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
)


def answer_logprobs(engine, p: Personalized, question: str, answer: str) -> np.ndarray:
    """Log-softmax of the next-token distributions at the answer's positions: [answer tokens, V]."""
    messages = apply(p, [{"role": "user", "content": question}])
    return engine.continuation_logprobs(messages, [answer], artifacts=p.artifacts)[0][1]


def locality_kl(engine, method, users, base_logprobs: list[np.ndarray]) -> float:
    """Mean KL(base || method) per answer token over the neutral prompts, averaged over `users`."""
    kls = []
    for user in users:
        for (question, answer), base in zip(NEUTRAL, base_logprobs):
            mine = answer_logprobs(engine, method(user, question, engine), question, answer)
            kls.append(float((np.exp(base) * (base - mine)).sum(axis=1).mean()))
    return float(np.mean(kls))


# ---------------------------------------------------------------- tasks

def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def _summary(values: dict[str, list]) -> tuple[dict[str, float], dict[str, int]]:
    """Means of per-item values, and how many items each mean is over (what `merge_reports` weighs by)."""
    return {metric: _mean(v) for metric, v in values.items()}, {metric: len(v) for metric, v in values.items()}


class Journal:
    """What a run has scored so far, appended to a file (DIR/progress.jsonl) one item at a time, so that an
    interrupted `localpers eval` resumes where it stopped instead of starting over. The first line names the
    run (task, model, config, methods); the journal of another run is refused, never overwritten. Without a
    path it only keeps scores in memory."""

    def __init__(self, path: str | Path | None = None, run: dict | None = None):
        self.path, self.done = (Path(path) if path else None), {}
        if self.path is None:
            return
        header = json.dumps(run, default=_jsonable)
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(header + "\n")
            return
        lines = self.path.read_text().splitlines()
        if not lines or lines[0] != header:
            raise UserError(f"{self.path} holds the progress of another run (task, model, config, input files "
                            "or methods differ): run the same command to resume it, or choose another --out")
        kept = lines[:1]
        for line in lines[1:]:
            try:
                key, value = json.loads(line)
            except ValueError:
                break  # the line a killed run was writing: score that item again
            self.done[key] = value
            kept.append(line)
        if len(kept) < len(lines):
            self.path.write_text("\n".join(kept) + "\n")

    def score(self, key: tuple, compute):
        """compute()'s value for `key`, from the journal when this run already has it. Values go through JSON
        either way, so a resumed run reports exactly what an uninterrupted one does."""
        key = "/".join(map(str, key))
        if key not in self.done:
            line = json.dumps([key, compute()], default=_jsonable)
            if self.path:
                with self.path.open("a") as f:
                    f.write(line + "\n")
            self.done[key] = json.loads(line)[1]
        return self.done[key]


def score_items(journal: Journal, part: str, items: list, methods: dict, score,
                desc: str | None = None) -> tuple[dict, dict, list[dict]]:
    """score(name, method, item) -> ({metric: [values]}, rows) for every item and method, through the journal;
    the means per method with their counts, and the rows grouped by method. Every method scores an item before
    the next item, so consecutive prompts share what they can of the KV cache. `desc`: the progress bar's
    label (default: `part`, the journal's key)."""
    values = {name: defaultdict(list) for name in methods}
    rows = {name: [] for name in methods}
    for index, item in enumerate(tqdm(items, desc=desc or part, unit="item")):
        for name, method in methods.items():
            item_values, item_rows = journal.score((part, name, index), lambda: score(name, method, item))
            for metric, v in item_values.items():
                values[name][metric] += v
            rows[name] += item_rows
    results, counts = {}, {}
    for name in methods:
        results[name], counts[name] = _summary(values[name])
    return results, counts, [row for name in methods for row in rows[name]]


def run_upqa(engine, items: list[UpqaItem], methods: dict, *, max_tokens: int = 48,
             journal: Journal | None = None, answers: bool = True,
             desc: str = "upqa") -> tuple[dict, dict, list[dict]]:
    """explicit/paraphrased/implicit accuracy by target match, mc_acc, locality_kl; (results, counts, rows).
    answers=False: mc_acc only (no generated answers, no locality_kl): a cheap first look at many items.
    desc: the progress bar's label (the world task runs UPQA-style questions)."""
    journal = journal or Journal()
    base_logprobs = [answer_logprobs(engine, Personalized(), q, a) for q, a in NEUTRAL] if answers else []

    def score(name, method, item):
        row = {"id": item.user.id, "method": name, **dict(item.meta)}
        ok = {}
        for kind, question in (("explicit", item.question), ("paraphrased", item.question_paraphrased),
                               ("implicit", item.implicit_question))[:3 if answers else 0]:
            answer = generate(engine, method(item.user, question, engine),
                              [{"role": "user", "content": question}], max_tokens)
            row[kind] = answer
            row[f"{kind}_ok"] = target_match(answer, item.targets, item.candidates)
            ok[f"{kind}_acc"] = [row[f"{kind}_ok"]]
        candidates = [item.target, *item.candidates]
        if item.candidates:
            chosen, _ = best_option(engine, method(item.user, item.question, engine),
                                    [{"role": "user", "content": item.question}], candidates)
            row["mc_choice"] = candidates[chosen]
            row["mc_ok"] = chosen == 0
            ok["mc_acc"] = [row["mc_ok"]]
        return ok, [row]

    results, counts, rows = score_items(journal, "upqa", items, methods, score, desc=desc)
    if not answers:
        return results, counts, rows
    users = locality_users([item.user for item in items])
    for name, method in methods.items():
        results[name]["locality_kl"] = 0.0 if name == "base" else journal.score(
            ("upqa", name, "locality_kl"), lambda: locality_kl(engine, method, users, base_logprobs))
        counts[name]["locality_kl"] = len(users)
    return results, counts, rows


RECITATION_USERS = 10
RESTATE_NEW_WORDS = 3


def restates_only(answer: str, item: UpqaItem, question: str) -> bool:
    """Does `answer` state the item's target while adding fewer than RESTATE_NEW_WORDS content tokens of its own
    (tokens not in the statement, the targets or the question; content_tokens leaves out PERSON_TOKENS)?
    "You are vegetarian." and "You're vegetarian and You're vegetarian. You're vegan." to "What should I cook tonight?"
    do; "Try a vegetarian chili with beans." does not."""
    if not target_match(answer, item.targets, item.candidates):
        return False
    known = set().union(content_tokens(question), *map(content_tokens, (*item.user.preferences, *item.targets)))
    return len(content_tokens(answer) - known) < RESTATE_NEW_WORDS


def run_recitation(engine, items: list[UpqaItem], methods: dict, questions: list[str], *, max_tokens: int = 32,
                   journal: Journal | None = None) -> tuple[dict, dict, list[dict]]:
    """recite_neutral, restate_implicit and restate_product (RULES["recitation"]) for up to RECITATION_USERS
    users evenly spaced over the items. Replies that no user changes (no artifacts, no context) are generated
    once per question."""
    same_for_all: dict[str, str] = {}

    def answer(p: Personalized, question: str) -> str:
        if p.artifacts.lora or p.artifacts.control_vectors or p.system or p.user_prefix:
            return generate(engine, p, [{"role": "user", "content": question}], max_tokens)
        if question not in same_for_all:
            same_for_all[question] = generate(engine, p, [{"role": "user", "content": question}], max_tokens)
        return same_for_all[question]

    def score(name, method, item):
        row = {"id": item.user.id, "method": name}
        recited = []
        for question in questions:
            reply = answer(method(item.user, question, engine), question)
            if target_match(reply, item.targets, item.candidates):
                recited.append({"question": question, "answer": reply})
        row["recited"], row["recite_neutral"] = recited, len(recited) / len(questions)
        out = {"recite_neutral": [row["recite_neutral"]]}
        for kind, question in (("implicit", item.implicit_question), ("product", item.product_question)):
            if question:
                reply = answer(method(item.user, question, engine), question)
                row[kind], row[f"restate_{kind}"] = reply, restates_only(reply, item, question)
                out[f"restate_{kind}"] = [row[f"restate_{kind}"]]
        return out, [row]

    chosen = items[::max(1, math.ceil(len(items) / RECITATION_USERS))][:RECITATION_USERS]
    return score_items(journal or Journal(), "recitation", chosen, methods, score)


PREFEVAL_ACK = "Got it, I'll keep that in mind."
PREFEVAL_MAX_CHARS = 150   # distractor messages are cut: 10 turns stay ~800 tokens, within context and CPU budget


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] + " ..."


def distractor_turns(conversations: list[list[dict]], n: int, rng: random.Random, max_chars: int) -> list[dict]:
    """n consecutive user/assistant turns from the distractor conversations (read as one long chat that
    wraps around), starting at a seeded position; each message cut to max_chars characters."""
    messages = [m for conversation in conversations for m in conversation]
    turns = len(messages) // 2
    start = rng.randrange(turns)
    out = []
    for t in range(n):
        j = 2 * ((start + t) % turns)
        out += [{"role": m["role"], "content": _cut(m["content"], max_chars)} for m in messages[j:j + 2]]
    return out


def prefeval_layout(item: PrefEvalItem, conversations: list[list[dict]], turns: int, seed: int,
                    max_chars: int) -> tuple[list[int], list[dict]]:
    """The option order and the distractor turns of an item, seeded by the seed and the item's id (so a shard
    lays an item out as a whole run does), shared by every method and turn count (the T-turn conversation is a
    prefix of the longest one)."""
    rng = random.Random(f"{seed}/{item.id}")
    order = list(range(len(item.options)))
    rng.shuffle(order)
    return order, distractor_turns(conversations, turns, rng, max_chars)


def run_prefeval(engine, items: list[PrefEvalItem], conversations: list[list[dict]], methods: dict, *,
                 turns: list[int], seed: int = 0, max_chars: int = PREFEVAL_MAX_CHARS,
                 journal: Journal | None = None) -> tuple[dict, dict, list[dict]]:
    """followed@T for each T in `turns`: is the preference-following option the model's choice?"""
    def score(name, method, item):
        order, distractors = prefeval_layout(item, conversations, max(turns), seed, max_chars)
        shown = [item.options[i] for i in order]
        question = item.question + "\n\nOptions:\n" + "\n".join(f"- {o}" for o in shown) + \
            "\nAnswer with the best option."
        p = method(item.user, item.question, engine)
        # Every other method walks the turn counts down: a method that shares the conversation with the one
        # before it (rag with base: rag only adds text before the question) then finds it in the KV cache.
        walk = turns if list(methods).index(name) % 2 == 0 else turns[::-1]
        choices = {t: best_option(engine, p, [{"role": "user", "content": item.preference},
                                              {"role": "assistant", "content": PREFEVAL_ACK}]
                                  + distractors[:2 * t] + [{"role": "user", "content": question}], shown)
                   for t in walk}
        followed, rows = {}, []
        for t in turns:
            chosen, scores = choices[t]
            ok = order[chosen] == 0
            followed[f"followed@{t}"] = [ok]
            rows.append({"id": item.id, "method": name, "turns": t, "order": order,
                         "scores": [round(s, 4) for s in scores], "followed": ok})
        return followed, rows

    return score_items(journal or Journal(), "prefeval", items, methods, score)


UPQA_QUESTIONS = (("explicit", "question"), ("paraphrased", "question_paraphrased"), ("implicit", "implicit_question"))


def statement_in_chat(method_name: str) -> bool:
    """Multi-turn UPQA: does the method hear the user's statement as the first user turn? Context methods do;
    a composition with a trained method (edit, perce, ...) has it in its weights instead, as the paper's edits do."""
    return not any(part in names.TRAINED_METHODS + names.EDIT_ABLATIONS for part in method_parts(method_name))


def method_parts(spec: str) -> list[str]:
    """The method names of a composition, `memory` counted as what it is made of (names.MEMORY_PARTS)."""
    out = []
    for part in (p.strip() for p in spec.split("+")):
        out += names.MEMORY_PARTS if part == names.MEMORY else [part]
    return out


def run_upqa_turns(engine, items: list[UpqaItem], conversations: list[list[dict]], methods: dict, *,
                   turns: list[int], max_tokens: int = 32, seed: int = 0, max_chars: int = PREFEVAL_MAX_CHARS,
                   journal: Journal | None = None) -> tuple[dict, dict, list[dict]]:
    """UPQA in the multi-turn setting of the Personalization Editing paper: the statement is the first user turn
    (answered PREFEVAL_ACK) for context methods, or edited in for trained ones; then T PrefEval distractor
    turns; then the explicit, paraphrased and implicit questions. {kind}_acc@T for each T in `turns`. The
    distractors are seeded by the seed and the user (the T-turn conversation is a prefix of the longest one),
    the same for every method."""
    def score(name, method, item):
        distractors = distractor_turns(conversations, max(turns), random.Random(f"{seed}/{item.user.id}"), max_chars)
        opening = [{"role": "user", "content": item.user.preferences[0]}, {"role": "assistant", "content": PREFEVAL_ACK}] \
            if statement_in_chat(name) and item.user.preferences else []
        ok, rows = {}, []
        for t in turns:   # ascending: each conversation extends the previous one, so its prefix is in the KV cache
            row = {"id": item.user.id, "method": name, "turns": t}
            for kind, field in UPQA_QUESTIONS:
                question = getattr(item, field)
                messages = opening + distractors[:2 * t] + [{"role": "user", "content": question}]
                row[kind] = generate(engine, method(item.user, question, engine), messages, max_tokens)
                row[f"{kind}_ok"] = target_match(row[kind], item.targets, item.candidates)
                ok[f"{kind}_acc@{t}"] = [row[f"{kind}_ok"]]
            rows.append(row)
        return ok, rows

    return score_items(journal or Journal(), "upqa-turns", items, methods, score)


def many_preference_items(items: list[UpqaItem], n: int, seed: int = 0) -> list[UpqaItem]:
    """n items whose statements one user can hold together under detect_facts' rules: each statement gives
    exactly one atomic fact (not a retirement), and no two facts share a slot (StatedFact.slot: a single-valued
    attribute such as job or home, or one liked or disliked thing; a later fact of a held slot replaces the
    earlier, as the store's fact index does). Drawn round-robin over the attribute types, each type's items and
    the types themselves in a `seed`-shuffled order, so the first 10 hold one fact of each of UPQA's 10 types and
    the first 30 three of each. The list for n is a prefix of the list for any larger n. UserError when the
    items cannot give n."""
    from localpers.personalize.detect import detect_facts

    rng = random.Random(f"many/{seed}")
    by_type: dict[str, list[UpqaItem]] = defaultdict(list)
    for item in items:
        by_type[item.attribute_type].append(item)
    types = sorted(by_type)
    rng.shuffle(types)
    for kind in types:
        rng.shuffle(by_type[kind])
    chosen, slots = [], set()
    while len(chosen) < n and any(by_type.values()):
        for kind in types:
            while by_type[kind]:
                item = by_type[kind].pop(0)
                found = detect_facts(item.user.preferences[0]) if item.user.preferences else []
                if len(found) == 1 and not found[0].retire and found[0].slot not in slots:
                    chosen.append(item)
                    slots.add(found[0].slot)
                    break
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise UserError(f"--many-preferences {n}: the items give only {len(chosen)} statements that one user can "
                        "hold together (one atomic fact each, no two in the same slot)")
    return chosen


def many_user(items: list[UpqaItem], tag: str = "many") -> User:
    """One user holding the items' statements (preferences and history in order) and their question/target
    clusters (facts), as `localpers serve` holds a user who imported them (store imports keep UPQA fields)."""
    statements = tuple(item.user.preferences[0] for item in items)
    return User(f"{tag}{len(items)}", preferences=statements, history=statements,
                facts=tuple(f for item in items for f in item.user.facts))


def trained_part(spec: str) -> str | None:
    """The trained method of a composition ("edit+rag" -> "edit"), or None."""
    return next((part for part in method_parts(spec) if part in names.TRAINED_METHODS + names.EDIT_ABLATIONS), None)


def edit_add_fact(engine):
    """add_fact for run_upqa_many: the seconds `localpers personalize` takes to the verified adapter of `user`
    (editing.edit_facts on every fact the edit keeps, from the unedited model, each checked on llama.cpp) for
    the edit methods (edit; edit-1turn with its single-turn config), written to a temporary file and never to
    the evaluation's cache, so every run times a real edit. The editor (editing.editor_for: its torch model and
    what every edit reuses) is ready before timing, as in the server's warm job process. Other trained methods:
    None (not timed)."""
    def add_fact(user: User, part: str) -> dict | None:
        import tempfile
        import time

        from localpers.personalize import editing

        configs = {names.EDIT: None, "edit-1turn": editing.SINGLE_TURN,   # what edit_method serves with
                   "edit-stacked": editing.STACKED}
        if part not in configs:
            return None
        config = configs[part]
        editor = editing.editor_for(str(engine.model_path), config)
        facts = editing.facts_of(user.preferences, user.facts)
        routed = part == names.EDIT and len(facts) >= names.EDIT_ROUTE_FROM
        if routed:   # as personalize runs it: the adapters of the earlier facts (made for the smaller users) are
            new = editor.fact_id(facts[-1])   # reused, the new fact is edited
            reuse = {fid: path for fid, path in editing.evaluation_fact_adapters(engine).items() if fid != new}
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            if routed:
                result = editing.edit_routed(engine, editor, facts, Path(tmp) / "routes", reuse)
            else:
                result = editing.edit_facts(engine, editor, facts, Path(tmp) / "edit.gguf")
            seconds = time.perf_counter() - started
        return {"facts": len(user.preferences), "kept": len(facts), "edited": len(result.edits),
                "failed": len(result.failed), "seconds": round(seconds, 1),
                **({"reused": result.reused} if routed else {})}

    return add_fact


def run_upqa_many(engine, items: list[UpqaItem], methods: dict, *, sizes: list[int], seed: int = 0,
                  max_tokens: int = 32, journal: Journal | None = None,
                  add_fact=None) -> tuple[dict, dict, list[dict], dict]:
    """Many preferences per user (RULES["many"]): for each N in `sizes` one user holding N facts
    (many_preference_items), each fact's explicit and paraphrased question asked of every method;
    explicit_acc@N, paraphrased_acc@N, locality_kl@N. `add_fact(user, part)` -> {"seconds", ...}: what adding
    the last fact costs a trained method (eval_cli passes edit_add_fact); it is timed once for each trained
    method the specs name, with fact max(sizes)+1 added to the largest user, when the items give one.
    Returns (results, counts, rows, timing): timing[method] = add_fact's dict."""
    journal = journal or Journal()
    sizes = sorted(set(sizes))
    try:
        chosen = many_preference_items(items, sizes[-1] + 1, seed)
    except UserError:
        chosen = many_preference_items(items, sizes[-1], seed)  # no fact left to time adding
    base_logprobs = [answer_logprobs(engine, Personalized(), q, a) for q, a in NEUTRAL]
    users = {n: many_user(chosen[:n]) for n in sizes}
    pairs = [(n, item) for n in sizes for item in chosen[:n]]

    def score(name, method, pair):
        n, item = pair
        user = users[n]
        # the user's other facts of the same type answer the same question: their words are not evidence
        others = item.candidates + tuple(other.target for other in chosen[:n]
                                         if other is not item and other.attribute_type == item.attribute_type)
        row = {"id": f"{n}:{item.user.id}", "method": name, "facts": n, "statement": item.user.preferences[0],
               "attribute_type": item.attribute_type}
        ok = {}
        for kind, question in (("explicit", item.question), ("paraphrased", item.question_paraphrased)):
            row[kind] = generate(engine, method(user, question, engine), [{"role": "user", "content": question}],
                                 max_tokens)
            row[f"{kind}_ok"] = target_match(row[kind], item.targets, others)
            ok[f"{kind}_acc@{n}"] = [row[f"{kind}_ok"]]
        return ok, [row]

    results, counts, rows = score_items(journal, "many", pairs, methods, score, desc="many preferences")
    for name, method in methods.items():
        for n in sizes:
            results[name][f"locality_kl@{n}"] = 0.0 if name == "base" else journal.score(
                ("many", name, f"locality_kl@{n}"), lambda: locality_kl(engine, method, [users[n]], base_logprobs))
            counts[name][f"locality_kl@{n}"] = 1
    timing = {}
    if add_fact is not None and len(chosen) > sizes[-1]:
        grown = many_user(chosen[:sizes[-1] + 1])
        costs = {}   # per trained method: edit and edit+rag serve the same adapter
        for name in methods:
            if part := trained_part(name):
                if part not in costs:
                    costs[part] = journal.score(("many", part, f"add_fact@{len(chosen)}"),
                                                lambda: add_fact(grown, part))
                if costs[part] is not None:
                    timing[name] = costs[part]
    return results, counts, rows, timing


# LaMP's classification and rating tasks: task-name prefix -> label set (None: the gold labels of the file).
LAMP_LABELS = {"LaMP_1": ["[1]", "[2]"], "LaMP_2": None, "LaMP_3": ["1", "2", "3", "4", "5"]}


def lamp_labels(task: str, items: list[LampItem]) -> list[str] | None:
    """The label set of a classification task, or None for a generation task."""
    for prefix, labels in LAMP_LABELS.items():
        if task == prefix or task.startswith(prefix + "_") or task.startswith(prefix + "-"):
            return labels or sorted({item.gold for item in items})
    return None


def run_lamp(engine, task: str, items: list[LampItem], methods: dict, *, max_tokens: int = 64,
             journal: Journal | None = None, desc: str | None = None) -> tuple[dict, dict, list[dict]]:
    labels = lamp_labels(task, items)

    def score(name, method, item):
        p = method(item.user, item.input, engine)
        messages = [{"role": "user", "content": item.input}]
        row = {"id": item.id, "method": name, **dict(item.meta)}
        metrics = {}
        if labels is None:
            row["output"] = generate(engine, p, messages, max_tokens)
            for metric, value in rouge(row["output"], item.gold).items():
                metrics[metric] = [value]
                row[metric] = round(value, 4)
        else:
            chosen, _ = best_option(engine, p, messages, labels)
            row["output"] = labels[chosen]
            row["correct"] = row["output"] == item.gold
            metrics["accuracy"] = [row["correct"]]
            if task.startswith("LaMP_3"):
                error = abs(float(row["output"]) - float(item.gold))
                metrics["mae"], metrics["rmse"] = [error], [error ** 2]
        return metrics, [row]

    results, counts, rows = score_items(journal or Journal(), task, items, methods, score, desc=desc)
    for name in results:
        if "rmse" in results[name]:
            results[name]["rmse"] = math.sqrt(results[name]["rmse"])
    return results, counts, rows


def breakdown(rows: list[dict], metrics: dict[str, str]) -> dict:
    """Per method, the mean of each row field in `metrics` (field -> metric name) by history-size bucket
    and by time step: {method: {"history": {bucket: {metric: x}}, "step": {step: {metric: x}}}}."""
    groups = defaultdict(list)
    for row in rows:
        if "history_size" in row:
            groups[row["method"], "history", history_bucket(row["history_size"])].append(row)
            groups[row["method"], "step", str(row["step"])].append(row)
    out = defaultdict(lambda: {"history": {}, "step": {}})
    for (method, axis, key), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _bucket_order(kv[0][2]))):
        out[method][axis][key] = {name: _mean(float(r[field]) for r in members if field in r)
                                  for field, name in metrics.items()}
        out[method][axis][key]["n"] = len({r["id"] for r in members})
    return dict(out)


# Row fields that hold one item's value of a mean metric (prefeval's `followed` is per turn count, below).
ROW_METRICS = {"explicit_ok": "explicit_acc", "paraphrased_ok": "paraphrased_acc", "implicit_ok": "implicit_acc",
               "recite_neutral": "recite_neutral", "restate_implicit": "restate_implicit", "restate_product": "restate_product",
               "mc_ok": "mc_acc", "rouge1": "rouge1", "rougeL": "rougeL", "correct": "accuracy"}


def row_scores(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(method, metric): {item id: value}}: each item's value of each mean metric, read from the report's rows
    (prefeval and multi-turn upqa: one metric per turn count, e.g. followed@5)."""
    scores = defaultdict(dict)
    for row in rows:
        fields = ({"followed": row["followed"]} if "followed" in row else
                  {metric: row[field] for field, metric in ROW_METRICS.items() if row.get(field) is not None})
        for axis in ("turns", "facts"):   # prefeval, multi-turn upqa: per turn count; many preferences: per N
            if axis in row:
                fields = {f"{metric}@{row[axis]}": value for metric, value in fields.items()}
        for metric, value in fields.items():
            scores[row["method"], metric][row["id"]] = float(value)
    return scores


def ci95(values) -> float:
    """Half-width of the 95% interval of the mean of `values` (normal approximation); 0 for fewer than 2."""
    values = np.asarray(list(values), dtype=float)
    return float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


BOOTSTRAP_RESAMPLES = 10_000


def bootstrap95(diffs, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The paired bootstrap's 95% interval of the mean of `diffs` (per-item differences of two methods): the
    2.5th and 97.5th percentiles of the means of `resamples` seeded resamplings of the items with replacement.
    It makes no normality assumption, which 0/1 differences over a few items are far from."""
    diffs = np.asarray(list(diffs), dtype=float)
    means = diffs[np.random.default_rng(seed).integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_deltas(rows: list[dict], reference: str = "base") -> dict:
    """{method: {metric: {"delta", "ci95", "boot95", "n"}}}: the mean over items of (method − reference) on the
    same item, with the half-width of its 95% interval (normal approximation) and the paired bootstrap's
    interval [low, high] (bootstrap95). Pairing removes the variation between items, which both methods share,
    so this separates two methods that the means' own intervals do not."""
    scores = row_scores(rows)  # (method, metric) -> {item id: value}
    out = defaultdict(dict)
    for (method, metric), values in scores.items():
        reference_values = scores.get((reference, metric), {})
        diffs = np.array([v - reference_values[i] for i, v in values.items() if i in reference_values])
        if method != reference and len(diffs) > 1:
            out[method][metric] = {"delta": float(diffs.mean()), "n": len(diffs), "ci95": ci95(diffs),
                                   "boot95": bootstrap95(diffs)}
    return dict(out)


def _bucket_order(key: str) -> int:
    return int(key.split("-")[0].rstrip("+"))


# ---------------------------------------------------------------- reports and plots

WORLD_BREAKDOWN = {field: ROW_METRICS[field] for field in ("explicit_ok", "implicit_ok", "mc_ok", "rougeL")}


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N): the I-th of N disjoint shards of the items (every N-th item from the I-th)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like I/N (e.g. 0/4), not {text!r}") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {text}: I must be in 0..N-1")
    return index, count


def content_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (relative names and file digests, sorted; dot-files
    skipped): what a report names its data by, so shards read from different places still merge."""
    from localpers.engine.engine import model_sha256 as file_sha256  # any file's digest, cached by path and mtime

    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    files = sorted(f.relative_to(path).as_posix() for f in path.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    return hashlib.sha256("".join(f"{name}\0{file_sha256(path / name)}\n" for name in files).encode()).hexdigest()


def _run_identity(report: dict) -> dict:
    """What shards of one run share: task, model, methods, config and the content of the inputs. Paths whose
    content the report has digests of (report["inputs"]) are left out, so only content has to agree."""
    inputs = report.get("inputs", {})
    return {"task": report["task"], "model": report["model"], "methods": sorted(report["results"]),
            **{f"config {k}": v for k, v in report["config"].items() if k != "shard" and k not in inputs},
            **{f"{k} content": v for k, v in inputs.items()}}


def merge_reports(parts: list[dict]) -> dict:
    """One report from the reports of shards of the same run: every mean weighted by the number of items
    it is over (RMSE through its square), the items concatenated, the breakdown recomputed from them."""
    if any("counts" not in part or "shard" not in part["config"] for part in parts):
        raise UserError("merge takes reports of `localpers eval ... --shard I/N` runs")
    shards = [parse_shard(part["config"]["shard"]) for part in parts]
    if len({n for _, n in shards}) != 1 or len({i for i, _ in shards}) != len(shards):
        raise UserError("merge needs distinct shards of one split: " + ", ".join(p["config"]["shard"] for p in parts))
    first = _run_identity(parts[0])
    for part in parts[1:]:
        other = _run_identity(part)
        if differ := sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k)):
            raise UserError(f"shards {parts[0]['config']['shard']} and {part['config']['shard']} come from "
                            f"different runs: {', '.join(differ)} differ")
    task, model = parts[0]["task"], parts[0]["model"]
    config = {k: v for k, v in parts[0]["config"].items() if k != "shard"}
    count = shards[0][1]
    if len(shards) < count:  # a partial merge says which shards it holds
        config["shard"] = ",".join(str(i) for i, _ in sorted(shards)) + f"/{count}"
    results, counts = {}, {}
    for method in parts[0]["results"]:
        results[method], counts[method] = {}, {}
        for metric in parts[0]["results"][method]:
            pairs = [(part["counts"][method][metric], part["results"][method][metric]) for part in parts]
            n = sum(k for k, _ in pairs)
            square = metric == "rmse"
            mean = sum(k * (x * x if square else x) for k, x in pairs if k) / n if n else float("nan")
            results[method][metric], counts[method][metric] = math.sqrt(mean) if square else mean, n
    report = {"task": task, "model": model, "config": config, "rules": parts[0]["rules"], "results": results,
              "counts": counts, "items": [row for part in parts for row in part["items"]]}
    if "inputs" in parts[0]:
        report["inputs"] = parts[0]["inputs"]
    if "breakdown" in parts[0]:
        report["breakdown"] = breakdown(report["items"], WORLD_BREAKDOWN)
    return report


def with_vs_base(report: dict) -> dict:
    """The report with, when base is among several methods, "vs_base" (paired_deltas), or "vs_base_absent"
    saying why there are none (fewer than 2 items), so that the section never vanishes silently."""
    if "base" not in report["results"] or len(report["results"]) < 2:
        return report
    if deltas := paired_deltas(report["items"]):
        return {**report, "vs_base": deltas}
    return {**report, "vs_base_absent": "it needs at least 2 items scored by base and by the method (this run "
                                        f"has {max(_items(report).values(), default=0)})"}


def write_report(out_dir: str | Path, report: dict) -> list[Path]:
    """report.json, report.md and the plots; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_report(report, out_dir)
    report = with_vs_base(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=_jsonable))
    lines = [f"# localpers eval {report['task']}", "", f"Model: `{report['model']}`", "",
             "Config: " + ", ".join(f"`{k}={v}`" for k, v in report["config"].items()), "",
             *(["Inputs (SHA-256): " + ", ".join(f"{k} `{v[:16]}`" for k, v in report["inputs"].items()), ""]
               if "inputs" in report else []),
             results_table(report), ""]
    if "vs_base" in report:
        lines += ["### Paired with base: mean of (method − base) over the same items, ± its 95% interval "
                  "(normal approximation) [the paired bootstrap's 95% interval]", "",
                  vs_base_table(report), ""]
    elif "vs_base_absent" in report:
        lines += ["### Paired with base", "", f"Not computed: {report['vs_base_absent']}.", ""]
    if report.get("timing"):
        lines += ["### Adding a fact", "", timing_table(report), ""]
    for method, axes in report.get("breakdown", {}).items():
        for axis, groups in axes.items():
            lines += [f"### {method} by {'history size' if axis == 'history' else 'time step'}", "",
                      _table(groups, first=axis), ""]
    lines += ["## Scoring", ""] + [f"- {rule}" for rule in report["rules"]] + [""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return [out_dir / "report.json", out_dir / "report.md", *plots]


def _items(report: dict) -> dict[str, int]:
    """{method: number of items its means are over}: the largest count of its metrics (locality_kl counts
    users, not items); reports without counts: the number of distinct item ids in its rows."""
    counts = report.get("counts") or {}
    out = {}
    for method in report["results"]:
        mine = [n for metric, n in counts.get(method, {}).items() if metric != "locality_kl"]
        out[method] = max(mine) if mine else len({r.get("id") for r in report.get("items", ())
                                                  if r.get("method") == method})
    return out


def results_table(report: dict) -> str:
    """The methods × metrics table of a report, with the number of items each method was scored on."""
    items = _items(report)
    return _table({m: {"items": items[m], **values} for m, values in report["results"].items()})


def vs_base_table(report: dict) -> str:
    """The paired differences from base (report["vs_base"]), each method with the number of items paired."""
    def cell(d: dict) -> str:
        boot = f" [{d['boot95'][0]:+.2f}, {d['boot95'][1]:+.2f}]" if "boot95" in d else ""
        return f"{d['delta']:+.3f} ± {d['ci95']:.3f}{boot}"

    return _table({m: {"items": max(d["n"] for d in metrics.values()), **{k: cell(d) for k, d in metrics.items()}}
                   for m, metrics in report["vs_base"].items()})


def timing_table(report: dict) -> str:
    """report["timing"] (run_upqa_many): per method, the facts of the grown user, how many of them its trained
    part keeps (editing.facts_of: one per slot), the seconds to its verified adapter when the last one was added,
    how many edits it serves and how many failed verification, and (routed edits) how many were reused."""
    return _table({m: {"facts": t["facts"], "kept": t.get("kept"), "add_fact_s": t["seconds"],
                       "edited": t.get("edited"), "failed": t.get("failed"), "reused": t.get("reused")}
                   for m, t in report["timing"].items()})


def summary(report: dict, paths: list[Path]) -> str:
    """What `localpers eval` prints at the end: the results table (and the paired differences from base), then
    the files written."""
    report = with_vs_base(report)
    out = [f"{report['task']} on {report['model']}:", results_table(report)]
    if report.get("vs_base"):
        out += ["paired with base (method − base, ± 95% interval):", vs_base_table(report)]
    elif report.get("vs_base_absent"):
        out += [f"paired with base: not computed: {report['vs_base_absent']}"]
    if report.get("timing"):
        out += ["adding the last fact:", timing_table(report)]
    return "\n".join(out + ["written:", *(f"  {p}" for p in paths)])


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def _table(rows: dict[str, dict[str, float]], first: str = "method") -> str:
    metrics = list(dict.fromkeys(m for values in rows.values() for m in values))
    lines = [f"| {first} | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name, values in rows.items():
        cells = [_fmt(values.get(m)) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return str(x) if isinstance(x, (int, str)) else f"{x:.3f}"


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, paths = report["results"], []
    methods = list(results)
    scores = row_scores(report.get("items", []))

    def err(method: str, metric: str) -> float:  # error bars: the 95% interval of the mean over the items
        return ci95(scores[method, metric].values()) if (method, metric) in scores else 0.0

    # Bar chart of the metrics that live in [0, 1] (accuracies, ROUGE); KL and MAE have other scales.
    bounded = [m for m in dict.fromkeys(k for r in results.values() for k in r)
               if m.split("@")[0].endswith(("_acc", "accuracy")) or m.startswith(("rouge", "followed@"))]
    if bounded:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(bounded) * max(1, len(methods)) / 2, 3.2))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            ax.bar([x + i * width for x in range(len(bounded))], [results[method].get(m, np.nan) for m in bounded],
                   width, yerr=[err(method, m) for m in bounded], capsize=2, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(bounded))], bounded, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{report['task']} — {report['model']} (bars: 95% interval)", fontsize=9)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / "results.png"))
    for metric in dict.fromkeys(m.split("@")[0] for m in bounded if "@" in m):   # a plot per metric over turns
        turns = [m for m in bounded if m.split("@")[0] == metric]
        if len(turns) < 2:
            continue
        fig, ax = plt.subplots(figsize=(4, 3))
        xs = [int(m.split("@")[1]) for m in turns]
        for method in methods:
            ax.errorbar(xs, [results[method][m] for m in turns], yerr=[err(method, m) for m in turns], marker="o",
                        capsize=2, label=method)
        many = "many_preferences" in report.get("config", {})
        ax.set(xlabel="preferences per user" if many else "distractor turns", ylabel=metric, ylim=(0, 1), xticks=xs)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"{metric}_by_{'facts' if many else 'turns'}.png"))
    for axis, label in (("history", "history size"), ("step", "time step")):
        per_method = {m: b[axis] for m, b in report.get("breakdown", {}).items() if b[axis]}
        if not per_method:
            continue
        metrics = [m for m in next(iter(next(iter(per_method.values())).values())) if m != "n"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for method, groups in per_method.items():
                # a [0, 1] value of mean p has variance at most p (1 - p): the bar bounds the 95% interval
                bars = [1.96 * math.sqrt(max(g[metric] * (1 - g[metric]), 0) / g["n"]) if g.get("n") else 0
                        for g in groups.values()]
                ax.errorbar(list(groups), [g[metric] for g in groups.values()], yerr=bars, marker="o", capsize=2,
                            label=method)
            ax.set(title=metric, xlabel=label, ylim=(0, 1))
        axes[0][0].legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"by_{axis}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
