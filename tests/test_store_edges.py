"""The store's edges that store.py's every-mutant run found untested (issue 28; docs/history/mutation/
localpers.store.store.every.txt): a full disk told by SQLite's error code, a live process, the queue position of
each job, kept responses at their bounds, the limit a learning pass hands the detector, a retired artifact's files,
the broken mark of a folder artifact, and the artifact folders' permissions."""
from __future__ import annotations

import errno
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from localpers import names
from localpers.errors import UserError
from localpers.store.store import Store, disk_full, pid_alive

SHA = "b" * 64


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "home") as store:
        yield store


def test_invariant_a_full_disk_is_told_by_sqlites_error_code_whatever_the_message():
    full = sqlite3.OperationalError("some other wording")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert disk_full(full)
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert not disk_full(locked)
    assert disk_full(sqlite3.OperationalError("database or disk is full"))   # a build without error codes
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))


def test_invariant_pid_alive_tells_a_running_process_from_a_gone_one():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)     # another process, alive: signal 0 reaches it
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)     # and only asks: the process was sent no signal that ends it
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)     # reaped: no such process
    assert pid_alive(1)                 # another user's process (PermissionError) or init: alive


def test_invariant_each_queued_job_lists_its_own_place_in_the_queue(store):
    store.add("ann", "hello")
    store.add("bob", "hello")
    first = store.queue_job("ann", "edit")["id"]
    store.queue_job("bob", "edit")
    second = store.queue_job("ann", "train")["id"]
    places = {j["id"]: j["position"] for j in store.jobs("ann")}
    assert places == {first: 1, second: 3}   # round-robin: bob's job comes between ann's two
    assert places == {j: store.queue_positions()[j] for j in places}


def test_invariant_kept_responses_refuse_a_non_string_id_and_keep_none_at_zero(store):
    for bad in (7, None, ""):
        with pytest.raises(UserError, match="response id must be a non-empty string"):
            store.keep_response("ann", bad, [{"role": "user", "content": "hi"}])
    store.keep_response("ann", "r1", [{"role": "user", "content": "café ☕"}])
    assert store.response_conversation("ann", "r1") == [{"role": "user", "content": "café ☕"}]
    store.keep_response("ann", "r2", [{"role": "user", "content": "hi"}], keep=0)
    assert store.response_conversation("ann", "r1") is None and store.response_conversation("ann", "r2") is None
    store.keep_response("ann", "r3", [{"role": "user", "content": "hi"}], keep=-5)   # below zero: as zero
    assert store.response_conversation("ann", "r3") is None


def test_invariant_learning_hands_the_detector_its_limit(store):
    seen = []

    def extract(text, limit, previous):
        seen.append(limit)
        return []

    store.learn_text("ann", "I live in Oslo.", extract, 3)
    store.learn_texts("ann", ["I live in Oslo.", "I love jazz."], extract, 2)
    store.learn_text("ann", "I'm vegan.", extract)
    assert seen == [3, 2, 2, names.MAX_FACTS_PER_MESSAGE]


def test_invariant_a_fact_replaced_by_a_learned_text_deletes_its_artifacts_files(store, tmp_path):
    from localpers.personalize.detect import detect_facts

    store.learn_text("ann", "I live in Oslo.", detect_facts)
    [pref] = store.items("ann", kind=names.PREFERENCE)
    adapter = tmp_path / "edit.gguf"
    adapter.write_bytes(b"lora")
    store.register_artifact("ann", names.LORA, adapter, SHA, {"method": names.EDIT, "sources": [pref["id"]]})
    [registered] = store.artifacts("ann", names.LORA)
    assert Path(registered["path"]).is_file()
    store.learn_texts("ann", ["I moved to Paris."], detect_facts)   # replaces the home fact: its edit goes
    assert store.artifacts("ann", names.LORA) == []
    assert not Path(registered["path"]).exists()


