"""Cold prompt processing and decode through the engine against llama-cpp-python called directly (issue 32).

    PYTHONPATH=. python3 bench/bench_prompt.py [--sizes 256 1024 3000] [--rounds 3] [--decode 64] [--engine-batch N]

Both sides run in this one process on the default model with the same threads (n_threads=1, n_threads_batch=2 on
2 cores: llama-cpp-python's defaults, which the engine keeps) and the same n_ctx; the direct side uses
llama-cpp-python's default n_batch. Runs alternate engine / direct within each round, so the machine's load
affects both alike. Time to first token: a fresh prompt of N tokens (no cached prefix: both contexts and the
engine's KV-state cache are emptied first), one token generated; through Engine.complete (tokenized chat prompt,
sampling, the KV-state cache's bookkeeping) and through Llama.create_completion on the same tokens. Decode:
--decode greedy tokens after a 32-token prompt, tokens/s. Prints the medians and their ratios. --engine-batch
runs the engine with another prompt chunk size (64 is the schedule before issue 32), for the trade-off figures."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import llama_cpp

from localpers.engine import engine as engine_module
from localpers.engine.engine import Engine, Sampling


def text_of(n_words: int) -> str:
    words = ("the river runs past old mills and quiet farms where people grow apples pears and barley while "
             "children read maps of distant mountains").split()
    return " ".join(words[(i * 7) % len(words)] + ("." if i % 13 == 12 else "") for i in range(n_words))


def messages_of(engine, n_tokens: int, salt: int) -> list[dict]:
    """A one-message chat whose prompt is n_tokens long (give or take two), distinct per salt from its start."""
    lo, hi = 1, 4 * n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        m = [{"role": "user", "content": f"Request {salt}: " + text_of(mid)}]
        try:
            fits = len(engine.chat_tokens(m)) <= n_tokens
        except engine_module.ContextOverflow:  # the search's upper end can pass n_ctx
            fits = False
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return [{"role": "user", "content": f"Request {salt}: " + text_of(lo)}]


def cold_engine(engine, messages) -> float:
    engine.kv_cache.clear()
    engine.kv_cache.invalidate()
    engine.llm.reset()
    engine.llm._ctx.kv_cache_clear()
    start = time.perf_counter()
    engine.complete(messages, sampling=Sampling(max_tokens=1, temperature=0.0))
    return time.perf_counter() - start


def cold_direct(llm, tokens) -> float:
    llm.reset()
    llm._ctx.kv_cache_clear()
    start = time.perf_counter()
    llm.create_completion(tokens, max_tokens=1, temperature=0.0)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 3000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--engine-batch", type=int, default=None, help="the engine's N_BATCH (and KV block) instead")
    args = parser.parse_args(argv)
    if args.engine_batch:
        engine_module.N_BATCH = engine_module.KV_BLOCK = args.engine_batch
    engine = Engine(n_ctx=args.n_ctx)
    llm = llama_cpp.Llama(str(engine.model_path), n_ctx=args.n_ctx, n_threads=engine.llm.n_threads,
                          n_threads_batch=engine.llm.n_threads_batch, verbose=False)
    print(f"threads {engine.llm.n_threads}/{engine.llm.n_threads_batch}, engine n_batch {engine.llm.n_batch}, "
          f"direct n_batch {llm.n_batch}, load {os.getloadavg()[0]:.1f}")
    for n in args.sizes:
        times = {"engine": [], "direct": []}
        for r in range(args.rounds):
            messages = messages_of(engine, n, r)
            tokens = engine.chat_tokens(messages)
            times["engine"].append(cold_engine(engine, messages))
            times["direct"].append(cold_direct(llm, tokens))
        e, d = statistics.median(times["engine"]), statistics.median(times["direct"])
        print(f"cold TTFT, {len(tokens)}-token prompt: engine {e:.3f} s, direct {d:.3f} s, {e / d:.3f}x "
              f"(engine {[round(t, 3) for t in times['engine']]}, direct {[round(t, 3) for t in times['direct']]}); "
              f"load {os.getloadavg()[0]:.1f}")
    short = messages_of(engine, 32, 99)
    tokens = engine.chat_tokens(short)
    rates = {"engine": [], "direct": [], "engine stream": [], "direct stream": []}
    for r in range(args.rounds):
        # End to end (prompt, sampling, the KV-state cache's bookkeeping included) ...
        start = time.perf_counter()
        out = engine.complete(short, sampling=Sampling(max_tokens=args.decode, temperature=0.0))
        rates["engine"].append(out["completion_tokens"] / (time.perf_counter() - start))
        start = time.perf_counter()
        out = llm.create_completion(tokens, max_tokens=args.decode, temperature=0.0)
        rates["direct"].append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
        # ... and the generation rate alone (llama-server's predicted_per_second): tokens between the first
        # streamed piece and the last, over that time.
        stamps = []
        out = engine.complete(short, sampling=Sampling(max_tokens=args.decode, temperature=0.0),
                              on_delta=lambda i, piece, *rest: stamps.append(time.perf_counter()))
        rates["engine stream"].append((out["completion_tokens"] - 1) / (stamps[-1] - stamps[0]))
        stamps = [time.perf_counter() for _ in llm.create_completion(tokens, max_tokens=args.decode,
                                                                         temperature=0.0, stream=True)]
        rates["direct stream"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    for kind in ("", " stream"):
        e, d = statistics.median(rates["engine" + kind]), statistics.median(rates["direct" + kind])
        what = "end to end" if not kind else "first to last token"
        print(f"decode after a {len(tokens)}-token prompt, {what}: engine {e:.1f} tokens/s, direct {d:.1f} "
              f"tokens/s, {e / d:.3f}x (engine {[round(x, 1) for x in rates['engine' + kind]]}, direct "
              f"{[round(x, 1) for x in rates['direct' + kind]]}); load {os.getloadavg()[0]:.1f}")
    llm.close()
    engine.close()


if __name__ == "__main__":
    main()
