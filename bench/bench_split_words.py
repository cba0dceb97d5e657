"""Cost of the multilingual BM25 splitter (localpers.store.retrieval.split_words) against bm25s' default regex, on the
shipped development data's texts (UPQA statements, PrefEval preferences, PrefEval's distractor chats).

    PYTHONPATH=. python bench/bench_split_words.py
"""
from __future__ import annotations

import json
import re
import time

from localpers.personalize.datasets import data_path
from localpers.store.retrieval import split_words


def best_seconds(func, texts, rounds=5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for text in texts:
            func(text)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    chats = json.loads(data_path("inter_turns").read_text())
    texts = [i["input_attribute"] for i in json.loads(data_path("upqa").read_text())]
    texts += [i["preference"] for i in json.loads(data_path("prefeval_dev_70").read_text())]
    texts += [turn["content"] for chat in chats for turn in chat["conversation"]]
    texts = [t.lower() for t in texts]
    regex = re.compile(r"(?u)\b\w\w+\b").findall
    print("| texts | chars | bm25s regex | split_words |\n|---|---|---|---|")
    for name, subset in (("ASCII", [t for t in texts if t.isascii()]), ("non-ASCII", [t for t in texts if not t.isascii()])):
        chars = sum(map(len, subset))
        a, b = best_seconds(regex, subset), best_seconds(split_words, subset)
        print(f"| {name}: {len(subset)} | {chars:,} | {chars / a / 1e6:.1f} M chars/s | {chars / b / 1e6:.1f} M chars/s |")


if __name__ == "__main__":
    main()