def test_invariant_a_broken_file_marks_only_the_folder_artifact_that_holds_it(store, tmp_path):
    store.add("ann", "hello")
    folder = tmp_path / "routes"
    folder.mkdir()
    (folder / "fact-a.gguf").write_bytes(b"a")
    store.register_artifact("ann", names.LORA_ROUTES, folder, SHA, {"method": names.EDIT, "routes": [
        {"file": "fact-a.gguf", "words": "a"}]})
    single = tmp_path / "single.gguf"
    single.write_bytes(b"s")
    store.register_artifact("ann", names.LORA, single, SHA, {"method": names.CE})
    kinds = {a["kind"]: a for a in store.artifacts("ann")}
    routes_path, lora_path = Path(kinds[names.LORA_ROUTES]["path"]), Path(kinds[names.LORA]["path"])
    assert store.mark_artifact_broken("ann", lora_path, "bad lora") == 1        # the file artifact only
    assert store.mark_artifact_broken("ann", tmp_path / "elsewhere" / "fact-a.gguf", "x") == 0
    assert store.mark_artifact_broken("ann", routes_path / "fact-a.gguf", "bad route") == 1
    broken = {a["kind"]: a["meta"].get("broken") for a in store.artifacts("ann")}
    assert broken == {names.LORA_ROUTES: "bad route", names.LORA: "bad lora"}


def test_invariant_artifact_folders_are_private_to_the_owner(store, tmp_path):
    old = os.umask(0o022)
    try:
        path = store.artifact_dir("ann")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_invariant_read_routes_refuses_an_empty_file_name_and_keeps_only_string_fact_ids():
    from localpers.store.store import read_routes

    assert read_routes({"routes": [{"file": "", "words": "a"}]}) is None     # "" would name the folder itself
    [route] = read_routes({"routes": [{"file": "fact-a.gguf", "words": "a", "fact": 5, "source": "7"}]})
    assert route == {"file": "fact-a.gguf", "words": "a", "fact": None, "source": None}
    [route] = read_routes({"routes": [{"file": "fact-a.gguf", "words": "a", "fact": "f1", "source": 7}]})
    assert route == {"file": "fact-a.gguf", "words": "a", "fact": "f1", "source": 7}


def test_invariant_a_like_stated_as_a_change_marks_every_message_it_supersedes(store):
    from localpers.personalize.detect import detect_facts

    store.learn_chat("ann", [{"role": "user", "content": "I love jazz music. My sister is a doctor."}], detect_facts)
    store.learn_chat("ann", [{"role": "user", "content": "I love pop."}], detect_facts)
    store.learn_chat("ann", [{"role": "user", "content": "Actually I prefer rock now."}], detect_facts)
    assert [f["value"] for f in store.facts("ann")] == ["rock"]
    marked = [i["text"] for i in store.items("ann", kind="message") if names.SUPERSEDED_BY in i["meta"]]
    assert marked == ["I love jazz music. My sister is a doctor.", "I love pop."]   # both, in one statement


def test_invariant_facts_lists_each_preferences_attribute_value_and_message(store):
    from localpers.personalize.detect import detect_facts

    store.learn_chat("ann", [{"role": "user", "content": "I live in Lyon."}], detect_facts)
    store.add("ann", "I like to dance at the club.", kind=names.PREFERENCE,
              meta={"attribute_type": ["hobby", "leisure activity"]})        # UPQA cluster9: the canonical is last
    store.add("ann", "I avoid fragrances.", kind=names.PREFERENCE, meta={"attribute_type": []})
    store.add("ann", "I'm into sailing.", kind=names.PREFERENCE, meta={"attribute_type": 5})
    [message] = store.items("ann", kind="message")
    home, club, fragrances, sailing = store.facts("ann")
    assert (home["attribute"], home["value"], home["statement"], home["message"]) == (
        "home", "Lyon", "I live in Lyon.", message["id"])
    assert (club["attribute"], club["value"], club["message"]) == ("leisure activity", "I like to dance at the club.", None)
    assert (fragrances["attribute"], fragrances["value"]) == (None, "I avoid fragrances.")
    assert sailing["attribute"] is None and all(f["status"] == "current" for f in store.facts("ann"))


def test_invariant_a_text_learned_by_hand_is_sourced_remember(store):
    from localpers.personalize.detect import detect_facts

    store.learn_text("ann", "I'm vegan.", detect_facts)
    store.learn_texts("ann", ["I live in Oslo."], detect_facts)
    assert [p["meta"]["source"] for p in store.items("ann", kind=names.PREFERENCE)] == ["remember", "remember"]


def test_invariant_forget_drops_the_users_in_memory_indexes(store):
    """Forget deletes everything held about the user: also the decrypted search index the process keeps in
    memory (row ids are never reused, so a stale index would not be served, but it would hold the text)."""
    store.add("ann", "my bank pin is 4321")
    store.add("bob", "I like gardening")
    assert store.search("ann", "bank pin") and store.search("bob", "gardening")   # both users' indexes built
    with store._read() as conn:
        ann, bob = (store._user_id(conn, u) for u in ("ann", "bob"))
    store._dense[(ann, "stand-in")] = object()
    store._dense[(bob, "stand-in")] = object()
    store.forget("ann")
    assert ann not in store._bm25 and bob in store._bm25
    assert [key[0] for key in store._dense] == [bob]
    assert all("4321" not in hit["text"] for hit in store.search("bob", "bank pin", k=5))


