"""The history store: encryption at rest, items, validation, imports, artifacts, export and forget."""
import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from localpers.personalize.datasets import data_path
from localpers.errors import UserError
from localpers.store.store import DB_FILE, KEY_FILE, MAX_TEXT_BYTES, MAX_USER_CHARS, NotFoundError, Store, data_dir, read_import

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
    with pytest.raises(UserError, match="control character U\\+000A"):
        store.add("mallory\nadmin", "fine text")
    assert len(store.items("alice")) == 1 and store.users() == ["alice"]


# What clients put in OpenAI's `user` field: display names, e-mail addresses, long ids, ids with spaces, and
# strings that would be paths if a path were ever built from them.
ANY_USERS = ["john doe", "josé", "bob@example.com", "Bob Smith <bob@example.com>", "x" * 200, "alice ", "../etc",
             "a/b", "..", "/", "C:\\Windows\\system32", "%2e%2e", "名前", "🦊", "alice", "x" * MAX_USER_CHARS]


def tree(directory) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_any_user_string_is_an_identity_and_names_no_path(store, tmp_path):
    """Every string a client may send is a user of its own; the files on disk are named after row ids only."""
    home = tmp_path / "home"
    for n, user in enumerate(ANY_USERS):
        store.add(user, f"note of user {n}")
        store.register_artifact(user, "lora", _artifact(tmp_path, content=b"adapter %d" % n), SHA)
    assert store.users() == ANY_USERS
    for n, user in enumerate(ANY_USERS):
        assert [i["text"] for i in store.items(user)] == [f"note of user {n}"]
        assert [r["text"] for r in store.search(user, "note user")] == [f"note of user {n}"]
        (artifact,) = store.artifacts(user)
        assert open(artifact["path"], "rb").read() == b"adapter %d" % n
        assert Path(artifact["path"]).parent == home / "artifacts" / f"_user-{n + 1}"
        assert store.export(user)["user"] == user
    files = tree(home)
    assert not any(name in f for f in files for name in ("john", "jos", "bob", "etc", "名前", "🦊", "alice", "xxx"))
    assert {f.split("/")[0] for f in files} <= {"artifacts", "key", DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"}
    # the same text is the same user: "josé" composed or decomposed (NFC), but "alice " is not "alice"
    assert store.items("jose\u0301") == store.items("josé")
    store.forget("alice ")
    assert [i["text"] for i in store.items("alice")] == [f"note of user {ANY_USERS.index('alice')}"]
    assert not (home / "artifacts" / f"_user-{ANY_USERS.index('alice ') + 1}").exists()
    store.forget("../etc")
    assert home.is_dir() and (home / "artifacts").is_dir() and (home / DB_FILE).is_file()


@pytest.mark.parametrize("user, message", [
    ("", "user id is empty"), ("   ", "is blank"), ("a\nb", "U\\+000A"), ("nul\x00", "U\\+0000"),
    ("\x1b[31mred", "U\\+001B"), ("line\u2028sep", "U\\+2028"), ("x" * (MAX_USER_CHARS + 1), "limit is 1024"),
    (None, "must be a string"), (42, "must be a string"),
])
def test_unusable_user_ids_are_refused_before_any_write(store, tmp_path, user, message):
    with pytest.raises(UserError, match=message):
        store.add(user, "text")
    with pytest.raises(UserError, match=message):
        store.register_artifact(user, "lora", _artifact(tmp_path), SHA)
    assert store.users() == [] and tree(tmp_path / "home" / "artifacts") == []


def test_stores_with_folders_named_after_users_are_migrated(tmp_path, monkeypatch):
    """Layout 1 named artifact folders after the user id; opening such a store moves them to row-id folders and
    rewrites the registered paths, once, and a crash between the move and the rewrite is repaired on reopen."""
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    home = tmp_path / "home"
    with Store.open(home) as store:
        for user in ("alice", "bob"):
            store.add(user, "hello")  # the registry registers artifacts only for known users
            store.register_artifact(user, "lora", _artifact(tmp_path, content=user.encode()), SHA)
    conn = sqlite3.connect(home / DB_FILE)  # turn it into a layout-1 store, as an older localpers wrote it
    for user_id, user in ((1, "alice"), (2, "bob")):
        (home / "artifacts" / f"_user-{user_id}").rename(home / "artifacts" / user)
        conn.execute("UPDATE artifacts SET path = replace(path, ?, ?) WHERE user_id = ?",
                     (f"artifacts/_user-{user_id}/", f"artifacts/{user}/", user_id))
    conn.execute("DELETE FROM settings WHERE name = 'layout'")
    (home / "artifacts" / "bob").rename(home / "artifacts" / "_user-2")  # bob's move happened, then a crash
    conn.commit()
    conn.close()
    with Store.open(home) as store:
        for user_id, user in ((1, "alice"), (2, "bob")):
            (artifact,) = store.artifacts(user)
            assert artifact["path"].startswith(str(home / "artifacts" / f"_user-{user_id}"))
            assert open(artifact["path"], "rb").read() == user.encode()
        assert sorted(p.name for p in (home / "artifacts").iterdir()) == ["_user-1", "_user-2"]
        store.forget("alice")
        assert [p.name for p in (home / "artifacts").iterdir()] == ["_user-2"]


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
    assert list((home / "artifacts").iterdir()) == []  # alice's folder is gone; bob never had one
    with pytest.raises(NotFoundError):
        store.items("alice")
    assert [i["text"] for i in store.items("bob")] == ["bob-keeps-this note"]
    # the user can start over: the new history holds none of the old items
    store.add("alice", "a fresh start")
    assert [i["text"] for i in store.search("alice", "bank pin fresh start", k=10)] == ["a fresh start"]


def test_import_formats(store, tmp_path):
    upqa = data_path("upqa")
    with pytest.raises(UserError, match=r"100 UPQA items of 100 different users \(ids: upqa-0, upqa-1, upqa-2, upqa-3, upqa-4, …\).*--record ID"):
        read_import(upqa)  # each item is another user's statement: never mixed into one user silently (the
        # message shows 5 ids, and that there are more)
    assert [text for _, _, text, _ in read_import(upqa, record="upqa-1")] == [b"I like taking and posting selfies."]
    store.add_many("alice", read_import(upqa, merge_users=True))
    prefs = store.items("alice", kind="preference")
    assert len(prefs) == 100 and prefs[0]["text"] == "I like to dance at the club."
    assert prefs[0]["meta"] == {"source": "upqa", "attribute_type": "hobby", "question": "What's my hobby?",
                                "target": "Dancing at clubs"}
    # editing builds its fact from those fields: the item's question and target, the attribute's templates
    from localpers.personalize.editing import fact_from_item, with_template_questions
    fact = with_template_questions(fact_from_item(prefs[0]["text"], prefs[0]["meta"]))
    assert fact.questions[-1] == "What's my hobby?" and fact.targets == ("Dancing at clubs",) and len(fact.questions) > 9

    lamp = tmp_path / "lamp.json"
    lamp.write_text(json.dumps([
        {"id": "310", "input": "...", "profile": [
            {"id": "3100", "title": "On sparse retrieval", "abstract": "We study BM25."},
            {"id": "3101", "text": "Great phone, battery lasts.", "score": "5"}]},
        {"id": "311", "input": "...", "profile": [{"id": "3110", "text": "other user"}]},
    ]))
    with pytest.raises(UserError, match=r"2 LaMP records of 2 different users \(ids: 310, 311\).* --record ID"):
        read_import(lamp)
    with pytest.raises(UserError, match=r"no LaMP record has the id '312' \(ids: 310, 311\)"):
        read_import(lamp, record="312")
    assert len(read_import(lamp, merge_users=True)) == 3
    items = read_import(lamp, record="310")
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

    # a chat line, as the HTTP endpoint takes it (content a string or text parts), and text given as parts
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "I'm vegan"}, {"type": "text", "text": ", no honey."}]},
        {"role": "assistant", "content": "Got it."}]}) + "\n" + json.dumps(
        {"text": [{"type": "text", "text": "likes jazz"}], "kind": "preference"}) + "\n")
    imported = read_import(chat)  # the assistant's reply is left out (a served chat never stores it), and counted
    assert [(kind, text, json.loads(meta)) for kind, _, text, meta in imported] == [
        ("message", b"I'm vegan, no honey.", {"role": "user"}), ("preference", b"likes jazz", {})]
    assert imported.dropped == 1
    world = tmp_path / "world.json"  # UPQA items of one user (the world's user_id) import without a choice
    world.write_text(json.dumps([{"user_id": "u7", "input_attribute": f"I like {x}."} for x in ("tea", "jazz")]))
    assert len(read_import(world)) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "broken"\n', r"bad.jsonl line 3: invalid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"txt": "typo"}\n', r"line 2: expected a JSON object with a \"text\""),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": ""}\n', r"line 2: text is empty"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"line 2: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "a\\udc80"}\n', r"line 2: text is not valid UTF-8"),
        ("bad.json", b'[{"input_attribute": "ok"},\n {"input_attribute": }]', r"bad.json line 2: invalid JSON"),
        ("bad.json", b'[{"user_id": "u", "input_attribute": "ok"}, {"user_id": "u", "input_attribute": 3}]',
         r"UPQA item 2"),
        ("bad.json", b'{"profile": [{"title": "ok"}, {"score": 1}]}', r"profile entry 2: no text field"),
        ("bad.json", b'{"something": "else"}', r"not a recognised import"),
        ("bad.jsonl", b'{"messages": [{"role": "user", "content": "ok"}, {"content": "x"}]}\n', r"line 1: messages\[1\]"),
        ("bad.jsonl", b'{"messages": []}\n', r"line 1: \"messages\" must be a non-empty list"),
        ("bad.csv", b"text\nhello\n", r"unknown import format"),
        ("empty.jsonl", b"\n\n", r"no items"),
    ],
)
def test_malformed_imports_name_the_line_and_import_nothing(store, tmp_path, name, content, message):
    from localpers.cli.cli import main

    store.add("alice", "already here")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_import(path)
    assert main(["import", "--data-dir", str(tmp_path / "home"), "--user", "alice", str(path)]) == 2
    assert [i["text"] for i in store.items("alice")] == ["already here"]


