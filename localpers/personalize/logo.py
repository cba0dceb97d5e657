"""LoGo: global knowledge (communities of users that evolve over time) fused with a user's own signals by a
mediator, for users whose own history is too thin or too skewed to personalize on.

Source: "From Personal to Collective" (LoGo, Findings of ACL 2026): local signals on the device, global
knowledge from communities of users, a mediator that resolves conflicts between the two. Every output is one
of the served primitives: the user's and their community's control vectors (with scales) and prompt context.

The data flow (and the contract of the Flower sync, which computes the same aggregate across devices):

  device (per user, per round r)                         aggregate (server, or in-process)
  -------------------------------                        ---------------------------------
  LocalSignals  = local_signals(history)                 RoundSums = aggregate(contributions, k, ...)
    vector   [d]  unit user vector                         vector_sum   [k, d]     sum of member vectors
    counts   [V]  preference counts, public VOCABULARY     count        [k]        members
    steering [L, d] or None (CAA, control-vector layers)   steering_sum [k, L, d]  sum of member steering
    latest   [V]  latest named values (never sent)         steering_count [k]      members with steering
  Contribution  = contribute(signals, centroids)           counts       [k, V]     preference counts
    assignment  int: nearest centroid (cosine)           GlobalKnowledge = fold(previous, sums, ...)
    vector, counts, steering: as above                     (decay, centroids, drift; `advance` runs the
                                                            Lloyd iterations of a round in-process)

Everything a device sends is a sum term: the aggregate is a sum over devices of one-hot(assignment) times
each field (`contribution_sums` gives one device's term), so it can run under secure aggregation and with
noise added to the sums. Nothing else crosses: no text, no item, no user id.

GlobalKnowledge (`save`/`load`: one .npz in DATA_DIR/logo/, FORMAT_VERSION in its header):
    round          int                 rounds folded in so far (time windows)
    half_life      float               rounds after which a round's statistics weigh half
    min_size       float               a community is published only with at least this (decayed) size
    sums           RoundSums           decayed running sums: S_r = decay * S_{r-1} + round sums, decay = 0.5 ** (1 / half_life)
    centroids      [k, d]              vector_sum / count (unit-normalized)
    sizes          [k]                 decayed count
    steering       [k, L, d]           steering_sum / steering_count (0 where none)
    histograms     [k, V]              decayed preference counts (counts, not shares: they add across devices)
    drift          [r, k]              per round, the L2 distance each centroid moved
    published      [k] bool            sizes >= min_size; unpublished communities are never served

k (the number of communities) is chosen once, from the first round's number of contributors n:
k = clamp(round(sqrt(n / 20)), 2, K_MAX): communities of about sqrt(20 n) members (~120 for n = 700), so that
their histograms are read from many users (the sqrt(n / 2) rule of thumb gave 16 communities of ~40 on the
development worlds and worse cold-start predictions: BENCHMARKS.md, LoGo section). Later rounds keep k and start k-means from the previous centroids, so community
identities persist and their drift is measurable.

The world's true community labels and attribute values are for scoring only: nothing here reads them.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import tempfile
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from localpers import names
from localpers.personalize.world import ATTRIBUTES

FORMAT_VERSION = 1
K_MAX = 16
HALF_LIFE = 2.0         # rounds
MIN_SIZE = 10.0         # members (decayed) before a community is published
KMEANS_ITERATIONS = 10  # Lloyd steps in a round (each is one contribute/aggregate exchange)

# ---------------------------------------------------------------- the public vocabulary

# "attribute=value" for every value of every attribute: the histograms count over it. It is the world's
# public catalogue (what values exist and which words name them), not any user's label.
VOCABULARY: tuple[str, ...] = tuple(f"{a}={v}" for a, spec in ATTRIBUTES.items() for v in spec["values"])
VOCAB_ATTRIBUTE: tuple[str, ...] = tuple(entry.split("=", 1)[0] for entry in VOCABULARY)
VOCAB_VALUE: tuple[str, ...] = tuple(entry.split("=", 1)[1] for entry in VOCABULARY)


def _keyword_pattern() -> tuple[re.Pattern, dict[str, int]]:
    """One regex over every value name and keyword (longest first, so 'green curry' wins over 'curry'
    and 'rock climbing' over 'rock'), and phrase -> vocabulary index."""
    index = {}
    for i, (a, v) in enumerate(zip(VOCAB_ATTRIBUTE, VOCAB_VALUE)):
        for phrase in (v, *ATTRIBUTES[a]["values"][v]):
            index.setdefault(phrase.lower(), i)
    phrases = sorted(index, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(map(re.escape, phrases)) + r")\b"), index


_PATTERN, _PHRASE_INDEX = _keyword_pattern()


def read_preferences(text: str) -> np.ndarray:
    """Counts [V] over VOCABULARY of the values a text names (its value names and their keywords; each
    phrase once per mention). A reader of what the user wrote, not of any label."""
    counts = np.zeros(len(VOCABULARY), np.float32)
    for match in _PATTERN.finditer(text.lower()):
        counts[_PHRASE_INDEX[match.group(1)]] += 1
    return counts


def preference_counts(texts) -> np.ndarray:
    """Summed read_preferences over texts: [V]."""
    total = np.zeros(len(VOCABULARY), np.float32)
    for text in texts:
        total += read_preferences(text)
    return total


def attribute_slices() -> dict[str, slice]:
    """attribute -> its slice of VOCABULARY (values of one attribute are contiguous)."""
    out = {}
    for i, a in enumerate(VOCAB_ATTRIBUTE):
        out[a] = slice(out[a].start, i + 1) if a in out else slice(i, i + 1)
    return out


ATTRIBUTE_SLICES = attribute_slices()

# ---------------------------------------------------------------- local signals (on the device)


@dataclass
class LocalSignals:
    """What the device knows about its user at one time."""
    vector: np.ndarray                 # [d] unit user vector
    counts: np.ndarray                 # [V] preference counts (over the window the signals cover)
    n_items: int                       # history items the signals were read from
    steering: np.ndarray | None = None  # [L, d] CAA steering per control-vector layer (L = n_layer - 1), or None
    latest: np.ndarray | None = None    # [V] one-hot per attribute: the value the user named most recently


def latest_values(texts) -> np.ndarray:
    """[V]: per attribute, 1 on the value named by the most recent text (texts oldest first) that names one of
    its values (the most named one within that text), 0 elsewhere. Recency resolves conflicting statements:
    on the development worlds the latest named value was the current one 83-95% of the time when a user had
    named two or more, the most named one 47-60% (BENCHMARKS.md, LoGo session 7)."""
    out = np.zeros(len(VOCABULARY), np.float32)
    for text in texts:
        counts = read_preferences(text)
        for s in ATTRIBUTE_SLICES.values():
            if counts[s].sum() > 0:
                out[s] = 0
                out[s.start + int(np.argmax(counts[s]))] = 1
    return out


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0).astype(np.float32)


EMBEDDING_WEIGHT = 0.5  # share of the user vector's squared norm from text embeddings (the rest: preferences)


def user_vector(embeddings: np.ndarray | None, counts: np.ndarray, embedding_weight: float = EMBEDDING_WEIGHT) -> np.ndarray:
    """The unit user vector [d_e + V]: sqrt(w) * unit(mean item embedding) joined to sqrt(1 - w) *
    unit(preference counts). embeddings: [n, d_e] item embeddings (None or empty: that part is zero, and
    w = 0)."""
    pref = unit(np.asarray(counts, np.float32))
    if embeddings is None or len(embeddings) == 0:
        return pref
    emb = unit(np.asarray(embeddings, np.float32).mean(axis=0))
    return unit(np.concatenate([math.sqrt(embedding_weight) * emb, math.sqrt(1 - embedding_weight) * pref]))


def local_signals(history: list[str], embeddings: np.ndarray | None = None, steering: np.ndarray | None = None,
                  embedding_weight: float = EMBEDDING_WEIGHT) -> LocalSignals:
    """A user's signals from their history texts and (optionally) the embeddings [n, d_e] of those texts."""
    counts = preference_counts(history)
    return LocalSignals(user_vector(embeddings, counts, embedding_weight), counts, len(history), steering,
                        latest_values(history))

