"""LoGo's functions one at a time, each against what its docstring promises (exact values where there is one):
the fast tests of personalize/logo.py (its mutation shard runs them per mutant; test_logo.py holds the
end-to-end cases). Every model here is a stub or the tiny random GGUF; nothing takes more than a second or two."""
import math
import os

import numpy as np
import pytest

from localpers import names
from localpers.errors import UserError
from localpers.personalize import logo
from localpers.personalize.methods import RegisteredArtifact, User
from localpers.personalize.world import ATTRIBUTES

V = len(logo.VOCABULARY)


def vocab_index(value: str) -> int:
    return logo.VOCAB_VALUE.index(value)


def counts_of(*values, times=1) -> np.ndarray:
    c = np.zeros(V, np.float32)
    for v in values:
        c[vocab_index(v)] += times
    return c


def sig(vector, counts=None, n=5, steering=None, latest=None):
    return logo.LocalSignals(logo.unit(np.asarray(vector, np.float32)),
                             np.zeros(V, np.float32) if counts is None else np.asarray(counts, np.float32), n,
                             steering, latest)


def planted(n_per=12, k=3, d=6, seed=0, steer=True):
    """n_per noisy unit vectors around each of k orthogonal directions; community c states cuisine value c."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(k):
        base = np.zeros(d)
        base[c] = 1
        for _ in range(n_per):
            counts = np.zeros(V)
            counts[c] = 1
            out.append(sig(base + 0.15 * rng.standard_normal(d), counts,
                           steering=np.full((2, 3), float(c + 1)) if steer else None))
    return out


# ---------------------------------------------------------------- the vocabulary and the preference reader

def test_invariant_each_attribute_owns_the_contiguous_slice_of_its_values():
    got = logo.attribute_slices()
    assert list(got) == list(ATTRIBUTES)
    start = 0
    for attribute, spec in ATTRIBUTES.items():
        n = len(spec["values"])
        assert got[attribute] == slice(start, start + n), attribute
        assert logo.VOCAB_VALUE[got[attribute]] == tuple(spec["values"])
        start += n
    assert start == V and logo.ATTRIBUTE_SLICES == got


def test_invariant_every_value_name_and_keyword_counts_for_its_value_once_per_mention_longest_first():
    for attribute, spec in ATTRIBUTES.items():
        for value, keywords in spec["values"].items():
            for phrase in (value, *keywords):
                c = logo.read_preferences(f"Honestly, {phrase.upper()} and again {phrase}!")
                assert c[logo.VOCABULARY.index(f"{attribute}={value}")] == 2 and c.sum() == 2, phrase
    thai = logo.read_preferences("green curry, then curry")  # 'green curry' is Thai, a lone 'curry' Indian
    assert thai[vocab_index("Thai food")] == 1 and thai[vocab_index("Indian food")] == 1 and thai.sum() == 2
    assert logo.read_preferences("currying favour").sum() == 0  # whole words only
    pattern, index = logo._keyword_pattern()  # built afresh: the same phrases, longest first
    expected = {}
    for i, (attribute, value) in enumerate(zip(logo.VOCAB_ATTRIBUTE, logo.VOCAB_VALUE)):
        for phrase in (value, *ATTRIBUTES[attribute]["values"][value]):
            expected.setdefault(phrase.lower(), i)
    assert index == expected and len(index) > len(logo.VOCABULARY)
    assert pattern.findall("green curry, rock climbing, curry, rock") == ["green curry", "rock climbing", "curry", "rock"]
    total = logo.preference_counts(["sushi", "ramen and jazz", "nothing here"])
    np.testing.assert_array_equal(total, counts_of("Japanese food", times=2) + counts_of("Jazz"))
    assert total.dtype == np.float32 and logo.preference_counts([]).shape == (V,)


def test_invariant_the_latest_text_naming_an_attribute_decides_it_and_within_a_text_the_most_named_value():
    texts = ["sushi sushi", "pizza", "pizza and tacos tacos", "jazz", "no preference here"]
    latest = logo.latest_values(texts)
    assert latest.dtype == np.float32 and latest.sum() == 2
    assert latest[vocab_index("Mexican food")] == 1 and latest[vocab_index("Jazz")] == 1
    # one mention is enough, and an attribute named only early keeps its value
    assert np.flatnonzero(logo.latest_values(["I love pasta.", "music? none"])).tolist() == [vocab_index("Italian food")]
    assert not logo.latest_values([]).any()


def test_invariant_normalized_entropy_is_0_for_one_value_1_for_uniform_and_log2_over_logV_for_two():
    assert logo.normalized_entropy(np.zeros(V)) == 0.0
    assert logo.normalized_entropy(counts_of("Jazz", times=7)) == 0.0
    assert logo.normalized_entropy(np.ones(V)) == pytest.approx(1.0)
    assert logo.normalized_entropy(counts_of("Jazz", "Rock")) == pytest.approx(math.log(2) / math.log(V))
    assert logo.normalized_entropy(counts_of("Jazz", "Rock", "Rock", "Rock")) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(V))


# ---------------------------------------------------------------- local signals

def test_invariant_unit_normalizes_along_its_axis_and_keeps_zero_rows_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(logo.unit(x), [[0.6, 0.8], [0, 0]])
    np.testing.assert_allclose(logo.unit(x, axis=0), [[1, 1], [0, 0]])
    assert logo.unit(x).dtype == np.float32 and not np.isnan(logo.unit(np.zeros(3))).any()


def test_invariant_the_user_vector_joins_weighted_unit_embedding_and_unit_preferences():
    counts = counts_of("Jazz", "Rock", "Rock")
    pref = counts / np.linalg.norm(counts)
    np.testing.assert_allclose(logo.user_vector(None, counts), pref, rtol=1e-6)
    np.testing.assert_allclose(logo.user_vector(np.zeros((0, 3)), counts), pref, rtol=1e-6)
    emb = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    mean = emb.mean(0) / np.linalg.norm(emb.mean(0))
    for w in (0.5, 0.2):
        expected = np.concatenate([math.sqrt(w) * mean, math.sqrt(1 - w) * pref])
        np.testing.assert_allclose(logo.user_vector(emb, counts, w), expected / np.linalg.norm(expected), rtol=1e-5)
    s = logo.local_signals(["sushi", "jazz", "sushi again"], emb[[0, 1, 1]], steering=np.ones((2, 3)),
                           embedding_weight=0.2)
    np.testing.assert_array_equal(s.counts, counts_of("Japanese food", "Japanese food", "Jazz"))
    np.testing.assert_allclose(s.vector, logo.user_vector(emb[[0, 1, 1]], s.counts, 0.2))
    assert s.n_items == 3 and s.steering.shape == (2, 3)
    np.testing.assert_array_equal(s.latest, logo.latest_values(["sushi", "jazz", "sushi again"]))
    plain = logo.local_signals(["sushi"])
    assert plain.steering is None and np.linalg.norm(plain.vector) == pytest.approx(1.0)


# ---------------------------------------------------------------- contributions, sums, knowledge

def test_invariant_a_devices_term_is_one_hot_on_its_assignment_and_the_aggregate_is_their_sum():
    z = logo.RoundSums.zeros(3, 4, 2, 5)
    assert [getattr(z, f).shape for f in ("vector_sum", "count", "steering_sum", "steering_count", "counts")] == \
        [(3, 4), (3,), (3, 2, 5), (3,), (3, V)]
    assert all(getattr(z, f).dtype == np.float64 and not getattr(z, f).any() for f in
               ("vector_sum", "count", "steering_sum", "steering_count", "counts"))
    centroids = np.eye(3, 4, dtype=np.float32)
    a = logo.contribute(sig([0.1, 0.9, 0, 0], counts_of("Jazz"), steering=np.full((2, 5), 2.0)), centroids)
    b = logo.contribute(sig([0.1, 0.8, 0.1, 0], counts_of("Rock")), centroids)
    c = logo.contribute(sig([0, 0, 1, 0.2], counts_of("Rock")), centroids)
    assert (a.assignment, b.assignment, c.assignment) == (1, 1, 2) and b.steering is None
    term = logo.contribution_sums(a, 3, (2, 5))
    np.testing.assert_array_equal(term.count, [0, 1, 0])
    np.testing.assert_array_equal(term.steering_count, [0, 1, 0])
    np.testing.assert_array_equal(term.vector_sum[1], a.vector)
    np.testing.assert_array_equal(term.counts[1], a.counts)
    np.testing.assert_array_equal(term.steering_sum[1], 2.0)
    assert term.vector_sum[[0, 2]].sum() == 0 and term.counts[[0, 2]].sum() == 0
    assert not logo.contribution_sums(b, 3, (2, 5)).steering_count.any()
    total = logo.aggregate([a, b, c], 3, 4, (2, 5))
    summed = term + logo.contribution_sums(b, 3, (2, 5)) + logo.contribution_sums(c, 3, (2, 5))
    for f in ("vector_sum", "count", "steering_sum", "steering_count", "counts"):
        np.testing.assert_allclose(getattr(total, f), getattr(summed, f))
    np.testing.assert_array_equal(total.count, [0, 2, 1])
    np.testing.assert_array_equal(total.steering_count, [0, 1, 0])
    np.testing.assert_allclose(total.vector_sum[1], a.vector + b.vector)
    np.testing.assert_allclose(total.scaled(0.5).counts, total.counts * 0.5)
    np.testing.assert_allclose(total.scaled(0.5).steering_sum, total.steering_sum * 0.5)
    assert logo.aggregate([], 2, 4).steering_sum.shape == (2, 0, 0)


def knowledge_of(counts_per_community, sizes, steering=None, min_size=2.0, centroids=None):
    k = len(sizes)
    d = 4 if centroids is None else centroids.shape[1]
    sums = logo.RoundSums.zeros(k, d, *(steering.shape[1:] if steering is not None else (0, 0)))
    sums.count[:] = sizes
    sums.counts[:] = counts_per_community
    centroids = np.eye(k, d, dtype=np.float32) if centroids is None else centroids
    sums.vector_sum[:] = centroids * np.asarray(sizes)[:, None]
    if steering is not None:
        sums.steering_sum[:] = steering * np.asarray(sizes)[:, None, None]
        sums.steering_count[:] = sizes
    return logo.GlobalKnowledge(1, 2.0, min_size, sums, centroids, np.zeros((1, k)))


def test_invariant_knowledge_publishes_at_min_size_and_means_steering_over_members_that_sent_it():
    sums = logo.RoundSums.zeros(3, 2, 1, 2)
    sums.count[:] = [1.9, 2.0, 5.0]
    sums.steering_sum[1] = [[4.0, 6.0]]
    sums.steering_count[:] = [0, 2, 0]
    sums.counts[2, 0] = 3
    k = logo.GlobalKnowledge(1, 2.0, 2.0, sums, np.eye(3, 2, dtype=np.float32), np.zeros((1, 3)))
    assert k.k == 3 and k.published.tolist() == [False, True, True]
    np.testing.assert_array_equal(k.sizes, [1.9, 2.0, 5.0])
    np.testing.assert_allclose(k.steering, [[[0, 0]], [[2, 3]], [[0, 0]]])
    assert k.steering.dtype == np.float32 and k.histograms[2, 0] == 3


def test_invariant_a_saved_knowledge_file_loads_back_equal_and_refuses_other_formats(tmp_path):
    sigs = planted()
    k = logo.advance(None, sigs, k=3, min_size=4, half_life=3.0, meta={"embedder": "e"})
    k = logo.advance(k, sigs, half_life=3.0, min_size=4)
    path = k.save(tmp_path / "deep" / "k.npz")
    assert path == tmp_path / "deep" / "k.npz" and os.listdir(tmp_path / "deep") == ["k.npz"]  # no temporary left
    back = logo.GlobalKnowledge.load(path)
    assert (back.round, back.half_life, back.min_size, back.meta) == (2, 3.0, 4, {"embedder": "e"})
    np.testing.assert_array_equal(back.centroids, k.centroids)
    np.testing.assert_array_equal(back.drift, k.drift)
    for f in ("vector_sum", "count", "steering_sum", "steering_count", "counts"):
        np.testing.assert_array_equal(getattr(back.sums, f), getattr(k.sums, f))
    # another vocabulary or format, a file that is not one, a missing field: one UserError naming the file
    import json
    with np.load(path) as z:
        arrays = dict(z)
    header = json.loads(str(arrays["header"]))
    for bad_header in ({**header, "format": logo.FORMAT_VERSION + 1}, {**header, "vocabulary": header["vocabulary"][:-1]}):
        np.savez(tmp_path / "other.npz", **{**arrays, "header": np.array(json.dumps(bad_header))})
        with pytest.raises(UserError, match="another format or vocabulary"):
            logo.GlobalKnowledge.load(tmp_path / "other.npz")
    np.savez(tmp_path / "partial.npz", **{n: a for n, a in arrays.items() if n != "drift"})
    with pytest.raises(UserError, match="partial.npz: cannot read"):
        logo.GlobalKnowledge.load(tmp_path / "partial.npz")
    with pytest.raises(UserError, match="cannot read"):
        logo.GlobalKnowledge.load(tmp_path / "missing.npz")


def test_invariant_kmeans_plus_plus_seeds_k_distinct_member_vectors_reproducibly():
    vectors = np.stack([s.vector for s in planted()])
    c = logo.init_centroids(vectors, 3, seed=4)
    assert c.shape == (3, 6) and c.dtype == np.float32
    assert all(any(np.array_equal(row, v) for v in vectors) for row in c)
    tight = np.repeat(np.eye(3, 6, dtype=np.float32), 10, axis=0)
    tight[::2, 3] = 0.01  # three tight clusters: each seed far from the ones before is in another cluster
    for seed in range(10):  # (a uniform draw would pick one cluster twice for most seeds)
        picked = logo.init_centroids(logo.unit(tight), 3, seed=seed)
        assert sorted(int(np.argmax(row)) for row in picked) == [0, 1, 2], seed
    np.testing.assert_array_equal(c, logo.init_centroids(vectors, 3, seed=4))
    same = logo.init_centroids(np.ones((5, 2), np.float32), 3)  # no distance left: any member
    assert same.shape == (3, 2)


def test_invariant_an_empty_community_keeps_its_centroid_and_the_others_move_to_their_unit_mean():
    sums = logo.RoundSums.zeros(2, 2, 0, 0)
    sums.vector_sum[1] = [3.0, 4.0]
    sums.count[1] = 2
    previous = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    np.testing.assert_allclose(logo.centroids_from(sums, previous), [[0, 1], [0.6, 0.8]])


def test_invariant_fold_decays_the_previous_sums_by_half_per_half_life_and_records_drift():
    first_sums = logo.RoundSums.zeros(2, 2, 1, 1)
    first_sums.vector_sum[:] = [[2.0, 0.0], [0.0, 0.0]]
    first_sums.count[:] = [2, 0]
    start = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)
    first = logo.fold(None, first_sums, start=start, half_life=2.0, min_size=1.5, meta={"a": 1})
    assert (first.round, first.half_life, first.min_size, first.meta) == (1, 2.0, 1.5, {"a": 1})
    np.testing.assert_allclose(first.centroids, [[1, 0], [0, 1]])  # the empty one keeps its start
    np.testing.assert_array_equal(first.drift, [[0, 0]])
    np.testing.assert_array_equal(first.sizes, [2, 0])
    no_start = logo.fold(None, first_sums)
    np.testing.assert_allclose(no_start.centroids, [[1, 0], [0, 0]])
    second_sums = logo.RoundSums.zeros(2, 2, 1, 1)
    second_sums.vector_sum[:] = [[0.0, 0.0], [1.0, 1.0]]
    second_sums.count[:] = [0, 1]
    second = logo.fold(first, second_sums, half_life=2.0, meta={"b": 2})
    np.testing.assert_allclose(second.sizes, [2 * 0.5 ** 0.5, 1])
    np.testing.assert_allclose(second.sums.vector_sum, [[2 * 0.5 ** 0.5, 0], [1, 1]])
    np.testing.assert_allclose(second.centroids[1], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(second.drift, [[0, 0], [0, np.linalg.norm([2 ** -0.5, 2 ** -0.5 - 1])]], rtol=1e-5)
    assert second.round == 2 and second.meta == {"a": 1, "b": 2} and second.min_size == logo.MIN_SIZE
    kept = logo.fold(first, second_sums, half_life=math.inf)
    np.testing.assert_allclose(kept.sizes, [2, 1])
    np.testing.assert_allclose(logo.fold(first, second_sums, half_life=1.0).sizes, [1, 1])


def test_invariant_advance_is_lloyd_rounds_of_contribute_aggregate_and_fold():
    rng = np.random.default_rng(3)  # no structure: every Lloyd step moves the centroids
    sigs = [sig(v, steering=np.full((2, 3), float(i))) for i, v in enumerate(rng.standard_normal((40, 5)))]
    start = logo.init_centroids(np.stack([s.vector for s in sigs]), 3, seed=5)
    centroids, sums = start, None
    for steps in (1, 2, 3):  # `iterations` Lloyd steps, the round's sums those of the last assignment
        sums = logo.aggregate([logo.contribute(s, centroids) for s in sigs], 3, 5, (2, 3))
        centroids = logo.centroids_from(sums, centroids)
        got = logo.advance(None, sigs, k=3, iterations=steps, seed=5, min_size=3, half_life=4.0, meta={"m": 1})
        expected = logo.fold(None, sums, start=start, half_life=4.0, min_size=3, meta={"m": 1})
        np.testing.assert_allclose(got.centroids, expected.centroids, atol=1e-6)
        np.testing.assert_allclose(got.sizes, expected.sizes)
        np.testing.assert_allclose(got.sums.steering_sum, expected.sums.steering_sum)
        assert (got.half_life, got.min_size, got.meta, got.round) == (4.0, 3, {"m": 1}, 1)
    assert not np.allclose(logo.advance(None, sigs, k=3, iterations=1, seed=5).sizes,
                           logo.advance(None, sigs, k=3, iterations=2, seed=5).sizes)
    sigs = planted(n_per=8, seed=2)
    full = logo.advance(None, sigs, k=3, seed=5)
    assert sorted(full.sizes) == [8, 8, 8]  # converged: one community per planted direction
    assert logo.advance(None, sigs, seed=5).k == logo.choose_k(len(sigs))
    # a later round starts from the previous centroids, decays the carried sums, and keeps k
    later = logo.advance(full, sigs, half_life=1.0)
    np.testing.assert_allclose(later.sizes, full.sizes * 1.5)
    assert later.k == 3 and later.round == 2 and later.drift.shape == (2, 3)
    with pytest.raises(ValueError):
        logo.advance(None, [])


def test_invariant_a_round_with_steering_of_another_shape_drops_the_old_steering_and_one_without_keeps_its_shape():
    sigs = planted(n_per=6)
    first = logo.advance(None, sigs, k=3, min_size=1)
    wider = [sig(s.vector, s.counts, steering=np.ones((4, 5))) for s in sigs]
    second = logo.advance(first, wider, min_size=1)
    assert second.sums.steering_sum.shape == (3, 4, 5)
    np.testing.assert_allclose(second.sums.steering_count, second.sizes - first.sizes * 0.5 ** 0.5)
    np.testing.assert_allclose(second.steering[second.sizes > 0], 1.0)
    none = logo.advance(second, [sig(s.vector, s.counts) for s in sigs], min_size=1)
    assert none.sums.steering_sum.shape == (3, 4, 5)
    np.testing.assert_allclose(none.sums.steering_count, second.sums.steering_count * 0.5 ** 0.5)
    assert logo.advance(None, [sig(s.vector) for s in sigs], k=2).sums.steering_sum.shape == (2, 0, 0)


def test_invariant_random_assignment_is_one_seeded_pass_ignoring_the_vectors():
    sigs = planted(n_per=10)
    r1 = logo.advance(None, sigs, k=3, random_assignment=True, seed=3)
    r2 = logo.advance(None, sigs, k=3, random_assignment=True, seed=3)
    np.testing.assert_array_equal(r1.sizes, r2.sizes)
    assert r1.sizes.sum() == 30 and sorted(r1.sizes) != [10, 10, 10]
    np.testing.assert_array_equal(r1.sizes, logo.advance(None, sigs, k=3, random_assignment=True, seed=3,
                                                         iterations=50).sizes)


def test_invariant_restarts_keep_the_least_inertia_start_and_inertia_is_one_minus_cosine():
    rng = np.random.default_rng(1)
    sigs = [sig(v) for v in rng.standard_normal((40, 5))]  # no structure: seeds end in different optima
    start = logo.init_centroids(np.stack([s.vector for s in sigs]), 4, seed=0)
    centroids, sums, inertia = logo._lloyd(sigs, start, None, (2, 3), 10, np.random.default_rng(0), False)
    expected = sum(1 - float(centroids[logo.assign(s.vector, centroids)] @ s.vector) for s in sigs)
    assert inertia == pytest.approx(expected, abs=1e-5) and sums.count.sum() == len(sigs)
    inertia_of = lambda kn: sum(1 - kn.centroids[logo.assign(s.vector, kn.centroids)] @ s.vector for s in sigs)
    runs = [inertia_of(logo.advance(None, sigs, k=4, seed=i)) for i in range(12)]
    # a first seed whose own run is not the best of the next five (but within 1 of it): the restarts find it
    first = next(i for i in range(8) if 1e-3 < runs[i] - min(runs[i:i + 5]) < 1)
    best = inertia_of(logo.advance(None, sigs, k=4, seed=first, restarts=5))
    assert best <= min(runs[first:first + 5]) + 1e-4
    # among runs of equal inertia the first is kept: the same partition under another numbering is not taken
    clean = planted(n_per=10, seed=3)
    alone = logo.advance(None, clean, k=3, seed=0)
    numbered = [tuple(np.argmax(np.abs(logo.advance(None, clean, k=3, seed=i).centroids), axis=1)) for i in range(6)]
    assert len(set(numbered)) > 1  # the seeds number the same three communities differently
    np.testing.assert_array_equal(logo.advance(None, clean, k=3, seed=0, restarts=6).centroids, alone.centroids)


# ---------------------------------------------------------------- mediator

def test_invariant_attribute_shares_are_smoothed_and_sum_to_one_within_each_attribute():
    h = np.zeros((2, V))
    h[0, vocab_index("Jazz")] = 4
    shares = logo.attribute_shares(h.copy(), 1.0)
    for s in logo.ATTRIBUTE_SLICES.values():
        np.testing.assert_allclose(shares[:, s].sum(axis=1), 1.0)
    music = logo.ATTRIBUTE_SLICES["music"]
    n = music.stop - music.start
    assert shares[0, vocab_index("Jazz")] == pytest.approx(5 / (4 + n))
    assert logo.attribute_shares(h.copy(), 0.5)[0, vocab_index("Rock")] == pytest.approx(0.5 / (4 + 0.5 * n))


def test_invariant_the_posterior_is_naive_bayes_over_published_communities_and_stays_finite():
    h = np.zeros((3, V))
    h[0, vocab_index("Jazz")] = 6
    h[1, vocab_index("Rock")] = 6
    h[2, vocab_index("Jazz")] = 60
    k = knowledge_of(h, [6, 6, 1], min_size=2)  # community 2 is not published
    stated = counts_of("Jazz")
    shares = logo.attribute_shares(h.copy(), 1.0)
    prior = np.array([6, 6])
    like = shares[:2, vocab_index("Jazz")]
    np.testing.assert_allclose(logo.community_posterior(stated, k), [*(prior * like / (prior * like).sum()), 0])
    many = logo.community_posterior(counts_of("Jazz", times=5000), k)
    assert np.isfinite(many).all() and many.sum() == pytest.approx(1) and many[0] == pytest.approx(1)
    np.testing.assert_allclose(logo.community_posterior(np.zeros(V), k), [0.5, 0.5, 0])
    smooth = logo.community_posterior(stated, k, smoothing=3.0)
    assert smooth[0] < logo.community_posterior(stated, k)[0]


def test_invariant_with_nothing_published_the_mediator_serves_only_the_users_own_notes():
    k = knowledge_of(np.zeros((2, V)), [1, 1], min_size=2)
    s = logo.local_signals(["sushi for me"])
    m = logo.mediate(s, k, logo.MediatorParams(user_scale=3.0, community_scale=2.0))
    assert m == logo.Mediation(-1, 0.0, 1.0, 3.0, 0.0, (), (("cuisine", "Japanese food"),))


def test_invariant_the_mediator_weighs_history_size_agreement_and_skew_exactly():
    h = np.zeros((2, V))
    h[0, vocab_index("Jazz")] = 5
    h[0, vocab_index("Thai food")] = 5
    h[1, vocab_index("Rock")] = 5
    centroids = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    k = knowledge_of(h, [5, 5], min_size=2, centroids=centroids)
    vector = logo.unit(np.array([0.8, 0.6, 0, 0], np.float32))
    counts = counts_of("Rock", "Rock", "Jazz")
    p = logo.MediatorParams(tau=4.0, user_scale=2.0, community_scale=3.0, skew_boost=0.5, posterior=False)
    m = logo.mediate(logo.LocalSignals(vector, counts, 6), k, p)
    local = 1 - math.exp(-6 / 4.0)
    skew = 1 - logo.normalized_entropy(counts)
    assert m.community == 0 and m.agreement == pytest.approx(0.8) and m.local_weight == pytest.approx(local)
    assert m.user_scale == pytest.approx(2.0 * local)
    assert m.community_scale == pytest.approx(3.0 * min(1.0, (1 - local) + 0.5 * skew) * 0.8)
    # context only for attributes the user left open, from the nearest community when posterior is off
    assert dict(m.context) == {"cuisine": "Thai food"}  # (the community counted nothing else)
    assert m.own == ()  # no `latest` in these signals
    # agreement below min_agreement: no context; a community value below min_share: no line for it
    assert logo.mediate(logo.LocalSignals(vector, counts, 6), k, logo.MediatorParams(min_agreement=0.81)).context == ()
    shares = dict(logo.mediate(logo.LocalSignals(vector, counts, 6), k,
                               logo.MediatorParams(min_share=0.5, posterior=False)).context)
    assert shares == {"cuisine": "Thai food"}
    # context_max_count: an attribute named up to this many times still gets a community line
    named = dict(logo.mediate(logo.LocalSignals(vector, counts, 6), k,
                              logo.MediatorParams(context_max_count=1, posterior=False)).context)
    assert "music" not in named and named["cuisine"] == "Thai food"
    named = dict(logo.mediate(logo.LocalSignals(vector, counts, 6), k,
                              logo.MediatorParams(context_max_count=3, posterior=False)).context)
    assert named["music"] == "Jazz"
    # an unpublished community is never the one chosen, however near
    far = knowledge_of(h, [1, 5], min_size=2, centroids=centroids)
    assert logo.mediate(logo.LocalSignals(vector, counts, 6), far, p).community == 1
    # no counts at all: no skew term
    bare = logo.mediate(logo.LocalSignals(vector, np.zeros(V, np.float32), 6), k, p)
    assert bare.community_scale == pytest.approx(3.0 * (1 - local) * 0.8)


def test_invariant_own_notes_name_the_latest_value_of_each_attribute_named_more_than_context_max_count():
    texts = ["sushi", "pizza", "jazz"]
    s = logo.local_signals(texts)
    k = knowledge_of(np.zeros((2, V)), [1, 1], min_size=2)
    assert logo.mediate(s, k).own == (("cuisine", "Italian food"), ("music", "Jazz"))
    assert logo.mediate(s, k, logo.MediatorParams(context_max_count=1)).own == (("cuisine", "Italian food"),)
    assert logo.mediate(s, k, logo.MediatorParams(own_context=False)).own == ()


def test_invariant_context_prefix_lists_own_then_community_lines_keeping_the_requests_lines():
    context = (("music", "Jazz"), ("hobby", "Chess"))
    own = (("cuisine", "Thai food"),)
    everything = logo.context_prefix(context, "How are you?", own)
    assert everything == (f"{logo.OWN_NOTE}: Thai food (cuisine). "
                          f"{logo.COMMUNITY_NOTE}: Jazz (music); Chess (hobby).\n\n")
    assert logo.context_prefix(context, "Any chess openings to learn?", own) == \
        f"{logo.COMMUNITY_NOTE}: Chess (hobby).\n\n"
    # a keyword of the value counts as naming it; at most CONTEXT_TOP lines are kept
    assert logo.context_prefix(context, "saxophone solos tonight?") == f"{logo.COMMUNITY_NOTE}: Jazz (music).\n\n"
    three = logo.context_prefix(context, "music, hobby and cuisine?", own)
    assert three.count("(") == logo.CONTEXT_TOP
    assert logo.context_prefix((), "anything", ()) == ""


# ---------------------------------------------------------------- the world, in rounds

def upqa_of(rows):
    """upqa entries: (user, asked at step, [(text, step), ...])."""
    return [{"user_id": u, "step": step, "profile": [{"text": t, "step": s} for t, s in items]}
            for u, step, items in rows]


UPQA = upqa_of([("a", 3, [("sushi", 0), ("jazz", 1), ("rock", 2)]),
                ("b", 1, [("pizza", 0)]),
                ("c", 3, [("tacos", 2)]),
                ("d", 2, [("chess", 0), ("baking", 1)])])


def test_invariant_world_rounds_fold_each_round_the_users_still_active_with_items_before_it():
    seen = []

    def embed(texts):
        seen.append(tuple(texts))
        return np.ones((len(texts), 2))

    rounds = logo.world_rounds(UPQA, k=2, min_size=1, half_life=3.0, embed=embed, embedding_weight=0.3)
    assert sorted(rounds) == [1, 2, 3] and [rounds[r].round for r in (1, 2, 3)] == [1, 2, 3]
    assert rounds[1].half_life == 3.0 and rounds[1].min_size == 1 and rounds[1].k == 2
    # round 1: a, b, d (c's only item is at step 2); round 2: a, d; round 3: a, c
    assert seen == [("sushi",), ("pizza",), ("chess",), ("sushi", "jazz"), ("chess", "baking"),
                    ("sushi", "jazz", "rock"), ("tacos",)]
    assert rounds[1].sizes.sum() == 3
    assert rounds[2].sizes.sum() == pytest.approx(3 * 0.5 ** (1 / 3) + 2)
    np.testing.assert_allclose(rounds[1].histograms.sum(0), counts_of("Japanese food", "Italian food", "Chess"))
    assert rounds[1].centroids.shape == (2, 2 + V)  # embeddings joined to the preferences
    window = logo.world_rounds(UPQA, k=2, window=True)
    np.testing.assert_allclose(window[3].sums.counts.sum(0) - window[2].sums.counts.sum(0) * 0.5 ** 0.5,
                               counts_of("Rock", "Mexican food"), atol=1e-6)


def test_invariant_world_rounds_steer_every_contributor_or_a_seeded_sample_of_steer_limit():
    calls = []

    def steer(texts):
        calls.append(tuple(texts))
        return np.full((1, 2), float(len(texts)))

    rounds = logo.world_rounds(UPQA, k=2, min_size=1, steer=steer)
    assert len(calls) == 3 + 2 + 2 and rounds[1].sums.steering_count.sum() == 3
    calls.clear()
    limited = logo.world_rounds(UPQA, k=2, min_size=1, steer=steer, steer_limit=1, seed=2)
    assert len(calls) == 3 and limited[1].sums.steering_count.sum() == 1
    calls.clear()
    again = logo.world_rounds(UPQA, k=2, min_size=1, steer=steer, steer_limit=1, seed=2)
    assert len(calls) == 3
    np.testing.assert_array_equal(again[3].sums.steering_sum, limited[3].sums.steering_sum)
    assert logo.world_rounds(UPQA, k=2, steer=steer, steer_limit=10)[1].sums.steering_count.sum() == 3


# ---------------------------------------------------------------- steering, files, embeddings

class FakeTok:
    def __init__(self):
        self.rendered = []

    def apply_chat_template(self, messages):
        self.rendered.append(messages)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text, add_bos=True):
        assert add_bos is False
        return [len(text), text.count("-"), 1]


class FakeModel:
    """Hidden states that depend on the prompt: block i's output at the last token is (i + 1) * ids[0]."""

    def __call__(self, ids, output_hidden_states=False):
        import torch

        assert output_hidden_states and ids.shape[0] == 1
        n = ids.shape[1]
        base = ids[0, 0].double()
        states = [torch.zeros(1, n, 2, dtype=torch.float64)]
        for i in range(4):
            s = torch.zeros(1, n, 2, dtype=torch.float64)
            s[0, -1] = torch.tensor([(i + 1) * base, 1.0])
            s[0, 0] = 99.0  # never read: only the last token is
            states.append(s)
        return None, states


