"""The engine: per-request adapters and control vectors on the real default model, KV cache never reused
across a change of artifacts, rewritten adapter files reloaded, and scoring consistent with generation."""
import os

import numpy as np
import pytest

from localpers.engine.engine import Artifacts, Engine
from localpers.errors import UserError
from localpers.model.gguf_write import write_control_vector, write_lora

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def engine():
    return Engine(n_ctx=512, n_threads=2)


def random_ffn_down_lora(path, engine, rank=8, seed=0, strength=1.0):
    """A rank-`rank` adapter on every ffn_down, strong enough to change greedy outputs."""
    rng = np.random.default_rng(seed)
    d_ff = 1536
    factors = {
        f"blk.{il}.ffn_down": (rng.normal(0, 1 / np.sqrt(d_ff), (rank, d_ff)),
                               rng.normal(0, strength, (engine.n_embd, rank)))
        for il in range(engine.n_layer)
    }
    return write_lora(path, "llama", factors, alpha=rank)


def reply(engine, artifacts=Artifacts(), max_tokens=16):
    return engine.chat(PROMPT, artifacts=artifacts, max_tokens=max_tokens, temperature=0)["choices"][0]["message"]["content"]


def test_adapter_changes_output_and_cache_never_mixes(engine, tmp_path):
    adapter = str(random_ffn_down_lora(tmp_path / "a.gguf", engine))
    scratch = reply(engine)
    with_adapter = reply(engine, Artifacts(lora=((adapter, 1.0),)))
    assert with_adapter != scratch
    # Asked again, a prompt resumes from the KV state its own artifacts left (aligned to the batch size, so the
    # reply is byte-identical to the one an empty cache gives), never from another artifact set's.
    assert reply(engine) == scratch
    assert reply(engine, Artifacts(lora=((adapter, 1.0),))) == with_adapter
    # A zero scale is the base model (and a change of scale is a change of artifacts: nothing cached under it).
    assert reply(engine, Artifacts(lora=((adapter, 0.0),))) == scratch


def test_scores_follow_adapters(engine, tmp_path):
    adapter = str(random_ffn_down_lora(tmp_path / "a.gguf", engine, seed=1))
    tokens = engine.tokenize(engine.format_chat(PROMPT))
    base = engine.logits(tokens)
    adapted = engine.logits(tokens, artifacts=Artifacts(lora=((adapter, 1.0),)))
    assert np.abs(adapted - base).max() > 1.0
    np.testing.assert_array_equal(engine.logits(tokens), base)


def test_rewritten_adapter_is_reloaded(engine, tmp_path):
    path = tmp_path / "user.gguf"
    random_ffn_down_lora(path, engine, seed=2)
    first = reply(engine, Artifacts(lora=((str(path), 1.0),)))
    random_ffn_down_lora(path, engine, seed=3)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    second = reply(engine, Artifacts(lora=((str(path), 1.0),)))
    fresh = Engine(n_ctx=512, n_threads=2)
    assert second == reply(fresh, Artifacts(lora=((str(path), 1.0),)))
    assert first != second


def test_control_vector(engine, tmp_path):
    zero = write_control_vector(tmp_path / "zero.gguf", {il: np.zeros(engine.n_embd) for il in range(1, 30)}, "llama")
    rng = np.random.default_rng(0)
    strong = write_control_vector(tmp_path / "strong.gguf", {il: rng.normal(0, 2.0, engine.n_embd) for il in range(5, 25)},
                                  "llama")
    tokens = engine.tokenize(engine.format_chat(PROMPT))
    base = engine.logits(tokens)
    np.testing.assert_allclose(engine.logits(tokens, artifacts=Artifacts(control_vectors=((str(zero), 1.0),))), base, atol=1e-4)
    steered = engine.logits(tokens, artifacts=Artifacts(control_vectors=((str(strong), 1.0),)))
    assert np.abs(steered - base).max() > 1.0
    halved = engine.logits(tokens, artifacts=Artifacts(control_vectors=((str(strong), 0.0),)))
    np.testing.assert_allclose(halved, base, atol=1e-4)
    assert reply(engine, Artifacts(control_vectors=((str(strong), 1.0),))) != reply(engine)


def test_control_vectors_are_summed_with_their_scales(engine, tmp_path):
    rng = np.random.default_rng(1)
    a = {il: rng.normal(0, 0.3, engine.n_embd).astype(np.float32) for il in range(3, 20)}
    b = {il: rng.normal(0, 0.3, engine.n_embd).astype(np.float32) for il in range(10, 28)}
    zero = np.zeros(engine.n_embd, np.float32)
    both = {il: np.float32(0.5) * a.get(il, zero) + np.float32(2.0) * b.get(il, zero) for il in range(3, 28)}
    pa, pb = write_control_vector(tmp_path / "a.gguf", a, "llama"), write_control_vector(tmp_path / "b.gguf", b, "llama")
    pboth = write_control_vector(tmp_path / "both.gguf", both, "llama")
    tokens = engine.tokenize(engine.format_chat(PROMPT))
    summed = engine.logits(tokens, artifacts=Artifacts(control_vectors=((str(pa), 0.5), (str(pb), 2.0))))
    np.testing.assert_allclose(summed, engine.logits(tokens, artifacts=Artifacts(control_vectors=((str(pboth), 1.0),))),
                               atol=1e-3)
    assert np.abs(summed - engine.logits(tokens, artifacts=Artifacts(control_vectors=((str(pa), 0.5),)))).max() > 0.1


