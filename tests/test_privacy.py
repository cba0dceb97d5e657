"""Privacy that a silent break would lose (issue 28): what a syncing device sends against what its ledger claims
and the epsilon it spends, and a user's export holding that user's data only."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from localpers import names
from localpers.store.store import Store
from localpers.sync import sync

CFG = sync.SyncConfig(k=3, dim=48, n_layer=2, steer_dim=16, vocab=40, rounds=1, min_size=1, min_contributors=2,
                      seed=1, epsilon=4.0)


def device(tmp_path, cfg=CFG, seed=0):
    """One device (sync_app.SyncClient) holding one user's contribution, as Flower's context gives it."""
    from flwr.common import Context, RecordDict

    from localpers.sync.sync_app import SyncClient

    rng = np.random.default_rng(seed)
    c = sync.Contribution(vector=rng.standard_normal(cfg.dim), steering=rng.standard_normal((cfg.n_layer, cfg.steer_dim)),
                          histogram=rng.integers(0, 3, cfg.vocab).astype(np.float64))
    sync.save_contribution(tmp_path, "alice", c)
    context = Context(run_id=7, node_id=1, node_config={"data-dir": str(tmp_path), "user": "alice",
                                                        "epsilon-budget": "inf"},
                      state=RecordDict(), run_config={**cfg.to_run_config(), "min-devices": 2})
    return SyncClient(context), c


def test_invariant_what_a_device_sends_is_noised_as_its_ledger_claims(tmp_path):
    """The vector a device returns to Flower (captured here) is its plain contribution plus a noise share of the
    std the ledger records, and the ledger's epsilon is the accountant's for the noise actually configured."""
    client, contribution = device(tmp_path)
    centroids = sync.initial_centroids(CFG)
    sent, weight, _ = client.fit([centroids], {"round": 1})
    assert weight == 1 and len(sent) == 1
    sent = np.asarray(sent[0])
    plain, community = sync.encode(contribution, centroids, CFG)
    [entry] = [e for e in sync.read_log(tmp_path) if e["kind"] == "contribution"]
    assert entry["community"] == community and entry["shape"] == list(sent.shape) == [CFG.length]
    assert entry["norm_sent"] == pytest.approx(float(np.linalg.norm(sent)), abs=1e-5)
    assert entry["norm_plain"] == pytest.approx(float(np.linalg.norm(plain)), abs=1e-5)
    assert entry["noise_multiplier"] == CFG.noise_multiplier > 0 and entry["noise_std"] == CFG.share_std
    assert entry["epsilon_round"] == pytest.approx(sync.rdp_epsilon(CFG.noise_multiplier, 1, CFG.delta))
    assert entry["epsilon_round"] <= CFG.epsilon + 1e-6
    noise = sent - plain
    assert not np.allclose(noise, 0), "the device sent its plain vector"
    # the share's empirical std (hundreds of draws) is within 25% of the ledger's; clipping is rare at 4 sigma
    assert len(noise) >= 300
    assert 0.75 * entry["noise_std"] < float(noise.std()) < 1.25 * entry["noise_std"]
    assert abs(float(noise.mean())) < 4 * entry["noise_std"] / math.sqrt(len(noise))
    # a second round draws fresh noise (the same draw twice would let the two be subtracted)
    again = np.asarray(client.fit([centroids], {"round": 2})[0][0])
    assert not np.allclose(again, sent)
    assert sync.spent(tmp_path, CFG.delta) == pytest.approx(sync.rdp_epsilon(CFG.noise_multiplier, 2, CFG.delta))


def test_a_noiseless_config_sends_the_plain_vector_and_the_ledger_says_infinite_epsilon(tmp_path):
    cfg = sync.SyncConfig(**{**CFG.__dict__, "epsilon": math.inf})
    client, contribution = device(tmp_path, cfg)
    centroids = sync.initial_centroids(cfg)
    sent = np.asarray(client.fit([centroids], {"round": 1})[0][0])
    np.testing.assert_array_equal(sent, sync.encode(contribution, centroids, cfg)[0])
    [entry] = [e for e in sync.read_log(tmp_path) if e["kind"] == "contribution"]
    assert entry["noise_multiplier"] == 0 and entry["epsilon_round"] == math.inf


def test_a_device_over_its_budget_sends_nothing(tmp_path):
    client, _ = device(tmp_path)
    client.context.node_config["epsilon-budget"] = str(0.5 * CFG.epsilon)
    with pytest.raises(Exception, match="budget"):
        client.fit([sync.initial_centroids(CFG)], {"round": 1})
    [refused] = sync.read_log(tmp_path)
    assert refused["kind"] == "refused" and refused["round"] == 1 and "budget" in refused["reason"]
    from localpers.sync import sync_app
    assert sync_app._budget({}) == math.inf and sync_app._budget({"epsilon-budget": "2.5"}) == 2.5  # none: no limit


class Embedder:
    name = "test-embedder"

    def embed(self, texts):
        return np.array([[len(t), t.count("a") + 1.0, 1.0] for t in texts], dtype=np.float32)


def test_invariant_an_export_holds_only_its_users_items_vectors_and_artifacts(tmp_path):
    sha = "0" * 64
    with Store.open(tmp_path / "data", embedder=Embedder()) as store:
        mine = [store.add("alice", f"alice says a thing number {i}") for i in range(3)]
        theirs = [store.add("bob", f"bob writes about bananas {i}") for i in range(5)]
        store.add("carol", "carol has nothing embedded")
        for user in ("alice", "bob"):  # embeds every item of the user
            store.search(user, "thing bananas", mode="dense")
        art = tmp_path / "a.gguf"
        art.write_bytes(b"alice's adapter")
        store.register_artifact("alice", names.LORA, art, sha, meta={"method": names.EDIT, "sources": mine[:1]})
        bob_art = tmp_path / "b.gguf"
        bob_art.write_bytes(b"bob's adapter")
        store.register_artifact("bob", names.LORA, bob_art, sha, meta={"method": names.EDIT, "sources": []})
        store.register_artifact("bob", names.CONTROL_VECTOR, bob_art, sha, meta={"method": names.EDIT, "sources": []})

        out = store.export("alice")
        assert out["user"] == "alice"
        assert sorted(i["id"] for i in out["items"]) == sorted(mine)
        assert all(i["text"].startswith("alice") for i in out["items"])
        assert out["vectors"] == {Embedder.name: 3}
        assert [a["kind"] for a in out["artifacts"]] == [names.LORA]
        bob = store.export("bob")
        assert sorted(i["id"] for i in bob["items"]) == sorted(theirs) and bob["vectors"] == {Embedder.name: 5}
        assert sorted(a["kind"] for a in bob["artifacts"]) == sorted([names.LORA, names.CONTROL_VECTOR])
        carol = store.export("carol")
        assert len(carol["items"]) == 1 and carol["vectors"] == {} and carol["artifacts"] == []
        assert "bob" not in repr(out) and "carol" not in repr(out)
