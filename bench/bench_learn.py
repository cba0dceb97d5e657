"""Latency of learning from one chat message (localpers.serve.learn.learn_from_chat: the store write, the fact
detection and the facts index, all in one transaction) for a user holding 0, 1,000 and 10,000 stored
preferences, and of one message of 4,095 statements. Target (issue 24): learning with 10,000 stored preferences
<= 1.2x the empty user's latency.

    python3 bench/bench_learn.py [--sizes 0,1000,10000] [--repeat 30]

Each stored preference is a learned fact (one "I love thingN." a message, stored through the same path). A
measured message states a new home ("I'm vegetarian and I live in CityR.": one fact held, one replaced),
so every run replaces a fact, deletes the old one and queues the edit job, as a real update does. The figure is
the median over --repeat runs; the store lives in a temporary folder. Also printed: reading the served user for
the default composition (served_user with Composer().needs_preferences: edit+rag reads no stored preference),
which the chat request runs before learning."""
from __future__ import annotations

import argparse
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


def median_ms(fn, repeat: int) -> float:
    times = []
    for r in range(repeat):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000", help="stored preferences (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=30, help="runs per size (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"{'stored':>7} {'learn ms':>9} {'x empty':>8} {'compose ms':>11}")
    base = None
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp, Store.open(tmp) as store:
            user = f"user{n}"
            fill(store, user, n)
            say = lambda r: learn_from_chat(  # noqa: E731
                store, user, [{"role": "user", "content": f"I'm vegetarian and I live in City{r}."}])
            say(-1)  # the diet fact is held from here on; each run replaces the home
            learn = median_ms(say, args.repeat)
            compose = median_ms(lambda r: served_user(store, user, SHA, preferences=Composer().needs_preferences),
                                max(3, args.repeat // 5))
            base = learn if base is None else base
            print(f"{n:>7} {learn:>9.2f} {learn / base:>8.2f} {compose:>11.2f}")
    with tempfile.TemporaryDirectory() as tmp, Store.open(tmp) as store:
        message = " ".join(f"I love x{i}." for i in range(4095))
        start = time.perf_counter()
        learned = learn_from_chat(store, "big", [{"role": "user", "content": message}])
        print(f"one message of 4,095 statements: {1000 * (time.perf_counter() - start):.1f} ms, "
              f"{len(learned['facts'])} facts learned (names.MAX_FACTS_PER_MESSAGE)")


if __name__ == "__main__":
    main()