def test_invariant_caa_steering_is_the_mean_hidden_state_shift_the_profile_makes_at_the_last_prompt_token(tmp_path):
    tok = FakeTok()
    steerer = logo.Steerer(tmp_path / "m.gguf", model=FakeModel(), tokenizer=tok)
    assert steerer.model_path == tmp_path / "m.gguf"
    assert steerer(["no preference", "nothing"]) is None and tok.rendered == []
    texts = ["sushi", "hello", "jazz", "a", "bb", "ccc", "rock"]
    got = steerer(texts)
    prompts = texts[-logo.STEER_PROMPTS:]
    profile = [t for t in texts if logo.read_preferences(t).sum() > 0][-logo.STEER_PROFILE:]
    system = "About the user:\n" + "\n".join(f"- {t}" for t in profile)
    expected = []
    for p in prompts:
        with_profile = len(f"system:{system}|user:{p}")
        alone = len(f"user:{p}")
        expected.append([[(i + 1) * (with_profile - alone), 0.0] for i in range(1, 4)])
    np.testing.assert_allclose(got, np.mean(expected, axis=0))
    assert got.shape == (3, 2) and got.dtype == np.float32
    assert tok.rendered[0] == [{"role": "system", "content": system}, {"role": "user", "content": prompts[0]}]
    assert tok.rendered[1] == [{"role": "user", "content": prompts[0]}]
    assert len(tok.rendered) == 2 * len(prompts)


