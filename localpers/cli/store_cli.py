"""The history-store commands: users, remember, import, history, search, export, forget."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime

from localpers import names
from localpers.errors import UserError


def _store(args, read_only: bool = False, existing: bool = False):
    """The store of --data-dir; `read_only` for the commands that only read it (nothing made, nothing written:
    they work on a read-only mount), `existing` for those that read it and may write to it: either way a folder
    without a store is "no localpers data in DIR" and nothing is made."""
    from localpers.store.store import Store, data_dir, holds_store

    folder = data_dir(args.data_dir)
    if existing and not holds_store(folder):
        raise UserError(f"no localpers data in {folder}")
    return Store.open(folder, read_only=read_only)


def _line(item: dict) -> str:
    try:
        when = datetime.fromtimestamp(item["ts"]).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, ValueError, OSError):  # a time stored before ts was range-checked
        when = f"ts={item['ts']!r}"
    score = f"  {item['score']:.3f}" if "score" in item else ""
    return f"#{item['id']}  {when}  {item['kind']}{score}  {item['text']}"


def _print_items(items: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(items, ensure_ascii=False, indent=1))
    else:
        for item in items:
            print(_line(item))


def cmd_users(args):
    from localpers.store.store import data_dir, holds_store

    if not holds_store(data_dir(args.data_dir)):
        print(f"no localpers data in {data_dir(args.data_dir)} (add a user: localpers remember --user NAME TEXT)")
        return 0
    with _store(args, read_only=True) as store:
        users = store.user_counts()
    if args.json:
        print(json.dumps(users, ensure_ascii=False, indent=1))
        return
    if not users:
        print(f"no users in {store.directory} (add one: localpers remember --user NAME TEXT)")
    for u in users:
        print(f"{u['user']}  {_count(u['items'], 'item')} ({_count(u['preferences'], 'preference')}), "
              f"{_count(u['artifacts'], 'artifact')}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_remember(args):
    """With --kind: one item of that kind. Without: the text is a message the user typed, and the facts it states
    are learned as in chat (localpers.serve.learn): prints the message and each fact stored, replaced or retired."""
    if args.kind == names.PREFERENCE:
        # an explicit preference goes through the detector too: atomic facts with attributes, in the facts index
        from localpers.personalize.detect import NO_FACT, detect_facts

        if not detect_facts(args.text, names.MAX_FACTS_PER_MESSAGE):
            raise UserError(NO_FACT.format(text=args.text))
        args.kind = None
    if args.kind is not None:
        with _store(args) as store:
            item_id = store.add(args.user, args.text, kind=args.kind)
        print(f"remembered #{item_id} ({args.kind}) for {args.user}")
        return
    from localpers.serve.learn import learn_from_text

    with _store(args) as store:
        learned = learn_from_text(store, args.user, args.text)
        values = {f["id"]: f["value"] for f in store.facts(args.user)}
    [message] = learned["messages"]
    print(f"remembered #{message} (message) for {args.user}")
    for fact in learned["facts"]:
        print(f"noted #{fact['id']}: {fact['attribute']} = {values.get(fact['id'])}")
    for fact in learned["replaced"]:
        print(f"replaced #{fact['id']}: {fact['attribute']}")
    for fact in learned["retired"]:
        print(f"retired #{fact['id']}: {fact['attribute']}")
    for fact in learned["retried"]:
        print(f"editing again #{fact['id']}: {fact['attribute']} (its last edit failed)")
    if not (learned["facts"] or learned["replaced"] or learned["retired"] or learned["retried"]):
        print("no new fact about you in it (stored as a message; --kind preference stores it as one)")


def cmd_import(args):
    from localpers.store.store import read_import

    # all validated before anything is written; a file of several users' records needs --record or --merge-users
    items = read_import(args.file, record=args.record, merge_users=args.merge_users, user=args.user)
    with _store(args) as store:
        store.add_many(args.user, items)
    dropped = (f"; left out {items.dropped} chat message(s) not written by the user (the assistant's replies, "
               f"other participants' messages: a history holds what the user wrote, as a served chat does)" if items.dropped else "")
    print(f"imported {_count(len(items), 'item')} for {args.user} from {args.file}{dropped}")


def cmd_history(args):
    with _store(args, read_only=True) as store:
        items = store.items(args.user, kind=args.kind)
    _print_items(items, args.json)


def cmd_search(args):
    if args.embedder and args.mode == "bm25":
        raise UserError("--embedder is for --mode dense or hybrid; BM25 (the default mode) uses no embedder")
    from localpers.store.retrieval import make_embedder


    # dense search stores the embeddings it makes
    with _store(args, read_only=args.mode == "bm25", existing=True) as store:
        if args.mode != "bm25":
            store.embedder = make_embedder(args.embedder)
        results = store.search(args.user, args.query, k=args.k, mode=args.mode)
    _print_items(results, args.json)


def cmd_export(args):
    with _store(args, read_only=True) as store:
        data = store.export(args.user)
    text = json.dumps(data, ensure_ascii=False, indent=1)
    if args.output:
        try:  # decrypted history: a new file readable by its owner only, never over an existing one
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise UserError(f"{args.output}: {e.strerror}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"exported {len(data['items'])} items and {len(data['artifacts'])} artifacts to {args.output}")
    else:
        print(text)


def cmd_forget(args):
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"forget deletes everything held about {args.user}: pass --yes to confirm")
        if input(f"Delete everything held about {args.user}? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    with _store(args, existing=True) as store:
        store.forget(args.user)
    print(f"forgot {args.user}")


def add_cli(sub) -> None:
    from localpers.names import ITEM_KINDS, MESSAGE

    def command(name, func, help, description=None):
        p = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
        p.add_argument("--user", required=True, help="user id: letters, digits and ._@+- (required)")
        p.add_argument("--data-dir", help="user data directory (default: $LOCALPERS_HOME, else "
                                          "$XDG_DATA_HOME/localpers, else ~/.local/share/localpers)")
        p.set_defaults(func=func)
        return p

    kinds = ", ".join(ITEM_KINDS)
    p = sub.add_parser("users", help="list the users a store holds, with their numbers of items and artifacts",
                       description="List the users the store holds (oldest first), with how many history items, "
                                   "stated preferences and artifacts each has.")
    p.add_argument("--data-dir", help="user data directory (default: $LOCALPERS_HOME, else $XDG_DATA_HOME/localpers, "
                                      "else ~/.local/share/localpers)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per user (default: off)")
    p.set_defaults(func=cmd_users)

    p = command("remember", cmd_remember, "add one item to a user's history")
    p.add_argument("text", help="the item's text, e.g. \"I'm vegetarian.\"")
    p.add_argument("--kind", default=None, choices=ITEM_KINDS, metavar="KIND",
                   help=f"one of: {kinds}; `personalize` edits the preferences (default: a {MESSAGE} whose facts "
                        "about you are learned as in chat: \"I'm vegetarian and I live in Lyon.\" -> diet, home)")

    p = command("import", cmd_import, "import a JSONL file, a LaMP/LongLaMP profile or UPQA items, all or nothing",
                "Import items into a user's history, all or nothing (every line is checked before anything is "
                "written). Formats (README, Import formats): .jsonl with one JSON object a line, {\"text\": ..., "
                "\"kind\"?: ..., \"ts\"?: unix seconds, \"meta\"?: {...}} (other fields are kept in meta) or a "
                "chat {\"messages\": [...]}; .json holding LaMP/LongLaMP records, UPQA items, or a `localpers export`.")
    p.add_argument("file", help=".jsonl (one item or {\"messages\": [...]} chat a line) or .json (a localpers export, "
                                "LaMP/LongLaMP records, UPQA items)")
    p.add_argument("--record", "--lamp-id", dest="record", metavar="ID",
                   help="in a file of several users' records, import this user's: a LaMP record's id, a UPQA item's "
                        "user_id or upqa-INDEX (default: refuse such a file)")
    p.add_argument("--merge-users", action="store_true",
                   help="import every user's records of such a file into this one user")

    p = command("history", cmd_history, "list a user's history")
    p.add_argument("--kind", choices=ITEM_KINDS, metavar="KIND", help=f"only items of this kind: {kinds} "
                                                                      "(default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per item (default: off)")

    p = command("search", cmd_search, "search a user's history")
    p.add_argument("query", help="the text to search for")
    p.add_argument("-k", type=int, default=5, help="number of results (default: %(default)s)")
    p.add_argument("--mode", choices=["bm25", "dense", "hybrid"], default="bm25", metavar="MODE",
                   help="bm25 (words), dense (embeddings) or hybrid (both, fused by rank) (default: %(default)s)")
    p.add_argument("--embedder", help="for --mode dense|hybrid: 'minilm' (needs localpers[dense]) or the path of a "
                                      "GGUF embedding model (default: minilm)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per item (default: off)")

    p = command("export", cmd_export, "everything held about a user, decrypted, as JSON")
    p.add_argument("-o", "--output", help="write to this new file, readable by its owner only (default: stdout)")

    p = command("forget", cmd_forget, "delete everything held about a user and scrub it from the database file")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (default: ask)")
