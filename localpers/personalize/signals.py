"""A user's LoGo signals as the device keeps them for private sync: the Contribution and its file
DATA_DIR/sync/signals/<sha256(user)[:16]>.npz. LoGo's job (localpers.personalize.logo) writes it; `localpers sync`
(localpers.sync) reads and sends it, so the format lives here, below both."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localpers.errors import UserError
from localpers.store.store import signals_file


@dataclass
class Contribution:
    """A user's local signals (LoGo): unit `vector` [dim], `steering` [n_layer, steer_dim] (CAA mean difference of
    hidden states, a control vector), `histogram` [vocab] counts of stated preferences over a public vocabulary."""
    vector: np.ndarray
    steering: np.ndarray
    histogram: np.ndarray

    def check(self, cfg) -> None:
        """Raise UserError unless the shapes match `cfg` (a sync.SyncConfig: dim, n_layer, steer_dim, vocab) and
        every value is finite, the counts >= 0 and the vector non-zero."""
        shapes = {"vector": (cfg.dim,), "steering": (cfg.n_layer, cfg.steer_dim), "histogram": (cfg.vocab,)}
        for name, shape in shapes.items():
            arr = getattr(self, name)
            if arr.shape != shape:
                raise UserError(f"sync: the local {name} has shape {arr.shape}, the run expects {shape}")
        self.check_values()

    def check_values(self) -> None:
        """Raise UserError unless every value is numeric and finite, the counts >= 0 and the vector non-zero: what
        a device checks before it joins a run (the shapes are known only once the run is)."""
        for name in ("vector", "steering", "histogram"):
            arr = getattr(self, name)
            if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
                raise UserError(f"sync: the local {name} has non-finite values (NaN or infinity): recompute this "
                                "user's signals (localpers personalize --method logo) before syncing")
        if np.any(self.histogram < 0):
            raise UserError("sync: histogram counts must be >= 0")
        if not np.linalg.norm(self.vector) > 0:
            raise UserError("sync: the user vector is zero")


def sync_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "sync"


def signals_path(data_dir: str | Path, user: str) -> Path:
    """Where a user's local signals (a Contribution) are cached on the device: sync/signals/<sha256[:16]>.npz
    (store.signals_file: forgetting the user removes it)."""
    return signals_file(data_dir, user)


def save_contribution(data_dir: str | Path, user: str, c: Contribution) -> Path:
    path = signals_path(data_dir, user)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, vector=c.vector, steering=c.steering, histogram=c.histogram)
    return path


def load_contribution(data_dir: str | Path, user: str) -> Contribution:
    path = signals_path(data_dir, user)
    if not path.exists():
        raise UserError(f"sync: no local signals for user {user!r} in {data_dir} (compute them first: "
                        f"localpers personalize --user {user} --method logo)")
    with np.load(path, allow_pickle=False) as z:
        return Contribution(vector=z["vector"], steering=z["steering"], histogram=z["histogram"])