def control_vector_arch(path) -> str:
    from localpers.model.gguf_info import open_gguf

    field = open_gguf(path, check_arch=False).get_field("controlvector.model_hint")
    return bytes(field.parts[-1]).decode()


def test_invariant_a_steering_vector_is_written_as_directions_1_to_L_and_its_file_named_by_its_content(tmp_path):
    from localpers.model.gguf_write import read_control_vector

    steering = np.arange(6, dtype=np.float32).reshape(3, 2)
    path = logo.write_steering(tmp_path / "s.gguf", steering, "qwen2")
    assert path == tmp_path / "s.gguf" and control_vector_arch(path) == "qwen2"
    got = read_control_vector(path)
    assert sorted(got) == [1, 2, 3] and all(np.array_equal(got[i + 1], steering[i]) for i in range(3))
    folder = tmp_path / "new" / "files"
    first = logo._control_file(folder, steering, "llama")
    assert first.startswith(str(folder / "cvec-")) and first.endswith(".gguf") and control_vector_arch(first) == "llama"
    os.utime(first, ns=(1, 1))
    assert logo._control_file(folder, steering.copy(), "llama") == first and os.stat(first).st_mtime_ns == 1
    assert logo._control_file(folder, steering + 1, "llama") != first and len(os.listdir(folder)) == 2


