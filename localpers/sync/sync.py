"""Private sync: LoGo's global knowledge (communities) computed across devices from anonymized aggregates only.

One round of federated k-means (Lloyd's algorithm, spherical: users are assigned by cosine) works like this:
the server sends the current centroids [k, d]; each device assigns its user to the nearest one and returns ONE
flat vector holding, for every community j, [count_j, vector_sum_j [d], steering_sum_j [n_layer*d],
histogram_j [V]] — zeros everywhere except the user's community. SecAgg+ (Bell et al., CCS 2020; Flower's
`SecAggPlusWorkflow`) sums these vectors without the server seeing any single one; Gaussian noise (added in
shares by the devices, so the server never sees a noiseless sum either) makes the published totals
differentially private. The server divides sums by counts: centroids, sizes, community steering vectors and
preference histograms; communities smaller than `min_size` are never published.

This file is the math and the device ledger, with no Flower import: encoding, SecAgg+'s range and overflow
rules, the error bound, DP calibration and accounting. localpers/sync/sync_app.py is the Flower app that moves the
vectors; localpers/cli/sync_cli.py is `localpers sync` / `localpers sync-server`.

Units. Every block is scaled to L2 norm <= 1 before it is summed ("normalized units"): the user vector is
unit-norm, steering is divided by max(steer_clip, ||s||_F) and the histogram by max(hist_clip, ||h||_2). A
user therefore changes the summed vector by at most DELTA = 2 in L2 (4 blocks of norm <= 1), the sensitivity
that the Gaussian noise is calibrated to.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from localpers.errors import UserError
# the contribution file that LoGo's job writes (personalize layer) and this module sends
from localpers.personalize.signals import (Contribution, load_contribution, save_contribution, signals_path,  # noqa: F401
                                           sync_dir)

# L2 sensitivity of one user's contribution in normalized units (add/remove one user): sqrt(4 blocks * 1^2).
DELTA = 2.0
# SecAgg+ defaults of Flower's SecAggPlusWorkflow: values quantized to [0, 2^22), sums kept modulo 2^32.
QUANTIZATION_RANGE = 1 << 22
MODULUS_RANGE = 1 << 32
# Noise shares are clipped to [-clipping_range, clipping_range] by SecAgg+'s quantizer: leave this many
# standard deviations of headroom above the signal (|x| <= 1) so that clipping practically never happens.
NOISE_HEADROOM_SIGMAS = 6.0
# Renyi orders for the accountant (the grid of Opacus / TF-Privacy's RDP accountants).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])
GLOBAL_KNOWLEDGE_FILE = "global_knowledge.npz"
SENT_LOG_FILE = "sent.jsonl"


@dataclass(frozen=True)
class SyncConfig:
    """What the server announces for a sync run (Flower run config, one flat dict of numbers).

    k communities over user vectors of dimension `dim`, steering vectors [n_layer, steer_dim] (LoGo: the
    control-vector layers x the model width; n_layer 0: none), histograms over a public vocabulary of `vocab`
    entries. `epsilon` is the DP budget of ONE round for delta `delta` (math.inf: no noise);
    `min_contributors` the number of devices whose noise shares every published sum must hold: each device adds
    N(0, noise_std^2 / min_contributors), and a round with fewer unmasked devices is not published.
    (Distributed DP trusts the server to honour that; SecAgg+ hides single vectors regardless.)"""
    k: int = 8
    dim: int = 128
    n_layer: int = 29
    steer_dim: int = 576
    vocab: int = 64
    rounds: int = 3
    epsilon: float = math.inf
    delta: float = 1e-6
    min_size: int = 2
    min_contributors: int = 2
    steer_clip: float = 8.0
    hist_clip: float = 4.0
    seed: int = 0

    def __post_init__(self):
        for name in ("k", "dim", "vocab", "rounds", "min_contributors"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"sync: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_layer < 0 or self.steer_dim < 0 or self.min_size < 1:
            raise UserError("sync: n_layer and steer_dim must be >= 0, min_size >= 1")
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise UserError(f"sync: need epsilon > 0 and 0 < delta < 1, got {self.epsilon}, {self.delta}")
        if self.steer_clip <= 0 or self.hist_clip <= 0:
            raise UserError("sync: steer_clip and hist_clip must be > 0")

    @property
    def block(self) -> int:
        """Length of one community's block: count, vector, steering, histogram."""
        return 1 + self.dim + self.n_layer * self.steer_dim + self.vocab

    @property
    def length(self) -> int:
        """Length of the flat vector a device sends: k blocks."""
        return self.k * self.block

    @property
    def noise_multiplier(self) -> float:
        """z = sigma / DELTA of the Gaussian mechanism that spends `epsilon` in one round (0: no noise)."""
        return 0.0 if math.isinf(self.epsilon) else noise_multiplier_for_epsilon(self.epsilon, self.delta)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise in each published sum (normalized units)."""
        return self.noise_multiplier * DELTA

    @property
    def share_std(self) -> float:
        """Standard deviation of each device's noise share: min_contributors shares sum to noise_std."""
        return self.noise_std / math.sqrt(self.min_contributors)

    @property
    def clipping_range(self) -> float:
        """SecAgg+'s clipping range c: the signal (|x| <= 1) plus NOISE_HEADROOM_SIGMAS noise shares."""
        return 1.0 + NOISE_HEADROOM_SIGMAS * self.share_std

    def to_run_config(self) -> dict:
        return {k.replace("_", "-"): (str(v) if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict) -> SyncConfig:
        names = {f for f in cls.__dataclass_fields__}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name in names:
                kind = cls.__dataclass_fields__[name].type
                values[name] = float(value) if kind == "float" else int(value)
        return cls(**values)


# ---------------------------------------------------------------- the device's contribution


def _clip(x: np.ndarray, bound: float) -> np.ndarray:
    """x scaled to L2 norm <= 1 in units of `bound`: x / max(bound, ||x||)."""
    return x / max(bound, float(np.linalg.norm(x)))


def assign(vector: np.ndarray, centroids: np.ndarray) -> int:
    """Index of the nearest centroid by cosine (spherical k-means); centroids [k, dim]."""
    norms = np.linalg.norm(centroids, axis=1)
    return int(np.argmax(centroids @ vector / np.maximum(norms, 1e-12)))


def encode(c: Contribution, centroids: np.ndarray, cfg: SyncConfig, rng: np.random.Generator | None = None):
    """The flat vector [cfg.length] a device contributes (normalized units, float64), and its community.

    Without rng: the plain contribution. With rng: plus this device's Gaussian noise share N(0, share_std^2),
    clipped to SecAgg+'s range. Returns (flat, community)."""
    c.check(cfg)
    j = assign(c.vector, centroids)
    flat = np.zeros((cfg.k, cfg.block), dtype=np.float64)
    d, ld = cfg.dim, cfg.n_layer * cfg.steer_dim
    flat[j, 0] = 1.0
    flat[j, 1:1 + d] = c.vector / np.linalg.norm(c.vector)
    flat[j, 1 + d:1 + d + ld] = _clip(c.steering.astype(np.float64).ravel(), cfg.steer_clip)
    flat[j, 1 + d + ld:] = _clip(c.histogram.astype(np.float64), cfg.hist_clip)
    flat = flat.ravel()
    if rng is not None and cfg.share_std > 0:
        flat = np.clip(flat + rng.normal(0.0, cfg.share_std, flat.shape), -cfg.clipping_range, cfg.clipping_range)
    return flat, j


# ---------------------------------------------------------------- SecAgg+ ranges and the error bound


def check_cohort(n: int, cfg: SyncConfig, quantization_range: int = QUANTIZATION_RANGE,
                 modulus_range: int = MODULUS_RANGE) -> None:
    """Refuse a cohort whose SecAgg+ sum can wrap around the modulus.

    Each device sends values quantized to [0, quantization_range] (plus a weight factor of the same size);
    the server reduces the sum modulo modulus_range, so n * quantization_range must stay below it — Flower
    checks this only for an integer num_shares, and an overflow is silent (the sum comes back wrong)."""
    if n < 2:
        raise UserError(f"sync: SecAgg+ needs at least 2 devices, got {n}")
    if n * quantization_range >= modulus_range:
        raise UserError(f"sync: a cohort of {n} devices overflows SecAgg+ (n * quantization_range {quantization_range} "
                        f">= modulus_range {modulus_range}); at most {(modulus_range - 1) // quantization_range} devices")


def secagg_shares(n: int) -> tuple[float | int, float | int]:
    """SecAgg+'s (num_shares, reconstruction_threshold) for a cohort of n devices, in Flower's conventions.

    Up to 16 devices everyone is everyone's neighbour (1.0) and half of them must survive (0.5); above, the
    logarithmic-degree graph of SecAgg+ (Bell et al., CCS 2020): 2 * ceil(log2 n) + 1 neighbours (odd, as Flower
    recommends) of which a majority must survive, so each device does O(log n) key agreements instead of O(n)."""
    if n <= 16:
        return 1.0, 0.5
    shares = 2 * math.ceil(math.log2(n)) + 1
    return shares, shares // 2 + 1


def error_bound(n: int, cfg: SyncConfig, quantization_range: int = QUANTIZATION_RANGE) -> float:
    """Largest error of one coordinate of the SecAgg+ sum of n devices, in normalized units.

    SecAgg+ maps x in [-c, c] to (x + c) * Q / (2c) and rounds stochastically (unbiased, error < 1 step), so
    each device adds less than 2c/Q; the n roundings add up to < n * 2c / Q (Flower's quantize/dequantize,
    flwr/common/secure_aggregation/quantization.py). With no noise (c = 1, Q = 2^22) that is n * 4.8e-7:
    counts are recovered exactly by rounding while n * 2c/Q < 0.5."""
    return n * 2.0 * cfg.clipping_range / quantization_range


# ---------------------------------------------------------------- from sums to published knowledge


@dataclass
class Sums:
    """Totals over the contributing devices: counts [k], vector sums [k, dim], steering sums [k, n_layer, steer_dim]
    (normalized units), histogram sums [k, vocab] (normalized units)."""
    counts: np.ndarray
    vectors: np.ndarray
    steering: np.ndarray
    histograms: np.ndarray


def decode(total: np.ndarray, cfg: SyncConfig) -> Sums:
    """Split a summed flat vector [cfg.length] into per-community totals."""
    if total.shape != (cfg.length,):
        raise ValueError(f"sync: aggregate has shape {total.shape}, expected ({cfg.length},)")
    t = total.reshape(cfg.k, cfg.block)
    d, ld = cfg.dim, cfg.n_layer * cfg.steer_dim
    return Sums(counts=t[:, 0].copy(), vectors=t[:, 1:1 + d].copy(),
                steering=t[:, 1 + d:1 + d + ld].reshape(cfg.k, cfg.n_layer, cfg.steer_dim).copy(),
                histograms=t[:, 1 + d + ld:].copy())


@dataclass
class Knowledge:
    """Published global knowledge: centroids [k, dim] (unit), sizes [k] (rounded noisy counts), steering
    [k, n_layer, steer_dim] (mean member steering in model units, a community control vector), histograms [k, vocab]
    (member preference counts, clipped units), published [k] (False: below min_size, all zeros, never shown)."""
    centroids: np.ndarray
    sizes: np.ndarray
    steering: np.ndarray
    histograms: np.ndarray
    published: np.ndarray
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, centroids=self.centroids, sizes=self.sizes, steering=self.steering,
                 histograms=self.histograms, published=self.published, meta=np.array(json.dumps(self.meta)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Knowledge:
        with np.load(path, allow_pickle=False) as z:
            return cls(centroids=z["centroids"], sizes=z["sizes"], steering=z["steering"],
                       histograms=z["histograms"], published=z["published"], meta=json.loads(str(z["meta"])))

    def arrays(self) -> list[np.ndarray]:
        return [self.centroids, self.sizes, self.steering, self.histograms, self.published.astype(np.float64)]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], meta: dict | None = None) -> Knowledge:
        c, s, st, h, p = arrays
        return cls(centroids=c, sizes=s, steering=st, histograms=h, published=p.astype(bool), meta=meta or {})


