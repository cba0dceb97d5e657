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
