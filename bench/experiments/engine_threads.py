"""Prompt and generation throughput of the engine on 1 and 2 threads, each twice, default model:

    python bench/experiments/engine_threads.py

A 700-token prompt decoded in batches, then 96 tokens generated greedily after a 20-token prompt.
"""
import time

from localpers.engine.engine import Engine

for threads in (1, 2, 1, 2):
    engine = Engine(n_ctx=2048, n_threads=threads)
    llm = engine.llm
    ids = engine.tokenize("hello world " * 350)
    llm.reset()
    llm._ctx.kv_cache_clear()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_rate = len(ids) / (time.perf_counter() - start)
    llm.reset()
    llm._ctx.kv_cache_clear()
    start = time.perf_counter()
    out = llm.create_completion(ids[:20], max_tokens=96, temperature=0, stop=[])
    generate_rate = out["usage"]["completion_tokens"] / (time.perf_counter() - start)
    print(f"{threads} thread(s): prompt {prompt_rate:.0f} tokens/s, generation {generate_rate:.1f} tokens/s", flush=True)
    del engine
