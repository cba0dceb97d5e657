"""Retrieval: the incremental BM25 index against bm25s as the reference, catching up with the database
without rebuilds, dense and hybrid search."""
import json
import random
import re
import sqlite3

import bm25s
import numpy as np
import pytest

from localpers.personalize.datasets import data_path
from localpers.errors import UserError
from localpers.store.retrieval import BM25Index, GGUFEmbedder, MiniLMEmbedder, fuse, split_words, top_k
from localpers.store.store import DB_FILE, Store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path) as store:
        yield store


def real_texts() -> list[str]:
    upqa = json.loads(data_path("upqa").read_text())
    prefeval = json.loads(data_path("prefeval_dev_70").read_text())
    return [i["input_attribute"] for i in upqa] + [f"{i['preference']} {i['explanation']}" for i in prefeval]


def reference_scores(index: BM25Index, texts: dict[int, str], query: str) -> dict[int, float]:
    """bm25s (method="lucene"), built from scratch on the same tokens, scores every document."""
    ids = sorted(texts)
    corpus = [[str(t) for t in index.query_tokens(texts[i])] for i in ids]
    reference = bm25s.BM25(method="lucene", k1=index.k1, b=index.b)
    reference.index(corpus, show_progress=False)
    known = [str(t) for t in index.query_tokens(query) if str(t) in reference.vocab_dict]
    if not known:
        return {}
    scores = reference.get_scores(known)
    return {item_id: float(s) for item_id, s in zip(ids, scores) if s > 0}


def test_bm25_matches_bm25s_through_inserts_and_deletes():
    rng = random.Random(0)
    texts = dict(enumerate(real_texts(), start=1))
    queries = ["What's my hobby?", "Do I like spicy food or seafood?", "which movies should I watch",
               "I prefer vegan vegetarian meals", "travel travel flights"]
    index, held, compared = BM25Index(), {}, 0
    for item_id, text in texts.items():
        index.add(item_id, text)
        held[item_id] = text
        if item_id % 7 == 0:  # delete now and then, including just-added items
            gone = rng.choice(sorted(held))
            index.remove(gone)
            del held[gone]
        if item_id in (1, 40, 170):  # compare at a few sizes, with the statistics still moving
            for query in queries:
                ours, ref = index.scores(query), reference_scores(index, held, query)
                assert ours.keys() == ref.keys()
                np.testing.assert_allclose([ours[i] for i in ref], list(ref.values()), rtol=1e-5)
                compared += len(ref)
    assert compared > 50  # the queries did match documents
    assert len(index) == len(held) and index.total_length == sum(len(index.query_tokens(t)) for t in held.values())
    ranked = index.search("I prefer vegan vegetarian meals", 3)
    assert ranked == sorted(ranked, key=lambda pair: -pair[1]) and len(ranked) == 3


def test_split_words_equals_bm25s_default_splitter_on_ascii_text():
    """On ASCII text the words are bm25s' own (its default regex), so Latin scores stay bm25s' scores."""
    bm25s_default = re.compile(r"(?u)\b\w\w+\b").findall
    for text in real_texts()[:120] + ["a I x2 under_score 3.14 e-mail: bob@example.com", "   ", "don't"]:
        assert split_words(text.lower()) == bm25s_default(text.lower())


# (history item, query that must find it, a query that must not) in scripts written without spaces and others
SCRIPTS = [
    ("我喜欢吃素食和水果", "素食", "肉"),                                  # Chinese: a word inside a run of Han
    ("我有一只猫", "猫", "狗"),                                            # a one-character word
    ("私は毎朝緑茶を飲みます", "緑茶", "コーヒー"),                          # Japanese: Han + Hiragana
    ("週末はサッカーをします", "サッカー", "テニス"),                          # Katakana
    ("저는 매일 아침 커피를 마셔요", "커피", "녹차"),                          # Korean: a noun with its particle
    ("ฉันชอบกินข้าวผัดทุกวัน", "ข้าวผัด", "ก๋วยเตี๋ยว"),                     # Thai: no spaces, combining vowels
    ("Je préfère le café noir sans sucre", "cafe", "the"),                # accents fold: café = cafe
    ("Ich wohne in München und fahre gern Fahrrad", "münchen", "berlin"),
    ("मुझे हिन्दी संगीत पसंद है", "संगीत", "खाना"),                           # Devanagari: matras are in words
]


