"""The store's edges that store.py's every-mutant run found untested (issue 28; docs/history/mutation/
localpers.store.store.survivors.txt): a full disk told by SQLite's error code, the queue position of each job, the
limit a learning pass hands the detector, a retired artifact's files, routes' meta, a change's marks, facts'
fields, forget's second removal and scratch folders. (Cases tests/test_store.py already held were folded into it.)"""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from localpers import names
from localpers.errors import UserError
from localpers.store.store import Store, disk_full

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


def test_invariant_each_queued_job_lists_its_own_place_in_the_queue(store):
    store.add("ann", "hello")
    store.add("bob", "hello")
    first = store.queue_job("ann", "edit")["id"]
    store.queue_job("bob", "edit")
    second = store.queue_job("ann", "train")["id"]
    places = {j["id"]: j["position"] for j in store.jobs("ann")}
    assert places == {first: 1, second: 3}   # round-robin: bob's job comes between ann's two
    assert places == {j: store.queue_positions()[j] for j in places}


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


def test_invariant_forget_sweeps_the_users_scratch_folders_only(store):
    store.add("ann", "hello")
    store.add("bob", "hello")
    with store.temp_dir("ann") as ann_tmp, store.temp_dir("bob") as bob_tmp:
        store.forget("ann")
        assert not Path(ann_tmp).exists() and Path(bob_tmp).exists()
