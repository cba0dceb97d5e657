"""What the update rules of issue 25's learning loop cost on the write path: learn_from_chat of one message after
"I love jazz music.", for a plain like ("I love rock."), a like stated as a change ("Actually I prefer rock now.":
its kind's forms looked up in the facts index) and a retirement said another way ("I don't like rock anymore."),
30 users each, median milliseconds (detection included). No model.

    PYTHONPATH=. python bench/experiments/learn_change_cost.py"""
import statistics
import tempfile
import time

from localpers.serve.learn import learn_from_chat
from localpers.store.store import Store

CASES = [("plain like", "I love rock."), ("change", "Actually I prefer rock now."),
         ("retirement", "I don't like rock anymore.")]


def main(users: int = 30) -> None:
    with tempfile.TemporaryDirectory() as folder, Store.open(folder) as store:
        for label, text in CASES:
            took = []
            for i in range(users):
                user = f"{label.split()[0]}{i}"
                learn_from_chat(store, user, [{"role": "user", "content": "I love jazz music."}])
                start = time.perf_counter()
                learn_from_chat(store, user, [{"role": "user", "content": text}])
                took.append(time.perf_counter() - start)
            print(f"{label:10s} median {statistics.median(took) * 1000:.1f} ms (min {min(took) * 1000:.1f})")


if __name__ == "__main__":
    main()
