"""llama.cpp decode throughput on the default model: no adapter, a rank-8 LoRA on all 30 ffn_down, a control vector.

Decode = one token per llama_decode call on top of a 32-token prompt, as in generation; the same 128 fixed tokens
for every case (throughput does not depend on which tokens are decoded). Run:
    python -m pytest bench/bench_engine.py -s --benchmark-columns=mean,stddev,rounds
Tokens/s (and the ratio to no adapter) are printed (-s) and kept in each benchmark's extra_info.
"""
import time

import numpy as np
import pytest

from localpers.engine.engine import Artifacts, Engine
from localpers.model.gguf_write import write_control_vector, write_lora

N_DECODE = 128
RESULTS = {}


@pytest.fixture(scope="module", params=[1, 2], ids=["1thread", "2threads"])
def engine(request):
    """Decode on 1 thread (the engine's default on 2 cores: half of them) and on 2."""
    return Engine(n_ctx=512, n_threads=request.param)


@pytest.fixture(scope="module")
def artifacts(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    rng = np.random.default_rng(0)
    d_ff = 1536
    lora = write_lora(folder / "rank8.gguf", "llama", {
        f"blk.{il}.ffn_down": (rng.normal(0, d_ff ** -0.5, (8, d_ff)), rng.normal(0, 0.02, (engine.n_embd, 8)))
        for il in range(engine.n_layer)}, alpha=8)
    cvec = write_control_vector(folder / "cvec.gguf", {il: rng.normal(0, 0.05, engine.n_embd)
                                                       for il in range(1, engine.n_layer)}, "llama")
    return {"none": Artifacts(), "lora_r8_all_ffn_down": Artifacts(lora=((str(lora), 1.0),)),
            "control_vector": Artifacts(control_vectors=((str(cvec), 1.0),))}


def decode(engine, prompt, tokens):
    llm = engine.llm
    llm.reset()
    llm.eval(prompt)
    for token in tokens:
        llm.eval([token])


@pytest.mark.parametrize("case", ["none", "lora_r8_all_ffn_down", "control_vector"])
def test_decode_tokens_per_second(benchmark, engine, artifacts, case):
    text = "The history of the city begins with a small fishing village on the river. " * 12
    ids = engine.tokenize(text)
    prompt, tokens = ids[:32], ids[32:32 + N_DECODE]
    with engine._lock, engine._held(artifacts[case]) as pinned:
        engine._activate(pinned)
    benchmark.pedantic(decode, args=(engine, prompt, tokens), rounds=5, warmup_rounds=1)
    # Subtract the prompt's share, measured separately, so the figure is decode alone.
    start = time.perf_counter()
    for _ in range(5):
        engine.llm.reset()
        engine.llm.eval(prompt)
    prompt_s = (time.perf_counter() - start) / 5
    tokens_per_s = N_DECODE / (benchmark.stats.stats.mean - prompt_s)
    benchmark.extra_info["decode_tokens_per_s"] = round(tokens_per_s, 1)
    threads = engine.llm.n_threads
    RESULTS[threads, case] = tokens_per_s
    ratio = f" = {tokens_per_s / RESULTS[threads, 'none']:.2f}x no adapter" if (threads, "none") in RESULTS else ""
    print(f"\n{threads} thread(s), {case}: {tokens_per_s:.1f} decode tokens/s{ratio}")
