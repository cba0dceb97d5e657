"""The composer's cost per request for a served user with a large history (no model: prompt+rag).

    PYTHONPATH=. python3 bench/bench_compose.py [--items 5000] [--requests 5]

served_user reads the user's preferences and registry rows; `rag` searches the store's incremental BM25 index,
which is built on the first search and then only catches up with new items.
"""
import argparse
import random
import tempfile
import time

from localpers.serve.compose import Composer, served_user
from localpers.store.store import Store, check_item

WORDS = ("the a jazz dinner club music pasta hiking mountain book read cook lyon paris movie horror film run swim "
         "code python garden").split()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    with Store.open(tempfile.mkdtemp(prefix="bench-compose-")) as store:
        store.add_many("u", [check_item(" ".join(rng.choice(WORDS) for _ in range(30))) for _ in range(args.items)])
        composer = Composer("prompt+rag")
        for i in range(args.requests):
            start = time.perf_counter()
            composer(served_user(store, "u", "0" * 64), "jazz dinner in lyon", None)
            print(f"request {i + 1}: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
