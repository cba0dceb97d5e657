"""History-store benchmarks: write latency, and BM25 search latency with 10k items for one user.

    python bench/bench_store.py                          # p50/p95 table (add --items, --queries)
    python -m pytest bench/bench_store.py --benchmark-only

Targets (issue 4): write p95 <= 5 ms and search p95 <= 50 ms on a 2-core machine. Items are 1-3 real
sentences from the shipped development data, localpers/data (UPQA, PrefEval and its distractor chats); queries are the benchmarks'
questions. Beside the store's figures, the table gives what one rebuild of a bm25s index over the same
10k items costs in the same run: the price a write would pay if the index were rebuilt per write."""
from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time

import bm25s
import numpy as np

from localpers.personalize.datasets import DATA_DIR
from localpers.store.retrieval import make_tokenizer
from localpers.store.store import Store

SHARED = DATA_DIR  # the development data shipped in localpers/data


def sentences_and_questions() -> tuple[list[str], list[str]]:
    upqa = json.loads((SHARED / "upqa" / "upqa_dev_100.json").read_text())
    prefeval = json.loads((SHARED / "prefeval" / "prefeval_dev_70.json").read_text())
    chats = json.loads((SHARED / "prefeval" / "inter_turns.json").read_text())
    texts = [i["input_attribute"] for i in upqa] + [f"{i['preference']} {i['explanation']}" for i in prefeval]
    texts += [turn["content"][:2000] for chat in chats for turn in chat["conversation"]]
    sentences = [s for text in texts for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]
    questions = [i[field] for i in upqa for field in ("question", "question_paraphrased", "implicit_question")]
    return sentences, questions + [i["question"] for i in prefeval]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences, _ = sentences_and_questions()
    return [" ".join(rng.sample(sentences, rng.randint(1, 3))) for _ in range(n)]


def ms_percentiles(seconds: list[float]) -> str:
    p50, p95 = np.percentile(np.array(seconds) * 1e3, [50, 95])
    return f"p50 {p50:7.3f} ms   p95 {p95:7.3f} ms"


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(n_items: int, n_queries: int) -> None:
    texts = corpus(n_items + n_queries)
    _, questions = sentences_and_questions()
    queries = [questions[i % len(questions)] for i in range(n_queries)]
    with tempfile.TemporaryDirectory() as directory, Store.open(directory) as store:
        writes = [timed(store.add, "bench", text) for text in texts[:n_items]]
        cold = timed(store.search, "bench", queries[0])  # decrypts and indexes all items, once per process
        searches = [timed(store.search, "bench", q) for q in queries]
        after_write = []  # each search first indexes the item written just before it
        for text, query in zip(texts[n_items:], queries):
            store.add("bench", text)
            after_write.append(timed(store.search, "bench", query))
    tokenizer = make_tokenizer()
    tokens = [[str(t) for t in tokenizer.streaming_tokenize([text], allow_empty=False).__next__()] for text in texts]
    rebuild = timed(lambda: bm25s.BM25(method="lucene").index(tokens[:n_items], show_progress=False))

    print(f"history store, one user, {n_items} items (AES-GCM, SQLite WAL, synchronous=NORMAL)")
    print(f"  write (store.add), all {n_items} writes      {ms_percentiles(writes)}")
    print(f"  BM25 search at {n_items}, warm, k=5          {ms_percentiles(searches)}")
    print(f"  BM25 search right after a write         {ms_percentiles(after_write)}")
    print(f"  first search in a process (index load)  {cold * 1e3:9.1f} ms")
    print(f"  one bm25s rebuild over {n_items} items     {rebuild * 1e3:9.1f} ms  (the cost per write of rebuilding)")


def test_write_latency(benchmark, tmp_path):
    texts = iter(corpus(3000))
    with Store.open(tmp_path) as store:
        benchmark.pedantic(lambda: store.add("bench", next(texts)), rounds=3000, iterations=1)


def test_search_latency_10k(benchmark, tmp_path):
    from localpers.store.store import check_item

    _, questions = sentences_and_questions()
    queries = iter(questions * 10)
    with Store.open(tmp_path) as store:
        store.add_many("bench", [check_item(text) for text in corpus(10_000)])
        store.search("bench", "warm up")
        benchmark.pedantic(lambda: store.search("bench", next(queries)), rounds=500, iterations=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    run(args.items, args.queries)
