"""The assistant loop, measured on the default model over real HTTP (`localpers serve`'s app under uvicorn):

1. statement -> adapter: the time from a chat request saying "I'm vegetarian." to the answer of the first request
   served with the edit adapter made from it (the jobs endpoint polled meanwhile; the worker warm: its editor
   loaded at start, as `serve` does);
2. chat latency: p50/p95 of a short chat (16 tokens, greedy) with the worker idle, and while an edit job runs.

    python3 bench/bench_loop.py [--requests 20] [--out bench_loop.json]

Memory and the loop as `localpers serve` runs it (a server process; RSS summed over it and every process it
started, from /proc):

    python3 bench/bench_loop.py memory [--after-s 60] [--burn]   # RSS idle, during an edit job, after it;
                                                                  # statement -> adapter served, cold and warm
    python3 bench/bench_loop.py adapters [--users 1000] [--rounds 2]  # RSS after users with adapters, round-robin

--burn keeps one core busy with a CPU burner process while it measures.
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
from pathlib import Path

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


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, in MB (from /proc)."""
    import subprocess

    pids = [str(pid)]
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children = {}
    for child, parent in zip(out[::2], out[1::2]):
        children.setdefault(parent, []).append(child)
    total, queue = 0, [str(pid)]
    while queue:
        p = queue.pop()
        queue += children.get(p, [])
        try:
            total += int(open(f"/proc/{p}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            pass
    return total / 2**20


def burner():
    """A process that keeps one core busy until killed."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    proc.start()
    return proc


def _spin():
    while True:
        pass


def start_server(home: str, port: int):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "localpers", "serve", "--port", str(port), "--data-dir", home],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    while True:
        try:
            if client.get("/health").status_code == 200:
                return proc, client
        except httpx.TransportError:
            time.sleep(0.2)


def wait_job(client, user, poll_s=0.2) -> dict:
    while True:
        jobs = client.get(f"/v1/users/{user}/jobs").json()["data"]
        if jobs and jobs[0]["state"] in (names.DONE, names.FAILED):
            return jobs[0]
        time.sleep(poll_s)


def statement_to_adapter(client, user: str, statement: str, question: str, on_poll=None) -> tuple[float, dict]:
    start = time.perf_counter()
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": statement}], "user": user,
                                              "max_tokens": 8, "temperature": 0})
    while True:
        jobs = client.get(f"/v1/users/{user}/jobs").json()["data"]
        if jobs and jobs[0]["state"] in (names.DONE, names.FAILED):
            break
        if on_poll:
            on_poll()
        time.sleep(0.2)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}], "user": user,
                                                  "max_tokens": 16, "temperature": 0,
                                                  "localpers": {"explain": True, "history": False}}).json()
    return time.perf_counter() - start, {"job": jobs[0], "served": r["localpers"]["artifacts"],
                                         "answer": r["choices"][0]["message"]["content"]}


def cmd_memory(args):
    """RSS of `localpers serve` (and its job process) idle, during an edit job and after it; statement ->
    adapter served with the job process cold (started by the job) and warm (a second job right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    burn = burner() if args.burn else None
    proc, client = start_server(tempfile.mkdtemp(prefix="bench-loop-"), port)
    result = {"burn": bool(burn), "load_before": os.getloadavg()}
    try:
        client.post("/v1/chat/completions", json=SHORT)
        time.sleep(2)
        result["rss_idle_mb"] = round(tree_rss_mb(proc.pid))
        peak = [0.0]

        def sample():
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))

        cold_s, cold = statement_to_adapter(client, "vera", "I'm vegetarian.", "What is my diet?", sample)
        warm_s, warm = statement_to_adapter(client, "wren", "I live in Lyon.", "Where do I live?", sample)
        result["rss_during_job_peak_mb"] = round(peak[0])
        result["statement_to_adapter_cold_s"] = round(cold_s, 1)
        result["statement_to_adapter_warm_s"] = round(warm_s, 1)
        result["cold"], result["warm"] = cold, warm
        after, start = [], time.monotonic()
        while time.monotonic() - start < args.after_s:
            time.sleep(5)
            after.append((round(time.monotonic() - start), round(tree_rss_mb(proc.pid))))
        result["rss_after_job_mb"] = after
        result["ratio_after_to_idle"] = round(after[-1][1] / result["rss_idle_mb"], 2)
        result["load_after"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(30)
        if burn:
            burn.kill()
    print(json.dumps(result, indent=1))
    return result


def cmd_adapters(args):
    """RSS of a `localpers serve` after `--users` users, each with an edit-sized adapter (rank 1 on one ffn_down,
    as an edit job writes for one fact), served round-robin twice."""
    import numpy as np

    from localpers.engine.engine import model_sha256
    from localpers.model.gguf_write import write_lora
    from localpers.store.store import Store
    from localpers import default_model_path
    from localpers.model.gguf_info import open_gguf

    home = tempfile.mkdtemp(prefix="bench-adapters-")
    model = default_model_path()
    reader = open_gguf(model)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    d_ff = int(reader.fields[f"{arch}.feed_forward_length"].parts[-1][0])
    d = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    sha = model_sha256(model)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-files-"))
    with Store.open(home) as store:
        for i in range(args.users):
            user = f"user{i}"
            item = store.add(user, "I like tea.", kind=names.PREFERENCE)
            path = write_lora(work / f"{i}.gguf", arch, {"blk.6.ffn_down": (rng.normal(0, 0.01, (1, d_ff)),
                                                                          rng.normal(0, 0.01, (d, 1)))}, alpha=1)
            store.register_artifact(user, names.LORA, path, sha, {"method": names.EDIT, "sources": [item]})
        for job in [j for u in store.users() for j in store.jobs(u)]:
            store.finish_job(job["id"], names.DONE)  # the adapters are there: no job to run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, client = start_server(home, port)
    result = {"users": args.users, "adapter_bytes": (work / "0.gguf").stat().st_size}
    try:
        client.post("/v1/chat/completions", json=SHORT)
        result["rss_idle_mb"] = round(tree_rss_mb(proc.pid))
        start = time.perf_counter()
        for rnd in range(args.rounds):
            for i in range(args.users):
                r = client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "user": f"user{i}", "max_tokens": 1,
                    "temperature": 0, "localpers": {"history": False, "explain": True}})
                assert r.status_code == 200 and r.json()["localpers"]["artifacts"], r.text
                if (i + 1) % 100 == 0:  # progress, in case the run is cut short
                    print(f"round {rnd + 1}, {i + 1} users: {tree_rss_mb(proc.pid):.0f} MB", flush=True)
            result[f"rss_after_round_{rnd + 1}_mb"] = round(tree_rss_mb(proc.pid))
        result["requests_per_s"] = round(args.rounds * args.users / (time.perf_counter() - start), 1)
        result["load"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(result, indent=1))
    return result


def main():
    import sys

    if len(sys.argv) > 1 and sys.argv[1] in ("memory", "adapters"):
        parser = argparse.ArgumentParser()
        parser.add_argument("command")
        parser.add_argument("--after-s", type=float, default=60)
        parser.add_argument("--burn", action="store_true")
        parser.add_argument("--users", type=int, default=1000)
        parser.add_argument("--rounds", type=int, default=2)
        args = parser.parse_args()
        {"memory": cmd_memory, "adapters": cmd_adapters}[args.command](args)
        return
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