def test_invariant_forget_removes_the_artifact_folder_and_tells_the_listeners_of_each_file(store, tmp_path):
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"lora")
    store.add("ann", "hello")
    store.register_artifact("ann", names.LORA, adapter, SHA, {"method": names.CE})
    [registered] = [a["path"] for a in store.artifacts("ann")]
    folder = store.artifact_dir("ann")
    (folder / "scratch").mkdir()
    (folder / "scratch" / "late.bin").write_bytes(b"x")     # a file a job wrote meanwhile
    told = []

    def retired(path):   # a job registering a file while forget runs: the second removal takes it
        told.append(path)
        if len(told) == 1:
            folder.mkdir(exist_ok=True)
            (folder / "registered-meanwhile.gguf").write_bytes(b"y")

    store.on_retire.append(retired)
    store.forget("ann")
    assert not folder.exists()
    assert sorted(p.relative_to(folder.resolve()).as_posix() for p in told) == [
        f"{Path(registered).name}", "registered-meanwhile.gguf", "scratch/late.bin"]


def test_invariant_a_process_another_user_owns_counts_as_alive(monkeypatch):
    def refused(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    assert pid_alive(os.getpid() + 100000)


def test_invariant_an_imported_preference_takes_the_last_of_its_attribute_types(store):
    store.add("ann", "I like to dance at the club.", kind=names.PREFERENCE,
              meta={"attribute_type": ["leisure", "hobby", "leisure activity"]})
    assert [f["attribute"] for f in store.facts("ann")] == ["leisure activity"]


def test_invariant_one_job_shows_its_queue_place_while_queued_only(store):
    store.add("ann", "hello")
    first, second = (store.queue_job("ann", kind)["id"] for kind in ("edit", "train"))
    assert (store.job(first)["position"], store.job(second)["position"]) == (1, 2)
    claimed = store.claim_job()
    assert claimed["id"] == first and store.job(first)["position"] is None
    assert store.job(second)["position"] == 1


def test_invariant_an_artifacts_meta_is_checked_and_a_cancelled_jobs_artifact_never_registered(store, tmp_path):
    from localpers.store.store import StaleError

    store.add("ann", "hello")
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"lora")
    for sources in ([True], "3", [1, "2"]):
        with pytest.raises(UserError, match=r'meta\["sources"\] must be a list of item ids'):
            store.register_artifact("ann", names.LORA, adapter, SHA, {"method": names.EDIT, "sources": sources})
    with pytest.raises(UserError, match=r'meta\["method"\] must be a method name'):
        store.register_artifact("ann", names.LORA, adapter, SHA, {"method": 5})
    job = store.queue_job("ann", "edit")["id"]
    store.forget("ann")
    store.add("ann", "hello")          # the job's user is gone: a job id of another (or no) user is stale
    with pytest.raises(StaleError):
        store.register_artifact("ann", names.LORA, adapter, SHA, {"method": names.EDIT}, job=job)
    assert store.artifacts("ann") == []
    running = store.queue_job("ann", "edit")["id"]
    assert store.claim_job()["id"] == running
    store.register_artifact("ann", names.LORA, adapter, SHA, {"method": names.EDIT}, job=running)   # its own job
    assert len(store.artifacts("ann")) == 1


def test_invariant_a_lamp_review_is_stored_as_a_review(tmp_path):
    import json

    from localpers.store.store import read_import

    for fields in ({"reviewText": "Great phone."}, {"text": "Great phone.", "overall": 5},
                   {"text": "Great phone.", "score": 4}):
        path = tmp_path / "lamp.json"
        path.write_text(json.dumps([{"id": "u1", "profile": [fields, {"text": "A paper on graphs."}]}]))
        review, document = read_import(path)
        assert (review[0], document[0]) == ("review", "document"), fields


def test_invariant_forget_sweeps_the_users_scratch_folders_only(store):
    store.add("ann", "hello")
    store.add("bob", "hello")
    with store.temp_dir("ann") as ann_tmp, store.temp_dir("bob") as bob_tmp:
        store.forget("ann")
        assert not Path(ann_tmp).exists() and Path(bob_tmp).exists()