def publish(sums: Sums, previous: np.ndarray, cfg: SyncConfig) -> Knowledge:
    """Knowledge from (noisy) totals: mean per community of at least cfg.min_size (noisy count, rounded) members.

    A community below min_size publishes nothing and keeps its previous centroid (`previous` [k, dim]), so that
    no centroid sent to devices depends on fewer than min_size users."""
    sizes = np.rint(np.maximum(sums.counts, 0.0))
    published = sizes >= cfg.min_size
    safe = np.where(published, sizes, 1.0)
    centroids = previous.astype(np.float64).copy()
    means = sums.vectors / safe[:, None]
    norms = np.linalg.norm(means, axis=1)
    ok = published & (norms > 0)
    centroids[ok] = means[ok] / norms[ok, None]
    steering = np.where(published[:, None, None], sums.steering * cfg.steer_clip / safe[:, None, None], 0.0)
    histograms = np.where(published[:, None], np.maximum(sums.histograms * cfg.hist_clip, 0.0), 0.0)
    return Knowledge(centroids=centroids, sizes=np.where(published, sizes, 0.0), steering=steering,
                     histograms=histograms, published=published)


def logo_round_sums(k: Knowledge) -> dict:
    """The fields of LoGo's RoundSums (localpers/personalize/logo.py) from published knowledge, in model units, so that a
    device serves what sync published: `logo.GlobalKnowledge(round, half_life, min_size,
    logo.RoundSums(**logo_round_sums(k)), k.centroids, drift)`. Unpublished communities are all zeros; the
    vector sums are centroid * size (the published direction; LoGo reads only their direction)."""
    sizes = np.where(k.published, k.sizes, 0.0)
    return {"vector_sum": k.centroids * sizes[:, None], "count": sizes,
            "steering_sum": k.steering * sizes[:, None, None], "steering_count": sizes.copy(),
            "counts": k.histograms.copy()}


