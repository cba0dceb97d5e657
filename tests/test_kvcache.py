"""Per-user KV states (localpers.engine.kvcache): users taking turns resume their conversation from the RAM cache,
byte-exactly as if they had been alone, and a state is never restored under another artifact set."""
import numpy as np
import pytest

from localpers.engine.engine import Artifacts, Engine
from localpers.engine.kvcache import KVCache, common_prefix
from localpers.model.gguf_write import write_lora

STORY = ("Tell me a long story about a dragon who lives in the mountains, collects old maps and loves to eat "
         "green apples with the village children. ") * 3


def lora(path, engine, seed):
    rng = np.random.default_rng(seed)
    factors = {f"blk.{il}.ffn_down": (rng.normal(0, 1 / np.sqrt(1536), (4, 1536)), rng.normal(0, 0.3, (engine.n_embd, 4)))
               for il in range(engine.n_layer)}
    return Artifacts(lora=((str(write_lora(path, "llama", factors, alpha=4)), 1.0),))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cached = Engine(n_ctx=1024, n_threads=2)
    alone = Engine(n_ctx=1024, n_threads=2, kv_cache_bytes=0)   # the oracle: no cache, one user at a time
    tmp = tmp_path_factory.mktemp("kv")
    return cached, alone, lora(tmp / "a.gguf", cached, 0), lora(tmp / "b.gguf", cached, 1)


def reply(engine, messages, artifacts):
    return engine.chat(messages, artifacts=artifacts, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]


def turns(first: str, answer: str, follow_up: str) -> list[dict]:
    return [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
            {"role": "user", "content": follow_up}]


def test_invariant_reply_under_a_after_b_equals_a_alone(engines):
    cached, alone, a, b = engines
    first = [{"role": "user", "content": STORY}]
    a1 = reply(cached, first, a)
    reply(cached, [{"role": "user", "content": "Name three rivers in Europe. " + STORY}], b)   # user B in between
    hits = cached.kv_cache.hits
    a2 = reply(cached, turns(STORY, a1, "And then what happened?"), a)
    assert cached.kv_cache.hits == hits + 1   # A resumed from the cache instead of recomputing
    assert reply(alone, first, a) == a1
    assert reply(alone, turns(STORY, a1, "And then what happened?"), a) == a2


def test_invariant_state_never_restored_under_other_artifacts(engines):
    cached, alone, a, b = engines
    messages = [{"role": "user", "content": "Summarise this: " + STORY}]
    reply(cached, messages, a)
    reply(cached, [{"role": "user", "content": "Hello there, how are you today?"}], Artifacts())
    hits = cached.kv_cache.hits
    under_b = reply(cached, messages, b)   # same prompt, cached under A only
    assert cached.kv_cache.hits == hits
    assert under_b == reply(alone, messages, b)


def test_users_without_artifacts_alternate_from_the_cache(engines):
    cached, alone, _, _ = engines
    alice = [{"role": "user", "content": "I am Alice. " + STORY}]
    bob = [{"role": "user", "content": "I am Bob. " + STORY}]
    first = reply(cached, alice, Artifacts())
    reply(cached, bob, Artifacts())   # same (empty) artifact set, another conversation: Alice's state is stashed
    hits = cached.kv_cache.hits
    assert reply(cached, alice, Artifacts()) == first == reply(alone, alice, Artifacts())
    assert cached.kv_cache.hits == hits + 1


def test_cache_stays_within_its_bound_lru_first(engines):
    cached, _, _, _ = engines
    cached.chat([{"role": "user", "content": STORY}], max_tokens=1, temperature=0)
    tiny = KVCache(cached.llm, max_bytes=1, block=cached.kv_cache.block)   # enabled, but no state fits
    tiny.valid = cached.kv_cache.valid       # the context's cells the engine's own cache may reuse
    tiny.stash(("k",))
    assert len(tiny) == 0 and tiny.nbytes == 0
    bounded = KVCache(cached.llm, max_bytes=1 << 40, block=cached.kv_cache.block)
    for i in range(4):   # four different conversations of one size, room for two
        cached.chat([{"role": "user", "content": f"Conversation {i}. " + STORY}], max_tokens=1, temperature=0)
        bounded.valid = cached.kv_cache.valid
        bounded.stash(("k",))
        if i == 0:
            bounded.max_bytes = int(2.5 * bounded.nbytes)
    assert len(bounded) == 2 and bounded.nbytes <= bounded.max_bytes
    kept = sorted(cached.detokenize(list(tokens)) for _, tokens in bounded._states)
    assert ["Conversation 2" in kept[0], "Conversation 3" in kept[1]] == [True, True]   # the oldest went first
    for i, (_, tokens) in zip((2, 3), sorted(bounded._states, key=lambda e: cached.detokenize(list(e[1])))):
        prompt = cached.chat_tokens([{"role": "user", "content": f"Conversation {i}. " + STORY}])
        assert len(tokens) % cached.kv_cache.block == 0   # aligned prefixes of the prompt's evaluated cells only
        assert list(tokens) == prompt[:len(tokens)] and len(tokens) > len(prompt) - max(2, cached.kv_cache.block)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(np.array([7, 8]), [7, 8]) == 2