def test_invariant_the_cached_embedder_embeds_each_text_once_in_the_order_asked():
    class Embedder:
        name, calls = "fake", []

        def embed(self, texts):
            Embedder.calls.append(list(texts))
            return np.array([[len(t), t.count("a")] for t in texts], np.float32)

    cached = logo.CachedEmbedder(Embedder())
    assert cached.name == "fake"
    np.testing.assert_array_equal(cached(["a", "bbb", "a"]), [[1, 1], [3, 0], [1, 1]])
    np.testing.assert_array_equal(cached(["aa", "bbb"]), [[2, 2], [3, 0]])
    assert Embedder.calls == [["a", "bbb", "a"], ["aa"]]


# ---------------------------------------------------------------- the method: evaluation users

class Llm:
    metadata = {"general.architecture": "qwen3"}


class FakeEngine:
    llm = Llm()


def steered_knowledge():
    h = np.zeros((2, V))
    h[0, vocab_index("Jazz")] = 5
    h[1, vocab_index("Chess")] = 5
    steering = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 2.0)])
    return knowledge_of(h, [5, 5], steering=steering, min_size=2,
                        centroids=np.eye(V, dtype=np.float32)[[vocab_index("Jazz"), vocab_index("Chess")]])


def test_invariant_personalize_serves_the_scaled_control_vectors_and_the_requests_notes():
    from localpers.personalize.methods import Personalized

    k = steered_knowledge()
    s = logo.LocalSignals(counts_of("Chess"), counts_of("Jazz"), 4)  # a vector nearest community 1
    p = logo.MediatorParams(user_scale=2.0, community_scale=1.0, tau=4.0, posterior=False)
    asked = []
    got = logo.personalize(s, k, p, "me.gguf", lambda c: asked.append(c) or f"c{c}.gguf", "Any chess openings?")
    local = 1 - math.exp(-1)
    assert asked == [1] and got.artifacts.control_vectors == (
        ("me.gguf", pytest.approx(2.0 * local)), ("c1.gguf", pytest.approx((1 - local) * 1.0)))
    assert got.user_prefix == f"{logo.COMMUNITY_NOTE}: Chess (hobby).\n\n"
    assert logo.personalize(s, k, p, None, lambda c: None, "q").artifacts.control_vectors == ()
    assert logo.personalize(s, None, p, "me.gguf", lambda c: "x", "q") == Personalized()
    zero = logo.personalize(s, k, logo.MEDIATOR, "me.gguf", lambda c: "x", "q")
    assert zero.artifacts.control_vectors == ()  # the default scales are 0: nothing steers


def test_invariant_an_evaluation_user_gets_the_knowledge_of_their_query_step_and_their_own_steering_file(
        tmp_path, monkeypatch):
    late = steered_knowledge()
    early = knowledge_of(np.zeros((2, V)), [1, 1], min_size=2)  # nothing published yet
    steer_calls = []

    def steer(texts):
        steer_calls.append(tuple(texts))
        return np.full((2, 3), 5.0) if "jazz" in texts else None

    params = logo.MediatorParams(user_scale=1.0, community_scale=1.0, posterior=False)
    prepared = logo.Prepared({1: early, 2: late}, {"early": 1, "late": 2}, params, steer=steer,
                             files=tmp_path / "cv")
    monkeypatch.setitem(logo._PREPARED, "logo-test", prepared)
    logo._eval_signals.cache_clear()
    method = logo._method("logo-test")
    assert method.__name__ == "logo_test"
    early_user = User("early", history=("jazz",))
    got = method(early_user, "music?", FakeEngine())
    assert got.user_prefix == f"{logo.OWN_NOTE}: Jazz (music).\n\n"  # step 1: no community yet
    assert len(got.artifacts.control_vectors) == 1
    [(path, scale)] = got.artifacts.control_vectors
    assert path.startswith(str(tmp_path / "cv" / "cvec-")) and control_vector_arch(path) == "qwen3"
    from localpers.model.gguf_write import read_control_vector
    assert all(np.all(v == 5.0) for v in read_control_vector(path).values())
    late_user = User("late", history=("jazz",))
    paths = [p for p, _ in method(late_user, "Any chess openings?", FakeEngine()).artifacts.control_vectors]
    assert len(paths) == 2 and paths[0] == path and control_vector_arch(paths[1]) == "qwen3"
    assert all(np.all(v == 1.0) for v in read_control_vector(paths[1]).values())  # community 0's steering
    unknown = method(User("nobody", history=("jazz",)), "Any chess openings?", FakeEngine())
    assert len(unknown.artifacts.control_vectors) == 2  # an unknown user: the latest round
    no_steer = method(User("late", history=("chess",)), "Any chess openings?", FakeEngine())
    [(community_1, _)] = no_steer.artifacts.control_vectors  # no steering of their own: only community 1's
    assert steer_calls[-1] == ("chess",) and all(np.all(v == 2.0) for v in read_control_vector(community_1).values())
    # without a folder for files, nothing is written or steered
    monkeypatch.setitem(logo._PREPARED, "logo-nofiles", logo.Prepared({1: late}, {}, params, steer=steer))
    bare = logo._method("logo-nofiles")(User("x", history=("jazz",)), "Any chess openings?", None)
    assert bare.artifacts.control_vectors == () and bare.user_prefix
    with pytest.raises(UserError, match="needs global knowledge"):
        logo._method("logo-never-prepared")(User("x", history=("jazz",)), "q", None)
    logo._eval_signals.cache_clear()


