"""The artifact registry, deletion that retires derived artifacts, the persistent job queue, and learning
from chat messages (store level; the served path is in test_loop.py)."""
import json
import sqlite3
from pathlib import Path

import pytest

from localpers import names
from localpers.serve.learn import learn_from_chat
from localpers.store.store import DB_FILE, NotFoundError, StaleError, Store

SHA = "a" * 64


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "home") as store:
        yield store


def _file(tmp_path, name="adapter.gguf", content=b"adapter"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_deleting_a_source_retires_its_artifacts_and_queues_the_recomputation(store, tmp_path):
    turtle = store.add("ann", "I have a pet turtle.", kind=names.PREFERENCE)
    jazz = store.add("ann", "I love jazz.", kind=names.PREFERENCE)
    edit = store.register_artifact("ann", names.LORA, _file(tmp_path), SHA, {"method": names.EDIT, "sources": [turtle, jazz]})
    other = store.register_artifact("ann", names.CONTROL_VECTOR, _file(tmp_path, "cv.gguf"), SHA,
                                    {"method": names.LOGO, "sources": [jazz]})
    edit_path = store.latest_artifact("ann", names.LORA, SHA)["path"]
    store.claim_job()  # the queued edit job starts running
    store.delete_item("ann", turtle)
    # before delete_item returned: the derived artifact is gone (row and file), the other one stays
    assert [a["id"] for a in store.artifacts("ann")] == [other]
    assert not (tmp_path / edit_path).exists()
    queued = [(j["kind"], j["state"]) for j in store.jobs("ann")]
    assert (names.EDIT, "queued") in queued
    # a registration derived from the deleted item (a job that started before) writes nothing; the job that
    # tried is superseded by the one the deletion queued (jobs: done, not failed)
    from localpers.store.store import SourcesGoneError

    with pytest.raises(SourcesGoneError):
        store.register_artifact("ann", names.LORA, _file(tmp_path), SHA, {"method": names.EDIT, "sources": [turtle]})
    assert [a["id"] for a in store.artifacts("ann")] == [other]
    assert edit not in [a["id"] for a in store.artifacts("ann")]


def test_artifact_meta_and_export_hold_ids_not_text(store, tmp_path):
    pref = store.add("ann", "I have a pet turtle.", kind=names.PREFERENCE)
    store.register_artifact("ann", names.LORA, _file(tmp_path), SHA, {"method": names.EDIT, "sources": [pref], "layer": 6})
    [artifact] = store.export("ann")["artifacts"]
    assert artifact["sources"] == [pref] and artifact["meta"] == {"method": names.EDIT, "layer": 6}
    assert "turtle" not in json.dumps(artifact)


def test_only_a_registered_artifact_is_marked_broken_and_once(store, tmp_path):
    """The server marks what it cannot load (serve.server.mark_broken): the current artifact at that path, its
    file there or not; a path retired meanwhile (replaced) marks nothing; the same reason again is no new mark."""
    store.add("ann", "hello")
    store.register_artifact("ann", names.LORA, _file(tmp_path), SHA, {"method": names.EDIT})
    old = store.latest_artifact("ann", names.LORA, SHA)["path"]
    store.register_artifact("ann", names.LORA, _file(tmp_path, "new.gguf"), SHA, {"method": names.EDIT})
    current = store.latest_artifact("ann", names.LORA, SHA)["path"]
    assert store.mark_artifact_broken("ann", old, "gone") == 0
    Path(current).unlink()  # deleted by hand while registered
    assert store.mark_artifact_broken("ann", current, "no such file") == 1
    assert store.mark_artifact_broken("ann", current, "no such file") == 0
    with Store.open(tmp_path / "home") as later:
        assert [a["meta"].get("broken") for a in later.artifacts("ann")] == ["no such file"]


def test_jobs_persist_coalesce_and_forget_cancels_them(tmp_path):
    with Store.open(tmp_path) as store:
        store.add("ann", "I love jazz.", kind=names.PREFERENCE)
        store.add("ann", "I live in Lyon.", kind=names.PREFERENCE)  # still queued: the same job
        assert [(j["kind"], j["state"]) for j in store.jobs("ann")] == [(names.EDIT, "queued")]
        job = store.claim_job()
        assert job["state"] == "running" and store.claim_job() is None
    with Store.open(tmp_path) as store:  # a restart: the job the dead process ran is queued again
        assert store.requeue_running() == 1
        job = store.claim_job()
        store.finish_job(job["id"], names.FAILED, reason="no luck")
        assert store.jobs("ann")[0] | {} == store.job(job["id"]) and store.job(job["id"])["reason"] == "no luck"
        again = store.queue_job("ann", names.EDIT)
        assert again["state"] == "queued" and again["id"] != job["id"]
        running = store.claim_job()
        store.forget("ann")
        with pytest.raises(NotFoundError):
            store.jobs("ann")
        assert store.job(running["id"]) is None
        store.finish_job(running["id"], names.DONE)  # a job finishing after forget writes nothing
        with pytest.raises((NotFoundError, StaleError)):
            store.register_artifact("ann", names.LORA, _file(tmp_path), SHA, {"method": names.EDIT}, job=running["id"])
        assert store.users() == [] and not (tmp_path / "artifacts" / "ann").exists()
        with pytest.raises(NotFoundError):
            store.queue_job("ann", names.EDIT)  # never re-creates a forgotten user


def test_chat_messages_are_stored_once_and_only_the_users(store):
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "Hello!"}]
    assert [text for _, text in store.add_chat("ann", turn1)] == ["Hello!"]
    assert store.add_chat("ann", turn1) == []  # the client resent the conversation
    assert [text for _, text in store.add_chat("ann", turn2)] == ["Hello!"]  # said again, later: a new message
    assert [i["text"] for i in store.items("ann")] == ["Hello!", "Hello!"]
    [(first, _)] = store.add_chat("ann", [{"role": "user", "content": "Delete me."}])
    store.delete_item("ann", first)
    assert store.add_chat("ann", [{"role": "user", "content": "Delete me."}]) == []  # deleted stays deleted


