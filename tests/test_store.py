"""The history store: encryption at rest, items, validation, imports, artifacts, export and forget."""
import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from localpers.errors import UserError
from localpers.store import DB_FILE, KEY_FILE, MAX_TEXT_BYTES, NotFoundError, Store, data_dir, read_import

SHA = hashlib.sha256(b"base model").hexdigest()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home") as store:
        yield store


def raw_bytes(directory) -> bytes:
    """Every byte SQLite keeps on disk for this store: database, WAL, shared memory, rollback journal."""
    return b"".join(
        (directory / name).read_bytes()
        for name in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", DB_FILE + "-journal")
        if (directory / name).exists()
    )


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALPERS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir("/explicit") == data_dir("/explicit/") and str(data_dir("/explicit")) == "/explicit"
    assert data_dir(None) == tmp_path / "home"
    monkeypatch.delenv("LOCALPERS_HOME")
    assert data_dir(None) == tmp_path / "xdg" / "localpers"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_dir(None) == tmp_path / ".local" / "share" / "localpers"


def test_items_round_trip_and_user_isolation(store):
    first = store.add("alice", "I like to dance at the club.", kind="preference", meta={"source": "chat"}, ts=100.0)
    second = store.add("alice", "Ich mag Käse 🧀")
    store.add("bob", "I collect stamps.")
    items = store.items("alice")
    assert [i["id"] for i in items] == [first, second]
    assert items[0] == {"id": first, "kind": "preference", "ts": 100.0, "text": "I like to dance at the club.",
                        "meta": {"source": "chat"}}
    assert items[1]["text"] == "Ich mag Käse 🧀" and items[1]["kind"] == "message"
    assert [i["text"] for i in store.items("alice", kind="preference")] == ["I like to dance at the club."]
    assert [i["text"] for i in store.items("bob")] == ["I collect stamps."]
    store.delete_item("alice", first)
    assert [i["id"] for i in store.items("alice")] == [second]
    with pytest.raises(NotFoundError):
        store.delete_item("bob", second)  # someone else's item


def test_no_plaintext_on_disk(store, tmp_path):
    """Text and metadata are sealed before SQLite sees them: grep the database, its WAL and journal."""
    secret, meta_secret = "zebra-canary-7781 dances tango", "meta-canary-4410"
    for i in range(50):
        store.add("alice", f"{secret} {i}", meta={"note": meta_secret})
    store.register_artifact("alice", "lora", _artifact(tmp_path), SHA, meta={"trained_on": meta_secret})
    assert (tmp_path / "home" / (DB_FILE + "-wal")).stat().st_size > 0  # the rows are in the WAL now
    for blob in (raw_bytes(tmp_path / "home"),):
        for needle in (b"zebra-canary", b"meta-canary", "zebra-canary".encode("utf-16-le")):
            assert needle not in blob
    store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and once they are in the main file
    assert b"zebra-canary" not in raw_bytes(tmp_path / "home")
    assert store.items("alice")[0]["text"] == f"{secret} 0"


def test_key_file_is_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path) as store:
        store.add("alice", "hello there")
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    with Store.open(tmp_path) as store:
        assert store.items("alice")[0]["text"] == "hello there"
    key.write_bytes(os.urandom(32))
    with pytest.raises(UserError, match="not the key of this store"):
        Store.open(tmp_path)
    key.unlink()
    with pytest.raises(UserError, match="missing"):
        Store.open(tmp_path)


def test_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALPERS_PASSPHRASE", "correct horse")
    with Store.open(tmp_path) as store:
        store.add("alice", "sealed with a passphrase")
    assert not (tmp_path / KEY_FILE).exists()
    with Store.open(tmp_path) as store:
        assert store.items("alice")[0]["text"] == "sealed with a passphrase"
    monkeypatch.setenv("LOCALPERS_PASSPHRASE", "wrong horse")
    with pytest.raises(UserError, match="wrong LOCALPERS_PASSPHRASE"):
        Store.open(tmp_path)
    monkeypatch.delenv("LOCALPERS_PASSPHRASE")
    with pytest.raises(UserError, match="set LOCALPERS_PASSPHRASE"):
        Store.open(tmp_path)


def test_blobs_are_bound_to_their_user(store, tmp_path):
    """A ciphertext copied into another user's row does not decrypt (AES-GCM associated data)."""
    store.add("alice", "alice's secret")
    store.add("bob", "bob's note")
    conn = sqlite3.connect(tmp_path / "home" / DB_FILE)
    with conn:
        conn.execute("UPDATE items SET text = (SELECT text FROM items WHERE id = 1) WHERE id = 2")
    conn.close()
    with pytest.raises(InvalidTag):
        store.items("bob")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("x" * (MAX_TEXT_BYTES + 1), "limit is 65536 bytes"),
        (b"caf\xe9", "not valid UTF-8"),
        ("bad \udcff surrogate", "not valid UTF-8"),
        (42, "must be a string"),
    ],
)
def test_bad_text_is_refused_and_nothing_written(store, text, message):
    store.add("alice", "kept")
    with pytest.raises(UserError, match=message):
        store.add("alice", text)
    assert [i["text"] for i in store.items("alice")] == ["kept"]