def test_add_many_is_atomic(store):
    from localpers.store.store import check_item

    good = check_item("good")
    with pytest.raises(sqlite3.IntegrityError):  # a failure in the middle of the transaction
        store.add_many("alice", [good, (None, 1.0, b"x", b"{}")])  # a NULL kind violates NOT NULL
    with pytest.raises(NotFoundError):
        store.items("alice")  # not even the user was created


def test_invariant_items_artifacts_and_upqa_entries_keep_their_documented_fields(tmp_path, monkeypatch):
    """A learned chat message is stored with role "user"; an artifact lists when it was created; a UPQA entry
    without an "input_attribute" string is refused as the user's mistake (mutation survivors of store/store.py,
    docs/history/mutation/)."""
    import time

    from localpers.store.store import Store, _upqa_item

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "data") as store:
        store.add("ann", "hello")
        learned = store.learn_chat("ann", [{"role": "user", "content": "I'm vegetarian."}])
        [message] = [i for i in store.items("ann") if i["id"] in learned["messages"]]
        assert message["meta"]["role"] == "user" and message["meta"]["source"] == "chat"
        src = tmp_path / "a.gguf"
        src.write_bytes(b"adapter")
        before = time.time()
        store.register_artifact("ann", "lora", src, "ab" * 32, meta={"method": "edit", "sources": []})
        [artifact] = store.artifacts("ann")
        assert before - 1 <= artifact["created"] <= time.time() + 1
    for entry in ({"question": "q"}, {"input_attribute": 3}, ["I like tea."]):
        with pytest.raises(UserError, match="input_attribute"):
            _upqa_item(entry)


# -- the store shard's survivors (docs/history/mutation/localpers.store.store.survivors.txt) ----------------------