@pytest.mark.parametrize("text, query, other", SCRIPTS, ids=[s[1] for s in SCRIPTS])
def test_words_are_searchable_in_every_script(store, text, query, other):
    noise = ["I like jazz and long walks.", "我住在北京。", "東京に住んでいます。", "서울에 살아요.", "ฉันอยู่กรุงเทพ"]
    ids = [store.add("alice", t) for t in noise]
    wanted = store.add("alice", text)
    assert [r["id"] for r in store.search("alice", query, k=3)][:1] == [wanted]
    assert wanted not in [r["id"] for r in store.search("alice", other, k=10)]
    assert store.search("alice", text, k=1)[0]["id"] == wanted  # the whole text finds itself
    assert len(ids) == 5


def test_cjk_bigrams_rank_the_exact_word_first():
    """Unigrams make one-character words findable; the bigram of a two-character word ranks the item that
    holds the word above items that merely share its characters."""
    index = BM25Index()
    index.add(1, "素菜和食物")   # both characters of 素食, apart
    index.add(2, "我喜欢吃素食")  # the word itself
    assert [i for i, _ in index.search("素食", 2)] == [2, 1]
    assert split_words("ｆｕｌｌ　ｗｉｄｔｈ ﾃﾆｽ") == ["full", "width", "テ", "ニ", "ス", "テニ", "ニス"]  # NFKC


def test_stemming_and_stopwords():
    index = BM25Index()
    index.add(1, "I like to dance at the club.")
    index.add(2, "I love my cat.")
    assert [i for i, _ in index.search("dancing in clubs", 5)] == [1]
    assert index.search("the and of", 5) == []  # stopwords only: nothing matches


def test_search_catches_up_without_rebuilding(store, monkeypatch):
    """Each write is indexed once, when the next search comes; the index is never rebuilt."""
    for i in range(300):
        store.add("alice", f"note {i} about gardening and tomatoes")
    adds = []
    original_add = BM25Index.add
    monkeypatch.setattr(BM25Index, "add", lambda self, item_id, text: adds.append(item_id) or original_add(self, item_id, text))
    assert len(store.search("alice", "tomatoes", k=500)) == 300
    index = store._bm25[1]
    assert len(adds) == 300

    new_id = store.add("alice", "I adopted a border collie named Pixel")
    results = store.search("alice", "collie", k=5)
    assert [r["id"] for r in results] == [new_id] and results[0]["text"].startswith("I adopted")
    assert store._bm25[1] is index and adds[300:] == [new_id]  # one add, no rebuild

    store.delete_item("alice", new_id)
    assert store.search("alice", "collie") == []
    assert len(adds) == 301


def test_search_sees_another_process_writes_and_deletes(store, tmp_path):
    store.add("alice", "I drink green tea every morning")
    assert len(store.search("alice", "tea")) == 1
    with Store.open(tmp_path) as other:  # a second store on the same files, as `localpers remember` would be
        coffee = other.add("alice", "I switched to black coffee")
        tea = other.items("alice")[0]["id"]
        other.delete_item("alice", tea)
    assert [r["id"] for r in store.search("alice", "tea coffee")] == [coffee]


def test_search_input_errors(store):
    store.add("alice", "something")
    for query, kwargs, message in [("", {}, "query is empty"), ("x", {"k": 0}, "k must be"),
                                   ("x", {"mode": "magic"}, "unknown search mode")]:
        with pytest.raises(UserError, match=message):
            store.search("alice", query, **kwargs)


def test_fuse_is_reciprocal_rank_fusion():
    bm25 = [(1, 9.0), (2, 5.0), (3, 1.0)]
    dense = [(3, 0.9), (1, 0.8)]
    fused = dict(fuse([bm25, dense], k=3))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 62)
    assert [i for i, _ in fuse([bm25, dense], k=3)] == [1, 3, 2]