def test_limit_is_inclusive_and_bad_fields(store):
    store.add("alice", "é" * (MAX_TEXT_BYTES // 2))  # exactly the limit in UTF-8 bytes
    for kwargs, message in [
        (dict(kind="no spaces"), "invalid kind"),
        (dict(meta=["not", "a", "dict"]), "meta must be a JSON object"),
        (dict(meta={"x": float("nan")}), "meta is not valid JSON"),
        (dict(ts=float("inf")), "ts must be"),
    ]:
        with pytest.raises(UserError, match=message):
            store.add("alice", "fine text", **kwargs)
    with pytest.raises(UserError, match="invalid user id"):
        store.add("../etc", "fine text")
    assert len(store.items("alice")) == 1


def test_unknown_user_reads_raise(store):
    for read in (store.items, store.export, store.forget, store.artifacts, lambda u: store.search(u, "x")):
        with pytest.raises(NotFoundError, match="unknown user 'ghost'"):
            read("ghost")


def _artifact(tmp_path, name="adapter.gguf", content=b"GGUF fake adapter bytes"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_artifact_registry(store, tmp_path):
    """One current artifact per (user, method, kind, base model): registering replaces (and deletes) the old."""
    other_sha = hashlib.sha256(b"another base").hexdigest()
    store.add("alice", "a note")
    first = store.register_artifact("alice", "lora", _artifact(tmp_path), SHA, meta={"method": "edit", "steps": 10})
    first_path = Path(store.latest_artifact("alice", "lora", SHA)["path"])
    second = store.register_artifact("alice", "lora", _artifact(tmp_path, content=b"v2"), SHA, meta={"method": "edit"})
    assert second != first and not first_path.exists()  # replaced: row and file gone
    other = store.register_artifact("alice", "lora", _artifact(tmp_path, content=b"v3"), other_sha, {"method": "edit"})
    perce = store.register_artifact("alice", "lora", _artifact(tmp_path, content=b"p"), SHA, {"method": "perce"})
    in_place = store.artifact_dir("alice") / "vector.gguf"
    in_place.write_bytes(b"control vector")
    cvec = store.register_artifact("alice", "control_vector", in_place, SHA, {"method": "logo"})

    listed = store.artifacts("alice")
    assert [a["id"] for a in listed] == [cvec, perce, other, second]
    assert [a["id"] for a in store.artifacts("alice", base_model_sha256=SHA)] == [cvec, perce, second]
    assert [a["id"] for a in store.artifacts("alice", kind="lora")] == [perce, other, second]
    latest = store.latest_artifact("alice", "lora", SHA)
    assert latest["id"] == perce and open(latest["path"], "rb").read() == b"p"
    assert latest["path"].startswith(str(store.artifact_dir("alice")))  # copied in, so forget can delete it
    assert store.latest_artifact("alice", "control_vector", SHA)["path"] == str(in_place)
    assert store.latest_artifact("alice", "control_vector", other_sha) is None
    with pytest.raises(UserError, match="64 lower-case hex"):
        store.register_artifact("alice", "lora", _artifact(tmp_path), "abc")
    with pytest.raises(UserError, match="no such artifact"):
        store.register_artifact("alice", "lora", tmp_path / "missing.gguf", SHA)
    with pytest.raises(NotFoundError):  # never creates a user (a forgotten one stays forgotten)
        store.register_artifact("nobody", "lora", _artifact(tmp_path), SHA)


def test_export_holds_everything(store, tmp_path):
    store.add("alice", "first note", meta={"a": 1})
    store.add("alice", "second note", kind="preference")
    store.register_artifact("alice", "lora", _artifact(tmp_path), SHA, meta={"rank": 8})
    store.add("bob", "bob's note")
    exported = store.export("alice")
    assert exported["user"] == "alice"
    assert [(i["text"], i["kind"], i["meta"]) for i in exported["items"]] == [
        ("first note", "message", {"a": 1}), ("second note", "preference", {})]
    assert [(a["kind"], a["meta"]) for a in exported["artifacts"]] == [("lora", {"rank": 8})]
    json.dumps(exported)  # JSON-ready
    # an export is itself importable: a backup restores into a fresh user
    backup = tmp_path / "alice.json"
    backup.write_text(json.dumps(exported))
    store.add_many("alice2", read_import(backup))
    assert [(i["text"], i["kind"], i["meta"]) for i in store.items("alice2")] == [
        (i["text"], i["kind"], i["meta"]) for i in exported["items"]]


def test_forget_scrubs_text_and_ciphertext_from_the_file(store, tmp_path):
    home = tmp_path / "home"
    for i in range(200):
        store.add("alice", f"forget-canary-{i:04d} my bank pin is {i}", meta={"m": f"meta-canary-{i}"})
    store.add("bob", "bob-keeps-this note")
    adapter = store.artifact_dir("alice") / "lora.gguf"
    adapter.write_bytes(b"adapter")
    store.register_artifact("alice", "lora", adapter, SHA)
    store.search("alice", "bank pin")  # builds the in-memory index, to check it is dropped too
    conn = sqlite3.connect(home / DB_FILE)
    ciphertexts = [b for row in conn.execute("SELECT text, meta FROM items WHERE user_id = 1") for b in row]
    conn.close()
    assert len(ciphertexts) == 400 and all(len(c) > 28 for c in ciphertexts)
    before = raw_bytes(home)
    assert all(c in before for c in ciphertexts)  # on disk before forget (WAL or main file)

    store.forget("alice")

    on_disk = raw_bytes(home)
    assert not any(c in on_disk for c in ciphertexts)
    assert b"forget-canary" not in on_disk and b"alice" not in on_disk
    assert not (home / "artifacts" / "alice").exists()
    with pytest.raises(NotFoundError):
        store.items("alice")
    assert [i["text"] for i in store.items("bob")] == ["bob-keeps-this note"]
    # the user can start over: the new history holds none of the old items
    store.add("alice", "a fresh start")
    assert [i["text"] for i in store.search("alice", "bank pin fresh start", k=10)] == ["a fresh start"]


def test_import_formats(store, tmp_path, shared_dir):
    upqa = shared_dir / "data" / "upqa" / "upqa_dev_100.json"
    store.add_many("alice", read_import(upqa))
    prefs = store.items("alice", kind="preference")
    assert len(prefs) == 100 and prefs[0]["text"] == "I like to dance at the club."
    assert prefs[0]["meta"] == {"source": "upqa", "attribute_type": "hobby", "question": "What's my hobby?",
                                "target": "Dancing at clubs"}
    # editing builds its fact from those fields: the item's question and target, the attribute's templates
    from localpers.editing import fact_from_item, with_template_questions
    fact = with_template_questions(fact_from_item(prefs[0]["text"], prefs[0]["meta"]))
    assert fact.questions[-1] == "What's my hobby?" and fact.targets == ("Dancing at clubs",) and len(fact.questions) > 9

    lamp = tmp_path / "lamp.json"
    lamp.write_text(json.dumps([
        {"id": "310", "input": "...", "profile": [
            {"id": "3100", "title": "On sparse retrieval", "abstract": "We study BM25."},
            {"id": "3101", "text": "Great phone, battery lasts.", "score": "5"}]},
        {"id": "311", "input": "...", "profile": [{"id": "3110", "text": "other user"}]},
    ]))
    with pytest.raises(UserError, match="2 LaMP records .* --lamp-id"):
        read_import(lamp)
    items = read_import(lamp, lamp_id="310")
    assert [(kind, text.decode()) for kind, _, text, _ in items] == [
        ("document", "On sparse retrieval\nWe study BM25."), ("review", "Great phone, battery lasts.")]
    assert json.loads(items[1][3]) == {"id": "3101", "score": "5", "source": "lamp"}
    longlamp = tmp_path / "longlamp.json"  # one record, LongLaMP product-review fields
    longlamp.write_text(json.dumps({"id": "7", "profile": [{"overall": 4.0, "summary": "Solid", "reviewText": "Works."}]}))
    assert [text.decode() for _, _, text, _ in read_import(longlamp)] == ["Solid\nWorks."]

    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"text": "plain message"}\n\n{"text": "likes tea", "kind": "preference", "meta": {"x": 1}, '
                     '"ts": 5, "lang": "en"}\n')
    (_, _, _, meta1), (kind2, ts2, text2, meta2) = read_import(jsonl)
    assert (kind2, ts2, text2, json.loads(meta2)) == ("preference", 5.0, b"likes tea", {"x": 1, "lang": "en"})


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "broken"\n', r"bad.jsonl line 3: invalid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"txt": "typo"}\n', r"line 2: expected a JSON object with a \"text\""),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": ""}\n', r"line 2: text is empty"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"line 2: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "a\\udc80"}\n', r"line 2: text is not valid UTF-8"),
        ("bad.json", b'[{"input_attribute": "ok"},\n {"input_attribute": }]', r"bad.json line 2: invalid JSON"),
        ("bad.json", b'[{"input_attribute": "ok"}, {"input_attribute": 3}]', r"UPQA item 2"),
        ("bad.json", b'{"profile": [{"title": "ok"}, {"score": 1}]}', r"profile entry 2: no text field"),
        ("bad.json", b'{"something": "else"}', r"not a recognised import"),
        ("bad.csv", b"text\nhello\n", r"unknown import format"),
        ("empty.jsonl", b"\n\n", r"no items"),
    ],
)
def test_malformed_imports_name_the_line_and_import_nothing(store, tmp_path, name, content, message):
    from localpers.cli import main

    store.add("alice", "already here")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_import(path)
    assert main(["import", "--data-dir", str(tmp_path / "home"), "--user", "alice", str(path)]) == 2
    assert [i["text"] for i in store.items("alice")] == ["already here"]


def test_add_many_is_atomic(store):
    from localpers.store import check_item

    good = check_item("good")
    with pytest.raises(sqlite3.IntegrityError):  # a failure in the middle of the transaction
        store.add_many("alice", [good, (None, 1.0, b"x", b"{}")])  # a NULL kind violates NOT NULL
    with pytest.raises(NotFoundError):
        store.items("alice")  # not even the user was created