def test_invariant_prepare_world_prepares_exactly_the_logo_methods_asked_with_their_ablations_options(
        tmp_path, monkeypatch):
    import json

    from localpers.personalize.world import WORLD_FILES

    (tmp_path / WORLD_FILES["upqa"]).write_text(json.dumps(UPQA))
    monkeypatch.setattr(logo, "_PREPARED", {})
    steer = lambda texts: np.ones((1, 2))
    embed = lambda texts: np.ones((len(texts), 3))
    params = logo.MediatorParams(user_scale=0.5, community_scale=0.25, tau=3.0)
    logo.prepare_world(tmp_path, ["logo+prompt", "rag", *names.LOGO_ABLATIONS], steer=steer, params=params,
                       files=str(tmp_path / "f"), seed=1, steer_limit=1, embed=embed)
    assert set(logo._PREPARED) == {names.LOGO, *names.LOGO_ABLATIONS}
    plain = logo._PREPARED[names.LOGO]
    assert plain.params == params and plain.steer is steer and plain.embed is embed and plain.files == tmp_path / "f"
    assert plain.rounds[1].centroids.shape[1] == 3 + V  # the user vectors joined the embeddings
    assert plain.step_of == {"a": 3, "b": 1, "c": 3, "d": 2} and sorted(plain.rounds) == [1, 2, 3]
    assert plain.rounds[1].half_life == logo.HALF_LIFE and plain.rounds[1].sums.steering_count.sum() == 1
    assert logo._PREPARED["logo-nodecay"].rounds[1].half_life == math.inf
    fixed = logo._PREPARED["logo-nomediator"].params
    assert fixed == logo.MediatorParams(context_max_count=math.inf, tau=math.inf, user_scale=0.5, community_scale=0.25)
    expected = logo.world_rounds(UPQA, k=None, random_assignment=True, steer=steer, seed=1, steer_limit=1, embed=embed)
    np.testing.assert_array_equal(logo._PREPARED["logo-random"].rounds[3].sizes, expected[3].sizes)
    clustered = logo.world_rounds(UPQA, steer=steer, seed=1, steer_limit=1, embed=embed)  # logo: no random assignment
    np.testing.assert_array_equal(plain.rounds[3].centroids, clustered[3].centroids)
    monkeypatch.setattr(logo, "_PREPARED", {})
    logo.prepare_world(tmp_path, ["logo"])
    assert set(logo._PREPARED) == {names.LOGO} and logo._PREPARED[names.LOGO].files is None
    assert logo._PREPARED[names.LOGO].rounds[1].sums.steering_sum.shape[1:] == (0, 0)


# ---------------------------------------------------------------- served users

def test_invariant_signals_files_sit_beside_the_control_vector_and_load_back(tmp_path):
    assert logo.signals_path(tmp_path / "v3" / "logo.gguf") == tmp_path / "v3" / "logo.signals.npz"
    assert logo.knowledge_dir(tmp_path) == tmp_path / names.LOGO
    s = logo.local_signals(["sushi", "jazz"])
    path = logo.save_signals(tmp_path / "s.npz", s, tmp_path / "k.npz")
    back, kpath = logo._load_signals(str(path), ("key", 1))
    assert kpath == str(tmp_path / "k.npz") and back.n_items == 2 and back.steering is None
    np.testing.assert_array_equal(back.vector, s.vector)
    np.testing.assert_array_equal(back.counts, s.counts)
    np.testing.assert_array_equal(back.latest, s.latest)
    old = logo.save_signals(tmp_path / "old.npz", logo.LocalSignals(s.vector, s.counts, 2), tmp_path / "k.npz")
    assert logo._load_signals(str(old), ("key", 2))[0].latest is None


def test_invariant_a_served_user_is_served_from_their_registered_files_only(tmp_path):
    from localpers.personalize.methods import Personalized

    k = steered_knowledge()
    folder = tmp_path / names.LOGO
    kpath = folder / logo.KNOWLEDGE_FILE
    community = str(logo.write_steering(tmp_path / "community-1.gguf", np.ones((2, 3)), "llama"))
    k.meta["community_cvecs"] = {"1": community}
    k.save(kpath)
    own = logo.write_steering(tmp_path / "own.gguf", np.full((2, 3), 3.0), "llama")
    zeros = logo.write_steering(tmp_path / "zeros.gguf", np.zeros((2, 3)), "llama")
    s = logo.LocalSignals(counts_of("Chess"), counts_of("Jazz"), 4, latest=counts_of("Jazz"))
    for cvec in (own, zeros):
        logo.save_signals(logo.signals_path(cvec), s, kpath)
    params = logo.MediatorParams(user_scale=1.0, community_scale=1.0, posterior=False)

    def served(path, kind=names.CONTROL_VECTOR, method=names.LOGO):
        return User("u", registered=(RegisteredArtifact(names.EDIT, names.LORA, str(tmp_path / "edit.gguf")),
                                     RegisteredArtifact(method, kind, str(path))))

    got = logo._served(served(own), "Any chess openings?", params)
    assert [p for p, _ in got.artifacts.control_vectors] == [str(own), community]
    assert got.user_prefix == f"{logo.COMMUNITY_NOTE}: Chess (hobby).\n\n"
    assert [p for p, _ in logo._served(served(zeros), "q", params).artifacts.control_vectors] == [community]
    assert logo._nonzero_control_vector(str(own), 1) and not logo._nonzero_control_vector(str(zeros), 1)
    assert logo._served(served(own, kind=names.LORA), "q", params) == Personalized()
    assert logo._served(served(own, method=names.EDIT), "q", params) == Personalized()
    assert logo._served(served(tmp_path / "unsigned.gguf"), "q", params) == Personalized()
    # through the method: a registered user never needs prepared knowledge
    assert logo.logo_method(served(own), "Any chess openings?", None).user_prefix == got.user_prefix
    kpath.unlink()
    assert logo._served(served(own), "q", params) == Personalized()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers_models import random_model_path

    return random_model_path(tmp_path_factory, "llama")  # 3 layers, d_model 64


class FakeSteerer:
    """Steering [n_layer - 1, d_model] = the number of texts, for users who stated a preference."""

    made = []

    def __init__(self, model_path):
        FakeSteerer.made.append(model_path)

    def __call__(self, texts):
        if not logo.preference_counts(texts).sum():
            return None
        return np.full((2, 64), float(len(texts)), np.float32)


def test_invariant_a_refresh_round_writes_knowledge_community_files_and_each_users_artifacts(
        tiny_model, tmp_path, monkeypatch):
    from localpers.engine.engine import model_sha256
    from localpers.model.gguf_write import read_control_vector
    from localpers.personalize import signals as sync
    from localpers.store.store import Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(logo, "Steerer", FakeSteerer)
    with Store.open(tmp_path / "home") as store:
        for i in range(6):
            store.add(f"jazz{i}", "I mostly listen to jazz.")
            store.add(f"jazz{i}", "Saxophone solos all night.")
            store.add(f"chess{i}", "My hobby is chess.")
        store.add("quiet", "The weather was fine.")
        with pytest.raises(ValueError, match="no user has any history"):
            logo.refresh_knowledge(store, model_path=tiny_model, users=[])
        FakeSteerer.made.clear()
        k = logo.refresh_knowledge(store, model_path=tiny_model, k=3, min_size=2, seed=1)
        assert FakeSteerer.made == [tiny_model]  # CAA on the served model
        folder = tmp_path / "home" / names.LOGO
        back = logo.GlobalKnowledge.load(folder / logo.KNOWLEDGE_FILE)
        assert k.k == back.k == 3 and k.round == back.round == 1 and back.min_size == 2
        assert back.meta["embedder"] is None and back.meta["model_sha256"] == model_sha256(tiny_model)
        assert back.sums.steering_sum.shape[1:] == (2, 64)
        cvecs = back.meta["community_cvecs"]
        expected = {str(c) for c in range(3) if back.published[c] and back.sums.steering_count[c] > 0}
        assert set(cvecs) == expected and len(expected) >= 2
        for c, path in cvecs.items():
            assert path == str(folder / f"community-{c}-r1.gguf") and control_vector_arch(path) == "llama"
            got = read_control_vector(path)
            np.testing.assert_allclose(np.stack([got[1], got[2]]), back.steering[int(c)], rtol=1e-6)
        for user, steering in (("jazz0", 2.0), ("chess0", 1.0), ("quiet", 0.0)):
            [artifact] = store.artifacts(user, names.CONTROL_VECTOR)
            assert artifact["meta"]["method"] == names.LOGO and artifact["meta"]["round"] == 1
            assert sorted(artifact["sources"]) == sorted(i["id"] for i in store.items(user))
            assert artifact["base_model_sha256"] == model_sha256(tiny_model)
            assert all(np.all(v == steering) for v in read_control_vector(artifact["path"]).values())
            saved, kfile = logo._load_signals(str(logo.signals_path(artifact["path"])), user)
            assert kfile == str(folder / logo.KNOWLEDGE_FILE)
            assert saved.n_items == len(store.items(user))
        np.testing.assert_allclose(sync.load_contribution(tmp_path / "home", "jazz0").steering, 2.0)
        with pytest.raises(UserError):  # a user with no preference and no embedder sends nothing
            sync.load_contribution(tmp_path / "home", "quiet")
        # the next round: decayed into this one, over the users given; the old community files go
        k2 = logo.refresh_knowledge(store, model_path=tiny_model, min_size=2, users=["jazz1", "chess1"])
        assert k2.round == 2 and k2.k == 3 and k2.sizes.sum() == pytest.approx(13 * 0.5 ** 0.5 + 2)
        assert sorted(p.name for p in folder.glob("community-*.gguf")) == sorted(
            f"community-{c}-r2.gguf" for c in k2.meta["community_cvecs"])
        assert len(store.artifacts("jazz1", names.CONTROL_VECTOR)) == 1
        assert store.artifacts("jazz1", names.CONTROL_VECTOR)[0]["meta"]["round"] == 2
        assert store.artifacts("jazz0", names.CONTROL_VECTOR)[0]["meta"]["round"] == 1
        # no steering asked: the users' control vectors are zeros, the knowledge keeps its steering shape
        k3 = logo.refresh_knowledge(store, model_path=tiny_model, min_size=2, users=["jazz2"], steer=False)
        assert k3.round == 3 and k3.sums.steering_sum.shape[1:] == (2, 64)
        assert not any(np.any(v) for v in read_control_vector(
            store.artifacts("jazz2", names.CONTROL_VECTOR)[0]["path"]).values())