class HashingEmbedder:
    """A small deterministic bag-of-words embedder: lets the dense plumbing (lazy embedding, encrypted
    vectors, catch-up, fusion) be tested without a model; the real embedders are tested below."""

    name = "hashing-test"

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += len(texts)
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, sum(word.encode()) % 64] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_dense_and_hybrid_with_stored_vectors(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    embedder = HashingEmbedder()
    with Store.open(tmp_path, embedder=embedder) as store:
        ids = [store.add("alice", t) for t in ["red apples", "green pears", "blue sky today", "apples and pears"]]
        assert store.search("alice", "red apples", mode="dense")[0]["id"] == ids[0]
        assert embedder.calls == 4 + 1  # every item once, then the query
        hybrid = store.search("alice", "apples", k=4, mode="hybrid")
        assert {r["id"] for r in hybrid[:2]} == {ids[0], ids[3]}
        assert embedder.calls == 4 + 2  # vectors are stored: only the query is embedded again
        late = store.add("alice", "sky sky sky")
        store.delete_item("alice", ids[2])
        results = store.search("alice", "sky sky sky", k=3, mode="dense")
        assert results[0]["id"] == late and ids[2] not in [r["id"] for r in results]
        assert store.export("alice")["vectors"] == {"hashing-test": 4}
    with Store.open(tmp_path, embedder=HashingEmbedder()) as reopened:  # vectors persist, encrypted
        assert reopened.search("alice", "red apples", mode="dense")[0]["id"] == ids[0]
        assert reopened.embedder.calls == 1
        reopened.forget("alice")
    conn = sqlite3.connect(tmp_path / DB_FILE)
    assert conn.execute("SELECT count(*) FROM vectors").fetchone() == (0,)  # forget takes the vectors too
    conn.close()


def test_minilm_dense_search_finds_paraphrases(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path, embedder=MiniLMEmbedder()) as store:
        for text in ["I like to dance at the club.", "I do not like chips.", "My dog is named Rex.",
                     "I work as a nurse at the city hospital."]:
            store.add("alice", text)
        # no word in common with the answer: BM25 cannot find it, MiniLM can
        assert store.search("alice", "What's my job?", k=1, mode="bm25") == []
        assert store.search("alice", "What's my job?", k=1, mode="dense")[0]["text"].startswith("I work as a nurse")


def test_gguf_embedder(default_model_path):
    embedder = GGUFEmbedder(default_model_path)
    vectors = embedder.embed(["I like to dance at the club.", "I like to dance at the club.", "Quarterly tax report"])
    assert vectors.shape[0] == 3 and vectors.shape[1] >= 64
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)  # deterministic
    assert vectors[0] @ vectors[2] < 0.999


def test_gguf_embedder_through_store_search_and_the_cli(tmp_path, monkeypatch, default_model_path, capsys):
    """`localpers search --mode dense|hybrid --embedder MODEL.gguf`: the real GGUFEmbedder through Store.search."""
    import json

    from localpers.cli.cli import main

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    texts = ["I like to dance at the club.", "Quarterly tax report for the bakery", "My dog is named Rex."]
    with Store.open(tmp_path, embedder=GGUFEmbedder(default_model_path)) as store:
        ids = [store.add("alice", t) for t in texts]
        for mode in ("dense", "hybrid"):
            found = store.search("alice", "Quarterly tax report for the bakery", k=3, mode=mode)
            assert [r["id"] for r in found][0] == ids[1] and len(found) == 3
        assert store.export("alice")["vectors"] == {f"gguf:{default_model_path.name}": 3}
    argv = ["search", "--user", "alice", "--data-dir", str(tmp_path), "--mode", "dense", "--embedder",
            str(default_model_path), "--json", "-k", "1", "My dog is named Rex."]
    assert main(argv) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [ids[2]]


def test_top_k_breaks_ties_towards_recent_items():
    ids = np.array([5, 9, 7, 3, 8])
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    assert top_k(ids, scores, 2) == [(9, 2.0), (7, 2.0)]
    assert top_k(ids, scores, 10) == [(9, 2.0), (7, 2.0), (3, 2.0), (5, 1.0), (8, 0.5)]
