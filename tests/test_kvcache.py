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
    tiny = KVCache(cached.llm, max_bytes=1)   # enabled, but no state fits
    tiny.valid = cached.kv_cache.valid       # the context's cells the engine's own cache may reuse
    tiny.stash(("k",))
    assert len(tiny) == 0 and tiny.nbytes == 0
    bounded = KVCache(cached.llm, max_bytes=1 << 40)
    for i in range(4):   # four different conversations of one size, room for two
        cached.chat([{"role": "user", "content": f"Conversation {i}. " + STORY}], max_tokens=1, temperature=0)
        bounded.valid = cached.kv_cache.valid
        bounded.stash(("k",))
        if i == 0:
            bounded.max_bytes = int(2.5 * bounded.nbytes)
    assert len(bounded) == 2 and bounded.nbytes <= bounded.max_bytes
    kept = sorted(cached.detokenize(list(tokens)) for _, tokens in bounded._states)
    assert ["Conversation 2" in kept[0], "Conversation 3" in kept[1]] == [True, True]   # the oldest went first
    assert all(len(tokens) % cached.kv_cache.block == 0 for _, tokens in bounded._states)   # aligned prefixes only


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