def test_invariant_knowledge_from_a_sync_run_is_kept_and_only_gets_its_community_files(tiny_model, tmp_path, monkeypatch):
    from localpers.store.store import Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(logo, "Steerer", FakeSteerer)
    synced = logo.advance(None, [sig(np.eye(V)[i % 2], counts_of("Jazz"), steering=np.full((2, 64), 1.0))
                                 for i in range(8)], k=2, min_size=1)
    synced.meta.update(source=logo.SYNC_SOURCE, embedder=None)
    folder = tmp_path / "home" / names.LOGO
    synced.save(folder / logo.KNOWLEDGE_FILE)
    with Store.open(tmp_path / "home") as store:
        store.add("u", "I mostly listen to jazz.")
        k = logo.refresh_knowledge(store, model_path=tiny_model)
        assert k.round == 1 and k.meta["source"] == logo.SYNC_SOURCE
        np.testing.assert_array_equal(k.sizes, synced.sizes)
        back = logo.GlobalKnowledge.load(folder / logo.KNOWLEDGE_FILE)
        assert set(back.meta["community_cvecs"]) == {"0", "1"} and back.round == 1
        assert len(store.artifacts("u", names.CONTROL_VECTOR)) == 1
        # steering of another model's shape: no community files
        other = logo.advance(None, [sig(np.eye(V)[i % 2], counts_of("Jazz"), steering=np.ones((3, 8)))
                                    for i in range(8)], k=2, min_size=1)
        other.meta.update(source=logo.SYNC_SOURCE, embedder=None)
        other.save(folder / logo.KNOWLEDGE_FILE)
        logo.refresh_knowledge(store, model_path=tiny_model)
        assert "community_cvecs" not in logo.GlobalKnowledge.load(folder / logo.KNOWLEDGE_FILE).meta


def test_invariant_a_refresh_with_another_embedder_starts_the_communities_over(tiny_model, tmp_path, monkeypatch):
    from localpers.store.store import Store

    class Embedder:
        name = "fake-embedder"

        def embed(self, texts):
            return np.array([[1.0, float(len(t))] for t in texts])

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home") as store:
        for i in range(4):
            store.add(f"u{i}", "My hobby is chess." if i % 2 else "I mostly listen to jazz.")
        first = logo.refresh_knowledge(store, model_path=tiny_model, steer=False, k=2, min_size=1)
        assert first.meta["embedder"] is None and first.centroids.shape[1] == V
        assert first.published.all() and first.meta["community_cvecs"] == {}  # nobody steered: no community files
        assert not list((tmp_path / "home" / names.LOGO).glob("community-*"))
        second = logo.refresh_knowledge(store, model_path=tiny_model, steer=False, embedder=Embedder(), min_size=1)
        assert second.round == 1 and second.meta["embedder"] == "fake-embedder" and second.centroids.shape[1] == 2 + V
        third = logo.refresh_knowledge(store, model_path=tiny_model, steer=False, embedder=Embedder(), min_size=1)
        assert third.round == 2
        monkeypatch.setattr(logo, "Steerer", FakeSteerer)
        store.queue_job("u0", names.LOGO)
        claimed = store.claim_job([names.LOGO])
        job = logo.logo_job(store, "u0", type("E", (), {"model_path": tiny_model})(), claimed["id"])
        back = logo.GlobalKnowledge.load(tmp_path / "home" / names.LOGO / logo.KNOWLEDGE_FILE)
    # the job's round has no embedder: another space again, so round 1
    assert job == {"round": 1, "communities": back.k, "published": int(back.published.sum()), "users": 4}
    assert back.round == 1 and back.k == 2 and back.min_size == logo.MIN_SIZE


def test_invariant_a_later_rounds_members_are_those_nearest_its_final_centroids_under_the_decayed_sums():
    """The Lloyd iterations of a later round weigh the carried sums with the same decay as `fold`, so at the
    fixed point each contributor of the round is counted in the community whose final centroid is nearest."""
    for seed in range(4):
        for half_life in (2.0, 3.0):
            rng = np.random.default_rng(seed)
            first = logo.advance(None, [sig(v) for v in rng.standard_normal((30, 3))], k=3, seed=seed)
            sigs = [sig(v) for v in rng.standard_normal((30, 3)) + [1.5, 0, 0]]
            new = logo.advance(first, sigs, half_life=half_life, iterations=100)
            members = new.sums.count - first.sums.count * 0.5 ** (1 / half_life)
            nearest = np.bincount([logo.assign(s.vector, new.centroids) for s in sigs], minlength=3)
            np.testing.assert_allclose(members, nearest, atol=1e-9, err_msg=f"seed {seed}, half-life {half_life}")


def test_invariant_a_logo_jobs_round_registers_its_users_artifact_only_while_that_job_still_runs(tiny_model, tmp_path,
                                                                                          monkeypatch):
    """refresh_knowledge(job=(user, id)): that user's registration checks the job is still running (forget or a
    newer job cancels it), and a stale job ends the refresh."""
    from localpers.store.store import StaleError, Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home") as store:
        store.add("u", "I mostly listen to jazz.")
        store.add("v", "My hobby is chess.")
        store.queue_job("u", names.LOGO)
        job = store.claim_job([names.LOGO])
        logo.refresh_knowledge(store, model_path=tiny_model, steer=False, job=("u", job["id"]))
        assert len(store.artifacts("u", names.CONTROL_VECTOR)) == 1
        store.finish_job(job["id"], names.FAILED, reason="cancelled")  # the job no longer runs
        with pytest.raises(StaleError):
            logo.refresh_knowledge(store, model_path=tiny_model, steer=False, job=("u", job["id"]))
        assert store.artifacts("u", names.CONTROL_VECTOR)[0]["meta"]["round"] == 1  # nothing registered for u
        assert len(store.artifacts("v", names.CONTROL_VECTOR)) == 1


def test_invariant_agreement_at_min_agreement_is_enough_for_community_context():
    h = np.zeros((2, V))
    h[0, vocab_index("Jazz")] = 5
    k = knowledge_of(h, [5, 5], min_size=2)
    orthogonal = logo.LocalSignals(np.array([0, 0, 1, 0], np.float32), np.zeros(V, np.float32), 1)
    m = logo.mediate(orthogonal, k, logo.MediatorParams(posterior=False))
    assert m.agreement == 0.0 and dict(m.context) == {"music": "Jazz"}


def test_invariant_a_user_forgotten_during_a_refresh_is_skipped_unless_they_are_the_jobs_user(tiny_model, tmp_path,
                                                                                             monkeypatch):
    from localpers.store.store import NotFoundError, Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home") as store:
        store.add("u", "I mostly listen to jazz.")
        store.add("v", "My hobby is chess.")
        register = store.register_artifact

        def v_is_gone(user, *args, **kw):
            if user == "v":
                raise NotFoundError("unknown user 'v'")
            return register(user, *args, **kw)

        monkeypatch.setattr(store, "register_artifact", v_is_gone)
        store.queue_job("u", names.LOGO)
        job = store.claim_job([names.LOGO])
        for as_job in (None, ("u", job["id"])):
            logo.refresh_knowledge(store, model_path=tiny_model, steer=False, job=as_job)
        assert len(store.artifacts("u", names.CONTROL_VECTOR)) == 1 and store.artifacts("v", names.CONTROL_VECTOR) == []
        with pytest.raises(NotFoundError):
            logo.refresh_knowledge(store, model_path=tiny_model, steer=False, job=("v", job["id"]))


def test_invariant_a_steerer_loads_the_model_it_is_given_or_the_default(tmp_path, monkeypatch):
    import localpers
    import localpers.engine.tokenizer as tokenizer_module
    import localpers.model.model as model_module

    loaded = []
    monkeypatch.setattr(model_module, "load_model", lambda path: loaded.append(path) or FakeModel())
    monkeypatch.setattr(tokenizer_module.Tokenizer, "from_gguf", classmethod(lambda cls, path: loaded.append(("tok", path)) or FakeTok()))
    monkeypatch.setattr(localpers, "default_model_path", lambda: tmp_path / "default.gguf")
    logo.Steerer(tmp_path / "m.gguf")
    assert loaded == [tmp_path / "m.gguf", ("tok", tmp_path / "m.gguf")]
    loaded.clear()
    steerer = logo.Steerer()
    assert loaded == [tmp_path / "default.gguf", ("tok", tmp_path / "default.gguf")]
    assert steerer.model_path == tmp_path / "default.gguf"