def initial_centroids(cfg: SyncConfig) -> np.ndarray:
    """Public random unit centroids [k, dim] from cfg.seed (no device data goes into the initialization)."""
    c = np.random.default_rng(cfg.seed).standard_normal((cfg.k, cfg.dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def plain_kmeans(contributions: list[Contribution], cfg: SyncConfig, rounds: int | None = None,
                 rng: np.random.Generator | None = None, start: np.ndarray | None = None) -> Knowledge:
    """The same rounds computed in one process (no SecAgg+): the oracle. With rng, every contribution carries its
    noise share as on a device, so this equals the federated result up to SecAgg+'s rounding (error_bound).
    start: the centroids [k, dim] of the first round (default: initial_centroids(cfg), as the server's)."""
    centroids = initial_centroids(cfg) if start is None else np.asarray(start, np.float64)
    knowledge = None
    for _ in range(rounds or cfg.rounds):
        total = sum(encode(c, centroids, cfg, rng)[0] for c in contributions)
        knowledge = publish(decode(total, cfg), centroids, cfg)
        centroids = knowledge.centroids
    return knowledge


# ---------------------------------------------------------------- differential privacy accounting


def rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of `rounds` Gaussian mechanisms with noise multiplier z (sigma / L2 sensitivity)."""
    return compose_epsilon([noise_multiplier] * rounds, delta)


def compose_epsilon(noise_multipliers: list[float], delta: float) -> float:
    """(epsilon, delta)-DP of a sequence of Gaussian mechanisms with noise multipliers z_i.

    Renyi DP of one Gaussian mechanism: alpha / (2 z^2) (Mironov, "Renyi Differential Privacy", CSF 2017,
    Prop. 7), composed additively, converted with Balle et al., "Hypothesis Testing Interpretations and Renyi
    DP" (AISTATS 2020, Thm. 21): eps = rdp + log((a-1)/a) - (log delta + log a) / (a - 1), minimized over the
    orders RDP_ORDERS (as in TF-Privacy's and Opacus's RDP accountants). Any z <= 0 (no noise): math.inf."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    inv = sum(1.0 / (2.0 * z * z) for z in noise_multipliers)
    best = min(a * inv + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in RDP_ORDERS)
    return max(best, 0.0)


@functools.lru_cache(maxsize=256)
def noise_multiplier_for_epsilon(epsilon: float, delta: float, rounds: int = 1) -> float:
    """Smallest z (to 1e-6 relative) with rdp_epsilon(z, rounds, delta) <= epsilon (bisection)."""
    lo, hi = 1e-3, 1.0
    while rdp_epsilon(hi, rounds, delta) > epsilon:
        hi *= 2.0
        if hi > 1e6:
            raise UserError(f"sync: epsilon {epsilon} is too small to reach")
    for _ in range(100):
        mid = (lo + hi) / 2
        if rdp_epsilon(mid, rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    return hi


# ---------------------------------------------------------------- the device's ledger (what it sent)


def log_sent(data_dir: str | Path, entry: dict) -> None:
    """Append one entry (JSON, numbers and shapes only) to the device's ledger sync/sent.jsonl."""
    path = sync_dir(data_dir) / SENT_LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **entry}, sort_keys=True) + "\n")


def read_log(data_dir: str | Path) -> list[dict]:
    path = sync_dir(data_dir) / SENT_LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sent_noise(data_dir: str | Path) -> list[float]:
    return [e["noise_multiplier"] for e in read_log(data_dir) if e.get("kind") == "contribution"]


def spent(data_dir: str | Path, delta: float, extra: tuple[float, ...] = ()) -> float:
    """Total epsilon (for `delta`) this device has spent: composition of every round it contributed to, plus
    the rounds with noise multipliers `extra` (to check one more round against the budget before sending)."""
    return compose_epsilon(_sent_noise(data_dir) + list(extra), delta)


def exhausted(data_dir: str | Path, budget: float, delta: float) -> bool:
    """Has this device spent its epsilon budget (for `delta`)? Never for budget math.inf, even after noiseless
    rounds (which spend an infinite epsilon: a device that set no limit keeps contributing)."""
    return not math.isinf(budget) and spent(data_dir, delta) >= budget
