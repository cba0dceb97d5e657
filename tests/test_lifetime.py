"""No process localpers starts outlives its command (localpers.sync.lifetime), and a device answers a sync message
only while the `localpers sync` that consented runs (sync_app.check_consent). The end-to-end case with real Flower
processes is in test_sync_processes.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from localpers.sync import lifetime

ROOT = Path(__file__).resolve().parent.parent


def gone(pid: int) -> bool:
    return not lifetime.alive(lifetime.token(pid)) if lifetime._start_time(pid) else True


def wait_gone(pid: int, limit_s: float = 60) -> None:
    """A hang guard (not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)


PARENT = textwrap.dedent("""
    import signal, subprocess, sys, time
    from localpers.sync import lifetime
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a run under nohup inherits SIGHUP ignored: the parent must die of it
    if sys.argv[1] == "popen":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                                 preexec_fn=lifetime.child_preexec())
        pid = child.pid
    else:  # a process that calls die_with_parent itself (a train --nproc worker)
        child = subprocess.Popen([sys.executable, "-c", "from localpers.sync import lifetime; "
                                  "lifetime.die_with_parent(); print('armed', flush=True); import time; time.sleep(600)"],
                                 start_new_session=True, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "armed"
        pid = child.pid
    print(pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["popen", "self"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM])
def test_a_child_dies_with_its_parent_whatever_ends_the_parent(sig, how):
    """Invariant: a child started with child_preexec (or that called die_with_parent) does not survive its parent,
    even when the parent gets SIGKILL and runs no cleanup; the child is in a session of its own, so no signal
    to the parent's group reaches it."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.send_signal(sig)
        parent.wait(timeout=60)
        wait_gone(child)
    finally:
        parent.kill()
        parent.wait()


def test_a_token_names_one_process_and_not_a_reused_pid():
    me = lifetime.token()
    assert lifetime.alive(me)
    pid, start = me.split(":")
    assert start, "no /proc start time on this machine"
    assert not lifetime.alive(f"{pid}:{int(start) + 1}")  # same pid, another start time: another process
    done = subprocess.run([sys.executable, "-c", "from localpers.sync import lifetime; print(lifetime.token())"],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert not lifetime.alive(done.stdout.strip())  # exited
    assert not lifetime.alive("") and not lifetime.alive("x:1")


def test_the_client_app_sends_nothing_once_the_consenting_command_is_gone(monkeypatch, tmp_path):
    """The ClientApp's outermost mod ends its process before computing or sending a reply when the node config's
    consent token names a process that is gone, and passes the message on while it runs."""
    from localpers.sync import sync_app

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(sync_app.os, "_exit", fake_exit)
    monkeypatch.setattr(sync_app.lifetime, "watch", lambda tok: True)
    done = subprocess.run([sys.executable, "-c", "from localpers.sync import lifetime; print(lifetime.token())"],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    called = []

    def call_next(msg, context):
        called.append(msg)
        raise AssertionError("a reply was computed for a device whose command is gone")

    msg = SimpleNamespace(has_content=lambda: False)
    dead = SimpleNamespace(node_config={"data-dir": str(tmp_path), "consent": done.stdout.strip()})
    with pytest.raises(Exited):
        sync_app.ledger_mod(msg, dead, call_next)
    assert called == []
    live = SimpleNamespace(node_config={"data-dir": str(tmp_path), "consent": lifetime.token()})
    with pytest.raises(AssertionError, match="reply was computed"):
        sync_app.ledger_mod(msg, live, call_next)
    assert len(called) == 1