# ---------------------------------------------------------------- contributions and their aggregate


@dataclass
class Contribution:
    """What one device sends for one round (and all that it sends)."""
    assignment: int                     # nearest centroid, 0..k-1
    vector: np.ndarray                  # [d]
    counts: np.ndarray                  # [V]
    steering: np.ndarray | None = None  # [L, d]


@dataclass
class RoundSums:
    """Sums over the devices of a round, per community: everything the aggregate needs."""
    vector_sum: np.ndarray      # [k, d]
    count: np.ndarray           # [k]
    steering_sum: np.ndarray    # [k, L, d]
    steering_count: np.ndarray  # [k]
    counts: np.ndarray          # [k, V]

    @classmethod
    def zeros(cls, k: int, d: int, n_steer_layers: int, d_steer: int) -> "RoundSums":
        return cls(np.zeros((k, d), np.float64), np.zeros(k, np.float64),
                   np.zeros((k, n_steer_layers, d_steer), np.float64), np.zeros(k, np.float64),
                   np.zeros((k, len(VOCABULARY)), np.float64))

    def __add__(self, other: "RoundSums") -> "RoundSums":
        return RoundSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> "RoundSums":
        return RoundSums(*(getattr(self, f.name) * factor for f in fields(self)))


def assign(vector: np.ndarray, centroids: np.ndarray) -> int:
    """Index of the centroid [k, d] with the highest cosine similarity to the unit vector [d]."""
    return int(np.argmax(centroids @ vector))


def contribute(signals: LocalSignals, centroids: np.ndarray) -> Contribution:
    """One device's contribution for a round, given the current centroids [k, d]."""
    return Contribution(assign(signals.vector, centroids), signals.vector, signals.counts, signals.steering)


def contribution_sums(c: Contribution, k: int, steer_shape: tuple[int, int]) -> RoundSums:
    """One device's term of the round's sums (one-hot on its assignment): what secure aggregation adds up."""
    sums = RoundSums.zeros(k, len(c.vector), *steer_shape)
    sums.vector_sum[c.assignment] = c.vector
    sums.count[c.assignment] = 1
    sums.counts[c.assignment] = c.counts
    if c.steering is not None:
        sums.steering_sum[c.assignment] = c.steering
        sums.steering_count[c.assignment] = 1
    return sums


def aggregate(contributions: list[Contribution], k: int, d: int, steer_shape: tuple[int, int] = (0, 0)) -> RoundSums:
    """The round's sums over all contributions (equal to the sum of their contribution_sums)."""
    sums = RoundSums.zeros(k, d, *steer_shape)
    for c in contributions:
        sums.vector_sum[c.assignment] += c.vector
        sums.count[c.assignment] += 1
        sums.counts[c.assignment] += c.counts
        if c.steering is not None:
            sums.steering_sum[c.assignment] += c.steering
            sums.steering_count[c.assignment] += 1
    return sums

# ---------------------------------------------------------------- global knowledge