def test_invariant_a_read_only_store_reads_what_was_written_and_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    """read_only (history, export, users, search): a store written before reads back as it stands; a folder
    with no store, and a store an older localpers wrote (which only a writing command may migrate), are each a
    UserError saying so."""
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    home = tmp_path / "home"
    with Store.open(home) as store:
        store.add("ann", "a note")
    with Store.open(home, read_only=True) as store:
        assert [i["text"] for i in store.items("ann")] == ["a note"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no localpers data"):
        Store.open(tmp_path / "empty", read_only=True)
    with sqlite3.connect(home / DB_FILE) as db:
        db.execute("UPDATE settings SET value = ? WHERE name = 'layout'", (b"1",))
    db.close()
    with pytest.raises(UserError, match="older localpers"):
        Store.open(home, read_only=True)
    with Store.open(home) as store:  # a writing open migrates it
        pass
    with Store.open(home, read_only=True) as store:
        assert [i["text"] for i in store.items("ann")] == ["a note"]


def test_invariant_sweep_temp_deletes_a_crashed_jobs_folder_and_every_folder_of_one_user(store):
    """With no user: the scratch folders whose process is gone; with a user's row id: all of theirs, live or
    not, and nobody else's."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    store.add("hal", "a note")
    store.add("ivy", "a note")
    with store.temp_dir("hal") as hal, store.temp_dir("ivy") as ivy:
        crashed = hal.parent / f"_user-{hal.name.split('-')[1]}-{dead}-abc"
        crashed.mkdir()
        assert store.sweep_temp() == 1 and not crashed.exists() and hal.exists() and ivy.exists()
        assert store.sweep_temp(int(ivy.name.split("-")[1])) == 1
        assert not ivy.exists() and hal.exists()


def test_invariant_retiring_artifacts_deletes_those_of_the_kind_model_and_method_only(store, tmp_path):
    other_sha = hashlib.sha256(b"another base").hexdigest()
    store.add("ann", "a note")
    for method, kind, sha in (("edit", "lora", SHA), ("perce", "lora", SHA), ("edit", "control_vector", SHA),
                              ("edit", "lora", other_sha)):
        store.register_artifact("ann", kind, _artifact(tmp_path, f"{method}-{kind}-{sha[:4]}.gguf"), sha,
                                meta={"method": method})
    paths = {(a["method"], a["kind"], a["base_model_sha256"]): a["path"] for a in store.artifacts("ann")}
    assert store.retire_artifacts("ann", "lora", SHA, "edit") == 1
    assert not (store.directory / paths[("edit", "lora", SHA)]).exists()
    left = {(a["method"], a["kind"], a["base_model_sha256"]) for a in store.artifacts("ann")}
    assert left == {("perce", "lora", SHA), ("edit", "control_vector", SHA), ("edit", "lora", other_sha)}
    assert store.retire_artifacts("ann", "lora", SHA) == 1  # any method
    assert {a["method"] for a in store.artifacts("ann", base_model_sha256=SHA)} == {"edit"}


def test_invariant_forget_removes_the_sync_signals_at_their_documented_place(store):
    """docs/reference.md: a user's LoGo sync contribution is sync/signals/<sha256(user)[:16]>.npz under the data
    folder, and forget removes it."""
    path = store.directory / "sync" / "signals" / (hashlib.sha256(b"ann").hexdigest()[:16] + ".npz")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"signals")
    store.add("ann", "a note")
    store.forget("ann")
    assert not path.exists()


def test_invariant_make_private_leaves_files_to_the_owner_alone(tmp_path):
    from localpers.store.store import make_private

    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.gguf").write_bytes(b"x")
    (tmp_path / "one.npz").write_bytes(b"x")
    for path in (folder, tmp_path / "one.npz"):
        make_private(path)
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "sub" / "a.gguf").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "one.npz").stat().st_mode) == 0o600


def test_invariant_a_learned_fact_keeps_the_source_of_its_message_and_a_kept_response_reads_back(store):
    from localpers.personalize.detect import detect_facts

    store.learn_text("ann", "I'm vegetarian.", detect_facts, source="page")
    [fact] = store.items("ann", kind="preference")
    assert fact["meta"]["source"] == "page"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for n in range(3):
        store.keep_response("ann", f"resp-{n}", turns + [{"role": "user", "content": f"turn {n}"}], keep=2)
    assert store.response_conversation("ann", "resp-2") == turns + [{"role": "user", "content": "turn 2"}]
    assert store.response_conversation("ann", "resp-0") is None  # beyond the 2 newest
    assert store.response_conversation("bob", "resp-2") is None


# -- store.py's further sample (100, seed 11) ---------------------------------------------------------------------

def test_invariant_check_item_takes_every_edge_value_and_defaults_to_a_message():
    from localpers.store.store import MAX_META_DEPTH, MAX_TS, check_item

    assert check_item("hi")[0] == "message"
    check_item("hi", ts=0)
    check_item("hi", ts=MAX_TS)
    with pytest.raises(UserError):
        check_item("hi", ts=MAX_TS + 1)
    deepest = {}
    for _ in range(MAX_META_DEPTH - 1):
        deepest = {"a": deepest}
    check_item("hi", meta=deepest)  # exactly MAX_META_DEPTH levels
    with pytest.raises(UserError, match="nests more than"):
        check_item("hi", meta={"a": deepest})


def test_invariant_imports_tell_upqa_lists_and_chat_lines_from_other_records(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"input_attribute": "I like tea."}, {"text": "not a UPQA item"}]))
    with pytest.raises(UserError, match="not a recognised import"):
        read_import(plain)
    lines = tmp_path / "both.jsonl"
    lines.write_text(json.dumps({"text": "an item with messages", "messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert [text for _, _, text, _ in read_import(lines)] == [b"an item with messages"]


def test_an_empty_passphrase_is_a_user_error_saying_so(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALPERS_PASSPHRASE", "")
    with pytest.raises(UserError, match="set but empty"):
        Store.open(tmp_path / "home")


def test_invariant_learning_retries_only_a_fact_whose_edit_failed_and_reads_only_the_users_own_messages(store):
    from localpers.personalize.detect import detect_facts

    first = store.learn_text("ann", "I'm vegetarian.", detect_facts)
    [job] = store.jobs("ann")
    assert job["object"] == "job"
    store.finish_job(job["id"], "done")
    again = store.learn_text("ann", "I'm vegetarian.", detect_facts)
    assert again["retried"] == [] and again["facts"] == []  # held already, its edit succeeded
    [fact] = store.facts("ann")
    assert fact["id"] == first["facts"][0]["id"] and fact["statement"] == "I'm vegetarian."
    chat = [{"role": "user", "name": "bob", "content": "I'm vegan."}, {"role": "user", "content": "I live in Lyon."}]
    learned = store.learn_chat("ann", chat, detect_facts)
    assert [f["attribute"] for f in learned["facts"]] == ["home"]  # bob's statement is not ann's
    assert "I'm vegan." not in [i["text"] for i in store.items("ann")]
    moved = store.learn_texts("cy", ["I live in Paris.", "I live in Lyon."], detect_facts)  # the later one wins
    [home] = [f for f in store.facts("cy") if f["attribute"] == "home"]
    assert [f["id"] for f in moved["facts"]] == [home["id"]] and "Lyon" in home["statement"]


def test_invariant_export_names_when_the_user_was_created_and_forget_removes_a_node_file_naming_them(store):
    import time

    store.add("ann", "a note")
    assert abs(store.export("ann")["created"] - time.time()) < 60
    node = store.directory / "sync" / "node.toml"
    node.parent.mkdir(parents=True)
    node.write_text('user = "ann"\n')
    store.add("bob", "a note")
    store.forget("bob")
    assert node.exists()  # another user's
    store.forget("ann")
    assert not node.exists()


def test_invariant_deleting_a_message_deletes_the_kept_responses_that_quote_it_even_beside_an_image(store):
    item = store.add("ann", "a note")
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "a note"}]
    store.keep_response("ann", "resp-1", [{"role": "user", "content": parts}])
    store.delete_item("ann", item)
    assert store.response_conversation("ann", "resp-1") is None


def test_invariant_supersede_queued_settles_only_the_kinds_jobs_queued_before_the_run(store):
    import time

    store.add("ann", "a note")
    before = time.time() - 60
    early = store.queue_job("ann", "edit")
    other = store.queue_job("ann", "perce")
    assert store.supersede_queued("ann", "edit", before, "personalize") == 0  # queued after that run began
    assert store.supersede_queued("ann", "edit", time.time() + 1, "personalize") == 1
    states = {j["id"]: (j["state"], j["result"]) for j in store.jobs("ann")}
    assert states[early["id"]] == ("done", {"superseded_by": "personalize"})
    assert states[other["id"]][0] == "queued"


# -- store.py's every-mutant run (partial): its survivors' tests ---------------------------------------------------

def _stated(attribute, value, statement, retire=False):
    from localpers.personalize.detect import StatedFact

    return StatedFact(attribute=attribute, value=value, statement=statement, retire=retire)


def _extracting(table: dict, calls: list | None = None):
    """An extract(text, limit, previous) that states table[text] (a list of StatedFacts), recording its calls."""
    def extract(text, limit, previous):
        if calls is not None:
            calls.append((text, limit, previous))
        return list(table.get(text, []))
    return extract


def derive(store, tmp_path, sources: dict) -> list[Path]:
    """One artifact (another kind each) derived from each fact id given; their files."""
    paths = []
    for (name, fact_id), kind in zip(sources.items(), ("lora", "control_vector")):
        store.register_artifact("ann", kind, _artifact(tmp_path, f"{name}.gguf"), SHA,
                                meta={"method": "edit", "sources": [fact_id]})
        paths.append(Path(store.latest_artifact("ann", kind, SHA)["path"]))
    assert all(p.exists() for p in paths)
    return paths


def test_invariant_learning_reports_every_replaced_retired_and_retried_fact_with_its_attribute(store, tmp_path):
    """One request that replaces, retires or restates several held facts reports each ({"id", "attribute"}), a
    retirement withdraws only the value it names (an empty value: whatever the slot holds), a fact after a
    retirement or a restatement in the same message is still learned, a restated fact whose edit failed queues
    the edit again (reported once), and the messages the old facts came from
    are marked superseded by the new message."""
    from localpers import names

    home, diet = _stated("home", "Lyon", "I live in Lyon."), _stated("diet", "vegan", "I'm vegan.")
    pets, job = _stated("pets", "cat", "I have a cat."), _stated("job", "nurse", "I work as a nurse.")
    table = {"a": [home, diet], "b": [job],
             "moved": [_stated("home", "Paris", "I live in Paris."), _stated("diet", "vegetarian", "I'm vegetarian.")],
             "wrong": [_stated("job", "baker", "", retire=True), pets],
             "gone": [_stated("job", "", "", retire=True), _stated("home", "", "", retire=True), pets],
             "again": [pets, job, _stated("likes", "jazz", "I like jazz.")]}
    extract = _extracting(table)
    first = store.learn_text("ann", "a", extract)
    assert [f["attribute"] for f in first["facts"]] == ["home", "diet"]
    store.learn_text("ann", "b", extract)
    held = {f["attribute"]: f["id"] for f in store.facts("ann")}
    derived = derive(store, tmp_path, {"home": held["home"], "diet": held["diet"]})
    moved = store.learn_text("ann", "moved", extract)
    assert not any(p.exists() for p in derived)  # every artifact derived from a replaced fact: file deleted
    assert moved["replaced"] == [{"id": held["home"], "attribute": "home"}, {"id": held["diet"], "attribute": "diet"}]
    [message_a] = [i for i in store.items("ann", kind="message") if i["text"] == "a"]
    assert message_a["meta"][names.SUPERSEDED_BY] == moved["messages"][0]
    assert message_a["meta"]["role"] == "user" and message_a["meta"]["source"] == "remember"
    wrong = store.learn_text("ann", "wrong", extract)  # job=baker is not held: nothing retired; the cat is learned
    assert wrong["retired"] == [] and [f["attribute"] for f in wrong["facts"]] == ["pets"]
    held = {f["attribute"]: f["id"] for f in store.facts("ann")}
    derived = derive(store, tmp_path, {"job": held["job"], "home": held["home"]})
    gone = store.learn_chat("ann", [{"role": "user", "content": "gone"}], extract)
    assert gone["retired"] == [{"id": held["job"], "attribute": "job"}, {"id": held["home"], "attribute": "home"}]
    assert not any(p.exists() for p in derived)
    [message_b] = [i for i in store.items("ann", kind="message") if i["text"] == "b"]
    assert message_b["meta"][names.SUPERSEDED_BY] == gone["messages"][0]
    assert {f["attribute"] for f in store.facts("ann")} == {"diet", "pets"}
    [job_row] = [j for j in store.jobs("ann") if j["kind"] == names.EDIT]
    store.finish_job(store.claim_job()["id"], names.FAILED, "out of memory")
    store.learn_text("ann", "b", extract)  # the job is learned again (its edit failed, but it is new now)
    held = {f["attribute"]: f["id"] for f in store.facts("ann")}
    store.finish_job(store.claim_job()["id"], names.FAILED, "out of memory")
    again = store.learn_text("ann", "again", extract)  # the edit is queued again once: the job's restatement waits
    assert again["retried"] == [{"id": held["pets"], "attribute": "pets"}]
    assert [f["attribute"] for f in again["facts"]] == ["likes"]
    assert [j["state"] for j in store.jobs("ann") if j["kind"] == names.EDIT].count(names.QUEUED) == 1
    assert job_row["kind"] == names.EDIT


def test_invariant_facts_and_sources_keep_their_documented_fields(store):
    """facts(): id, attribute, value, statement, message, created, status "current" — an imported preference's
    attribute_type (UPQA's list: its last name) and, without a value, its statement; a message learnt from a chat
    is stored as a message with source "chat", from `localpers remember` with source "remember"."""
    chat = [{"role": "user", "content": "c"}]
    extract = _extracting({"c": [_stated("home", "Lyon", "I live in Lyon.")],
                           "r": [_stated("diet", "vegan", "I'm vegan.")]})
    learned = store.learn_chat("ann", chat, extract)
    store.learn_text("ann", "r", extract)
    store.add("ann", "Likes jazz.", kind="preference", meta={"attribute_type": ["music", "style", "genre"]})
    store.add("ann", "Reads a lot.", kind="preference", meta={"attribute_type": []})
    store.add("ann", "Runs.", kind="preference", meta={"attribute_type": 5})
    facts = store.facts("ann")
    [message] = [i for i in store.items("ann", kind="message") if i["text"] == "c"]
    assert facts[0] == {"id": learned["facts"][0]["id"], "attribute": "home", "value": "Lyon",
                        "statement": "I live in Lyon.", "message": message["id"], "created": facts[0]["created"],
                        "status": "current"}
    assert isinstance(facts[0]["created"], float) and facts[0]["created"] > 0
    assert [(f["attribute"], f["value"]) for f in facts[1:]] == [("diet", "vegan"), ("genre", "Likes jazz."),
                                                                  (None, "Reads a lot."), (None, "Runs.")]
    sources = {i["text"]: (i["meta"].get("source"), i["kind"]) for i in store.items("ann") if i["text"] in "cr"}
    assert sources == {"c": ("chat", "message"), "r": ("remember", "message")}
    assert {f["statement"]: store.items("ann", kind="preference")[n]["meta"]["source"]
            for n, f in enumerate(facts[:2])} == {"I live in Lyon.": "chat", "I'm vegan.": "remember"}


def test_invariant_extract_is_told_the_limit_and_the_previous_message_and_never_asked_twice(store):
    """learn_chat and learn_text(s) call extract(text, limit, previous) with the caller's limit and the user's
    message before (None first), keep at most `limit` facts a message, and a resent conversation is not
    detected again; a group chat's message named by the user is the user's."""
    many = [_stated("home", "Lyon", "I live in Lyon."), _stated("diet", "vegan", "I'm vegan.")]
    calls = []
    extract = _extracting({"one": many, "two": many}, calls)
    chat = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "name": "ann", "content": "two"}]
    out = store.learn_chat("ann", chat, extract, limit=1)
    assert calls == [("one", 1, None), ("two", 1, "one")] and len(out["messages"]) == 2
    assert len(out["facts"]) == 1
    store.learn_chat("ann", chat + [{"role": "user", "content": "three"}], extract, limit=1)
    assert calls[2:] == [("three", 1, "two")]
    calls.clear()
    assert len(store.learn_text("bob", "one", extract, limit=1)["facts"]) == 1
    store.learn_texts("bob", ["two", "one"], extract, limit=1)
    assert calls == [("one", 1, None), ("two", 1, None), ("one", 1, "two")]
    assert {i["meta"]["source"] for i in store.items("bob", kind="message")} == {"remember"}


def test_invariant_kept_responses_need_a_string_id_are_exported_and_keep_zero_keeps_none(store):
    with pytest.raises(UserError, match="response id"):
        store.keep_response("ann", 5, [])
    for bad in ("", None):
        with pytest.raises(UserError, match="response id"):
            store.keep_response("ann", bad, [])
    turns = [{"role": "user", "content": "héllo"}]
    store.keep_response("ann", "r1", turns)
    [kept] = store.export("ann")["responses"]
    assert (kept["id"], kept["messages"]) == ("r1", turns)
    store.keep_response("ann", "r2", turns, keep=0)
    assert store.export("ann")["responses"] == []
    store.keep_response("ann", "r3", turns)
    store.keep_response("ann", "r4", turns, keep=-5)       # below zero: as zero
    assert store.export("ann")["responses"] == []


def test_invariant_pid_alive_tells_a_running_process_from_an_ended_one_without_signalling_it(monkeypatch):
    """A running child is alive (and only asked: signal 0), an ended one is not, and a process of another user
    (kill refused: PermissionError) counts as alive."""
    import subprocess
    import sys

    from localpers.store import store as store_module
    from localpers.store.store import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # still running: asked, not hung up
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(store_module.os, "kill", refused)
    assert pid_alive(child.pid)


def test_invariant_a_users_artifact_folder_and_its_parent_are_private(store):
    old = os.umask(0o022)              # a usual umask would leave them readable by others
    try:
        folder = store.artifact_dir("ann")
    finally:
        os.umask(old)
    for path in (folder, folder.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, (path, oct(path.stat().st_mode))


def test_invariant_forget_drops_the_users_indexes_scratch_folders_and_files_and_tells_the_listeners(tmp_path, monkeypatch):
    """forget leaves nothing of the user in memory (the BM25 and dense indexes hold their text's tokens and
    vectors) while another user's stay; deletes their job scratch folders even of a job still running, and tells
    every on_retire listener about each artifact file it deletes."""
    from tests.test_mutation_kinds import Embedder

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home", embedder=Embedder()) as store:
        store.add("ann", "sailing on the river")
        store.add("bob", "bread and chess")
        for user, word in (("ann", "sailing"), ("bob", "bread")):
            for mode in ("bm25", "dense"):
                assert store.search(user, word, mode=mode)
        file = store.artifact_dir("ann") / "adapter.gguf"
        file.write_bytes(b"GGUF")
        told = []
        store.on_retire.append(told.append)
        assert len(store._bm25) == 2 and len({key[0] for key in store._dense}) == 2
        with store.temp_dir("ann") as scratch:
            store.forget("ann")
            assert not scratch.exists()
        assert told == [file.resolve()]
        assert len(store._bm25) == 1 and {key[0] for key in store._dense} == set(store._bm25)
        assert [hit["text"] for hit in store.search("bob", "bread")] == ["bread and chess"]


def test_invariant_forget_retries_once_after_a_full_disk_and_never_after_another_error(store, monkeypatch):
    """A full disk while deleting the user's rows: the WAL is checkpointed and the delete tried once more
    (it succeeds here); any other database error stands at once."""
    import contextlib

    real = store._write
    failures = []

    def failing(error):
        @contextlib.contextmanager
        def write():
            if not failures:
                failures.append(error)
                raise sqlite3.OperationalError(error)
            with real() as conn:
                yield conn
        return write

    store.add("ann", "a note")
    monkeypatch.setattr(store, "_write", failing("database or disk is full"))
    store.forget("ann")
    assert store.users() == [] and failures == ["database or disk is full"]
    store.add("bob", "a note")
    file = store.artifact_dir("bob") / "adapter.gguf"
    file.write_bytes(b"GGUF")
    failures.clear()
    monkeypatch.setattr(store, "_write", failing("database is locked"))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.forget("bob")
    assert store.users() == ["bob"] and not file.exists()  # the files go first, whatever happens to the rows


class _Vacuum:
    """A connection whose VACUUM fails with `error` (everything else passes through)."""

    def __init__(self, conn, error):
        self.conn, self.error = conn, error

    def execute(self, sql, *args):
        if sql.strip().upper() == "VACUUM":
            raise sqlite3.OperationalError(self.error)
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_invariant_forget_goes_on_without_vacuum_on_a_full_disk_only(store, monkeypatch):
    """VACUUM needs the file's size free: on a full disk forget ends without it (secure_delete zeroed the rows
    already); any other VACUUM error stands."""
    real = store._conn
    for user in ("ann", "bob"):
        store.add(user, "a note")
    monkeypatch.setattr(store, "_conn", lambda: _Vacuum(real(), "database or disk is full"))
    store.forget("ann")
    monkeypatch.setattr(store, "_conn", lambda: _Vacuum(real(), "disk I/O error"))
    with pytest.raises(sqlite3.OperationalError, match="I/O"):
        store.forget("bob")
    assert store.users() == []


def test_forget_while_another_process_holds_the_store_open_says_so(store, monkeypatch):
    """The rows are deleted, but a reader elsewhere keeps the WAL from being truncated (the checkpoint reports
    busy): a UserError names the user and the file."""
    class Busy(_Vacuum):
        def execute(self, sql, *args):
            if sql == "PRAGMA wal_checkpoint(TRUNCATE)":
                return self.conn.execute("SELECT 1, 0, 0")
            return self.conn.execute(sql, *args)

    real = store._conn
    store.add("ann", "a note")
    monkeypatch.setattr(store, "_conn", lambda: Busy(real(), None))
    with pytest.raises(UserError, match=r"'ann' is deleted, but another process holds .*localpers\.db open"):
        store.forget("ann")
    assert store.users() == []


def test_a_key_file_store_opened_with_a_passphrase_says_to_unset_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path) as store:
        store.add("ann", "a note")
    monkeypatch.setenv("LOCALPERS_PASSPHRASE", "secret")
    with pytest.raises(UserError, match="key file, not a passphrase: unset LOCALPERS_PASSPHRASE"):
        Store.open(tmp_path)


def test_invariant_a_broken_file_marks_its_own_artifact_or_the_folder_artifact_holding_it(store, tmp_path):
    from localpers import names

    store.add("ann", "a note")
    folder = tmp_path / "routes"
    folder.mkdir()
    (folder / "fact-1.gguf").write_bytes(b"GGUF 1")
    store.register_artifact("ann", names.LORA_ROUTES, folder, SHA, meta={"method": "edit"})
    store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": "perce"})
    routes, lora = (store.latest_artifact("ann", kind, SHA) for kind in (names.LORA_ROUTES, "lora"))
    assert store.mark_artifact_broken("ann", lora["path"], "bad magic") == 1
    assert store.mark_artifact_broken("ann", tmp_path / "elsewhere" / "fact-1.gguf", "x") == 0
    assert store.mark_artifact_broken("ann", Path(routes["path"]) / "fact-1.gguf", "truncated") == 1
    broken = {a["kind"]: a["meta"].get("broken") for a in store.artifacts("ann")}
    assert broken == {"lora": "bad magic", names.LORA_ROUTES: "truncated"}


def test_deleting_a_message_deletes_the_kept_responses_that_quote_it_as_plain_text(store):
    item = store.add("ann", "a note")
    store.keep_response("ann", "resp-1", [{"role": "user", "content": "a note"}])
    store.keep_response("ann", "resp-2", [{"role": "user", "content": "another"}])
    store.delete_item("ann", item)
    assert store.response_conversation("ann", "resp-1") is None and store.response_conversation("ann", "resp-2")


def test_invariant_a_full_disk_at_open_is_the_disk_full_error_not_a_folder_error(tmp_path, monkeypatch):
    """Store.open on a full disk raises the OSError (ENOSPC: the server's 507 DISK_FULL), not the UserError of a
    folder that cannot be written."""
    import errno

    from localpers.store import store as store_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(store_module.os, "open", full)
    with pytest.raises(OSError) as raised:
        Store.open(tmp_path / "home")
    assert raised.value.errno == errno.ENOSPC and not isinstance(raised.value, UserError)


def test_invariant_migrating_an_old_registry_reads_only_a_string_method(tmp_path, monkeypatch):
    """A store written before the registry's method and sources columns: the migration reads each artifact's
    method from its sealed meta, "" when that is not a string."""
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    home = tmp_path / "home"
    with Store.open(home) as store:
        store.add("ann", "a note")
        store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": "edit"})
        store.register_artifact("ann", "control_vector", _artifact(tmp_path, "v.gguf"), SHA, meta={"method": "logo"})
        cipher = store.cipher
    with sqlite3.connect(home / DB_FILE) as conn:
        rows = conn.execute("SELECT id, user_id, kind FROM artifacts ORDER BY id").fetchall()
        for artifact_id, user_id, kind in rows:
            meta = {"method": 5 if kind == "lora" else "logo", "steps": 3}
            conn.execute("UPDATE artifacts SET meta = ? WHERE id = ?",
                         (cipher.seal(json.dumps(meta).encode(), b"%d:artifact" % user_id), artifact_id))
        conn.execute("ALTER TABLE artifacts DROP COLUMN method")
        conn.execute("ALTER TABLE artifacts DROP COLUMN sources")
    conn.close()
    with Store.open(home) as store:
        pass
    with sqlite3.connect(home / DB_FILE) as conn:
        assert conn.execute("SELECT kind, method FROM artifacts ORDER BY id").fetchall() == [("lora", ""),
                                                                                            ("control_vector", "logo")]
    conn.close()


def test_invariant_a_jobs_artifact_registers_only_while_the_job_runs_and_its_sources_are_checked(store, tmp_path):
    """register_artifact(job=...) writes nothing unless that job of the user is running (StaleError naming the
    job); meta["sources"] must be a list of item ids (not a bool), meta["method"] a string, and every source
    still there (SourcesGoneError naming the missing ones); the folder it is copied into is private."""
    from localpers import names
    from localpers.store.store import SourcesGoneError, StaleError

    note = store.add("ann", "a note")
    queued = store.queue_job("ann", names.EDIT)
    with pytest.raises(StaleError, match=f"job {queued['id']} was cancelled"):
        store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": "edit"}, job=queued["id"])
    with pytest.raises(StaleError, match="job 999 was cancelled"):
        store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": "edit"}, job=999)
    running = store.claim_job()
    store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": "edit", "sources": [note]},
                            job=running["id"])
    folder = store.artifact_dir("ann")
    assert [a["kind"] for a in store.artifacts("ann")] == ["lora"]
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    for sources in ("1, 2", [True], [note, "x"]):
        with pytest.raises(UserError, match=r'meta\["sources"\] must be a list of item ids'):
            store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"sources": sources})
    with pytest.raises(UserError, match=r'meta\["method"\] must be a method name'):
        store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": 5})
    with pytest.raises(SourcesGoneError, match=r"items \[12345\] were deleted"):
        store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"sources": [note, 12345]})


def test_invariant_a_fresh_store_registers_a_folder_artifact_in_a_private_folder(tmp_path, monkeypatch):
    """The first artifact of a store (no artifacts folder yet) makes the folders 0700 and copies a folder in."""
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    with Store.open(tmp_path / "home") as store:
        store.add("ann", "a note")
        routes = tmp_path / "routes"
        routes.mkdir()
        (routes / "a.gguf").write_bytes(b"GGUF")
        store.register_artifact("ann", "lora_routes", routes, SHA, meta={"method": "edit"})
        [artifact] = store.artifacts("ann")
        copied = Path(artifact["path"])
        assert (copied / "a.gguf").read_bytes() == b"GGUF" and copied.parent != routes.parent
        for path in (copied.parent, copied.parent.parent):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_invariant_deleting_items_queues_what_they_fed_and_marks_what_they_stated(store):
    """Deleting a preference queues the user's edit job (and nothing else without derived artifacts); deleting a
    plain message queues nothing; a deleted fact's message is marked superseded by no message (None); ids beyond
    SQLite's 64-bit integers are simply not found."""
    from localpers import names
    from localpers.store.store import NotFoundError

    learned = store.learn_text("ann", "src", _extracting({"src": [_stated("home", "Lyon", "I live in Lyon.")]}))
    store.finish_job(store.claim_job()["id"], names.DONE)
    note = store.add("ann", "a note")
    store.delete_item("ann", note)
    assert [j["state"] for j in store.jobs("ann")] == [names.DONE]
    store.delete_item("ann", learned["facts"][0]["id"])
    assert [(j["kind"], j["state"]) for j in store.jobs("ann")] == [(names.EDIT, names.QUEUED), (names.EDIT, names.DONE)]
    [message] = store.items("ann", kind="message")
    assert names.SUPERSEDED_BY in message["meta"] and message["meta"][names.SUPERSEDED_BY] is None
    for item_id in (1 << 63, -(1 << 63) - 1, 1 << 64):
        with pytest.raises(NotFoundError):
            store.delete_item("ann", item_id)


def test_invariant_routed_edits_lose_only_the_deleted_facts_routes(store, tmp_path):
    """A names.LORA_ROUTES artifact (one adapter a fact) loses, when a fact is deleted, that fact's route and
    file only, and stays registered for the others; a route without a source retires the whole artifact."""
    from localpers import names

    extract = _extracting({"src": [_stated("home", "Lyon", "I live in Lyon."), _stated("diet", "vegan", "I'm vegan."),
                                   _stated("job", "nurse", "I work as a nurse.")]})
    facts = store.learn_text("ann", "src", extract)["facts"]
    home, diet, job = (f["id"] for f in facts)
    folder = tmp_path / "routes"
    folder.mkdir()
    routes = []
    for fact_id in (home, diet, job):
        (folder / f"{fact_id}.gguf").write_bytes(b"GGUF")
        routes.append({"file": f"{fact_id}.gguf", "words": "w", "fact": str(fact_id), "source": fact_id})
    store.register_artifact("ann", names.LORA_ROUTES, folder, SHA,
                            meta={"method": "edit", "sources": [home, diet, job], "routes": routes})
    copied = Path(store.latest_artifact("ann", names.LORA_ROUTES, SHA)["path"])
    store.delete_item("ann", home)
    store.delete_item("ann", diet)
    [left] = store.artifacts("ann", kind=names.LORA_ROUTES)
    assert sorted(p.name for p in copied.iterdir()) == [f"{job}.gguf"]
    assert [r["source"] for r in left["meta"]["routes"]] == [job]
    sourceless = [{"file": "x.gguf", "words": "w"}]
    (folder / "x.gguf").write_bytes(b"GGUF")
    store.register_artifact("ann", names.LORA_ROUTES, folder, SHA,
                            meta={"method": "edit", "sources": [job], "routes": sourceless})
    store.delete_item("ann", job)
    assert store.artifacts("ann", kind=names.LORA_ROUTES) == []


def test_invariant_dense_search_embeds_every_item_in_batches_and_makes_its_embedder(tmp_path, monkeypatch):
    """More items than two embedding batches: every one is embedded (the last found by dense search); a store
    opened without an embedder makes the default one at its first dense search."""
    import numpy as np

    from localpers.store import store as store_module

    class Violin:  # deterministic: a text with "violin" is one direction, any other text another
        name = "test-violin"

        def embed(self, texts):
            return np.array([[1.0, 0.0] if "violin" in t else [0.0, 1.0] for t in texts], dtype=np.float32)

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    monkeypatch.setattr(store_module, "make_embedder", Violin)
    with Store.open(tmp_path / "home") as store:
        store.add_many("ann", [store_module.check_item(f"note {i} sailing") for i in range(135)]
                       + [store_module.check_item("the violin at last")])
        [hit] = store.search("ann", "violin", k=1, mode="dense")
        assert hit["text"] == "the violin at last"


def test_the_import_lists_its_first_five_ids_and_shows_only_when_more_follow():
    from localpers.store.store import _some

    assert _some(list("abcde")) == "a, b, c, d, e" and _some(list("abcdef")) == "a, b, c, d, e, …"


def test_invariant_user_counts_holds_and_requeue_read_what_was_written(store, tmp_path):
    """user_counts: every user oldest first with their items, preferences and artifacts; holds_fact: the same
    slot and value only, and nothing for an unknown user; requeue_job puts a running job back (False otherwise)."""
    from localpers import names

    lyon = _stated("home", "Lyon", "I live in Lyon.")
    store.learn_text("ann", "src", _extracting({"src": [lyon]}))
    store.add("bob", "a note")
    store.register_artifact("bob", "lora", _artifact(tmp_path), SHA, meta={"method": "perce"})
    assert store.user_counts() == [{"user": "ann", "items": 2, "preferences": 1, "artifacts": 0},
                                   {"user": "bob", "items": 1, "preferences": 0, "artifacts": 1}]
    assert store.holds_fact("ann", lyon) and not store.holds_fact("bob", lyon)
    assert not store.holds_fact("ann", _stated("home", "Paris", "I live in Paris."))
    assert not store.holds_fact("ann", _stated("diet", "Lyon", "Lyon."))
    assert not store.holds_fact("nobody", lyon)
    job = store.claim_job()
    assert store.requeue_job(job["id"]) is True and store.job(job["id"])["state"] == names.QUEUED
    assert store.requeue_job(job["id"]) is False
    store.finish_job(store.claim_job()["id"], names.DONE)
    assert store.requeue_job(job["id"]) is False and store.job(job["id"])["state"] == names.DONE


def test_invariant_a_lamp_entry_is_a_review_by_any_of_its_review_fields_and_a_job_shows_its_place(store, tmp_path):
    """A LaMP entry with reviewText, score or overall is a review (else a document), and a non-object entry is
    refused saying what was expected; job() shows a queued job's place in the queue (None once it runs);
    deleting the item an artifact was derived from queues that artifact's method again."""
    from localpers import names
    from localpers.store.store import _lamp_item, profile_entry

    for field in ("reviewText", "score", "overall"):
        assert _lamp_item({"text": "Great.", field: "5"})[0] == "review", field
    assert _lamp_item({"text": "A page."})[0] == "document"
    with pytest.raises(UserError, match="expected a JSON object"):
        profile_entry(["not", "an", "object"])
    note = store.add("ann", "a note")
    store.register_artifact("ann", "lora", _artifact(tmp_path), SHA, meta={"method": names.PERCE, "sources": [note]})
    store.delete_item("ann", note)
    [queued] = store.jobs("ann")
    assert (queued["kind"], store.job(queued["id"])["position"]) == (names.PERCE, store.queue_positions()[queued["id"]])
    store.claim_job()
    assert store.job(queued["id"])["position"] is None
