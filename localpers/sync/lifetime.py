"""No process localpers starts outlives the command that started it, and a device contributes only while the
command that consented is alive.

- `child_preexec()`: a Popen `preexec_fn` that asks Linux to SIGKILL the child when its parent dies, whatever
  ends the parent (SIGKILL included: prctl(PR_SET_PDEATHSIG), which survives exec), and exits at once if the
  parent is already gone. `die_with_parent()` does the same for the calling process (torch.multiprocessing
  workers of `train --nproc`).
- `exit_on_signals()`: SIGTERM and SIGHUP (the terminal closed) raise SystemExit in the main thread, so that the
  command's `finally` blocks stop its children's process groups.
- `token()` / `alive(token)`: the identity of a process as "pid:start-time" (start time in clock ticks since
  boot, /proc/PID/stat field 22, so a reused pid is a different token). `localpers sync` puts its token in the
  node config; the ClientApp checks it before it answers any message and before its reply leaves
  (`watch(token)` also ends the ClientApp process when the consenting command is gone).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def child_preexec():
    """A `preexec_fn` for subprocess.Popen: the child is SIGKILLed when the process that started it dies.
    Built in the parent (it records the parent's pid), run in the child between fork and exec."""
    parent = os.getpid()

    def preexec():
        _set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us later
            os._exit(1)
    return preexec


def die_with_parent() -> None:
    """The calling process gets SIGKILL when its parent dies (exits now if the parent is already gone)."""
    parent = os.getppid()
    _set_pdeathsig(signal.SIGKILL)
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread (so `finally` blocks run)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("latin-1")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped
        return None
    return fields[19]


def token(pid: int | None = None) -> str:
    """This process's (or pid's) identity "pid:start-time" ("pid:" where /proc is absent)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or ''}"


def alive(tok: str) -> bool:
    """Whether the process that `tok` names is still running (the same process, not a reused pid)."""
    pid_text, _, start = str(tok).partition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if start:
        return _start_time(pid) == start
    from localpers.store.store import pid_alive  # (lazy: this module stays light for the processes it starts)

    return pid_alive(pid)


def watch(tok: str, poll_s: float = 0.2) -> threading.Thread:
    """A daemon thread that ends this process (os._exit(1)) as soon as the process of `tok` is gone."""
    def run():
        while alive(tok):
            time.sleep(poll_s)
        os._exit(1)
    thread = threading.Thread(target=run, daemon=True, name="localpers-consent-watch")
    thread.start()
    return thread
