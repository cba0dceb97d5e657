"""The assistant loop, measured on the default model over real HTTP (`localpers serve`'s app under uvicorn):

1. statement -> adapter: the time from a chat request saying "I'm vegetarian." to the answer of the first request
   served with the edit adapter made from it (the jobs endpoint polled meanwhile; the worker warm: its editor
   loaded at start, as `serve` does);
2. chat latency: p50/p95 of a short chat (16 tokens, greedy) with the worker idle, and while an edit job runs.

    python3 bench/bench_loop.py [--requests 20] [--out bench_loop.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time

import httpx
import uvicorn

from localpers import names
from localpers.engine.engine import Engine
from localpers.serve.server import create_app

SHORT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 16, "temperature": 0,
         "user": "bench", "localpers": {"history": False}}


def p95(values):
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def chat_latencies(client, n: int, while_=lambda: True) -> list[float]:
    out = []
    for _ in range(n):
        if not while_():
            break
        start = time.perf_counter()
        assert client.post("/v1/chat/completions", json=SHORT).status_code == 200
        out.append(time.perf_counter() - start)
    return out


def job_state(client, user):
    jobs = client.get(f"/v1/users/{user}/jobs").json()["data"]
    return jobs[0]["state"] if jobs else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="bench-loop-")
    app = create_app(engine=Engine(n_ctx=1024), data_dir=home, jobs=True, warm_jobs=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    result = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        t = time.perf_counter()
        app.state.worker.ready.wait()
        result["warm_up_s"] = round(time.perf_counter() - t, 1)
        chat_latencies(client, 2)  # warm the engine
        idle = chat_latencies(client, args.requests)

        # 1. statement -> adapter served
        question = {"messages": [{"role": "user", "content": "What is my diet?"}], "user": "vera", "max_tokens": 16,
                    "temperature": 0, "localpers": {"explain": True, "history": False}}
        start = time.perf_counter()
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "I'm vegetarian."}],
                                                   "user": "vera", "max_tokens": 16, "temperature": 0})
        while job_state(client, "vera") not in (names.DONE, names.FAILED):  # polling chat would slow the job
            time.sleep(0.1)
        r = client.post("/v1/chat/completions", json=question).json()
        assert r["localpers"]["artifacts"], r
        result["statement_to_adapter_s"] = round(time.perf_counter() - start, 1)
        result["answer"] = r["choices"][0]["message"]["content"]
        result["job"] = client.get("/v1/users/vera/jobs").json()["data"][0]

        # 2. chat latency while an edit job runs (a second preference: a fresh edit job)
        client.post("/v1/users/wren/memories", json={"text": "I live in Lyon.", "kind": names.PREFERENCE})
        while job_state(client, "wren") != names.RUNNING:
            time.sleep(0.05)
        busy = chat_latencies(client, args.requests, lambda: job_state(client, "wren") == names.RUNNING)
    server.should_exit = True
    result["idle"] = {"n": len(idle), "p50_s": round(statistics.median(idle), 3), "p95_s": round(p95(idle), 3)}
    result["during_edit"] = {"n": len(busy), "p50_s": round(statistics.median(busy), 3), "p95_s": round(p95(busy), 3)}
    result["p95_ratio"] = round(result["during_edit"]["p95_s"] / result["idle"]["p95_s"], 2)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    os._exit(0)  # the second edit job may still run in its daemon thread: do not finalize torch under it


if __name__ == "__main__":
    main()