@dataclass
class GlobalKnowledge:
    """The current global knowledge (see the module docstring for every field's shape and meaning)."""
    round: int
    half_life: float
    min_size: float
    sums: RoundSums
    centroids: np.ndarray
    drift: np.ndarray                     # [rounds, k]
    meta: dict = field(default_factory=dict)  # embedder name, model hash, embedding weight, control-vector paths

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> np.ndarray:
        return self.sums.count

    @property
    def published(self) -> np.ndarray:
        return self.sums.count >= self.min_size

    @property
    def steering(self) -> np.ndarray:
        """[k, L, d] mean member steering vector per community (zeros where no member had one)."""
        n = self.sums.steering_count[:, None, None]
        return np.where(n > 0, self.sums.steering_sum / np.where(n > 0, n, 1), 0).astype(np.float32)

    @property
    def histograms(self) -> np.ndarray:
        return self.sums.counts

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed over `path`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT_VERSION, "round": self.round, "half_life": self.half_life,
                  "min_size": self.min_size, "vocabulary": list(VOCABULARY), "meta": self.meta}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), centroids=self.centroids, drift=self.drift,
                     **{f"sums_{x.name}": getattr(self.sums, x.name) for x in fields(RoundSums)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "GlobalKnowledge":
        from localpers.errors import UserError

        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT_VERSION or header.get("vocabulary") != list(VOCABULARY):
                    raise UserError(f"{path}: global knowledge of another format or vocabulary; refresh it")
                sums = RoundSums(*(z[f"sums_{x.name}"] for x in fields(RoundSums)))
                return cls(header["round"], header["half_life"], header["min_size"], sums, z["centroids"],
                           z["drift"], header.get("meta", {}))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: cannot read the global knowledge ({e})") from None


def choose_k(n: int) -> int:
    """The number of communities for n contributors: clamp(round(sqrt(n / 20)), 2, K_MAX)."""
    return int(min(K_MAX, max(2, round(math.sqrt(n / 20)))))


def init_centroids(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on unit vectors [n, d] -> [k, d]."""
    rng = np.random.default_rng(seed)
    centroids = [vectors[rng.integers(len(vectors))]]
    for _ in range(1, k):
        d2 = np.min(((vectors[:, None, :] - np.array(centroids)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centroids.append(vectors[rng.choice(len(vectors), p=p)])
    return np.array(centroids, np.float32)


def centroids_from(sums: RoundSums, previous: np.ndarray) -> np.ndarray:
    """Unit mean vector per community; a community with no members keeps its previous centroid."""
    empty = sums.count <= 0
    return np.where(empty[:, None], previous, unit(sums.vector_sum)).astype(np.float32)


def fold(previous: GlobalKnowledge | None, round_sums: RoundSums, *, start: np.ndarray | None = None,
         half_life: float = HALF_LIFE, min_size: float = MIN_SIZE, meta: dict | None = None) -> GlobalKnowledge:
    """The knowledge after one round, from the round's aggregated sums (what a federated server runs on the
    securely aggregated sums): S_r = decay * S_{r-1} + round sums with decay = 0.5 ** (1 / half_life)
    (half_life=inf: no decay), centroids = unit(S_r.vector_sum) (an empty community keeps its centroid),
    drift = how far each centroid moved from the previous round's. `start`: the centroids the round's devices
    were assigned with (needed in the first round, for communities nobody joined)."""
    if previous is None:
        carried, before = round_sums.scaled(0.0), (start if start is not None else unit(round_sums.vector_sum))
    else:
        carried, before = previous.sums.scaled(0.5 ** (1.0 / half_life)), previous.centroids
    sums = carried + round_sums
    centroids = centroids_from(sums, before)
    moved = (np.zeros((1, len(centroids))) if previous is None
             else np.linalg.norm(centroids - previous.centroids, axis=1)[None])
    return GlobalKnowledge(round=(previous.round if previous else 0) + 1, half_life=half_life, min_size=min_size,
                           sums=sums, centroids=centroids,
                           drift=moved if previous is None else np.concatenate([previous.drift, moved]),
                           meta={**(previous.meta if previous else {}), **(meta or {})})


def advance(previous: GlobalKnowledge | None, signals: list[LocalSignals], *, k: int | None = None,
            half_life: float = HALF_LIFE, min_size: float = MIN_SIZE, iterations: int = KMEANS_ITERATIONS,
            seed: int = 0, meta: dict | None = None, random_assignment: bool = False,
            restarts: int = 1) -> GlobalKnowledge:
    """Fold one round (the signals of this round's contributors) into the knowledge, in-process: Lloyd
    iterations of contribute -> aggregate -> centroids of the decayed sums, starting from the previous
    centroids (the first round: k-means++ with k = choose_k(n)), then `fold`. Each iteration is one exchange
    with the devices (they assign themselves to the centroids sent). half_life=inf: no decay.
    random_assignment (an ablation): every contributor joins a random community, one pass. restarts: in the
    first round, k-means++ seeds seed..seed+restarts-1 are each run and the one of least inertia (sum over
    contributors of 1 - cosine to their centroid) is kept, which removes most of the seed lottery."""
    if not signals:
        raise ValueError("a round needs at least one contributor")
    vectors = np.stack([s.vector for s in signals])
    steering = [s.steering for s in signals if s.steering is not None]
    if steering:
        steer_shape = steering[0].shape
    else:  # nobody steers this round: keep the previous rounds' steering shape
        steer_shape = previous.sums.steering_sum.shape[1:] if previous is not None else (0, 0)
    if previous is not None and previous.sums.steering_sum.shape[1:] != steer_shape:
        previous = replace(previous, sums=replace(previous.sums, steering_sum=np.zeros((previous.k, *steer_shape)),
                                                  steering_count=np.zeros(previous.k)))
    carried = previous.sums.scaled(0.5 ** (1.0 / half_life)) if previous is not None else None
    rng = np.random.default_rng(seed + (previous.round if previous else 0))
    if previous is not None:
        starts = [previous.centroids]
    else:  # the first round: k-means++ from `restarts` seeds, the run of least inertia kept
        starts = [init_centroids(vectors, k or choose_k(len(signals)), seed + i) for i in range(max(1, restarts))]
    best = None
    for start in starts:
        centroids, round_sums, inertia = _lloyd(signals, start, carried, steer_shape, iterations, rng,
                                                random_assignment)
        if best is None or inertia < best[2] - 1e-9:
            best = (start, round_sums, inertia)
    start, round_sums, _ = best
    return fold(previous, round_sums, start=start, half_life=half_life, min_size=min_size, meta=meta)


def _lloyd(signals, centroids, carried, steer_shape, iterations, rng, random_assignment):
    """Lloyd iterations of one round from `centroids`: (final centroids, the round's sums, inertia)."""
    d = len(signals[0].vector)
    for _ in range(1 if random_assignment else max(1, iterations)):
        contributions = [contribute(s, centroids) for s in signals]
        if random_assignment:
            contributions = [replace(c, assignment=int(rng.integers(len(centroids)))) for c in contributions]
        round_sums = aggregate(contributions, len(centroids), d, steer_shape)
        new = centroids_from(round_sums if carried is None else carried + round_sums, centroids)
        if np.allclose(new, centroids):
            break
        centroids = new
    inertia = float(sum(1.0 - centroids[c.assignment] @ c.vector for c in contributions))
    return centroids, round_sums, inertia


# ---------------------------------------------------------------- mediator


def normalized_entropy(counts: np.ndarray) -> float:
    """Entropy of the counts' distribution over their nonzero support, divided by log(V): 0 = all mass on
    one value (a skewed history), 1 = uniform. 0 for no counts."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))


@dataclass(frozen=True)
class MediatorParams:
    """The mediator's few parameters. Chosen on development world seeds 1, 3 and 7 (BENCHMARKS.md, LoGo
    sections of sessions 6 and 7): context_max_count = 0 (a community note for an attribute the user named
    would contradict them: without the mediator it did for 40% of 50+-item users of seed 7; and where the
    user's own statements conflict, their latest one was right 83-95% of the time, the community's choice among
    them 36-56%, so conflicting local evidence is resolved by recency, not by the community), min_agreement = 0
    and min_share = 0 (notes were right more often than chance in every well-filled agreement and share bin,
    and a withheld note leaves the model near chance), posterior = True (the community mixture's note was right
    0.267 vs 0.223 for the nearest community, over the cold users of seeds 1/3/7), own_context = True (the 135M
    model chose a user's own stated value only 24% of the time from the history in context; the note of their
    latest value: +0.075 mc_acc for cold users, +0.225 for 50+ users on seed 7). The control-vector scales stay 0:
    measured on seed 1 (community 1 and 4, user 4 and 16), every nonzero scale lowered mc_acc (the user's own
    CAA vector at 4: -0.50 for users with 10-49 items); so skew_boost (the entropy term: extra community weight
    for a skewed history), which only moves the community scale, stays 0 as well."""
    context_max_count: float = 0.0   # an attribute gets community context when the user's own count for it is <= this
    min_agreement: float = 0.0       # and the user's vector agrees with the community centroid at least this much
    min_share: float = 0.0           # and the community's most common value holds at least this share of its counts
    tau: float = 8.0                 # items: local weight = 1 - exp(-n / tau)
    user_scale: float = 0.0          # control-vector scale of the user's own steering at full local weight
    community_scale: float = 0.0     # control-vector scale of the community steering at full global weight
    skew_boost: float = 0.0          # extra global weight for a skewed (low-entropy) history: + skew_boost * (1 - entropy)
    posterior: bool = True           # context values from the posterior mixture of communities, not the nearest one
    own_context: bool = True         # also note the user's own latest named value of the attributes they did name
    smoothing: float = 1.0           # pseudo-count per value in the communities' likelihoods


MEDIATOR = MediatorParams()


@dataclass(frozen=True)
class Mediation:
    community: int             # -1: no published community fits
    agreement: float           # cosine(user vector, centroid)
    local_weight: float        # 1 - exp(-n / tau), in [0, 1]
    user_scale: float
    community_scale: float
    context: tuple[tuple[str, str], ...]   # (attribute, community's most common value) for thin attributes
    own: tuple[tuple[str, str], ...] = ()  # (attribute, the user's latest named value) for the other attributes


def attribute_shares(histograms: np.ndarray, smoothing: float) -> np.ndarray:
    """[k, V] -> per community and attribute, the smoothed share of each value among the attribute's values."""
    shares = histograms + smoothing
    for s in ATTRIBUTE_SLICES.values():
        shares[:, s] /= shares[:, s].sum(axis=1, keepdims=True)
    return shares


def community_posterior(counts: np.ndarray, knowledge: GlobalKnowledge, smoothing: float = 1.0) -> np.ndarray:
    """P(community | the user's preference counts) over the published communities [k] (0 elsewhere): prior
    ∝ size, likelihood = prod over counted values of the community's smoothed share of that value
    (naive Bayes: each mention independent given the community)."""
    published = knowledge.published
    log_post = np.log(np.maximum(knowledge.sizes, 1e-9)) + np.log(attribute_shares(knowledge.histograms, smoothing)) @ counts
    log_post = np.where(published, log_post, -np.inf)
    post = np.exp(log_post - log_post.max())
    return post / post.sum()


def mediate(signals: LocalSignals, knowledge: GlobalKnowledge, params: MediatorParams = MEDIATOR) -> Mediation:
    """Decide, for one request, how much the reply leans on the community: from the history size, the
    agreement of the user's vector with their community's centroid and the skew (normalized entropy) of
    their preference counts."""
    own = []
    if params.own_context and signals.latest is not None:
        for attribute, s in ATTRIBUTE_SLICES.items():
            if signals.counts[s].sum() > params.context_max_count and signals.latest[s].any():
                own.append((attribute, VOCAB_VALUE[s.start + int(np.argmax(signals.latest[s]))]))
    published = knowledge.published
    if not published.any():
        return Mediation(-1, 0.0, 1.0, params.user_scale, 0.0, (), tuple(own))
    similarity = knowledge.centroids @ signals.vector
    similarity = np.where(published, similarity, -np.inf)
    community = int(np.argmax(similarity))
    agreement = float(similarity[community])
    local = 1.0 - math.exp(-signals.n_items / params.tau)
    skew = 1.0 - normalized_entropy(signals.counts) if signals.counts.sum() > 0 else 0.0
    global_weight = min(1.0, (1.0 - local) + params.skew_boost * skew) * max(0.0, agreement)
    context = []
    if agreement >= params.min_agreement:
        if params.posterior:
            post = community_posterior(signals.counts, knowledge, params.smoothing)
            histogram = post @ attribute_shares(knowledge.histograms, params.smoothing)
        else:
            histogram = knowledge.histograms[community]
        for attribute, s in ATTRIBUTE_SLICES.items():
            if signals.counts[s].sum() > params.context_max_count:
                continue
            values = histogram[s]
            if values.sum() <= 0 or values.max() / values.sum() < params.min_share:
                continue
            context.append((attribute, VOCAB_VALUE[s.start + int(np.argmax(values))]))
    return Mediation(community, agreement, local, params.user_scale * local,
                     params.community_scale * global_weight, tuple(context), tuple(own))


CONTEXT_TOP = 2  # community lines kept when the request names attributes (else every thin attribute's line)


def context_prefix(context: tuple[tuple[str, str], ...], query: str, own: tuple[tuple[str, str], ...] = ()) -> str:
    """The mediator's notes before the user's message ('' when there are none): the community context
    (attributes the user left open) and the user's own latest named values (`own`, the attributes they named).
    Lines whose attribute, value or value keywords share a term with the request (BM25, methods.retrieve) are
    kept, at most CONTEXT_TOP; when none does, every line is. On development world seed 1, 32 cold-start
    users: the 135M model chose the context's value 59-72% of the time with all lines (system message or
    prefix), 100% with the request's line only."""
    from localpers.personalize.methods import retrieve

    entries = [(OWN_NOTE, a, v) for a, v in own] + [(COMMUNITY_NOTE, a, v) for a, v in context]
    if not entries:
        return ""
    keyed = tuple(f"{a} {v} " + " ".join(ATTRIBUTES[a]["values"][v]) for _, a, v in entries)
    if hits := retrieve(keyed, query, k=CONTEXT_TOP):
        entries = [entries[keyed.index(h)] for h in hits]
    notes = []
    for head in (OWN_NOTE, COMMUNITY_NOTE):
        if lines := [f"{v} ({a})" for h, a, v in entries if h == head]:
            notes.append(f"{head}: " + "; ".join(lines) + ".")
    return " ".join(notes) + "\n\n"


OWN_NOTE = "What I said most recently"
COMMUNITY_NOTE = "People with interests like mine often prefer"


# ---------------------------------------------------------------- the synthetic world, in rounds


def world_rounds(upqa: list[dict], *, half_life: float = HALF_LIFE, min_size: float = MIN_SIZE, k: int | None = None,
                 window: bool = False, random_assignment: bool = False, embed=None, steer=None,
                 embedding_weight: float = EMBEDDING_WEIGHT, seed: int = 0,
                 restarts: int = 1, steer_limit: int | None = None) -> dict[int, GlobalKnowledge]:
    """The global knowledge a world user asked at step s sees: {s: knowledge after rounds 1..s}, round r
    folding in every user still active at r (asked at step >= r) with an item before step r. A contributor's
    signals are read from their items before step r (window=True: only those of step r - 1).
    upqa: the world's upqa.json entries (their `profile` items carry `text` and `step`; nothing else is read).
    embed(texts) -> [n, d_e] item embeddings (None: preference counts only); steer(texts) -> [L, d] or None,
    computed for every contributor or, with steer_limit, for a random sample of that many per round (CAA runs
    the model twice per prompt: a sample keeps an evaluation's cost bounded; the community steering is the
    mean over the members that sent one, as on devices where only some do)."""
    steps = 1 + max(entry["step"] for entry in upqa)
    out, knowledge = {}, None
    for r in range(1, steps):
        signals = []
        for entry in upqa:
            if entry["step"] < r:
                continue
            texts = [p["text"] for p in entry["profile"] if (p["step"] == r - 1 if window else p["step"] < r)]
            if texts:
                signals.append((texts, local_signals(texts, embed(texts) if embed else None, None, embedding_weight)))
        if steer is not None:  # the contributors that steer: all, or a sample of steer_limit (seeded per round)
            chosen = range(len(signals)) if steer_limit is None else \
                random.Random(seed * 1000 + r).sample(range(len(signals)), min(steer_limit, len(signals)))
            for i in chosen:
                signals[i][1].steering = steer(signals[i][0])
        signals = [sig for _, sig in signals]
        if signals:
            knowledge = advance(knowledge, signals, k=k, half_life=half_life, min_size=min_size, seed=seed,
                                random_assignment=random_assignment, restarts=restarts)
        out[r] = knowledge
    return out


# ---------------------------------------------------------------- steering vectors (CAA, torch)

STEER_PROMPTS = 3   # the user's own most recent items used as prompts
STEER_PROFILE = 6   # preference items (most recent) put in context


class Steerer:
    """CAA-style steering vectors (Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition"):
    the mean over the user's prompts of h(profile in the system message + prompt) - h(prompt) at the last
    prompt token, for every block whose output llama.cpp's control vectors can steer (blocks 1..n_layer-1).
    Hidden states from localpers.model.model (output_hidden_states), equal to llama.cpp's."""

    def __init__(self, model_path=None, model=None, tokenizer=None):
        import torch

        from localpers import default_model_path
        from localpers.model.model import load_model
        from localpers.engine.tokenizer import Tokenizer

        self.torch = torch
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.model = model if model is not None else load_model(self.model_path)
        self.tok = tokenizer or Tokenizer.from_gguf(self.model_path)

    def _last_states(self, messages: list[dict]) -> np.ndarray:
        ids = self.tok.encode(self.tok.apply_chat_template(messages), add_bos=False)
        with self.torch.no_grad():
            _, states = self.model(self.torch.tensor([ids]), output_hidden_states=True)
        # states[i + 1] is the output of block i; llama.cpp steers blocks 1..n_layer-1
        return np.stack([s[0, -1].float().numpy() for s in states[2:]])

    def __call__(self, texts: list[str]) -> np.ndarray | None:
        """[n_layer - 1, d] for a user's history texts (oldest first), or None when they stated no preference."""
        profile = [t for t in texts if read_preferences(t).sum() > 0][-STEER_PROFILE:]
        if not profile:
            return None
        system = "About the user:\n" + "\n".join(f"- {t}" for t in profile)
        diffs = [self._last_states([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
                 - self._last_states([{"role": "user", "content": prompt}]) for prompt in texts[-STEER_PROMPTS:]]
        return np.mean(diffs, axis=0).astype(np.float32)


def write_steering(path: str | Path, steering: np.ndarray, arch: str) -> Path:
    """A steering vector [n_layer - 1, d] as a llama.cpp control-vector GGUF (direction.1 .. direction.{n_layer-1})."""
    from localpers.model.gguf_write import write_control_vector

    return write_control_vector(path, {il + 1: v for il, v in enumerate(steering)}, arch)


class CachedEmbedder:
    """Item embeddings through `embedder` (retrieval.GGUFEmbedder or MiniLMEmbedder), cached in memory by the
    text's SHA-256 so a text is embedded once per process."""

    def __init__(self, embedder):
        self.embedder, self.name, self.cache = embedder, embedder.name, {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode()).digest() for t in texts]
        missing = [t for key, t in zip(keys, texts) if key not in self.cache]
        if missing:
            for t, v in zip(missing, self.embedder.embed(missing)):
                self.cache[hashlib.sha256(t.encode()).digest()] = v
        return np.stack([self.cache[key] for key in keys])

# ---------------------------------------------------------------- the method (serve and eval)


@dataclass
class Prepared:
    """Global knowledge for evaluation users: the knowledge each user's query time sees, and how to read
    their signals."""
    rounds: dict[int, GlobalKnowledge]    # query step -> knowledge
    step_of: dict[str, int]               # user id -> query step
    params: MediatorParams
    embed: object = None
    steer: object = None
    files: Path | None = None             # where control vectors are written
    embedding_weight: float = EMBEDDING_WEIGHT


# method name -> Prepared (the evaluation prepares them; served users read the registry instead)
_PREPARED: dict[str, Prepared] = {}


@lru_cache(maxsize=4096)
def _eval_signals(name: str, user) -> LocalSignals:
    prepared = _PREPARED[name]
    texts = list(user.history)
    return local_signals(texts, prepared.embed(texts) if prepared.embed else None,
                         prepared.steer(texts) if prepared.steer else None, prepared.embedding_weight)


def _control_file(folder: Path, steering: np.ndarray, arch: str) -> str:
    """A content-hashed control-vector file for `steering` under folder (written once)."""
    digest = hashlib.sha256(np.ascontiguousarray(steering, np.float32).tobytes()).hexdigest()[:24]
    path = folder / f"cvec-{digest}.gguf"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_steering(path, steering, arch)
    return str(path)


def personalize(signals: LocalSignals, knowledge: GlobalKnowledge | None, params: MediatorParams,
                user_cvec: str | None, community_cvec, query: str):
    """The served primitives for one request (a methods.Personalized): control vectors with the mediator's
    scales, community context."""
    from localpers.engine.engine import Artifacts
    from localpers.personalize.methods import Personalized

    if knowledge is None:
        return Personalized()
    m = mediate(signals, knowledge, params)
    vectors = []
    if user_cvec and m.user_scale:
        vectors.append((user_cvec, m.user_scale))
    if m.community >= 0 and m.community_scale and (path := community_cvec(m.community)):
        vectors.append((path, m.community_scale))
    return Personalized(artifacts=Artifacts(control_vectors=tuple(vectors)), user_prefix=context_prefix(m.context, query, m.own))


def _method(name: str):
    def method(user, query: str, engine):
        if user.registered is not None:
            return _served(user, query)
        prepared = _PREPARED.get(name)
        if prepared is None:
            from localpers.errors import UserError

            raise UserError(f"method {name!r} needs global knowledge: evaluate it on the world "
                            "(`localpers eval world`), or serve it after `refresh_knowledge`")
        signals = _eval_signals(name, user)
        knowledge = prepared.rounds.get(prepared.step_of.get(user.id, -1)) or prepared.rounds[max(prepared.rounds)]
        arch = engine.llm.metadata.get("general.architecture", "llama") if prepared.files else ""
        user_cvec = (_control_file(prepared.files, signals.steering, arch)
                     if prepared.files and signals.steering is not None else None)

        def community_cvec(c: int):
            if not prepared.files or knowledge.sums.steering_count[c] <= 0:
                return None
            return _control_file(prepared.files, knowledge.steering[c], arch)

        return personalize(signals, knowledge, prepared.params, user_cvec, community_cvec, query)

    method.__name__ = name.replace("-", "_")
    return method


logo_method = _method(names.LOGO)

# Ablations (evaluation only): no temporal decay, no mediator (community context for every attribute and
# fixed control-vector scales whatever the history), communities from random assignment.
ABLATIONS = dict(zip(names.LOGO_ABLATIONS, ({"half_life": math.inf}, {"fixed": True}, {"random_assignment": True})))
logo_nodecay, logo_nomediator, logo_random = (_method(name) for name in names.LOGO_ABLATIONS)
FIXED = MediatorParams(context_max_count=math.inf, tau=math.inf)


def prepare_world(world_dir: str | Path, method_names, *, engine=None, embed=None, steer=None,
                  params: MediatorParams = MEDIATOR, files: str | Path | None = None, seed: int = 0,
                  steer_limit: int | None = None) -> None:
    """Compute the world's global knowledge, round by round, for the LoGo methods among `method_names`
    (logo and its ablations), from the world's upqa.json (the users' histories with their items' time
    steps; never world.json's labels). `files`: where control vectors go (needed when the mediator's
    control-vector scales are nonzero). steer_limit: contributors per round whose steering is computed
    (world_rounds; None: all)."""
    from localpers.personalize.datasets import load_json
    from localpers.personalize.world import WORLD_FILES

    upqa = load_json(Path(world_dir) / WORLD_FILES["upqa"])
    wanted = {part for spec in method_names for part in spec.split("+")}
    for name in wanted & ({names.LOGO} | set(ABLATIONS)):
        options = ABLATIONS.get(name, {})
        rounds = world_rounds(upqa, half_life=options.get("half_life", HALF_LIFE),
                              random_assignment=options.get("random_assignment", False), embed=embed,
                              steer=steer, seed=seed, steer_limit=steer_limit)
        mediator = replace(FIXED, user_scale=params.user_scale, community_scale=params.community_scale) \
            if options.get("fixed") else params
        _PREPARED[name] = Prepared(rounds, {e["user_id"]: e["step"] for e in upqa}, mediator, embed, steer,
                                   Path(files) if files else None)
    _eval_signals.cache_clear()


# ---------------------------------------------------------------- served users: the background job and the registry

KNOWLEDGE_FILE = "knowledge.npz"


def knowledge_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / names.LOGO


def signals_path(cvec_path: str | Path) -> Path:
    """The user's local signals file, beside their registered LoGo control vector."""
    p = Path(cvec_path)
    return p.with_name(p.stem + ".signals.npz")


def save_signals(path: Path, signals: LocalSignals, knowledge_path: Path) -> Path:
    with open(path, "wb") as f:
        np.savez(f, vector=signals.vector, counts=signals.counts, n_items=np.int64(signals.n_items),
                 knowledge=np.array(str(knowledge_path)),
                 **({"latest": signals.latest} if signals.latest is not None else {}))
    return path


@lru_cache(maxsize=256)
def _load_signals(path: str, key) -> tuple[LocalSignals, str]:
    with np.load(path, allow_pickle=False) as z:
        latest = z["latest"] if "latest" in z.files else None  # signals files before session 7 have none
        return LocalSignals(z["vector"], z["counts"], int(z["n_items"]), latest=latest), str(z["knowledge"])


@lru_cache(maxsize=4)
def _load_knowledge(path: str, key) -> GlobalKnowledge:
    return GlobalKnowledge.load(path)


def _served(user, query: str, params: MediatorParams = MEDIATOR):
    """A served user: their registered LoGo control vector and the signals written beside it by the last
    refresh_knowledge, and the current global knowledge file (read again when it changes). Nothing is
    computed from the history on the request path."""
    from localpers.engine.engine import _file_key
    from localpers.personalize.methods import Personalized

    artifact = user.artifact(names.LOGO, names.CONTROL_VECTOR)
    if artifact is None or not signals_path(artifact.path).is_file():
        return Personalized()
    sp = signals_path(artifact.path)
    signals, kpath = _load_signals(str(sp), _file_key(sp))
    if not Path(kpath).is_file():
        return Personalized()
    knowledge = _load_knowledge(kpath, _file_key(kpath))
    has_own = _nonzero_control_vector(artifact.path, _file_key(artifact.path))
    cvecs = knowledge.meta.get("community_cvecs", {})
    return personalize(signals, knowledge, params, artifact.path if has_own else None,
                       lambda c: cvecs.get(str(c)), query)


@lru_cache(maxsize=256)
def _nonzero_control_vector(path: str, key) -> bool:
    """Does the control vector at `path` (file version `key`) steer at all? (A user who stated nothing has zeros.)"""
    from localpers.model.gguf_write import read_control_vector

    return any(np.any(v) for v in read_control_vector(path).values())


SYNC_SOURCE = "sync"  # knowledge meta["source"] of a file written by `localpers sync` (sync_app.SyncClient)


def refresh_knowledge(store, *, model_path=None, embedder=None, steer: bool = True, half_life: float = HALF_LIFE,
                      min_size: float = MIN_SIZE, users: list[str] | None = None, k: int | None = None,
                      seed: int = 0, job: tuple[str, int] | None = None) -> GlobalKnowledge:
    """The background job: one round of global knowledge over the store's users (all, or `users`), then each
    user's LoGo artifacts. Reads every user's history once; writes DATA_DIR/logo/knowledge.npz (decayed into
    the previous round's), a control vector per published community with steering, and per user a control
    vector (their CAA steering; zeros when they stated no preference) registered as (logo, control_vector)
    with meta {"method", "sources", "round"}, its signals file beside it, and their sync contribution
    (sync.save_contribution: what `localpers sync` sends; not for a user with no preference and no embedder,
    whose vector is zero). When the knowledge file came from a sync run (meta["source"] == SYNC_SOURCE) it is
    kept as it is (the communities of many devices are not replaced by this device's few users): only the
    users' signals and artifacts are written. embedder: an object with .embed(texts) and .name
    (retrieval.GGUFEmbedder for the served model's own embeddings); None: preference counts only. job: (user,
    job id) of the worker's job; that user's registration checks the job still runs. A user forgotten (or
    whose items were deleted) meanwhile is skipped. Returns the new knowledge."""
    from localpers import default_model_path
    from localpers.personalize import signals as sync
    from localpers.engine.engine import model_sha256
    from localpers.model.gguf_info import open_gguf
    from localpers.model.model import ModelConfig
    from localpers.store.store import NotFoundError, StaleError

    model_path = Path(model_path) if model_path else default_model_path()
    config = ModelConfig.from_gguf(open_gguf(model_path))
    folder = knowledge_dir(store.directory)
    kpath = folder / KNOWLEDGE_FILE
    previous = GlobalKnowledge.load(kpath) if kpath.is_file() else None
    embed = CachedEmbedder(embedder) if embedder is not None else None
    if previous is not None and previous.meta.get("embedder") != (embed.name if embed else None):
        previous = None  # user vectors of another space: start over
    steerer = Steerer(model_path) if steer else None
    per_user = {}
    for user in users if users is not None else store.users():
        items = store.items(user)
        texts = [i["text"] for i in items]
        if texts:
            per_user[user] = ([i["id"] for i in items], local_signals(
                texts, embed(texts) if embed else None, steerer(texts) if steerer else None))
    if not per_user:
        raise ValueError("no user has any history yet")
    folder.mkdir(parents=True, exist_ok=True)
    if previous is not None and previous.meta.get("source") == SYNC_SOURCE:
        knowledge = previous
        fits = knowledge.sums.steering_sum.shape[1:] == (config.n_layer - 1, config.d_model)
        if fits and not knowledge.meta.get("community_cvecs") and np.any(knowledge.sums.steering_sum):
            _save_with_community_cvecs(knowledge, kpath, config.arch)  # the synced communities' steering
    else:
        knowledge = advance(previous, [sig for _, sig in per_user.values()], k=k, half_life=half_life,
                            min_size=min_size, seed=seed, meta={"embedder": embed.name if embed else None,
                                                                "model_sha256": model_sha256(model_path)})
        _save_with_community_cvecs(knowledge, kpath, config.arch)
    sha = model_sha256(model_path)
    with tempfile.TemporaryDirectory(prefix="localpers-logo-") as tmp:  # registration copies each file in
        for user, (ids, signals) in per_user.items():
            steering = (signals.steering if signals.steering is not None
                        else np.zeros((config.n_layer - 1, config.d_model), np.float32))
            path = write_steering(Path(tmp) / f"logo-r{knowledge.round}-{len(ids)}.gguf", steering, config.arch)
            try:  # never artifact_dir(user) here: it would re-create a user forgotten meanwhile
                version = store.register_artifact(user, names.CONTROL_VECTOR, path, sha,
                                                  meta={"method": names.LOGO, "sources": ids, "round": knowledge.round},
                                                  job=job[1] if job and job[0] == user else None)
                registered = next(a["path"] for a in store.artifacts(user, names.CONTROL_VECTOR) if a["id"] == version)
                save_signals(signals_path(registered), signals, kpath)
            except (NotFoundError, StaleError, StopIteration, FileNotFoundError):
                if job and job[0] == user:
                    raise
                continue
            if np.linalg.norm(signals.vector) > 0:
                sync.save_contribution(store.directory, user, sync.Contribution(signals.vector, steering, signals.counts))
    return knowledge


def _save_with_community_cvecs(knowledge: GlobalKnowledge, kpath: Path, arch: str) -> None:
    """Write a control vector per published community with steering beside the knowledge file, list them in
    meta["community_cvecs"], save the knowledge, and delete the community files no longer listed."""
    folder = kpath.parent
    community_cvecs = {}
    for c in range(knowledge.k):
        if knowledge.published[c] and knowledge.sums.steering_count[c] > 0:
            community_cvecs[str(c)] = str(write_steering(folder / f"community-{c}-r{knowledge.round}.gguf",
                                                         knowledge.steering[c], arch))
    knowledge.meta["community_cvecs"] = community_cvecs
    knowledge.save(kpath)
    for old in folder.glob("community-*.gguf"):  # the previous round's, no longer referenced
        if str(old) not in community_cvecs.values():
            old.unlink()


def logo_job(store, user: str, engine, job_id: int) -> dict:
    """The worker's `logo` job (localpers.serve.jobs), queued for one user. The communities are shared, so it
    recomputes what every user's LoGo depends on: one refresh_knowledge round over ALL the store's users
    (preference counts, CAA steering on the served model), then each user's signals, control vector and sync
    contribution; with knowledge from a sync run, only the users' signals and artifacts. Returns counts: the
    round, communities, published communities and users."""
    knowledge = refresh_knowledge(store, model_path=engine.model_path, job=(user, job_id))
    return {"round": knowledge.round, "communities": knowledge.k, "published": int(knowledge.published.sum()),
            "users": len(store.users())}