def test_continuation_logprob_matches_logits(engine):
    prompt = engine.format_chat([{"role": "user", "content": "What is the capital of France?"}])
    continuation = "The capital of France is Paris."
    p_ids, c_ids = engine.tokenize(prompt), engine.tokenize(continuation, add_bos=False)
    logits = engine.logits(p_ids + c_ids).astype(np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    expected = sum(logprobs[len(p_ids) - 1 + i, t] for i, t in enumerate(c_ids))
    assert engine.continuation_logprob(prompt, continuation) == pytest.approx(expected, abs=1e-3)
    assert engine.continuation_logprob(prompt, " Paris") > engine.continuation_logprob(prompt, " Tokyo")


def test_bad_artifacts_are_user_errors(engine, tmp_path, default_model_path):
    with pytest.raises(UserError, match="no such file"):
        reply(engine, Artifacts(lora=((str(tmp_path / "missing.gguf"), 1.0),)))
    with pytest.raises(UserError, match="not a LoRA adapter"):
        reply(engine, Artifacts(lora=((str(default_model_path), 1.0),)))
    wrong = write_control_vector(tmp_path / "wrong.gguf", {3: np.ones(64)}, "llama")
    with pytest.raises(UserError, match="does not fit"):
        reply(engine, Artifacts(control_vectors=((str(wrong), 1.0),)))
    assert reply(engine)  # the engine still serves after refusing bad artifacts


def test_a_long_request_lets_a_waiting_one_through_between_its_choices(engine, tmp_path):
    """Fairness: while a request of n=3 choices holds the engine, a request that starts waiting during its first
    choice is served before the long one's second choice starts (the lock is handed over in arrival order), and
    the long one's choices are the ones it gets alone (artifacts re-activated: greedy choices are identical)."""
    import threading
    import time

    from localpers.engine.engine import Sampling

    adapter = str(random_ffn_down_lora(tmp_path / "f.gguf", engine))
    events, first_piece = [], threading.Event()

    def on_delta(i, text):
        events.append(("long", i))
        if not first_piece.is_set():  # hold choice 0 until the short request waits in line (no race)
            first_piece.set()
            deadline = time.monotonic() + 120
            while not engine._lock.waiting():
                assert time.monotonic() < deadline, "the short request never queued"
                time.sleep(0.01)

    greedy = Sampling(max_tokens=12, temperature=0.0)
    alone = engine.complete(PROMPT, artifacts=Artifacts(lora=((adapter, 1.0),)), sampling=greedy, n=1)
    result = {}
    long = threading.Thread(target=lambda: result.setdefault("long", engine.complete(
        PROMPT, artifacts=Artifacts(lora=((adapter, 1.0),)), sampling=greedy, n=3, on_delta=on_delta)))
    long.start()
    assert first_piece.wait(120)
    short = threading.Thread(target=lambda: (engine.complete(PROMPT, sampling=Sampling(max_tokens=2)),
                                             events.append(("short", "done"))))
    short.start()
    long.join(300)
    short.join(300)
    assert ("short", "done") in events
    done_at = events.index(("short", "done"))
    assert all(i == 0 for who, i in events[:done_at] if who == "long"), events  # served before choice 1 began
    assert [c["text"] for c in result["long"]["choices"]] == [alone["choices"][0]["text"]] * 3


def test_invariant_loaded_adapters_stay_within_their_bound_and_a_retired_one_lives_while_held(engine, tmp_path):
    """The engine's adapters are an LRU within adapter_cache_bytes; an adapter retired (its file deleted) while a
    request holds it still serves that request, leaves the LRU at once and is freed when the request ends."""
    paths = [str(random_ffn_down_lora(tmp_path / f"{i}.gguf", engine, seed=i)) for i in range(4)]
    size = os.path.getsize(paths[0])
    bound, engine.adapter_cache_bytes = engine.adapter_cache_bytes, 2 * size
    try:
        replies = [reply(engine, Artifacts(lora=((p, 1.0),)), max_tokens=4) for p in paths]
        stats = engine.adapter_stats()
        assert stats["cached"] == 2 and stats["bytes"] <= 2 * size and stats["pinned"] == 0
        pinned, broken = engine.pin(Artifacts(lora=((paths[0], 1.0),)))
        assert broken == [] and engine.adapter_stats()["pinned"] == 1
        [(_, entry, _)] = pinned.loras
        os.unlink(paths[0])
        engine.retire_file(paths[0])
        assert entry.handle is not None and not entry.cached
        assert reply(engine, pinned, max_tokens=4) == replies[0]  # served as composed, file gone
        pinned.release()
        assert entry.handle is None and engine.adapter_stats()["pinned"] == 0
        assert engine.pin(Artifacts(lora=((paths[0], 1.0),)))[1]  # a new request: not served any more
    finally:
        engine.adapter_cache_bytes = bound