def test_learned_preferences_merge_and_the_later_wins(store):
    learned = learn_from_chat(store, "ann", [{"role": "user", "content": "I like horror films. What should I watch?"}])
    assert len(learned["messages"]) == 1 and len(learned["preferences"]) == 1
    assert learn_from_chat(store, "ann", [{"role": "user", "content": "i like horror films!"}])["preferences"] == []
    changed = learn_from_chat(store, "ann", [{"role": "user", "content": "I don't like horror films."}])
    assert [r["id"] for r in changed["replaced"]] == learned["preferences"]
    assert changed["facts"] == [{"id": changed["preferences"][0], "attribute": "dislikes"}]
    assert [i["text"] for i in store.items("ann", kind=names.PREFERENCE)] == ["I don't like horror films."]
    assert learn_from_chat(store, "ann", [{"role": "user", "content": "Do I like horror films?"}])["preferences"] == []
    # deleting the message a preference was learned from deletes the preference too
    message = store.items("ann", kind=names.PREFERENCE)[0]["meta"]["message"]
    store.delete_item("ann", message)
    assert store.items("ann", kind=names.PREFERENCE) == []


def test_migration_of_a_session5_database(tmp_path):
    """A database made before the registry: method and sources columns added, text dropped from meta, one
    current artifact per (user, method, kind, model), the newest."""
    home = tmp_path / "home"
    with Store.open(home) as store:
        store.add("ann", "I have a pet turtle.", kind=names.PREFERENCE)
        folder = store.artifact_dir("ann")
        for version in (1, 2):
            (folder / f"v{version}.gguf").write_bytes(b"x")
        conn = store._conn()
        for version in (1, 2):
            meta = {"method": "edit", "layer": 6, "edited": [{"statement": "I have a pet turtle."}]}
            conn.execute("INSERT INTO artifacts (user_id, kind, version, path, base_model_sha256, meta, created)"
                         " VALUES (1, 'lora', ?, ?, ?, ?, ?)",
                         (version, f"artifacts/ann/v{version}.gguf", SHA,
                          store.cipher.seal(json.dumps(meta).encode(), b"1:artifact"), version))
    conn = sqlite3.connect(home / DB_FILE)
    conn.execute("CREATE TABLE old AS SELECT id, user_id, kind, version, path, base_model_sha256, meta, created FROM artifacts")
    conn.execute("DROP TABLE artifacts")
    conn.execute("ALTER TABLE old RENAME TO artifacts")
    conn.commit()
    conn.close()
    with Store.open(home) as store:
        [artifact] = store.artifacts("ann")
        assert artifact["version"] == 2 and artifact["method"] == "edit" and artifact["meta"] == {"method": "edit", "layer": 6}
        assert not (home / "artifacts" / "ann" / "v1.gguf").exists()


def test_invariant_code_that_makes_artifacts_never_imports_the_server_or_the_evaluation():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, localpers.personalize.editing, localpers.serve.jobs, localpers.serve.learn, localpers.serve.compose; "
            "bad = [m for m in ('localpers.eval.evaluation', 'localpers.serve.server', 'localpers.cli.eval_cli') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
