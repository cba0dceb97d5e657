"""localpers' local history store: one SQLite database (WAL mode) per data directory, holding users, their
history items, embeddings of those items, the registry of their personalization artifacts (one current artifact
per user, method, kind and base model, with the ids of the items it was derived from) and the persistent queue
of background jobs that recompute them.

Item text, item metadata, artifact metadata and embeddings are sealed with AES-GCM before they reach SQLite,
so no user text lies in plaintext in the database, its WAL or its journal. User names, item kinds and
timestamps stay in clear: the store filters on them. The key is a 0600 key file created on first use, or,
when LOCALPERS_PASSPHRASE is set, derived with scrypt from it and a salt kept in the database.

Facts (store.learn_chat, store.facts): the preferences learned from chat are atomic facts about the user, each a
preference item (its statement as text; attribute, value and source message in meta) indexed by keyed hashes of
(user, slot) and (user, attribute=value), so that learning one fact costs O(log n) whatever the history holds:
an update replaces only the fact of the same slot, a retirement deletes one. store.facts(user) lists them.

Writes are one short SQLite transaction: no model runs on the write path. Search indexes live in memory
and catch up with the database (including writes by other processes) when searched."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from localpers import names
from localpers.errors import UserError
from localpers.store.retrieval import BM25Index, DenseIndex, fuse, make_embedder

MAX_TEXT_BYTES = 64 * 1024  # per item, text and metadata each
DB_FILE = "localpers.db"
TEMP_DIR = "tmp"  # jobs' scratch folders (Store.temp_dir)
JOB_LOCK_FILE = "jobs.lock"  # held by whoever runs an artifact job (Store.job_lock)
KEY_FILE = "key"
SEARCH_MODES = ("bm25", "dense", "hybrid")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")  # kinds (and the user ids of stores before layout 2)
MAX_USER_CHARS = 1024
# Characters a user id may not hold: C0/C1 controls, lone surrogates, line and paragraph separators.
_FORBIDDEN_IN_USER = {"Cc", "Cs", "Zl", "Zp"}
# bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069) and marks (LRM, RLM, ALM): an id holding
# one can display as another id (Trojan Source, CVE-2021-42574)
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
MAX_META_DEPTH = 32  # nesting of an item's meta (objects and arrays): what every reader can decode back


def _visible(c: str) -> bool:
    """A character that shows as ink: not whitespace (NBSP included), not a format or control character
    (zero-width space/joiners, bidi controls, BOM), not a mark, not a Hangul/Braille filler."""
    return not (c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Mn", "Me", "Zs")
                or c in "\u115f\u1160\u3164\uffa0\u2800\u180e")
LAYOUT = 2  # 1: artifact folders named after the user id; 2: after the user's row id (artifacts/_user-<id>)
_KEY_CHECK = b"localpers key check"
_SCRYPT = dict(length=32, n=2**15, r=8, p=1)  # ~0.1 s and 32 MiB per open

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created REAL NOT NULL,
    deletions INTEGER NOT NULL DEFAULT 0);  -- bumped by each item deletion: tells in-memory indexes to look
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL, ts REAL NOT NULL, text BLOB NOT NULL, meta BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS items_by_user ON items(user_id, id);
CREATE TABLE IF NOT EXISTS vectors (
    item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    model TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (item_id, model));
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, base_model_sha256 TEXT NOT NULL,
    meta BLOB NOT NULL, created REAL NOT NULL, UNIQUE (user_id, kind, version));
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,  -- forget cancels a user's jobs
    kind TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', result TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, started REAL, finished REAL);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS facts (  -- the index of learned facts: keyed hashes and ids, no text
    item_id INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,  -- the preference item stating it
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    slot BLOB,      -- keyed hash of what an update replaces (attribute, or attribute group and thing); NULL: none
    value BLOB,     -- keyed hash of attribute=normalized value
    message INTEGER);  -- the chat message it was learned from (deleting it deletes the fact)
CREATE INDEX IF NOT EXISTS facts_by_slot ON facts(user_id, slot);
CREATE INDEX IF NOT EXISTS facts_by_message ON facts(user_id, message);
CREATE TABLE IF NOT EXISTS chat_seen (  -- keyed hashes of chat messages already stored (no text)
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    digest BLOB NOT NULL,
    item INTEGER,  -- the message's item id (NULL: stored before this column); "Scratch that." finds the turn before
    PRIMARY KEY (user_id, digest));
CREATE TABLE IF NOT EXISTS responses (  -- /v1/responses conversations that a previous_response_id continues
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    response TEXT NOT NULL,           -- the response's id (resp_<random hex>), no text
    created REAL NOT NULL,
    conversation BLOB NOT NULL,       -- sealed: the chat messages, JSON
    UNIQUE (user_id, response));
"""
# Registry columns added in session 6 (ALTER TABLE for databases made before): the method that made the
# artifact, the ids of the items it was derived from (JSON list of ints, no text), and its state.
ARTIFACT_COLUMNS = {
    "method": "TEXT NOT NULL DEFAULT ''",
    "sources": "TEXT NOT NULL DEFAULT '[]'",
}


def disk_full(e: BaseException) -> bool:
    """Is `e` the data folder's disk being full: SQLite's SQLITE_FULL ("database or disk is full") or ENOSPC?"""
    import errno

    if isinstance(e, sqlite3.OperationalError):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(e)
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


DISK_FULL = "the disk of the data folder is full: free some space and try again"


class NotFoundError(UserError):
    """A read of a user or an item the store does not hold (the server answers 404)."""


class StaleError(UserError):
    """An artifact's registration came too late: its job was cancelled (forget), or an item it was derived
    from was deleted meanwhile (the deletion queued its recomputation). Nothing was written."""


class SourcesGoneError(StaleError):
    """A StaleError of the second kind: an item the artifact was derived from was deleted (or replaced) while
    its job ran; the deletion queued the job that recomputes it, so the job is superseded, not failed."""


def make_private(path: str | Path) -> None:
    """Only the owner may read what the data folder holds: files 0600, folders 0700 (a folder recursively)."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o700)
            for f in files:
                os.chmod(os.path.join(root, f), 0o600)
    elif path.exists():
        os.chmod(path, 0o600)


def signals_file(directory: str | Path, user: str) -> Path:
    """Where a user's LoGo sync signals live under a data folder: sync/signals/<sha256(user)[:16]>.npz
    (localpers.personalize.signals writes and reads it; Store.forget removes it)."""
    return Path(directory) / "sync" / "signals" / (hashlib.sha256(user.encode("utf-8")).hexdigest()[:16] + ".npz")


def _content_text(content) -> str | None:
    """A chat message's content as text (a list of content parts joined), None for no text."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else None