def test_invariant_a_refresh_round_clusters_with_the_seed_it_is_given(tiny_model, tmp_path, monkeypatch):
    """refresh_knowledge(seed=S) runs its round's k-means (advance) with seed S, not advance's default (a
    mutation survivor of logo.py, sample seed 11: docs/history/mutation/)."""
    from localpers.store.store import Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(logo, "Steerer", FakeSteerer)
    seeds = []
    real = logo.advance
    monkeypatch.setattr(logo, "advance", lambda *a, **kw: seeds.append(kw.get("seed")) or real(*a, **kw))
    with Store.open(tmp_path / "home") as store:
        for i in range(3):
            store.add(f"jazz{i}", "I mostly listen to jazz.")
            store.add(f"chess{i}", "My hobby is chess.")
        logo.refresh_knowledge(store, model_path=tiny_model, k=2, min_size=1, seed=7, steer=False)
    assert seeds == [7]


# ---------------------------------------------------------------- every mutant of logo.py (issue 28): its survivors' tests

def test_invariant_normalized_entropy_does_not_depend_on_the_counts_scale():
    """The entropy of the counts' distribution: counts that sum to less than one (decayed, or shares) give the
    same value as the whole counts they are proportional to."""
    two = counts_of("Jazz", "Rock")
    for scale in (0.25, 0.5, 1.0, 3.0):
        assert logo.normalized_entropy(two * scale) == pytest.approx(math.log(2) / math.log(V))


def test_invariant_the_posterior_prior_is_proportional_to_size_also_below_one_member():
    """Decayed sizes are fractional: communities of 0.5 and 0.25 (published under min_size 0.1), with the same
    histograms and no evidence, are 2:1."""
    k = knowledge_of(np.zeros((2, V)), [0.5, 0.25], min_size=0.1)
    np.testing.assert_allclose(logo.community_posterior(np.zeros(V), k), [2 / 3, 1 / 3], rtol=1e-6)


def test_invariant_the_mediators_skew_counts_a_single_mention_and_its_global_weight_is_at_most_one():
    h = np.zeros((2, V))
    h[0, vocab_index("Jazz")] = 5
    k = knowledge_of(h, [5, 5], min_size=2, centroids=np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32))
    vector = logo.unit(np.array([0.8, 0.6, 0, 0], np.float32))
    one = logo.LocalSignals(vector, counts_of("Rock"), 6)  # one mention: all mass on one value, skew 1
    local = 1 - math.exp(-6 / 4.0)
    boosted = logo.mediate(one, k, logo.MediatorParams(tau=4.0, community_scale=3.0, skew_boost=0.25))
    assert boosted.community_scale == pytest.approx(3.0 * ((1 - local) + 0.25 * 1.0) * 0.8)
    capped = logo.mediate(one, k, logo.MediatorParams(tau=4.0, community_scale=3.0, skew_boost=2.0))
    assert capped.community_scale == pytest.approx(3.0 * 1.0 * 0.8)  # the global weight stops at 1


def test_invariant_a_community_value_is_noted_when_its_share_reaches_min_share_and_not_below():
    h = np.zeros((2, V))
    for value in ("Jazz", "Rock", "Thai food", "Italian food", "Mexican food"):
        h[0, vocab_index(value)] = 1  # music: two values, 1/2 each; cuisine: three, 1/3 each
    h[0, vocab_index("Chess")] = 2
    k = knowledge_of(h, [5, 5], min_size=2)
    s = logo.LocalSignals(np.array([1, 0, 0, 0], np.float32), np.zeros(V, np.float32), 1)
    context = dict(logo.mediate(s, k, logo.MediatorParams(min_share=0.5, posterior=False)).context)
    assert context == {"music": "Jazz", "hobby": "Chess"}  # a tie goes to the first value; cuisine's 1/3 is too low


def test_invariant_the_posterior_mixture_weighs_the_communities_with_the_mediators_smoothing():
    """With smoothing 0.01 one mention of Jazz makes the small jazz community (size 1) likelier than the large
    one (size 3), whose cuisine note (Thai) then loses to the jazz community's (Italian); smoothing 1 would
    flatten the evidence and reverse both."""
    h = np.zeros((2, V))
    h[0, vocab_index("Jazz")] = 1
    h[0, vocab_index("Italian food")] = 10
    h[1, vocab_index("Thai food")] = 10
    k = knowledge_of(h, [1, 3], min_size=1)
    s = logo.LocalSignals(np.array([1, 0, 0, 0], np.float32), counts_of("Jazz"), 1)
    sharp = logo.MediatorParams(smoothing=0.01)
    post = logo.community_posterior(s.counts, k, 0.01)
    assert post[0] > post[1] and logo.community_posterior(s.counts, k, 1.0)[0] < 0.5
    assert dict(logo.mediate(s, k, sharp).context)["cuisine"] == "Italian food"
    assert dict(logo.mediate(s, k, logo.MediatorParams(smoothing=1.0)).context)["cuisine"] == "Thai food"


def test_invariant_a_note_is_kept_for_a_request_naming_any_keyword_of_its_value():
    context = (("music", "Jazz"), ("hobby", "Chess"), ("sport", "Tennis"))
    for word in ("saxophone", "jam", "vinyl", "jazz"):
        assert logo.context_prefix(context, f"Any {word} tonight?") == f"{logo.COMMUNITY_NOTE}: Jazz (music).\n\n", word


def test_invariant_a_community_with_one_steering_member_gets_its_control_vector_and_one_with_none_gets_none(
        tmp_path, monkeypatch):
    from localpers.model.gguf_write import read_control_vector

    k = steered_knowledge()  # community 0 nearest a jazz user, 1 nearest a chess user
    k.sums.steering_sum[0], k.sums.steering_count[0] = 3.0, 1  # one member steered
    k.sums.steering_sum[1], k.sums.steering_count[1] = 0.0, 0  # none did
    # served: the files written beside the knowledge
    (tmp_path / names.LOGO).mkdir()
    logo._save_with_community_cvecs(k, tmp_path / names.LOGO / logo.KNOWLEDGE_FILE, "llama")
    assert set(k.meta["community_cvecs"]) == {"0"}
    # evaluated: the files the method writes
    params = logo.MediatorParams(community_scale=1.0, posterior=False)
    monkeypatch.setitem(logo._PREPARED, "logo-test", logo.Prepared({1: k}, {}, params, files=tmp_path / "cv"))
    logo._eval_signals.cache_clear()
    method = logo._method("logo-test")
    [(path, _)] = method(User("j", history=("jazz",)), "music?", FakeEngine()).artifacts.control_vectors
    assert all(np.all(v == 3.0) for v in read_control_vector(path).values())
    assert method(User("c", history=("chess",)), "chess?", FakeEngine()).artifacts.control_vectors == ()
    logo._eval_signals.cache_clear()


def test_invariant_a_served_user_reads_each_of_their_files_again_when_it_is_rewritten(tmp_path):
    """The knowledge file keeps its path from round to round: a served request reads the current one (and the
    signals and control vector as they are now), not what an earlier request cached. A knowledge file without
    community files serves no community vector."""
    kpath = tmp_path / names.LOGO / logo.KNOWLEDGE_FILE
    own = tmp_path / "own.gguf"
    stamp = [10**18]

    def rewrite(path, write):
        write()
        stamp[0] += 10**9
        os.utime(path, ns=(stamp[0], stamp[0]))

    rewrite(kpath, lambda: steered_knowledge().save(kpath))  # no meta["community_cvecs"]
    rewrite(own, lambda: logo.write_steering(own, np.zeros((2, 3)), "llama"))
    spath = logo.signals_path(own)
    rewrite(spath, lambda: logo.save_signals(spath, logo.LocalSignals(counts_of("Chess"), counts_of("Jazz"), 4), kpath))
    user = User("u", registered=(RegisteredArtifact(names.LOGO, names.CONTROL_VECTOR, str(own)),))
    params = logo.MediatorParams(user_scale=1.0, community_scale=1.0, posterior=False)
    first = logo._served(user, "Any chess openings?", params)
    assert first.artifacts.control_vectors == () and first.user_prefix == f"{logo.COMMUNITY_NOTE}: Chess (hobby).\n\n"
    rewrite(own, lambda: logo.write_steering(own, np.full((2, 3), 2.0), "llama"))
    assert [p for p, _ in logo._served(user, "q", params).artifacts.control_vectors] == [str(own)]
    baking = steered_knowledge()
    baking.sums.counts[1] = counts_of("Baking", times=5)
    rewrite(kpath, lambda: baking.save(kpath))
    assert logo._served(user, "Any chess openings?", params).user_prefix == f"{logo.COMMUNITY_NOTE}: Baking (hobby).\n\n"
    rewrite(spath, lambda: logo.save_signals(spath, logo.LocalSignals(counts_of("Jazz"), counts_of("Chess"), 4), kpath))
    assert "Jazz (music)" in logo._served(user, "Any jazz?", params).user_prefix  # now nearest community 0


def test_invariant_the_logo_method_made_afresh_serves_a_registered_user_from_the_registry(tmp_path):
    k = steered_knowledge()
    kpath = tmp_path / names.LOGO / logo.KNOWLEDGE_FILE
    k.meta["community_cvecs"] = {}
    k.save(kpath)
    own = logo.write_steering(tmp_path / "own.gguf", np.full((2, 3), 3.0), "llama")
    s = logo.LocalSignals(counts_of("Chess"), counts_of("Jazz", "Chess"), 4, latest=counts_of("Jazz", "Chess"))
    logo.save_signals(logo.signals_path(own), s, kpath)
    user = User("u", registered=(RegisteredArtifact(names.LOGO, names.CONTROL_VECTOR, str(own)),))
    method = logo._method(names.LOGO)  # what the module does at import, for logo_method
    for query in ("Any chess openings?", "Some jazz?"):
        got = method(user, query, None)
        assert got == logo._served(user, query) and got.user_prefix.count("(") == 1


