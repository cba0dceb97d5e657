"""Load on `localpers serve` (the embedded model, real HTTP on loopback): C concurrent clients, 4 users (base, a
LoRA adapter, a control vector, both), streamed and plain requests alternating, every 4th streamed request
disconnecting after 2 chunks. Reports latency p50/p95 (whole reply; first content chunk for streams), completion
tokens per second over the run, and checks that every completed greedy reply is byte-identical to the same
request sent alone:

    python bench/experiments/serve_load.py [--clients 8] [--rounds 3] [--max-tokens 48] [--threads 2]
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import live_server, make_users  # noqa: E402

from localpers.engine.engine import Engine  # noqa: E402
from localpers.serve.server import create_app  # noqa: E402
from localpers.store.store import Store  # noqa: E402

PROMPTS = ["Write one sentence about the sea.", "Name three fruits.", "Give me a tip for a rainy day.",
           "What is a good name for a cat?"]


def one(url, user, prompt, stream, drop, max_tokens):
    """(reply text or None if dropped, seconds to the whole reply, seconds to the first content, tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "user": user}
    start = time.perf_counter()
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        out = r.json()
        elapsed = time.perf_counter() - start
        return out["choices"][0]["message"]["content"], elapsed, elapsed, out["usage"]["completion_tokens"]
    pieces, first, tokens = [], None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=600,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - start
                    pieces.append(c["delta"]["content"])
            if drop and len(pieces) >= 2:
                return None, time.perf_counter() - start, first, len(pieces)
    return "".join(pieces), time.perf_counter() - start, first, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    engine = Engine(n_ctx=1024, n_threads=args.threads)
    with Store.open(work / "data") as store:
        users = sorted(make_users(engine, store, work))
    requests = [(users[i % 4], PROMPTS[(i // 4) % len(PROMPTS)], i % 2 == 0, i % 8 == 4)
                for i in range(args.clients * args.rounds)]
    with live_server(create_app(engine=engine, data_dir=str(work / "data"))) as url:
        alone = {}
        for user, prompt, _, _ in requests:
            if (user, prompt) not in alone:
                alone[(user, prompt)] = one(url, user, prompt, False, False, args.max_tokens)[0]
        results, lock = [], threading.Lock()
        queue = list(requests)

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    req = queue.pop()
                out = one(url, *req, args.max_tokens)
                with lock:
                    results.append((req, out))

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    done = [(req, out) for req, out in results if out[0] is not None]
    same = sum(out[0] == alone[(req[0], req[1])] for req, out in done)
    latency = sorted(out[1] for _, out in done)
    first = sorted(out[2] for req, out in done if req[2] and out[2] is not None)
    tokens = sum(out[3] for _, out in results)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    print(f"{args.clients} clients x {args.rounds} rounds, {len(results)} requests ({len(results) - len(done)} "
          f"dropped early), max_tokens {args.max_tokens}, {args.threads} thread(s)")
    print(f"latency p50 {statistics.median(latency):.2f} s, p95 {pct(latency, 0.95):.2f} s; first content chunk "
          f"p50 {statistics.median(first):.2f} s, p95 {pct(first, 0.95):.2f} s")
    print(f"{tokens} completion tokens in {wall:.1f} s: {tokens / wall:.1f} tokens/s")
    print(f"byte-identical to the request alone: {same}/{len(done)}")
    return 0 if same == len(done) else 1


if __name__ == "__main__":
    sys.exit(main())
