"""Latency of learning from one chat message (localpers.serve.learn.learn_from_chat: the store write, the fact
detection and the facts index, in one transaction) for a user holding 0, 1,000 and 10,000 stored preferences,
and of one message of 4,095 statements. Target (issue 24): learning with 10,000 stored preferences <= 1.2x the
empty user's latency.

    python3 bench/bench_learn.py [--sizes 0,1000,10000] [--repeat 60]

Each stored preference is a learned fact (one "I love thingN." a message, stored through the same path). A
measured message states a new home ("I'm vegetarian and I live in CityR.": one fact held, one replaced), so
every run replaces a fact, deletes the old one and queues the edit job, as a real update does. The figure is
the median over --repeat runs, the sizes interleaved run by run (a shared machine's load drifts alike for
each); the stores live in temporary folders. Also printed: reading the served user for the default composition
(served_user with Composer().needs_preferences of a question about the user: the default reads no stored preference), which the chat request
runs before learning."""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

from localpers.serve.compose import Composer, served_user
from localpers.serve.learn import learn_from_chat
from localpers.store.store import Store

SHA = "0" * 64


def fill(store: Store, user: str, n: int) -> None:
    for start in range(0, n, 1000):
        learn_from_chat(store, user, [{"role": "user", "content": f"I love thing{i}."}
                                      for i in range(start, min(n, start + 1000))])
    if n:
        assert len(store.facts(user)) == n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000", help="stored preferences (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=60, help="runs per size (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    with contextlib.ExitStack() as stack:
        stores = {}
        for n in sizes:
            store = stack.enter_context(Store.open(stack.enter_context(tempfile.TemporaryDirectory())))
            fill(store, "user", n)
            learn_from_chat(store, "user", [{"role": "user", "content": "I'm vegetarian and I live in City."}])
            stores[n] = store
        learn, compose = {n: [] for n in sizes}, {n: [] for n in sizes}
        for r in range(args.repeat):  # sizes interleaved: a shared machine's load drifts alike for each
            for n, store in stores.items():
                start = time.perf_counter()
                learn_from_chat(store, "user", [{"role": "user", "content": f"I'm vegetarian and I live in City{r}."}])
                learn[n].append(time.perf_counter() - start)
                start = time.perf_counter()
                served_user(store, "user", SHA, preferences=Composer().needs_preferences("Where do I live?"))
                compose[n].append(time.perf_counter() - start)
    base = 1000 * statistics.median(learn[sizes[0]])
    print(f"{'stored':>7} {'learn ms':>9} {'x first':>8} {'served_user ms':>15}")
    for n in sizes:
        ms = 1000 * statistics.median(learn[n])
        print(f"{n:>7} {ms:>9.2f} {ms / base:>8.2f} {1000 * statistics.median(compose[n]):>15.3f}")
    with tempfile.TemporaryDirectory() as tmp, Store.open(tmp) as store:
        message = " ".join(f"I love x{i}." for i in range(4095))
        start = time.perf_counter()
        learned = learn_from_chat(store, "big", [{"role": "user", "content": message}])
        print(f"one message of 4,095 statements: {1000 * (time.perf_counter() - start):.1f} ms, "
              f"{len(learned['facts'])} facts learned (names.MAX_FACTS_PER_MESSAGE)")


if __name__ == "__main__":
    main()