def _response_aad(user_id: int, response_id: str) -> bytes:
    """A kept conversation's associated data: its ciphertext opens only in its own row."""
    return f"{user_id}:response:{response_id}".encode("utf-8")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0; one of another user's counts). A reused pid counts as
    alive: localpers.sync.lifetime.alive tells them apart by start time where /proc has it."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def data_dir(arg: str | None = None) -> Path:
    """--data-dir, else $LOCALPERS_HOME, else $XDG_DATA_HOME/localpers, else ~/.local/share/localpers."""
    if arg:
        return Path(arg).expanduser()
    if os.environ.get("LOCALPERS_HOME"):
        return Path(os.environ["LOCALPERS_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "localpers"


def check_user(user) -> str:
    """A user id as the store keys it: any string of 1 to 1024 characters, not blank, without control
    characters (what OpenAI's `user` field and clients' display names and e-mail addresses hold), in Unicode
    NFC so that "josé" typed either way is one user. The id is only ever a value in SQL: no file or folder
    name is built from it (a user's artifacts live in artifacts/_user-<row id>)."""
    if not isinstance(user, str):
        raise UserError(f"the user id must be a string, not {type(user).__name__}")
    if any(unicodedata.category(c) == "Cs" for c in user):  # lone surrogates: undecodable bytes (%ff in a URL)
        raise UserError(f"the user id {user[:64]!r} is not valid UTF-8 text")
    if not user:
        raise UserError("the user id is empty")
    if not any(_visible(c) for c in user):  # blank: spaces, NBSP, zero-width and format characters only
        raise UserError(f"the user id {user[:64]!r} is blank (no visible character)")
    bad = next((c for c in user if unicodedata.category(c) in _FORBIDDEN_IN_USER or c in _BIDI_CONTROLS), None)
    if bad is not None:
        what = "bidirectional-text control" if bad in _BIDI_CONTROLS else "control character"
        raise UserError(f"the user id {user[:64]!r} holds the {what} U+{ord(bad):04X}")
    user = unicodedata.normalize("NFC", user)
    if len(user) > MAX_USER_CHARS:
        raise UserError(f"the user id is {len(user)} characters; the limit is {MAX_USER_CHARS}")
    return user


def check_name(what: str, value) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise UserError(f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_', '@', '+' or '-'")
    return value


def encode_text(text) -> bytes:
    """The UTF-8 bytes of an item's text, or a UserError saying what is wrong with it."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"text is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not isinstance(text, str):
        raise UserError(f"text must be a string, not {type(text).__name__}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: undecodable bytes from argv, or '\udXXX' escapes in JSON
        raise UserError(f"text is not valid UTF-8 (bad character at offset {e.start})") from None
    if not text.strip():
        raise UserError("text is empty")
    if len(data) > MAX_TEXT_BYTES:
        raise UserError(f"text is {len(data)} bytes; the limit is {MAX_TEXT_BYTES} bytes (64 KiB)")
    return data


def encode_meta(meta) -> bytes:
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise UserError(f"meta must be a JSON object, not {type(meta).__name__}")
    _check_depth(meta)
    try:
        data = json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as e:
        raise UserError(f"meta is not valid JSON: {e}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise UserError(f"meta is {len(data)} bytes; the limit is {MAX_TEXT_BYTES} bytes (64 KiB)")
    return data


def _read_meta(data: bytes) -> dict:
    """An item's stored meta; meta nested deeper than MAX_META_DEPTH (stored before the limit) reads as
    {"unreadable": ...} so that the user's list, export and search still answer."""
    try:
        meta = json.loads(data)
        _check_depth(meta)
        return meta
    except (RecursionError, UserError):
        return {"unreadable": f"this item's meta nests more than {MAX_META_DEPTH} levels"}


def said_by(message: dict, user: str) -> bool:
    """Is a chat message `user`'s own? One without a `name` is; in a group chat one whose `name` is another
    participant's is not (compared as stored: NFC, case-folded). Only the user's own messages are stored and
    learned from (Store.learn_chat), and only a conversation whose last user message is theirs is personalized
    for them (the server): another participant never gets the user's memory."""
    name = message.get("name")
    return name is None or unicodedata.normalize("NFC", str(name)).casefold() == check_user(user).casefold()


def read_routes(meta) -> list[dict] | None:
    """A names.LORA_ROUTES artifact's routes from its registry meta (personalize.editing.edit_routed writes
    them; the one reader of that format): dicts with "file" (a bare file name inside the artifact's folder),
    "words" (str, what a question is matched against), "fact" (str, the fact's id; None when absent) and
    "source" (int, the preference item's id; None when absent). None when the meta has no route list or any
    route is malformed (a file naming another folder, no words): the artifact is then unreadable as a whole."""
    routes = meta.get("routes") if isinstance(meta, dict) else None
    if not isinstance(routes, list) or not routes:
        return None
    out = []
    for r in routes:
        if not (isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("words"), str)
                and r["file"] == Path(r["file"]).name and r["file"] not in ("", ".", "..")):
            return None
        fact, source = r.get("fact"), r.get("source")
        out.append({"file": r["file"], "words": r["words"], "fact": fact if isinstance(fact, str) else None,
                    "source": source if isinstance(source, int) and not isinstance(source, bool) else None})
    return out


def _check_depth(meta: dict) -> None:
    """UserError when meta nests objects/arrays deeper than MAX_META_DEPTH (iterative: any depth is checked)."""
    stack = [(meta, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise UserError(f"meta nests more than {MAX_META_DEPTH} levels of objects and arrays")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))


MAX_TS = 253402214400  # 9999-12-31 00:00 UTC: the last time every local time zone can show (datetime)


def check_item(text, kind="message", meta=None, ts=None) -> tuple[str, float, bytes, bytes]:
    """Validate one item: (kind, timestamp, text bytes, meta bytes), nothing written yet."""
    check_name("kind", kind)
    if ts is None:
        ts = time.time()
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts <= MAX_TS:
        raise UserError(f"ts must be a number of seconds since the epoch (1970) up to {MAX_TS} (year 9999), "
                        f"not {ts!r}")
    return kind, float(ts), encode_text(text), encode_meta(meta)


def message_items(messages) -> list[tuple]:
    """A chat, OpenAI's `messages` list ([{"role", "content"}], content a string or a list of text parts), as
    validated items: one per message, kind "message", the role in meta (and a group chat's `name`). The one parser of this form, for the
    memories endpoint and for `localpers import`."""
    from localpers.model.chat import content_text

    if not isinstance(messages, list) or not messages:
        raise UserError('"messages" must be a non-empty list of {"role", "content"} objects')
    items = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise UserError(f'messages[{number}] must be an object with a "role" and a "content"')
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise UserError(f'messages[{number}]: "name" must be a string (a group chat\'s speaker)')
        try:
            speaker = {"name": message["name"]} if isinstance(message.get("name"), str) else {}
            items.append(check_item(content_text(message.get("content")), "message", {"role": message["role"], **speaker}))
        except UserError as e:
            raise UserError(f"messages[{number}]: {e}") from None
    return items


LAMP_TEXT_FIELDS = ("title", "summary", "description", "text", "abstract", "content", "reviewText")
# The fields of a profile entry that are neither text nor to be kept: the entry's own id is not the store's id,
# and the synthetic world's "kind" and "step" describe the entry for the evaluation.
PROFILE_SKIP_FIELDS = ("id", "kind", "step")


def profile_entry(entry) -> tuple[str, dict]:
    """A LaMP / LongLaMP (or synthetic world) profile entry: (its text fields joined by newlines, every other
    field). The one parser of profile entries: the import stores the other fields in meta; the evaluation
    (localpers.personalize.datasets) shows their values beside the text. Raises UserError without a text field."""
    if not isinstance(entry, dict):
        raise UserError("expected a JSON object")
    texts = [entry[field] for field in LAMP_TEXT_FIELDS if isinstance(entry.get(field), str) and entry[field].strip()]
    if not texts:
        raise UserError(f"no text field (expected one of {', '.join(LAMP_TEXT_FIELDS)})")
    return "\n".join(texts), {key: value for key, value in entry.items() if key not in LAMP_TEXT_FIELDS}


def upqa_user(entry: dict, index: int) -> str:
    """Whose statement a UPQA item is: its "user_id" (world files), else the item is a user of its own."""
    return str(entry.get("user_id", f"upqa-{index}"))


def _jsonl_item(entry) -> tuple:
    if not isinstance(entry, dict) or "text" not in entry:
        raise UserError('expected a JSON object with a "text" field')
    entry = dict(entry)
    text, kind, ts = entry.pop("text"), entry.pop("kind", "message"), entry.pop("ts", None)
    meta = entry.pop("meta", {})
    if not isinstance(meta, dict):
        raise UserError(f'"meta" must be a JSON object, not {type(meta).__name__}')
    entry.pop("id", None)  # ids are the store's own
    if isinstance(text, list):  # text parts, as in chat
        from localpers.model.chat import content_text

        text = content_text(text)
    return check_item(text, kind, meta | entry, ts)  # other fields are kept in meta


class Imported(list):
    """The items of an import file (a list), and how many of its chats' messages were left out (`dropped`: the
    assistant's replies and other roles' messages; a user's history holds what they wrote, as in a served chat)."""
    dropped: int = 0


def _jsonl_line(entry, user: str | None = None) -> tuple[list[tuple], int]:
    """One line of a JSONL import: an item ({"text", ...}) or a chat ({"messages": [...]}, as the HTTP
    endpoint takes it), of which only the user's messages are kept: role "user" and, in a group chat, said by
    `user` (said_by; None: every user-role message); (items, messages left out)."""
    if isinstance(entry, dict) and "messages" in entry and "text" not in entry:
        items = message_items(entry["messages"])
        metas = [json.loads(item[3]) for item in items]
        mine = [item for item, meta in zip(items, metas)
                if meta.get("role") == "user" and (user is None or said_by(meta, user))]
        return mine, len(items) - len(mine)
    return [_jsonl_item(entry)], 0


def _lamp_item(entry) -> tuple:
    """A LaMP / LongLaMP profile entry: its text fields joined, everything else (id, score, date …) in meta."""
    text, others = profile_entry(entry)
    kind = "review" if {"reviewText", "score", "overall"} & entry.keys() else "document"
    return check_item(text, kind, others | {"source": "lamp"})


def _upqa_item(entry) -> tuple:
    """A UPQA item: the user's statement of one of their attributes, stored as a preference with the question
    and target clusters that editing trains on (strings, or cluster9's lists), kept as the file has them:
    datasets.upqa_fact is what reads them, for the evaluation, editing and the served path alike."""
    if not isinstance(entry, dict) or not isinstance(entry.get("input_attribute"), str):
        raise UserError('expected a UPQA object with an "input_attribute" string')
    meta = {"source": "upqa", **{k: entry[k] for k in ("attribute_type", "question", "target") if k in entry}}
    return check_item(entry["input_attribute"], "preference", meta)


def _one_user(records: list, what: str, keys: list[str], record: str | None, merge_users: bool) -> list:
    """The records of one user: the chosen one's (--record), else all of them when they belong to one user or
    merge_users says to put several users' records into one; never several users' silently."""
    if record is not None:
        chosen = [r for r, key in zip(records, keys) if key == record]
        if not chosen:
            raise UserError(f"no {what} has the id {record!r} (ids: {_some(keys)})")
        return chosen
    if len(set(keys)) > 1 and not merge_users:
        raise UserError(f"{len(records)} {what}s of {len(set(keys))} different users (ids: {_some(keys)}): import "
                        f"one user's with --record ID, or all into this one user with --merge-users")
    return records


def _some(keys: list[str], n: int = 5) -> str:
    unique = list(dict.fromkeys(keys))
    return ", ".join(unique[:n]) + (", …" if len(unique) > n else "")


def _json_entries(data, record: str | None, merge_users: bool):
    """Recognise a JSON import: what its entries are called, the entries, and the parser of one entry."""
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        return "item", data["items"], _jsonl_item  # a localpers export
    records = [data] if isinstance(data, dict) else data
    if isinstance(records, list) and records and all(isinstance(r, dict) and "profile" in r for r in records):
        records = _one_user(records, "LaMP record", [str(r.get("id")) for r in records], record, merge_users)
        if not all(isinstance(r["profile"], list) for r in records):
            raise UserError('"profile" must be a list')
        return "profile entry", [entry for r in records for entry in r["profile"]], _lamp_item
    if isinstance(data, list) and data and all(isinstance(r, dict) and "input_attribute" in r for r in data):
        keys = [upqa_user(r, i) for i, r in enumerate(data)]
        return "UPQA item", _one_user(data, "UPQA item", keys, record, merge_users), _upqa_item
    raise UserError(
        "not a recognised import: expected a localpers export, a LaMP/LongLaMP record with a profile, or UPQA items"
    )


def read_import(path: str | os.PathLike, record: str | None = None, merge_users: bool = False,
                user: str | None = None) -> Imported:
    """Parse and validate a whole import file before anything is written (formats: README, "Import formats"):
    .jsonl/.ndjson, one JSON object a line: an item {"text", "kind"?, "meta"?, "ts"?} (other fields go into
    meta) or a chat {"messages": [{"role", "content"}, ...]} (its user messages; the assistant's replies, and in a
    group chat the messages whose `name` is not `user`'s (said_by), are left out, as a served chat never stores
    them, and counted in the result's `dropped`); .json: a localpers export,
    LaMP/LongLaMP records with a profile, or UPQA items. A file holding several users' records (LaMP records, UPQA
    items) imports one user's (`record`: a LaMP record's id, a UPQA item's user_id or "upqa-<index>") or, with
    merge_users, all.
    Any error names the file and the line (JSONL, JSON syntax) or the entry."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    items = Imported()
    if path.suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                mine, dropped = _jsonl_line(json.loads(line.decode("utf-8")), user)
                items.extend(mine)
                items.dropped += dropped
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {number}: not valid UTF-8 (bad byte at column {e.start + 1})") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number}: invalid JSON: {e.msg} (column {e.colno})") from None
            except UserError as e:
                raise UserError(f"{path} line {number}: {e}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise UserError(f"{path} line {line}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        try:
            where, entries, parse = _json_entries(data, record, merge_users)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        for number, entry in enumerate(entries, 1):
            try:
                items.append(parse(entry))
            except UserError as e:
                raise UserError(f"{path}: {where} {number}: {e}") from None
    else:
        raise UserError(f"{path}: unknown import format (expected .jsonl or .json)")
    if not items:
        raise UserError(f"{path}: no items to import" + (f" (its chats hold no message of the user's own: the "
                                                         f"assistant's replies and other participants' messages are "
                                                         f"not imported)" if items.dropped else ""))
    return items


class Cipher:
    """AES-256-GCM with a fresh 96-bit nonce per message; the associated data binds a blob to its owner
    and field, so a blob copied into another user's row or column does not decrypt."""

    def __init__(self, key: bytes):
        self.aead = AESGCM(key)
        # A separate key for keyed hashes (chat-message dedupe): equal messages give equal digests, and the
        # digests say nothing about the text without the store's key.
        self.mac_key = hashlib.sha256(b"localpers digest key\0" + key).digest()

    def digest(self, data: bytes) -> bytes:
        return hmac.new(self.mac_key, data, hashlib.sha256).digest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        return self.aead.decrypt(blob[:12], blob[12:], aad)


def _key_file(path: Path) -> bytes:
    """Read the key file, creating it (0600, all at once) if it does not exist yet."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key meanwhile: then use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != 32:
        raise UserError(f"{path} is not a localpers key file (expected 32 bytes, found {len(key)})")
    return key


def _passphrase() -> str | None:
    passphrase = os.environ.get("LOCALPERS_PASSPHRASE")
    if passphrase == "":
        raise UserError("LOCALPERS_PASSPHRASE is set but empty")
    return passphrase


def _scrypt(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, **_SCRYPT).derive(passphrase.encode("utf-8"))


def holds_store(directory: str | os.PathLike) -> bool:
    """Does `directory` hold a store's database (a file not empty; whether it is one is for Store.open to say)?"""
    db = Path(directory) / DB_FILE
    return db.is_file() and db.stat().st_size > 0


class Store:
    """The history store of one data directory. Safe to share between threads: each thread gets its own
    SQLite connection, WAL lets readers run while one writer writes, and the in-memory indexes are locked."""

    def __init__(self, directory: Path, embedder=None, read_only: bool = False):
        self.directory = Path(directory)
        self.embedder = embedder
        self.read_only = read_only
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._index_lock = threading.Lock()  # the in-memory indexes are shared by all threads
        self._bm25: dict[int, BM25Index] = {}  # user id -> index
        self._dense: dict[tuple[int, str], DenseIndex] = {}  # (user id, embedder name) -> index
        # called with each artifact file this store retires (absolute path), after it is deleted: a server's
        # engine drops the adapter it loaded from it (freed once no request holds it)
        self.on_retire: list = []
        self.cipher = self._unlock()
        if read_only:
            self._check_current()
        else:
            self._migrate()
            self._migrate_facts()
            self._migrate_chat_seen()

    @classmethod
    def open(cls, directory: str | os.PathLike, embedder=None, read_only: bool = False) -> Store:
        """The store of `directory`, made (folder, database, key) if new. `read_only`: for commands that only read
        (history, export, users, search): nothing is made or written, so a folder that holds no store is a
        UserError ("no localpers data in DIR"), and a store on a read-only mount is read as it stands. A folder
        that cannot be made or written (a read-only mount, /proc/...) is a UserError naming it."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{directory} is not a directory")
        if read_only:
            if not holds_store(directory):
                raise UserError(f"no localpers data in {directory}")
            return cls._opened(directory, embedder, read_only=True)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # the database first, 0600: SQLite gives its -wal and -shm files the database's permissions
            os.close(os.open(directory / DB_FILE, os.O_RDWR | os.O_CREAT, 0o600))
            make_private(directory / DB_FILE)  # a store made before this rule
            for suffix in ("-wal", "-shm"):
                if (directory / (DB_FILE + suffix)).exists():
                    make_private(directory / (DB_FILE + suffix))
        except OSError as e:
            if disk_full(e):
                raise
            raise UserError(f"cannot write the data folder {directory}: {e.strerror}") from None
        return cls._opened(directory, embedder)

    @classmethod
    def _opened(cls, directory: Path, embedder, read_only: bool = False) -> Store:
        try:
            return cls(directory, embedder, read_only=read_only)
        except sqlite3.OperationalError as e:  # a read-only database file, a locked one (a full disk: DISK_FULL)
            if disk_full(e):
                raise
            raise UserError(f"cannot {'read' if read_only else 'write'} the store in {directory}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{directory / DB_FILE} is not a localpers store: {e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._local = threading.local()

    # ----- connections and keys

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None and self.read_only:
            # mode=ro: SQLite never writes the database; where the folder cannot be written at all (a read-only
            # mount) not even WAL's -shm can be made, so the file is read as immutable (as it stands on disk)
            immutable = "" if os.access(self.directory, os.W_OK) else "&immutable=1"
            conn = sqlite3.connect(f"file:{quote((self.directory / DB_FILE).resolve().as_posix())}?mode=ro{immutable}",
                                   uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        elif conn is None:
            # Autocommit mode: transactions are explicit (see _write). check_same_thread is off only so that
            # close() can close every thread's connection; each connection is used by its own thread.
            conn = sqlite3.connect(
                self.directory / DB_FILE, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit reaches the OS before it returns, so a killed process loses nothing it
            # acknowledged; only a power cut can drop the last commits (FULL would fsync every write).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self):
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front, so it never deadlocks."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self):
        """One read transaction: every query inside sees the same snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _unlock(self) -> Cipher:
        if self.read_only:
            with self._read() as conn:
                try:
                    settings = dict(conn.execute("SELECT name, value FROM settings"))
                except sqlite3.OperationalError:  # no settings table: an empty or foreign database
                    settings = {}
            if "kdf" not in settings:
                raise UserError(f"no localpers data in {self.directory}")
            return self._key(settings, _passphrase())
        self._conn().executescript(SCHEMA)
        with self._write() as conn:
            settings = dict(conn.execute("SELECT name, value FROM settings"))
            passphrase = _passphrase()
            if "kdf" not in settings:  # a new store: choose its key
                if passphrase is not None:
                    salt = os.urandom(16)
                    key, kdf = _scrypt(passphrase, salt), b"scrypt"
                    conn.execute("INSERT INTO settings VALUES ('salt', ?)", (salt,))
                else:
                    key, kdf = _key_file(self.directory / KEY_FILE), b"keyfile"
                cipher = Cipher(key)
                conn.execute("INSERT INTO settings VALUES ('kdf', ?)", (kdf,))
                conn.execute("INSERT INTO settings VALUES ('layout', ?)", (str(LAYOUT).encode(),))
                conn.execute("INSERT INTO settings VALUES ('key_check', ?)", (cipher.seal(_KEY_CHECK, b"key"),))
                return cipher
        cipher = self._key(settings, passphrase)
        if settings.get("layout") != str(LAYOUT).encode():
            self._migrate_artifact_folders()
        return cipher

    def _key(self, settings: dict, passphrase: str | None) -> Cipher:
        """The cipher of an existing store (its settings rows), checked against its key_check."""
        if settings["kdf"] == b"scrypt":
            if passphrase is None:
                raise UserError(f"{self.directory} is encrypted with a passphrase: set LOCALPERS_PASSPHRASE")
            key, wrong = _scrypt(passphrase, settings["salt"]), "wrong LOCALPERS_PASSPHRASE"
        else:
            if passphrase is not None:
                raise UserError(
                    f"{self.directory} is encrypted with its key file, not a passphrase: unset LOCALPERS_PASSPHRASE"
                )
            key_path = self.directory / KEY_FILE
            if not key_path.exists():
                raise UserError(f"{key_path} is missing: the history in {self.directory} cannot be decrypted")
            key, wrong = _key_file(key_path), f"{key_path} is not the key of this store"
        cipher = Cipher(key)
        try:
            cipher.open(settings["key_check"], b"key")
        except InvalidTag:
            raise UserError(f"{wrong}: cannot decrypt {self.directory / DB_FILE}") from None
        return cipher

    def _check_current(self) -> None:
        """A store opened read-only cannot be migrated: one an older localpers wrote is a UserError saying so."""
        with self._read() as conn:
            layout = conn.execute("SELECT value FROM settings WHERE name = 'layout'").fetchone()
            columns = {row[1] for row in conn.execute("PRAGMA table_info(artifacts)")}
        if layout is None or layout[0] != str(LAYOUT).encode() or not set(ARTIFACT_COLUMNS) <= columns:
            raise UserError(f"{self.directory} was written by an older localpers: run a command that writes to it "
                            "(remember, serve) once to update it")

    def _migrate_artifact_folders(self) -> None:
        """Layout 1 -> 2: move artifacts/<user id> to artifacts/_user-<row id> and rewrite the registered paths.
        Safe to rerun after a crash at any point: a folder is moved only when its new place is free, and a
        path is rewritten only while it still starts with the old folder."""
        root = self.directory / "artifacts"
        with self._write() as conn:
            for user_id, name in conn.execute("SELECT id, name FROM users").fetchall():
                old, new = root / name, self._user_folder(user_id)
                if _NAME.fullmatch(name) and old.is_dir() and not new.exists():
                    old.rename(new)
                prefix = f"artifacts/{name}/"
                for artifact_id, path in conn.execute("SELECT id, path FROM artifacts WHERE user_id = ?", (user_id,)).fetchall():
                    if path.startswith(prefix):
                        conn.execute("UPDATE artifacts SET path = ? WHERE id = ?",
                                     (f"artifacts/{new.name}/{path[len(prefix):]}", artifact_id))
            conn.execute("INSERT OR REPLACE INTO settings VALUES ('layout', ?)", (str(LAYOUT).encode(),))

    def _migrate_facts(self) -> None:
        """Before the facts index: preferences learned from a chat message (meta "message") get an index row with
        no slot (never replaced by an update, deleted with their message). Once per store."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM settings WHERE name = 'facts_index'").fetchone():
                return
            for item_id, user_id, meta in conn.execute(
                    "SELECT id, user_id, meta FROM items WHERE kind = ? AND id NOT IN (SELECT item_id FROM facts)",
                    (names.PREFERENCE,)).fetchall():
                message = json.loads(self.cipher.open(meta, b"%d:meta" % user_id)).get("message")
                if isinstance(message, int):
                    conn.execute("INSERT INTO facts (item_id, user_id, message) VALUES (?, ?, ?)",
                                 (item_id, user_id, message))
            conn.execute("INSERT INTO settings VALUES ('facts_index', ?)", (b"1",))

    def _migrate_chat_seen(self) -> None:
        """chat_seen's item column, added to a store made before it (its rows keep NULL: a withdrawal of a turn
        stored before withdraws nothing)."""
        if "item" in {row[1] for row in self._conn().execute("PRAGMA table_info(chat_seen)")}:
            return
        with self._write() as conn:
            if "item" not in {row[1] for row in conn.execute("PRAGMA table_info(chat_seen)")}:
                conn.execute("ALTER TABLE chat_seen ADD COLUMN item INTEGER")

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to this schema: the registry's method and sources
        columns (method read from the old sealed meta), item text removed from artifact meta (only the method
        and numbers are kept), and one current artifact per (user, method, kind, base model), the newest."""
        columns = {row[1] for row in self._conn().execute("PRAGMA table_info(artifacts)")}
        if set(ARTIFACT_COLUMNS) <= columns:
            return
        with self._write() as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(artifacts)")}
            for name, definition in ARTIFACT_COLUMNS.items():
                if name not in columns:
                    conn.execute(f"ALTER TABLE artifacts ADD COLUMN {name} {definition}")
            for artifact_id, user_id, sealed in conn.execute("SELECT id, user_id, meta FROM artifacts").fetchall():
                meta = json.loads(self.cipher.open(sealed, b"%d:artifact" % user_id))
                method = meta.get("method") if isinstance(meta.get("method"), str) else ""
                kept = {k: v for k, v in meta.items() if k == "method" or isinstance(v, (int, float, bool))}
                conn.execute("UPDATE artifacts SET method = ?, meta = ? WHERE id = ?",
                             (method, self.cipher.seal(encode_meta(kept), b"%d:artifact" % user_id), artifact_id))
            stale = conn.execute(
                "SELECT a.id, a.user_id, a.path FROM artifacts a WHERE EXISTS"
                " (SELECT 1 FROM artifacts b WHERE b.user_id = a.user_id AND b.method = a.method AND b.kind = a.kind"
                " AND b.base_model_sha256 = a.base_model_sha256 AND b.id > a.id)").fetchall()
            conn.executemany("DELETE FROM artifacts WHERE id = ?", [(i,) for i, _, _ in stale])
        for _, user_id, path in stale:
            self._remove_files(user_id, [path])

    # ----- users

    def _user_id(self, conn, user: str) -> int:
        row = conn.execute("SELECT id FROM users WHERE name = ?", (check_user(user),)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown user {user!r}")
        return row[0]

    def _create_user(self, conn, user: str) -> int:
        """The user's row id, creating the user if new (called inside a write transaction). Looked up first:
        an INSERT OR IGNORE of an existing name would still use up an AUTOINCREMENT id."""
        row = conn.execute("SELECT id FROM users WHERE name = ?", (check_user(user),)).fetchone()
        if row is not None:
            return row[0]
        return conn.execute("INSERT INTO users (name, created) VALUES (?, ?)", (check_user(user), time.time())).lastrowid

    def users(self) -> list[str]:
        return [name for (name,) in self._conn().execute("SELECT name FROM users ORDER BY id")]

    def user_counts(self) -> list[dict]:
        """Every user the store holds, oldest first: {"user", "items", "preferences", "artifacts"} (counts from
        the tables, nothing decrypted)."""
        rows = self._conn().execute(
            "SELECT u.name, (SELECT COUNT(*) FROM items i WHERE i.user_id = u.id),"
            " (SELECT COUNT(*) FROM items i WHERE i.user_id = u.id AND i.kind = ?),"
            " (SELECT COUNT(*) FROM artifacts a WHERE a.user_id = u.id) FROM users u ORDER BY u.id", (names.PREFERENCE,))
        return [{"user": name, "items": items, "preferences": prefs, "artifacts": artifacts}
                for name, items, prefs, artifacts in rows]

    # ----- items

    def add(self, user: str, text, kind: str = "message", meta: dict | None = None, ts: float | None = None) -> int:
        """Store one item and return its id; the user is created on first write."""
        return self.add_many(user, [check_item(text, kind, meta, ts)])[0]

    def add_many(self, user: str, items: list[tuple[str, float, bytes, bytes]]) -> list[int]:
        """Store items validated by check_item, all in one transaction: all of them or none. A new preference queues an edit job for the user (the worker of `localpers serve` runs it)."""
        with self._write() as conn:
            user_id = self._create_user(conn, user)
            return self._insert(conn, user_id, items)

    def _insert(self, conn, user_id: int, items: list[tuple[str, float, bytes, bytes]]) -> list[int]:
        text_aad, meta_aad = b"%d:text" % user_id, b"%d:meta" % user_id
        ids = [
            conn.execute(
                "INSERT INTO items (user_id, kind, ts, text, meta) VALUES (?, ?, ?, ?, ?)",
                (user_id, kind, ts, self.cipher.seal(text, text_aad), self.cipher.seal(meta, meta_aad)),
            ).lastrowid
            for kind, ts, text, meta in items
        ]
        if any(kind == names.PREFERENCE for kind, *_ in items):
            self._queue(conn, user_id, names.EDIT)
        return ids

    def add_chat(self, user: str, messages: list[dict]) -> list[tuple[int, str]]:
        """Store the user's own new messages of a chat (learn_chat without facts). Returns (item id, text) of the
        messages stored now."""
        return self.learn_chat(user, messages)["stored"]

    def learn_chat(self, user: str, messages: list[dict], extract=None,
                   limit: int = names.MAX_FACTS_PER_MESSAGE) -> dict:
        """Store the user's own messages of a chat that are not stored yet, and learn the facts they state, in one
        write transaction (BEGIN IMMEDIATE: concurrent chats of a user are applied one after the other, so the
        last statement wins). The user's own messages are those of role "user" whose `name` is absent or is the
        user id (in a group chat, a message with another `name` is another participant's: neither stored nor
        learned from). A client resends the whole conversation every turn, so a message is known by a keyed
        hash of the conversation up to and including it; a deleted message is not stored again.

        `extract(text, limit, previous)` gives the facts a message states (localpers.personalize.detect.detect_facts:
        objects with attribute, value, statement, retire, slot and key; `previous` is the user's own message before
        it in the conversation, None for the first, so that "Scratch that." can withdraw what it said: a fact
        with `withdrawal` set retires only what that very message taught, found through chat_seen's item); at
        most `limit` per message are learned. See
        _learn for what a fact does. Returns {"stored": [(item id, text)], "messages": [ids], "facts": [...],
        "replaced": [...], "retired": [...], "retried": [...]} (learned facts: {"id", "attribute"}; replaced and retired ones:
        {"id", "attribute"}, their text is deleted)."""
        checked, digests, prefix = [], [], hashlib.sha256()
        for position, message in enumerate(messages):
            prefix.update(json.dumps([position, message["role"], message["content"]]).encode("utf-8"))
            if message["role"] == "user" and said_by(message, user) and message["content"].strip():
                checked.append(check_item(message["content"], "message", {"role": "user", "source": "chat"}))
                digests.append(self.cipher.digest(prefix.digest()))
        out = {"stored": [], "messages": [], "facts": [], "replaced": [], "retired": [], "retried": []}
        if not checked:
            return out
        # Detection runs before the write lock is taken, on the messages not seen yet (a resent conversation is
        # not detected again); the transaction checks again which are new (a message seen before a concurrent
        # forget is stored without its facts).
        with self._read() as conn:
            row = conn.execute("SELECT id FROM users WHERE name = ?", (check_user(user),)).fetchone()
            seen = {d for d in digests if row and conn.execute(
                "SELECT 1 FROM chat_seen WHERE user_id = ? AND digest = ?", (row[0], d)).fetchone()}
        texts = [item[2].decode("utf-8") for item in checked]
        found = {d: extract(text, limit, previous)[:limit] if extract else []
                 for text, previous, d in zip(texts, [None, *texts], digests) if d not in seen}
        with self._write() as conn:
            user_id = self._create_user(conn, user)
            new = [(item, found.get(digest) or [], digest, before) for item, digest, before
                   in zip(checked, digests, [None, *digests]) if conn.execute(
                "INSERT OR IGNORE INTO chat_seen (user_id, digest) VALUES (?, ?)", (user_id, digest)).rowcount]

            def previous(ids: list[int]) -> list[int | None]:  # each new message's item id, then the turn before's
                conn.executemany("UPDATE chat_seen SET item = ? WHERE user_id = ? AND digest = ?",
                                 [(i, user_id, digest) for i, (_, _, digest, _) in zip(ids, new)])
                return [before and (conn.execute("SELECT item FROM chat_seen WHERE user_id = ? AND digest = ?",
                                                 (user_id, before)).fetchone() or (None,))[0] for *_, before in new]

            paths = self._learn(conn, user_id, [(item, facts) for item, facts, _, _ in new], out, previous=previous,
                                extract=extract, limit=limit)
        self._remove_files(user_id, paths)
        return out

    def learn_text(self, user: str, text, extract, limit: int = names.MAX_FACTS_PER_MESSAGE,
                   source: str = "remember") -> dict:
        """Store one message the user typed (`localpers remember`, or a fact corrected on the page: `source`) and
        learn the facts it states, as learn_chat does, in one transaction; the same text said twice is two
        messages. Returns learn_chat's dict."""
        return self.learn_texts(user, [text], extract, limit, source=source)

    def learn_texts(self, user: str, texts: list, extract, limit: int = names.MAX_FACTS_PER_MESSAGE,
                    source: str = "remember") -> dict:
        """learn_text for several messages the user wrote (POST /v1/users/{user}/memories with a chat's user
        messages), in order, in one transaction: all are checked before anything is written, and each is read
        as learn_chat reads a turn (`extract(text, limit, previous)`, previous: the message before it, None for
        the first), so a later fact replaces an earlier one of its slot and "Just kidding" withdraws the one
        before. Returns learn_chat's dict."""
        items = [check_item(text, "message", {"role": "user", "source": source}) for text in texts]
        said = [item[2].decode("utf-8") for item in items]
        found = [(item, extract(text, limit, previous)[:limit])
                 for item, text, previous in zip(items, said, [None, *said])]
        out = {"stored": [], "messages": [], "facts": [], "replaced": [], "retired": [], "retried": []}
        with self._write() as conn:
            user_id = self._create_user(conn, user)
            paths = self._learn(conn, user_id, found, out, source=source, previous=lambda ids: [None, *ids[:-1]],
                                extract=extract, limit=limit)
        self._remove_files(user_id, paths)
        return out

    def _learn(self, conn, user_id: int, items: list[tuple[tuple, list]], out: dict,
               source: str = "chat", previous=None, extract=None, limit: int = names.MAX_FACTS_PER_MESSAGE) -> list[str]:
        """Inside a write: insert message items (validated, each with the facts found in it) and learn their
        facts, each through the facts index by keyed
        hashes of (user, slot) and (user, attribute=value), O(log n) in the user's stored facts (no scan, no
        decryption but of the replaced facts' metadata):

        - a fact already held (same slot and value) is not stored again;
        - a fact of a slot held with another value replaces it (single-valued attributes: home, diet, job ...;
          likes and dislikes of one thing): the old preference item goes, with the artifacts derived from it;
        - a retirement ("I'm not vegetarian anymore") deletes the fact of that slot and value, if held; one of an
          empty value ("Please forget where I live.") deletes the slot's fact whatever its value;
        - a withdrawal (a retirement with `withdrawal` set: "Scratch that.", "Oops, ignore that.") deletes the fact
          of that slot and value only where it was learned from the user's message before (`previous(ids)`:
          called once the items are inserted, with their ids, gives for each the item id of the user's message
          before it in the conversation, or None): a fact held from an older message, another conversation or
          another participant stays. What that message replaced or retired is learned again (_restore, with
          `extract`): the facts of the slots it changed, re-detected in the earlier messages they were learned
          from (kept, marked names.SUPERSEDED_BY; recorded in its meta names.SUPERSEDES), where the slot holds
          nothing once the whole withdrawing message is learned ("Scratch that, I live in Rome." keeps Rome) and the
          message was not deleted;
        - a fact held already whose edit failed (the user's newest edit job failed) queues the edit again
          (out["retried"]: once per restatement);
        - a fact's `supersedes` (detect.StatedFact.supersedes: other facts, each matched by slot and value as
          above) that the user holds go too: a retirement's value said another way ("I don't like jazz anymore."
          retires a held "jazz music"), a like stated as a change the held likes of its kind ("Actually I prefer
          rock now." replaces "jazz"), also when the fact itself is held already (it is not stored again). One
          query through the (user, slot) index for all of them (a change names some hundred: its kind's values in
          kinds.json), no decryption.

        New and deleted preferences queue the user's edit job. Returns the retired artifact files."""
        ids = self._insert(conn, user_id, [item for item, _ in items])
        out["messages"] += ids
        out["stored"] += [(i, item[2].decode("utf-8")) for i, (item, _) in zip(ids, items)]
        befores = previous(ids) if previous else [None] * len(ids)
        paths: list[str] = []
        for message_id, before, (_, facts) in zip(ids, befores, items):
            if before is not None and extract is not None and any(getattr(f, "withdrawal", False) for f in facts):
                withdrawn = before
            else:
                withdrawn = None
            for fact in facts:
                slot, value = self._fact_digests(fact)
                held = conn.execute("SELECT item_id, value, message FROM facts WHERE user_id = ? AND slot = ?",
                                    (user_id, slot)).fetchall()
                also = self._held(conn, user_id, getattr(fact, "supersedes", ()))
                if fact.retire:
                    if getattr(fact, "withdrawal", False):  # "Scratch that.": what the turn before taught, only
                        gone = [i for i, v, m in held if v == value and before is not None and m == before]
                    else:  # an empty key ("Please forget where I live.") retires whatever the slot holds
                        gone = list(dict.fromkeys([i for i, v, _ in held if v == value or not fact.key] + also))
                    if gone:
                        out["retired"] += [{"id": i, "attribute": self._fact_attribute(conn, user_id, i)} for i in gone]
                        self._mark_superseded(conn, user_id, gone, message_id)
                        paths += self._delete(conn, user_id, gone)
                    continue
                # held already: only what it supersedes goes ("Actually I prefer rock now." with rock held: jazz)
                held_already = any(v == value for _, v, _ in held)
                replaced = also if held_already else list(dict.fromkeys([i for i, _, _ in held] + also))
                if replaced:
                    new_now = {f["id"] for f in out["facts"]}  # said earlier in this same request: not reported
                    out["facts"] = [f for f in out["facts"] if f["id"] not in set(replaced)]
                    out["replaced"] += [{"id": i, "attribute": self._fact_attribute(conn, user_id, i)}
                                        for i in replaced if i not in new_now]
                    self._mark_superseded(conn, user_id, replaced, message_id)
                    paths += self._delete(conn, user_id, replaced)
                if held_already:  # not stored again; its edit failed last time: tried again
                    if self._edit_failed(conn, user_id):
                        self._queue(conn, user_id, names.EDIT)
                        out["retried"] += [{"id": i, "attribute": fact.attribute} for i, v, _ in held if v == value]
                    continue
                self._add_fact(conn, user_id, fact, message_id, source, out)
            if withdrawn is not None:
                self._restore(conn, user_id, withdrawn, extract, limit, out)
        return paths

    def _add_fact(self, conn, user_id: int, fact, message_id: int, source: str, out: dict) -> None:
        """Inside a write: store `fact` as a preference learned from message `message_id` (meta source, message,
        attribute, value; its edit job queued) and in the facts index; out["facts"] gets {"id", "attribute"}."""
        slot, value = self._fact_digests(fact)
        meta = {"source": source, "message": message_id, "attribute": fact.attribute, "value": fact.value}
        [fact_id] = self._insert(conn, user_id, [check_item(fact.statement, names.PREFERENCE, meta)])
        conn.execute("INSERT INTO facts (item_id, user_id, slot, value, message) VALUES (?, ?, ?, ?, ?)",
                     (fact_id, user_id, slot, value, message_id))
        out["facts"].append({"id": fact_id, "attribute": fact.attribute})

    def _restore(self, conn, user_id: int, withdrawn: int, extract, limit: int, out: dict) -> None:
        """Inside a write, once message `withdrawn`'s facts were withdrawn: learn again what it replaced or retired
        (its meta names.SUPERSEDES: earlier message -> the slots it changed there): each earlier message still
        stored is re-detected (`extract(text, limit, None)`) and its facts of those slots are learned again from
        it where the slot holds nothing now (one current value per slot; its edit is queued as for any new
        fact); the message loses its names.SUPERSEDED_BY mark when that mark is `withdrawn`'s and every fact it
        states is held again. Adds the facts learned to out["facts"]."""
        aad = b"%d:meta" % user_id
        row = conn.execute("SELECT meta FROM items WHERE id = ? AND user_id = ?", (withdrawn, user_id)).fetchone()
        changed = _read_meta(self.cipher.open(row[0], aad)).get(names.SUPERSEDES) if row else None
        for message_id, slots in (changed.items() if isinstance(changed, dict) else ()):
            if not (message_id.isdecimal() and isinstance(slots, list)):
                continue
            row = conn.execute("SELECT text, meta FROM items WHERE id = ? AND user_id = ? AND kind = ?",
                               (int(message_id), user_id, names.MESSAGE)).fetchone()
            if row is None:  # deleted since: nothing to learn again
                continue
            text = self.cipher.open(row[0], b"%d:text" % user_id).decode("utf-8")
            meta = _read_meta(self.cipher.open(row[1], aad))
            facts = [f for f in extract(text, limit, None)[:limit] if not f.retire]
            for fact in facts:
                slot, _ = self._fact_digests(fact)
                if slot.hex() not in slots or conn.execute(
                        "SELECT 1 FROM facts WHERE user_id = ? AND slot = ?", (user_id, slot)).fetchone():
                    continue
                self._add_fact(conn, user_id, fact, int(message_id), meta.get("source", "chat"), out)
            held = all(conn.execute("SELECT 1 FROM facts WHERE user_id = ? AND slot = ? AND value = ?",
                                    (user_id, *self._fact_digests(f))).fetchone() for f in facts)
            if meta.get(names.SUPERSEDED_BY) == withdrawn and held:
                del meta[names.SUPERSEDED_BY]
                conn.execute("UPDATE items SET meta = ? WHERE id = ?",
                             (self.cipher.seal(json.dumps(meta, ensure_ascii=False).encode("utf-8"), aad),
                              int(message_id)))

    def _held(self, conn, user_id: int, facts) -> list[int]:
        """Inside a transaction: the item ids of the facts of `facts` (each by slot and value) the user holds."""
        pairs = {self._fact_digests(fact) for fact in facts}
        slots = sorted({slot for slot, _ in pairs})
        found = []
        for start in range(0, len(slots), 500):  # through the (user, slot) index; SQLite bounds the parameters
            chunk = slots[start:start + 500]
            found += [i for i, slot, value in conn.execute(
                f"SELECT item_id, slot, value FROM facts WHERE user_id = ? AND slot IN ({','.join('?' * len(chunk))})",
                (user_id, *chunk)) if (slot, value) in pairs]
        return list(dict.fromkeys(found))

    def _fact_digests(self, fact) -> tuple[bytes, bytes]:
        """The facts index's keyed hashes of a detected fact (detect.StatedFact: slot, attribute, key)."""
        return (self.cipher.digest(b"slot\0" + fact.slot.encode("utf-8")),
                self.cipher.digest(f"value\0{fact.attribute}={fact.key}".encode("utf-8")))

    def holds_fact(self, user: str, fact) -> bool:
        """Does the user currently hold `fact` (a detect.StatedFact: the same slot and value)? O(log n) in their
        facts, through the index's keyed hashes (no decryption). An unknown user holds nothing."""
        return self._holds(user, fact, "=")

    def holds_other_value(self, user: str, fact) -> bool:
        """Does the user currently hold `fact`'s slot with another value ("I live in Oslo." once "I moved to Paris."
        replaced it)? O(log n) in their facts, keyed hashes only (no decryption), as holds_fact."""
        return self._holds(user, fact, "!=")

    def _holds(self, user: str, fact, op: str) -> bool:
        slot, value = self._fact_digests(fact)
        with self._read() as conn:
            row = conn.execute("SELECT id FROM users WHERE name = ?", (check_user(user),)).fetchone()
            return row is not None and conn.execute(
                f"SELECT 1 FROM facts WHERE user_id = ? AND slot = ? AND value {op} ?", (row[0], slot, value)
            ).fetchone() is not None

    def _mark_superseded(self, conn, user_id: int, fact_ids: list[int], by: int | None) -> None:
        """Inside a write, before facts `fact_ids` are replaced or retired by chat message `by` (None: deleted by
        the user): each earlier chat message they were learned from gets meta names.SUPERSEDED_BY = by, so
        retrieval quotes only its sentences that state nothing the user no longer holds (serve.compose.still_held:
        "I live in Oslo." once "I moved to Paris." replaced it, while "My sister is a doctor." of the same message
        stays), and `by` gets meta names.SUPERSEDES: {earlier message id: [the slots changed there]} (what a
        withdrawal of `by` learns again: _restore). A fact without a message (an imported preference) and `by`
        itself (a replacement inside one message) mark nothing."""
        marks = ",".join("?" * len(fact_ids))
        slots: dict[int, list[str]] = {}
        for m, slot in conn.execute(f"SELECT message, slot FROM facts WHERE user_id = ? AND item_id IN ({marks})"
                                    " AND message IS NOT NULL", (user_id, *fact_ids)):
            if m != by:
                slots.setdefault(m, []).append(slot.hex())
        messages = list(slots)
        aad = b"%d:meta" % user_id
        row = by is not None and slots and conn.execute(
            "SELECT meta FROM items WHERE id = ? AND user_id = ?", (by, user_id)).fetchone()
        if row:  # what `by` changed, for a withdrawal of it to learn again (_restore)
            meta = _read_meta(self.cipher.open(row[0], aad))
            record = meta.get(names.SUPERSEDES) if isinstance(meta.get(names.SUPERSEDES), dict) else {}
            for m, changed in slots.items():
                record[str(m)] = sorted(set(record.get(str(m), [])) | set(changed))
            conn.execute("UPDATE items SET meta = ? WHERE id = ?", (self.cipher.seal(json.dumps(
                meta | {names.SUPERSEDES: record}, ensure_ascii=False).encode("utf-8"), aad), by))
        for message_id in messages:
            row = conn.execute("SELECT meta FROM items WHERE id = ? AND user_id = ?", (message_id, user_id)).fetchone()
            if row is not None:
                meta = _read_meta(self.cipher.open(row[0], aad)) | {names.SUPERSEDED_BY: by}
                conn.execute("UPDATE items SET meta = ? WHERE id = ?",
                             (self.cipher.seal(json.dumps(meta, ensure_ascii=False).encode("utf-8"), aad), message_id))

    def _edit_failed(self, conn, user_id: int) -> bool:
        """Inside a write: did the user's newest edit job fail (and none is queued or running after it)?"""
        row = conn.execute("SELECT state FROM jobs WHERE user_id = ? AND kind = ? ORDER BY id DESC LIMIT 1",
                           (user_id, names.EDIT)).fetchone()
        return row is not None and row[0] == names.FAILED

    def _fact_attribute(self, conn, user_id: int, item_id: int) -> str | None:
        row = conn.execute("SELECT meta FROM items WHERE id = ?", (item_id,)).fetchone()
        return json.loads(self.cipher.open(row[0], b"%d:meta" % user_id)).get("attribute") if row else None

    def facts(self, user: str) -> list[dict]:
        """The user's current facts, oldest first: one per stored preference, as dicts with id (the preference
        item's), attribute (detect_facts' name, "diet", "home", "likes" ...; an imported preference's
        attribute_type; else None), value (as said, "Lyon"; else the statement), statement ("I live in
        Lyon."), message (the id of the message it was learned from, or None), created (seconds since the epoch)
        and status ("current": a replaced or retired fact is deleted, text and all; the chat response that
        replaced it names it). What editing (personalize.editing) and the memory routes read."""
        out = []
        for item in self.items(user, kind=names.PREFERENCE):
            meta = item["meta"]
            attribute = meta.get("attribute") or meta.get("attribute_type")
            if isinstance(attribute, list):  # UPQA cluster9: the canonical name is last
                attribute = attribute[-1] if attribute else None
            out.append({"id": item["id"], "attribute": attribute if isinstance(attribute, str) else None,
                        "value": meta.get("value", item["text"]), "statement": item["text"],
                        "message": meta.get("message"), "created": item["ts"], "status": "current"})
        return out

    def _decrypt_item(self, user_id, item_id, kind, ts, text, meta) -> dict:
        return {
            "id": item_id,
            "kind": kind,
            "ts": ts,
            "text": self.cipher.open(text, b"%d:text" % user_id).decode("utf-8"),
            "meta": _read_meta(self.cipher.open(meta, b"%d:meta" % user_id)),
        }

    def items(self, user: str, kind: str | None = None) -> list[dict]:
        """The user's items, oldest first, decrypted: dicts with id, kind, ts, text, meta."""
        with self._read() as conn:
            user_id = self._user_id(conn, user)
            sql, args = "SELECT id, kind, ts, text, meta FROM items WHERE user_id = ?", [user_id]
            if kind is not None:
                sql, args = sql + " AND kind = ?", args + [check_name("kind", kind)]
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [self._decrypt_item(user_id, *row) for row in rows]

    def _forget_files(self, user: str) -> None:
        """The files outside the database and the artifact folder that hold `user`'s data (see forget)."""
        for name in {user, check_user(user)}:  # as given and as stored (NFC)
            signals_file(self.directory, name).unlink(missing_ok=True)
        node = self.directory / "sync" / "node.toml"
        try:
            import tomllib

            named = tomllib.loads(node.read_text(encoding="utf-8")).get("user")
        except (OSError, ValueError, ImportError):
            return
        if named in (user, check_user(user)):
            node.unlink(missing_ok=True)

    def delete_item(self, user: str, item_id: int) -> None:
        """Delete one item, and before returning every artifact derived from it (rows and files: not served
        from the next request on); their recomputation is queued, as is an edit for a deleted preference. A
        deleted message also takes the kept /v1/responses conversations in which the user said it."""
        with self._write() as conn:
            user_id = self._user_id(conn, user)
            row = conn.execute("SELECT kind, text FROM items WHERE id = ? AND user_id = ?", (item_id, user_id)
                               ).fetchone() if -(1 << 63) <= item_id < 1 << 63 else None  # beyond SQLite's integers
            if row is None:
                raise NotFoundError(f"user {user!r} has no item {item_id}")
            if row[0] == names.PREFERENCE:   # a fact the user deleted: its message is no longer quoted for it
                self._mark_superseded(conn, user_id, [item_id], None)
            retired = self._delete(conn, user_id, [item_id])
            if row[0] == names.MESSAGE:
                said = self.cipher.open(row[1], b"%d:text" % user_id).decode("utf-8")
                conn.executemany("DELETE FROM responses WHERE user_id = ? AND response = ?",
                                 [(user_id, k["id"]) for k in self._responses(conn, user_id)
                                  if any(m.get("role") == "user" and _content_text(m.get("content")) == said
                                         for m in k["messages"])])
        self._remove_files(user_id, retired)

    def _delete(self, conn, user_id: int, item_ids: list[int]) -> list[str]:
        """Inside a write: delete items, retire what was derived from them, queue the recomputations; returns
        the retired artifact files (to remove once committed). Preferences learned from a deleted chat message
        (the facts index's `message`, localpers.serve.learn) go with it."""
        marks = ",".join("?" * len(item_ids))
        item_ids = list(item_ids) + [pref_id for (pref_id,) in conn.execute(
            f"SELECT item_id FROM facts WHERE user_id = ? AND message IN ({marks})", (user_id, *item_ids))]
        marks = ",".join("?" * len(item_ids))
        kinds = {k for (k,) in conn.execute(
            f"SELECT kind FROM items WHERE user_id = ? AND id IN ({marks})", (user_id, *item_ids))}
        conn.execute(f"DELETE FROM items WHERE user_id = ? AND id IN ({marks})", (user_id, *item_ids))
        conn.execute("UPDATE users SET deletions = deletions + 1 WHERE id = ?", (user_id,))
        paths, methods = self._retire_derived(conn, user_id, item_ids)
        if names.PREFERENCE in kinds:
            methods.add(names.EDIT)
        for method in sorted(methods & set(names.TRAINED_METHODS)):
            self._queue(conn, user_id, method)
        return paths

    # ----- search

    def search(self, user: str, query: str, k: int = 5, mode: str = "bm25") -> list[dict]:
        """The user's k items most relevant to query, best first, each with a "score" (BM25; cosine
        similarity for dense; reciprocal-rank fusion of both for hybrid). Items matching no query term
        are not returned by BM25."""
        if not isinstance(query, str) or not query.strip():
            raise UserError("the search query is empty")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise UserError(f"k must be an integer from 1 to 1000, not {k!r}")
        if mode not in SEARCH_MODES:
            raise UserError(f"unknown search mode {mode!r}: use one of {', '.join(SEARCH_MODES)}")
        with self._read() as conn:
            user_id = self._user_id(conn, user)
        pool = max(k, 50) if mode == "hybrid" else k
        rankings = []
        if mode in ("bm25", "hybrid"):
            rankings.append(self._search_bm25(user_id, query, pool))
        if mode in ("dense", "hybrid"):
            rankings.append(self._search_dense(user_id, query, pool))
        ranking = rankings[0][:k] if len(rankings) == 1 else fuse(rankings, k)
        return self._items_by_id(user_id, ranking)

    def _items_by_id(self, user_id: int, ranking: list[tuple[int, float]]) -> list[dict]:
        ids = [item_id for item_id, _ in ranking]
        rows = self._conn().execute(
            f"SELECT id, kind, ts, text, meta FROM items WHERE id IN ({','.join('?' * len(ids))})", ids
        )
        found = {row[0]: self._decrypt_item(user_id, *row) for row in rows}
        return [found[item_id] | {"score": score} for item_id, score in ranking if item_id in found]

    def _catch_up(self, index, user_id: int, new_rows: str, params: tuple, decode) -> None:
        """Bring an in-memory index level with the database, whoever wrote to it: add the rows newer than the
        index's newest (ids only grow), and when the user's deletion count has moved, drop the ids now gone."""
        with self._read() as conn:
            for item_id, blob in conn.execute(new_rows, (*params, index.max_id)).fetchall():
                index.add(item_id, decode(blob))
            row = conn.execute("SELECT deletions FROM users WHERE id = ?", (user_id,)).fetchone()
            if row is None:
                raise NotFoundError("the user was deleted during the search")
            if row[0] != index.deletions_seen:
                live = {item_id for (item_id,) in conn.execute("SELECT id FROM items WHERE user_id = ?", (user_id,))}
                for gone in index.ids() - live:
                    index.remove(gone)
                index.deletions_seen = row[0]

    def _search_bm25(self, user_id: int, query: str, k: int) -> list[tuple[int, float]]:
        with self._index_lock:
            index = self._bm25.setdefault(user_id, BM25Index())
            aad = b"%d:text" % user_id
            self._catch_up(
                index,
                user_id,
                "SELECT id, text FROM items WHERE user_id = ? AND id > ? ORDER BY id",
                (user_id,),
                lambda blob: self.cipher.open(blob, aad).decode("utf-8"),
            )
            return index.search(query, k)

    def _search_dense(self, user_id: int, query: str, k: int) -> list[tuple[int, float]]:
        if self.embedder is None:
            self.embedder = make_embedder()
        model = self.embedder.name
        self._embed_missing(user_id, model)
        query_vector = self.embedder.embed([query])[0]
        with self._index_lock:
            index = self._dense.setdefault((user_id, model), DenseIndex())
            aad = b"%d:vector" % user_id
            self._catch_up(
                index,
                user_id,
                "SELECT v.item_id, v.vector FROM vectors v JOIN items i ON i.id = v.item_id"
                " WHERE i.user_id = ? AND v.model = ? AND v.item_id > ? ORDER BY v.item_id",
                (user_id, model),
                lambda blob: np.frombuffer(self.cipher.open(blob, aad), dtype=np.float32),
            )
            return index.search(query_vector, k)

    def _embed_missing(self, user_id: int, model: str, batch: int = 64) -> None:
        """Embed the items that have no vector for this model yet. This runs at search time, never on the
        write path, and each vector is stored (encrypted) so it is computed once."""
        text_aad, vector_aad = b"%d:text" % user_id, b"%d:vector" % user_id
        missing = self._conn().execute(
            "SELECT id, text FROM items WHERE user_id = ? AND id NOT IN (SELECT item_id FROM vectors WHERE model = ?)",
            (user_id, model),
        ).fetchall()
        for start in range(0, len(missing), batch):
            rows = missing[start : start + batch]
            vectors = self.embedder.embed([self.cipher.open(blob, text_aad).decode("utf-8") for _, blob in rows])
            with self._write() as conn:
                conn.executemany(
                    "INSERT OR IGNORE INTO vectors (item_id, model, vector) SELECT ?, ?, ? WHERE EXISTS"
                    " (SELECT 1 FROM items WHERE id = ?)",
                    [
                        (item_id, model, self.cipher.seal(vector.astype(np.float32).tobytes(), vector_aad), item_id)
                        for (item_id, _), vector in zip(rows, vectors)
                    ],
                )

    # ----- artifacts: the registry

    def _user_folder(self, user_id: int) -> Path:
        """A user's artifact folder, named after their row id (never after the user id string, which may be any
        text); row ids are never reused (AUTOINCREMENT), so a forgotten user's folder is never inherited."""
        return self.directory / "artifacts" / f"_user-{user_id}"

    def artifact_dir(self, user: str) -> Path:
        """Where the user's artifact files live (created, with the user); forget deletes it."""
        with self._write() as conn:
            path = self._user_folder(self._create_user(conn, user))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def register_artifact(
        self, user: str, kind: str, path: str | os.PathLike, base_model_sha256: str, meta: dict | None = None,
        *, job: int | None = None,
    ) -> int:
        """Make an artifact the user's current one for (meta["method"], kind, base model) and return its id.

        The registry holds one current artifact per (user, method, kind, base model): the one it replaces is
        deleted, row and file. meta["sources"] lists the ids of the items it was derived from (never their
        text); they must all still exist, and deleting one later retires the artifact. A file or folder
        outside artifact_dir(user) is copied in, so that forget deletes it. Raises NotFoundError for an
        unknown (or forgotten) user; StaleError when a source item is gone or `job` (the job making the
        artifact) is no longer running (cancelled by forget), in which case nothing is written."""
        check_name("artifact kind", kind)
        if not isinstance(base_model_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", base_model_sha256):
            raise UserError(f"base_model_sha256 must be 64 lower-case hex digits, not {base_model_sha256!r}")
        meta = dict(meta or {})
        method = meta.get("method", "")
        if not isinstance(method, str):
            raise UserError(f'meta["method"] must be a method name, not {method!r}')
        sources = meta.pop("sources", [])
        if not isinstance(sources, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in sources):
            raise UserError(f'meta["sources"] must be a list of item ids, not {sources!r}')
        sources = sorted(set(sources))
        source = Path(path).resolve()
        if not source.exists():
            raise UserError(f"{source}: no such artifact file")
        meta_bytes = encode_meta(meta)
        with self._write() as conn:
            user_id = self._user_id(conn, user)
            if job is not None:
                row = conn.execute("SELECT state FROM jobs WHERE id = ? AND user_id = ?", (job, user_id)).fetchone()
                if row is None or row[0] != "running":
                    raise StaleError(f"job {job} was cancelled: its artifact is not registered")
            if sources:
                found = {i for (i,) in conn.execute(
                    f"SELECT id FROM items WHERE user_id = ? AND id IN ({','.join('?' * len(sources))})",
                    (user_id, *sources))}
                if len(found) != len(sources):
                    raise SourcesGoneError(f"items {sorted(set(sources) - found)} were deleted: the artifact is not "
                                           "registered")
            folder = self._user_folder(user_id)
            folder.parent.mkdir(mode=0o700, exist_ok=True)  # (parents=True would make it with the umask's mode)
            folder.mkdir(mode=0o700, exist_ok=True)
            folder = folder.resolve()
            (version,) = conn.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM artifacts WHERE user_id = ? AND kind = ?", (user_id, kind)
            ).fetchone()
            replaced = conn.execute(
                "SELECT id, path FROM artifacts WHERE user_id = ? AND method = ? AND kind = ? AND base_model_sha256 = ?",
                (user_id, method, kind, base_model_sha256)).fetchall()
            conn.executemany("DELETE FROM artifacts WHERE id = ?", [(i,) for i, _ in replaced])
            if not source.is_relative_to(folder):
                target = folder / f"{method or kind}-{kind}-v{version}-{source.name}"
                if source.is_dir():
                    shutil.copytree(source, target)
                else:
                    shutil.copy2(source, target)
                make_private(target)
                source = target
            relative = str(source.relative_to(self.directory.resolve()))
            artifact_id = conn.execute(
                "INSERT INTO artifacts (user_id, kind, version, path, base_model_sha256, meta, created, method, sources)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (user_id, kind, version, relative, base_model_sha256,
                 self.cipher.seal(meta_bytes, b"%d:artifact" % user_id), time.time(), method, json.dumps(sources)),
            ).lastrowid
        self._remove_files(user_id, [p for _, p in replaced if p != relative])
        return artifact_id

    @contextmanager
    def job_lock(self, wait: bool = True):
        """The data folder's one-writer lock for artifact jobs (an flock on JOB_LOCK_FILE, across processes and
        threads): a server's worker holds it while it runs a job, `localpers personalize` while it edits, so the
        two never race. Yields True once held; with wait=False yields False at once when another holds it."""
        import fcntl

        with open(self.directory / JOB_LOCK_FILE, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def temp_dir(self, user: str):
        """A private scratch folder for one job of `user`'s, under the data folder (never the system temp, so
        forget and a restart find it): tmp/_user-<row id>-<pid>-<random>, deleted when the block ends; one
        left by a crash is swept by the next sweep_temp() (server start) or by forgetting the user."""
        import tempfile

        with self._read() as conn:
            user_id = self._user_id(conn, user)
        root = self.directory / TEMP_DIR
        root.mkdir(mode=0o700, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"_user-{user_id}-{os.getpid()}-", dir=root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def sweep_temp(self, user_id: int | None = None) -> int:
        """Delete job scratch folders (temp_dir): all of one user's (by row id), or, with None, those whose
        process is gone (a crash mid-job). Returns how many were deleted."""
        root, swept = self.directory / TEMP_DIR, 0
        for path in root.glob("_user-*") if root.is_dir() else ():
            parts = path.name.split("-")
            if len(parts) < 4 or not parts[1].isdigit() or not parts[2].isdigit():
                continue
            if user_id is not None and int(parts[1]) != user_id:
                continue
            if user_id is None and pid_alive(int(parts[2])):
                continue
            shutil.rmtree(path, ignore_errors=True)
            swept += 1
        return swept

    def _remove_files(self, user_id: int, paths: list[str]) -> None:
        """Delete retired artifact files (paths relative to the data directory), never outside the user's folder."""
        folder = self._user_folder(user_id).resolve()
        for relative in paths:
            path = (self.directory / relative).resolve()
            if path.is_relative_to(folder) and path.exists():
                if path.is_dir():   # a folder artifact (names.LORA_ROUTES): each file in it is retired
                    self._remove_folder(path)
                else:
                    path.unlink(missing_ok=True)
                    self._retired(path)

    def _retired(self, path: Path) -> None:
        for listener in self.on_retire:
            try:
                listener(path)
            except Exception:  # a listener's failure never fails the deletion that is done already
                pass

    def _remove_folder(self, folder: Path) -> None:
        """Delete a user's artifact folder, telling on_retire about each file in it."""
        files = [p.resolve() for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        shutil.rmtree(folder, ignore_errors=True)
        for path in files:
            self._retired(path)

    def artifacts(self, user: str, kind: str | None = None, base_model_sha256: str | None = None) -> list[dict]:
        """The user's current artifacts, latest first: dicts with id, method, kind, version, path (absolute),
        base_model_sha256, meta, sources (item ids) and created."""
        with self._read() as conn:
            user_id = self._user_id(conn, user)
            sql = ("SELECT id, method, kind, version, path, base_model_sha256, meta, sources, created FROM artifacts"
                   " WHERE user_id = ?")
            args = [user_id]
            if kind is not None:
                sql, args = sql + " AND kind = ?", args + [kind]
            if base_model_sha256 is not None:
                sql, args = sql + " AND base_model_sha256 = ?", args + [base_model_sha256]
            rows = conn.execute(sql + " ORDER BY created DESC, id DESC", args).fetchall()
        return [
            {"id": artifact_id, "method": method, "kind": kind, "version": version, "path": str(self.directory / path),
             "base_model_sha256": sha, "meta": json.loads(self.cipher.open(meta, b"%d:artifact" % user_id)),
             "sources": json.loads(sources), "created": created}
            for artifact_id, method, kind, version, path, sha, meta, sources, created in rows
        ]

    def latest_artifact(self, user: str, kind: str, base_model_sha256: str) -> dict | None:
        """The user's newest artifact of this kind made for this base model, or None."""
        return next(iter(self.artifacts(user, kind, base_model_sha256)), None)

    def retire_artifacts(self, user: str, kind: str, base_model_sha256: str, method: str | None = None) -> int:
        """Delete the user's artifacts of this kind made for this base model (by this method, when given),
        rows and files: an adapter encodes the preferences it was made from. Returns how many there were."""
        with self._write() as conn:
            user_id = self._user_id(conn, user)
            sql, args = "SELECT id, path FROM artifacts WHERE user_id = ? AND kind = ? AND base_model_sha256 = ?", \
                [user_id, kind, base_model_sha256]
            if method is not None:
                sql, args = sql + " AND method = ?", args + [method]
            gone = conn.execute(sql, args).fetchall()
            conn.executemany("DELETE FROM artifacts WHERE id = ?", [(i,) for i, _ in gone])
        self._remove_files(user_id, [p for _, p in gone])
        return len(gone)

    def _retire_derived(self, conn, user_id: int, item_ids: list[int]) -> tuple[list[str], set[str]]:
        """Inside a write: delete the artifact rows derived from any of `item_ids`; return their paths (for
        _remove_files once committed) and their methods. Routed edits (names.LORA_ROUTES: one adapter file a
        fact, each route naming its source item) lose only the routes of those items, files included, and stay
        served for the others (_prune_routes); nothing derived from a deleted item is left either way."""
        rows = conn.execute(
            f"SELECT DISTINCT a.id, a.path, a.method, a.kind, a.meta FROM artifacts a, json_each(a.sources) s"
            f" WHERE a.user_id = ? AND s.value IN ({','.join('?' * len(item_ids))})", (user_id, *item_ids)).fetchall()
        retired, paths = [], []
        for artifact_id, path, _, kind, sealed in rows:
            pruned = None if kind != names.LORA_ROUTES else \
                self._prune_routes(conn, user_id, artifact_id, path, sealed, set(item_ids))
            if pruned is None:
                retired.append(artifact_id)
                paths.append(path)
            else:
                paths += pruned
        conn.executemany("DELETE FROM artifacts WHERE id = ?", [(i,) for i in retired])
        return paths, {row[2] for row in rows}

    def _prune_routes(self, conn, user_id: int, artifact_id: int, path: str, sealed, gone: set[int]) -> list[str] | None:
        """Inside a write: drop the routes whose source item is in `gone` from a names.LORA_ROUTES artifact (its
        sealed meta's "routes" and its sources) and return their files' paths; None when a route has no source or
        no route would be left (then the whole artifact is retired)."""
        aad = b"%d:artifact" % user_id
        meta = json.loads(self.cipher.open(sealed, aad))
        routes = read_routes(meta)
        if routes is None or any(r["source"] is None for r in routes):
            return None
        keep = [r for r in meta["routes"] if r["source"] not in gone]
        if not keep:
            return None
        meta["routes"], meta["edited"] = keep, len(keep)
        left = sorted({r["source"] for r in keep})
        conn.execute("UPDATE artifacts SET meta = ?, sources = ? WHERE id = ?",
                     (self.cipher.seal(encode_meta(meta), aad), json.dumps(left), artifact_id))
        return [f"{path}/{r['file']}" for r in routes if r["source"] in gone]

    # ----- jobs: a persistent queue (localpers.serve.jobs runs them)

    def _queue(self, conn, user_id: int, kind: str) -> int:
        """Inside a write: queue a `kind` job for the user, unless one is already queued (not yet started: it
        will see the newest data anyway). Returns the job's id."""
        row = conn.execute("SELECT id FROM jobs WHERE user_id = ? AND kind = ? AND state = 'queued'",
                           (user_id, kind)).fetchone()
        if row:
            return row[0]
        return conn.execute("INSERT INTO jobs (user_id, kind, state, created) VALUES (?, ?, 'queued', ?)",
                            (user_id, kind, time.time())).lastrowid

    def supersede_queued(self, user: str, kind: str, before: float, by: str) -> int:
        """Mark the user's `kind` jobs queued before `before` (a time.time()) done, with result {"superseded_by":
        by}: a run by hand (`localpers personalize`) that started after they were queued already did their work.
        Returns how many were settled; jobs queued later (new data) stay queued."""
        with self._write() as conn:
            cur = conn.execute("UPDATE jobs SET state = 'done', result = ?, finished = ? WHERE state = 'queued' AND"
                               " kind = ? AND created < ? AND user_id = (SELECT id FROM users WHERE name = ?)",
                               (json.dumps({"superseded_by": by}), time.time(), kind, before, user))
        return cur.rowcount

    def queue_job(self, user: str, kind: str) -> dict:
        """Queue a job of `kind` (a method name: names.EDIT, ...) for a known user; returns it (an already
        queued one of the same kind, if any)."""
        check_name("job kind", kind)
        with self._write() as conn:
            job_id = self._queue(conn, self._user_id(conn, user), kind)
        return self.job(job_id)

    def _job_dict(self, row) -> dict:
        job_id, user, user_id, kind, state, reason, result, created, started, finished = row
        return {"id": job_id, "object": "job", "user": user, "kind": kind, "state": state,
                "reason": self.cipher.open(reason, b"%d:job" % user_id).decode("utf-8") if reason else None,
                "result": json.loads(result), "created": created, "started": started, "finished": finished}

    _JOB_SELECT = ("SELECT j.id, u.name, u.id, j.kind, j.state, j.reason, j.result, j.created, j.started, j.finished"
                   " FROM jobs j JOIN users u ON u.id = j.user_id")

    def jobs(self, user: str) -> list[dict]:
        """The user's jobs, newest first: dicts with id, kind, state (queued, running, done, failed), reason
        (why it failed), result, created/started/finished times, and position (a queued job's place in the queue
        of all users' jobs, 1: next; None for the others)."""
        with self._read() as conn:
            user_id = self._user_id(conn, user)
            rows = conn.execute(self._JOB_SELECT + " WHERE j.user_id = ? ORDER BY j.id DESC", (user_id,)).fetchall()
            places = self.queue_positions()
        return [{**self._job_dict(row), "position": places.get(row[0])} for row in rows]

    def job(self, job_id: int) -> dict | None:
        """One job as jobs() lists it, or None."""
        row = self._conn().execute(self._JOB_SELECT + " WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return {**self._job_dict(row), "position": self.queue_positions().get(job_id) if row[4] == "queued" else None}

    # the queue's order, round-robin over users: each user's oldest queued job first (a job's round: how many of
    # its user's queued jobs are older); within a round the user due first: the later of when their oldest queued
    # job was queued and when their last job started (a user who has just had a turn waits for the others, and a
    # newcomer who queued after a waiting job comes after it), then the oldest. So one user's jobs never starve
    # another's, and no job waits behind jobs queued after it but by a user whose turn it is
    _QUEUE_ORDER = (" ORDER BY (SELECT count(*) FROM jobs q WHERE q.user_id = j.user_id AND q.state = 'queued'"
                    " AND q.id < j.id), max((SELECT min(o.created) FROM jobs o WHERE o.user_id = j.user_id AND"
                    " o.state = 'queued'), coalesce((SELECT max(p.started) FROM jobs p WHERE p.user_id = j.user_id),"
                    " 0)), j.id")

    def claim_job(self, kinds=None) -> dict | None:
        """Mark the next queued job (of one of `kinds`, if given) running and return it, or None. Next, in
        _QUEUE_ORDER: the oldest job of the user due first (round-robin over users, in the order they queued)."""
        with self._write() as conn:
            sql, args = "SELECT j.id FROM jobs j WHERE j.state = 'queued'", []
            if kinds is not None:
                sql, args = sql + f" AND j.kind IN ({','.join('?' * len(kinds))})", list(kinds)
            row = conn.execute(sql + self._QUEUE_ORDER + " LIMIT 1", args).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ?", (time.time(), row[0]))
        return self.job(row[0])

    def queue_positions(self) -> dict[int, int]:
        """Job id -> its place in the queue (1: claimed next), for every queued job, in claim_job's order."""
        rows = self._conn().execute("SELECT j.id FROM jobs j WHERE j.state = 'queued'" + self._QUEUE_ORDER)
        return {job_id: place for place, (job_id,) in enumerate(rows, 1)}

    def requeue_job(self, job_id: int) -> bool:
        """Put one running job back in the queue (its process died; a store error kept its end from being
        recorded). False when it is not running (finished, or cancelled by forget)."""
        with self._write() as conn:
            return bool(conn.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE id = ? AND state = 'running'",
                                     (job_id,)).rowcount)

    def finish_job(self, job_id: int, state: str, reason: str | None = None, result: dict | None = None) -> None:
        """Record a running job's end (done or failed). A job cancelled meanwhile (forget) stays gone."""
        if state not in ("done", "failed"):
            raise ValueError(f"a job ends done or failed, not {state!r}")
        with self._write() as conn:
            row = conn.execute("SELECT user_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            sealed = self.cipher.seal(reason.encode("utf-8"), b"%d:job" % row[0]) if reason else ""
            conn.execute("UPDATE jobs SET state = ?, reason = ?, result = ?, finished = ? WHERE id = ?",
                         (state, sealed, json.dumps(result or {}), time.time(), job_id))

    def requeue_running(self) -> int:
        """Put jobs left running by a process that died back in the queue (a worker calls it once at start)."""
        with self._write() as conn:
            return conn.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE state = 'running'").rowcount

    def mark_artifact_broken(self, user: str, path: str | os.PathLike, reason: str) -> int:
        """Record in the metadata of the user's artifact(s) at `path` that the served path could not load them
        (meta["broken"] = reason); store.artifacts and export show it. Returns how many rows were marked."""
        target = Path(path).resolve()
        def holds(artifact) -> bool:   # the file itself, or a file of a folder artifact (names.LORA_ROUTES)
            path = Path(artifact["path"]).resolve()
            return target == path or (target.parent == path and path.is_dir())

        marked = [a for a in self.artifacts(user) if holds(a) and a["meta"].get("broken") != reason]
        if marked:
            with self._write() as conn:
                user_id = self._user_id(conn, user)
                for a in marked:
                    meta = encode_meta({**a["meta"], "broken": reason})
                    conn.execute("UPDATE artifacts SET meta = ? WHERE user_id = ? AND kind = ? AND version = ?",
                                 (self.cipher.seal(meta, b"%d:artifact" % user_id), user_id, a["kind"], a["version"]))
        return len(marked)

    # ----- /v1/responses conversations

    def keep_response(self, user: str, response_id: str, messages: list[dict],
                      keep: int = names.MAX_KEPT_RESPONSES) -> None:
        """Keep the conversation of one of the user's responses (chat messages: role, content, tool calls) under
        its id, sealed, so that a later request naming it as previous_response_id continues it after a restart;
        the user's `keep` newest are kept (older ones deleted in the same transaction). The user is created if
        new. Export lists them; forget deletes them. (Its size is bounded by the served context: it was a prompt.)"""
        if not isinstance(response_id, str) or not response_id:
            raise UserError("a response id must be a non-empty string")
        data = json.dumps(messages, ensure_ascii=False).encode("utf-8")
        with self._write() as conn:
            user_id = self._create_user(conn, user)
            conn.execute("INSERT OR REPLACE INTO responses (user_id, response, created, conversation)"
                         " VALUES (?, ?, ?, ?)", (user_id, response_id, time.time(),
                                                  self.cipher.seal(data, _response_aad(user_id, response_id))))
            conn.execute("DELETE FROM responses WHERE user_id = ? AND id NOT IN (SELECT id FROM responses"
                         " WHERE user_id = ? ORDER BY id DESC LIMIT ?)", (user_id, user_id, max(keep, 0)))

    def response_conversation(self, user: str, response_id: str) -> list[dict] | None:
        """The conversation kept for the user's response `response_id`, or None (unknown user or response, or
        another user's)."""
        with self._read() as conn:
            row = conn.execute("SELECT r.user_id, r.conversation FROM responses r JOIN users u ON u.id = r.user_id"
                               " WHERE u.name = ? AND r.response = ?", (check_user(user), response_id)).fetchone()
        if row is None:
            return None
        return json.loads(self.cipher.open(row[1], _response_aad(row[0], response_id)))

    def _responses(self, conn, user_id: int) -> list[dict]:
        rows = conn.execute("SELECT response, created, conversation FROM responses WHERE user_id = ? ORDER BY id",
                            (user_id,)).fetchall()
        return [{"id": rid, "created": created,
                 "messages": json.loads(self.cipher.open(sealed, _response_aad(user_id, rid)))}
                for rid, created, sealed in rows]

    # ----- export and forget

    def export(self, user: str) -> dict:
        """Everything held about the user, decrypted: items, artifacts, how many embeddings of each model, and the
        /v1/responses conversations kept for previous_response_id."""
        with self._read() as conn:
            user_id = self._user_id(conn, user)
            (created,) = conn.execute("SELECT created FROM users WHERE id = ?", (user_id,)).fetchone()
            responses = self._responses(conn, user_id)
            vectors = dict(
                conn.execute(
                    "SELECT v.model, count(*) FROM vectors v JOIN items i ON i.id = v.item_id"
                    " WHERE i.user_id = ? GROUP BY v.model",
                    (user_id,),
                )
            )
        return {
            "user": user,
            "created": created,
            "items": self.items(user),
            "artifacts": self.artifacts(user),
            "vectors": vectors,
            "responses": responses,  # /v1/responses conversations kept for previous_response_id
        }

    def forget(self, user: str) -> None:
        """Delete everything held about the user: artifact files, then rows (items, vectors, artifacts),
        then VACUUM and truncate the WAL, so that neither the text nor its ciphertext is left in the files.

        Every place a user's data lands under the data folder, and what removes it here:
        - store.db (+ -wal): items (history, preferences, memories), their embeddings, artifact and job rows,
          kept /v1/responses conversations -> the rows (DELETE cascades), VACUUM, WAL truncated;
        - artifacts/_user-<id>/: adapters, control vectors, baked models, LoGo signals beside the LoGo control
          vector (<name>.signals.npz) -> the folder;
        - sync/signals/<sha256(user)[:16]>.npz: the LoGo sync contribution (user vector, steering, preference
          counts) -> the file;
        - sync/node.toml: the id of the user a `localpers sync` device contributes -> the file, when it names them.
        Not per user, so not removed: logo/knowledge.npz and sync/global_knowledge.npz (community aggregates over
        all users, published with DP noise), sync/sent.jsonl (the device's ledger: shapes, norms, epsilon; no
        text, no user id)."""
        with self._read() as conn:
            self._remove_folder(self._user_folder(self._user_id(conn, user)))
        self._forget_files(user)
        for attempt in range(2):
            try:
                with self._write() as conn:
                    user_id = self._user_id(conn, user)
                    conn.execute("DELETE FROM users WHERE id = ?", (user_id,))  # cascades to items, artifacts, jobs...
                break
            except sqlite3.OperationalError as e:  # a full disk (the user's files, removed above, freed too
                if not disk_full(e) or attempt:  # little): the WAL could not grow. Checkpointed and truncated,
                    raise  # it may free room for a second try; else the disk-full error stands (a 507)
                try:
                    self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.OperationalError:
                    raise e from None
        # again: a job may have registered a file between the first removal and the delete (after it, a
        # registration finds no user and writes nothing)
        self._remove_folder(self._user_folder(user_id))
        self.sweep_temp(user_id)
        with self._index_lock:
            self._bm25.pop(user_id, None)
            for key in [key for key in self._dense if key[0] == user_id]:
                del self._dense[key]
        self._forget_files(user)
        conn = self._conn()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            conn.execute("VACUUM")  # rewrites the file: needs its size free on the disk
        except sqlite3.OperationalError as e:  # a full disk: the deleted rows are overwritten with zeros already
            if not disk_full(e):  # (secure_delete), so the text and its ciphertext are gone without it
                raise
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise UserError(
                f"{user!r} is deleted, but another process holds {self.directory / DB_FILE} open:"
                " the file is scrubbed only once it closes"
            )