def test_a_state_that_stashing_evicts_is_not_restored(engines):
    """Regression: resuming Alice while Bob's conversation fills the context stashes Bob's first; when that
    evicts Alice's kept state (room for one), the prompt is computed again, not restored from a dropped entry
    (a KeyError before)."""
    _, alone, _, _ = engines
    engine = Engine(n_ctx=1024, n_threads=2)
    try:
        alice = [{"role": "user", "content": "I am Alice. " + STORY}]
        first = reply(engine, alice, Artifacts())
        reply(engine, [{"role": "user", "content": "I am Bob. " + STORY}], Artifacts())   # Alice is stashed
        assert len(engine.kv_cache) == 1
        engine.kv_cache.max_bytes = int(1.5 * engine.kv_cache.nbytes)   # room for one state
        assert reply(engine, alice, Artifacts()) == first == reply(alone, alice, Artifacts())
    finally:
        engine.close()


# -- the prompt schedule (issue 32): a reused prefix leaves the prompt's KV cells and last logits byte-identical --

def cold(llm, tokens):
    """KV bytes of sequence 0 and the last logits after decoding `tokens` from an empty context in n_batch chunks."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.eval(tokens)
    return snapshot(llm)


def snapshot(llm):
    import ctypes

    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    return bytes(buf[:written]), logits


def warm(llm, cache, tokens):
    """What the engine does with a prompt: resume from the context or the cache, then decode the rest (as
    Llama.generate does: from llm.n_tokens, in n_batch chunks). Returns (tokens reused, KV bytes, last logits)."""
    held = cache.resume(("key",), tokens)
    cache.evaluated(len(tokens))
    if held == 0:
        llm.reset()
    llm.eval(tokens[held:])
    return (held, *snapshot(llm))


@pytest.fixture(scope="module", params=["no adapter", "lora"])
def small_batches(request, tmp_path_factory):
    """The engine's schedule scaled down (n_batch 16 instead of engine.N_BATCH), so prompts of a few dozen tokens
    cross several chunk boundaries and end in a chunk of one; with no adapter, and with a LoRA on every ffn_down
    (its F32 matmuls take other kernels)."""
    import ctypes

    import llama_cpp

    from localpers import default_model_path
    from localpers.engine.engine import KV_BLOCK, N_BATCH, closed_at_exit

    llm = closed_at_exit(llama_cpp.Llama(str(default_model_path()), n_ctx=512, n_batch=16, n_ubatch=16,
                                         n_threads=2, n_threads_batch=2, verbose=False))
    handle = None
    if request.param == "lora":
        rng = np.random.default_rng(0)
        n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
        factors = {f"blk.{il}.ffn_down": (rng.normal(0, 1 / np.sqrt(1536), (4, 1536)), rng.normal(0, 0.3, (n_embd, 4)))
                   for il in range(n_layer)}
        path = write_lora(tmp_path_factory.mktemp("lora") / "a.gguf", "llama", factors, alpha=4)
        handle = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
        assert handle
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, handles, 1, (ctypes.c_float * 1)(1.0)) == 0
    block = 1 if KV_BLOCK == 1 else KV_BLOCK * 16 // N_BATCH
    yield llm, KVCache(llm, min_tokens=1, block=block)
    if handle:
        llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
        llama_cpp.llama_adapter_lora_free(handle)
    llm.close()


def test_invariant_reused_prefix_gives_cold_kv_bytes_and_logits(small_batches):
    """Prompts that extend, shorten and leave each other (the context's prefix, and states stashed and restored
    from the cache), with lengths on every side of a chunk boundary, including prompts whose last chunk is a
    single token: every prompt's KV bytes and last logits equal an empty context's."""
    llm, cache = small_batches
    text = STORY * 2
    a = llm.tokenize(text.encode())
    b = a[:20] + llm.tokenize(b" Something else entirely: a recipe for bread with seeds and honey.", add_bos=False) * 5
    prompts = [a[:40], a[:57], a[:49], a[:50], b[:60], a[:66], a[:65], b[:33], a[:81], a[:97], b[:70], a[:98],
               a[:100], a[:35]]
    assert len(a) >= 100 and len(b) >= 70
    reused = []
    for tokens in prompts:
        held, state, logits = warm(llm, cache, tokens)
        reused.append(held)
        cold_state, cold_logits = cold(llm, tokens)
        assert state == cold_state, (len(tokens), held)
        assert np.array_equal(logits, cold_logits), (len(tokens), held)
        # the context now holds the cold decode: the same bytes, so what the cache knows of it still holds
    assert sum(h > 0 for h in reused) >= len(prompts) // 2 and cache.hits > 0, reused
    if cache.block == 1:
        assert any(h % llm.n_batch for h in reused), reused   # reuse at boundaries other than chunk ones


def test_invariant_reused_prefix_gives_cold_reply_at_engine_batches(engines):
    """At the engine's own n_batch, with an adapter: a conversation longer than one chunk, then another user,
    then the first one's next turn reuses its prefix and replies as an empty cache does."""
    cached, alone, a, b = engines
    long_story = [{"role": "user", "content": STORY * 7}]
    assert len(cached.chat_tokens(long_story)) > cached.llm.n_batch
    first = reply(cached, long_story, a)
    reply(cached, [{"role": "user", "content": "Name three rivers in Europe."}], b)
    hits = cached.kv_cache.hits
    nxt = long_story + [{"role": "assistant", "content": first}, {"role": "user", "content": "Go on."}]
    assert reply(cached, nxt, a) == reply(alone, nxt, a)
    assert cached.kv_cache.hits == hits + 1