def upqa_random(n=18, steps=3, seed=0):
    """n users asked at steps 1..steps, each with 1-3 items a step naming values from two interest groups."""
    rng = np.random.default_rng(seed)
    groups = (["sushi", "jazz", "chess", "tennis"], ["pizza", "rock", "baking", "running"])
    rows = []
    for u in range(n):
        words = groups[u % 2]
        asked = int(rng.integers(1, steps + 1))
        items = [(" and ".join(rng.choice(words, 2)), int(step)) for step in range(asked) for _ in range(rng.integers(1, 4))]
        rows.append((f"u{u}", asked, items))
    return upqa_of(rows)


def test_invariant_world_rounds_are_advance_over_each_rounds_contributors_with_the_options_given():
    upqa = upqa_random()

    def embed(texts):
        return np.array([[len(t), t.count("s"), t.count("n")] for t in texts], float)

    for options in ({"k": 3, "seed": 5, "restarts": 3, "half_life": 3.0, "min_size": 1.0, "embedding_weight": 0.3},
                    {"k": 3, "seed": 2, "random_assignment": True, "embedding_weight": 0.8},
                    {}):
        rounds = logo.world_rounds(upqa, embed=embed, **options)
        weight = options.get("embedding_weight", logo.EMBEDDING_WEIGHT)
        advance_options = {key: v for key, v in options.items() if key != "embedding_weight"}
        knowledge = None
        for r in range(1, 4):
            histories = [[p["text"] for p in e["profile"] if p["step"] < r] for e in upqa if e["step"] >= r]
            signals = [logo.local_signals(h, embed(h), None, weight) for h in histories if h]
            knowledge = logo.advance(knowledge, signals, **advance_options)
            np.testing.assert_array_equal(rounds[r].centroids, knowledge.centroids, err_msg=f"{options} round {r}")
            np.testing.assert_array_equal(rounds[r].sums.count, knowledge.sums.count)
            assert rounds[r].half_life == knowledge.half_life and rounds[r].min_size == knowledge.min_size


def test_invariant_a_refresh_without_a_model_path_uses_the_default_model_and_keeps_the_half_life_given(
        tiny_model, tmp_path, monkeypatch):
    """The users' control vectors have one direction per steerable layer (1..n_layer-1) of d_model, named for
    the served model's architecture, zeros for a refresh without steering."""
    import localpers
    from localpers.engine.engine import model_sha256
    from localpers.model.gguf_write import read_control_vector
    from localpers.store.store import Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(localpers, "default_model_path", lambda: tiny_model)
    with Store.open(tmp_path / "home") as store:
        store.add("u", "I mostly listen to jazz.")
        store.add("v", "My hobby is chess.")
        k = logo.refresh_knowledge(store, steer=False, half_life=3.0, min_size=1)
        assert k.half_life == 3.0 and k.meta["model_sha256"] == model_sha256(tiny_model)
        assert logo.GlobalKnowledge.load(tmp_path / "home" / names.LOGO / logo.KNOWLEDGE_FILE).half_life == 3.0
        for user in ("u", "v"):
            [artifact] = store.artifacts(user, names.CONTROL_VECTOR)
            got = read_control_vector(artifact["path"])
            assert sorted(got) == [1, 2] and all(v.shape == (64,) and not v.any() for v in got.values())
            assert control_vector_arch(artifact["path"]) == "llama"


def test_invariant_the_logo_job_refreshes_on_the_served_model_and_registers_only_while_it_runs(
        tiny_model, tmp_path, monkeypatch):
    import localpers
    from localpers.engine.engine import model_sha256
    from localpers.store.store import StaleError, Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(logo, "Steerer", FakeSteerer)
    monkeypatch.setattr(localpers, "default_model_path", lambda: tmp_path / "not-the-served-model.gguf")
    engine = type("Engine", (), {"model_path": tiny_model})()
    with Store.open(tmp_path / "home") as store:
        store.add("u", "I mostly listen to jazz.")
        store.add("v", "My hobby is chess.")
        store.queue_job("u", names.LOGO)
        job = store.claim_job([names.LOGO])
        FakeSteerer.made.clear()
        assert logo.logo_job(store, "u", engine, job["id"])["users"] == 2
        assert FakeSteerer.made == [tiny_model]
        assert store.artifacts("u", names.CONTROL_VECTOR)[0]["base_model_sha256"] == model_sha256(tiny_model)
        store.finish_job(job["id"], names.FAILED, reason="cancelled")
        with pytest.raises(StaleError):  # the job no longer runs: its user's registration refuses
            logo.logo_job(store, "u", engine, job["id"])


def test_invariant_a_forgotten_user_does_not_stop_the_refresh_of_the_users_after_them(tiny_model, tmp_path, monkeypatch):
    from localpers.store.store import NotFoundError, Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home") as store:
        for user, text in (("u", "I mostly listen to jazz."), ("v", "My hobby is chess."), ("w", "Tennis at dawn.")):
            store.add(user, text)
        register = store.register_artifact

        def v_is_gone(user, *args, **kw):
            if user == "v":
                raise NotFoundError("unknown user 'v'")
            return register(user, *args, **kw)

        monkeypatch.setattr(store, "register_artifact", v_is_gone)
        logo.refresh_knowledge(store, model_path=tiny_model, steer=False, min_size=1)
        assert [len(store.artifacts(u, names.CONTROL_VECTOR)) for u in ("u", "v", "w")] == [1, 0, 1]


def test_invariant_a_later_refresh_leaves_the_synced_knowledge_and_its_community_files_untouched(
        tiny_model, tmp_path, monkeypatch):
    """Knowledge from a sync run gets its community files once (for the served model's architecture); a later
    refresh rewrites neither them nor the knowledge file (a served request may be reading them)."""
    from localpers.store.store import Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    synced = logo.advance(None, [sig(np.eye(V)[i % 2], counts_of("Jazz"), steering=np.full((2, 64), 1.0))
                                 for i in range(8)], k=2, min_size=1)
    synced.meta.update(source=logo.SYNC_SOURCE, embedder=None)
    folder = tmp_path / "home" / names.LOGO
    synced.save(folder / logo.KNOWLEDGE_FILE)
    with Store.open(tmp_path / "home") as store:
        store.add("u", "I mostly listen to jazz.")
        logo.refresh_knowledge(store, model_path=tiny_model, steer=False)
        files = [folder / logo.KNOWLEDGE_FILE, *sorted(folder.glob("community-*.gguf"))]
        assert len(files) == 3 and all(control_vector_arch(f) == "llama" for f in files[1:])
        for f in files:
            os.utime(f, ns=(7, 7))
        logo.refresh_knowledge(store, model_path=tiny_model, steer=False)
        assert [os.stat(f).st_mtime_ns for f in files] == [7, 7, 7]
        assert len(store.artifacts("u", names.CONTROL_VECTOR)) == 1


def test_invariant_a_later_round_weighs_the_carried_sums_by_the_half_life_decay_while_it_iterates():
    """Worlds (2-D, half-life 1 round: the carried sums weigh 0.5) where weighing them 1.5 or 0.25 during the
    Lloyd iterations ends in other memberships: the round's contributors must end in the community whose final
    (decayed) centroid is nearest."""
    for seed in (4, 23, 38):
        rng = np.random.default_rng(seed)
        first = logo.advance(None, [sig(v) for v in rng.standard_normal((12, 2))], k=2, seed=seed)
        sigs = [sig(v) for v in rng.standard_normal((12, 2)) + [1.0, 0]]
        new = logo.advance(first, sigs, half_life=1.0, iterations=100)
        members = new.sums.count - first.sums.count * 0.5
        nearest = np.bincount([logo.assign(s.vector, new.centroids) for s in sigs], minlength=2)
        np.testing.assert_allclose(members, nearest, atol=1e-9, err_msg=f"seed {seed}")


def test_invariant_random_assignment_draws_anew_each_round():
    """The ablation's communities are drawn per round (seeded by seed + round): the same 30 contributors in two
    rounds are not dealt the same communities."""
    sigs = [sig(v) for v in np.random.default_rng(0).standard_normal((30, 3))]
    first = logo.advance(None, sigs, k=3, random_assignment=True, seed=3)
    second = logo.advance(first, sigs, random_assignment=True, seed=3, half_life=math.inf)
    assert not np.array_equal(second.sums.count - first.sums.count, first.sums.count)
    again = logo.advance(first, sigs, random_assignment=True, seed=3, half_life=math.inf)
    np.testing.assert_array_equal(again.sums.count, second.sums.count)  # and reproducibly


def test_invariant_a_community_nobody_joined_in_the_first_round_keeps_its_start_centroid():
    """Five users with the same vector and k=2: k-means++ starts both communities on that vector, all five join
    the first, and the second keeps its start (a unit vector a later user can be assigned to), never zeros."""
    same = [sig([1.0, 2.0, 2.0]) for _ in range(5)]
    k = logo.advance(None, same, k=2)
    assert sorted(k.sizes.tolist()) == [0.0, 5.0]
    np.testing.assert_allclose(k.centroids, [same[0].vector, same[0].vector], rtol=1e-6)


def test_invariant_kmeans_plus_plus_weighs_by_squared_distance_however_close_the_vectors():
    """Four distinct vectors within 0.05 of each other (squared distances summing well below 1): a picked
    vector is at distance 0, so k-means++ never picks it again, for any seed."""
    near = logo.unit(np.array([[1.0, 0.00], [1.0, 0.02], [1.0, 0.04], [1.0, 0.06]], np.float32))
    for seed in range(20):
        picked = logo.init_centroids(near, 3, seed=seed)
        assert len({tuple(row) for row in picked}) == 3, seed


def test_invariant_unit_normalizes_short_vectors_too():
    """A decayed community's summed vector can be shorter than 1: unit() still scales it to length 1."""
    np.testing.assert_allclose(logo.unit(np.array([[0.3, 0.4], [0.03, 0.04]])), [[0.6, 0.8], [0.6, 0.8]], rtol=1e-6)
