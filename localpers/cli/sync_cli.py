"""`localpers sync-server` (Flower SuperLink + the sync ServerApp) and `localpers sync` (this device joins as a
Flower SuperNode; `--log` shows what it sent). Nothing syncs unless one of these runs: the serving path opens no
socket beyond its own loopback server.

Both start Flower's own executables (flower-superlink, flower-supernode, flwr run) as children in their own
process group, with runtime dependency installation off (no network), and always stop them on exit: SIGTERM and
SIGHUP (a closed terminal) run the cleanup, and the kernel SIGKILLs them if the command dies without it
(localpers.sync.lifetime). A device's ClientApp answers only while its `localpers sync` runs (node config `consent`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from localpers.errors import UserError, port_number
from localpers.sync import lifetime

APP_PYPROJECT = """[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "localpers-sync"
version = "1.0.0"
description = "localpers private sync (federated communities under SecAgg+ and DP)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "localpers"

[tool.flwr.app.components]
serverapp = "localpers.sync.sync_app:server_app"
clientapp = "localpers.sync.sync_app:client_app"
"""
CONNECTION = "localpers"


def _executable(name: str) -> str:
    """A Flower executable next to this interpreter (pip installs them there), else on PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise UserError(f"sync: {name} not found (pip install flwr==1.42.0)")
    return found


def _env(flwr_home: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    # the Flower subprocesses (flwr-serverapp, flwr-clientapp) must import this localpers
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the localpers package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Flower's processes start each other by name (flower-superlink starts flower-superexec): find them next to
    # this interpreter even when its virtual environment is not activated (a venv's bin/ is not on PATH then)
    env["PATH"] = str(Path(sys.executable).parent) + (os.pathsep + env["PATH"] if env.get("PATH") else "")
    return env


@contextmanager
def _process_group(cmd: list[str], log_path: Path, env: dict, pid_file: Path | None = None):
    """Start cmd in a new session (its own process group, pid written to pid_file), SIGKILLed by the kernel if
    this process dies without stopping it (lifetime.child_preexec); on exit kill the whole group (SIGTERM, then
    SIGKILL) and reap it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lifetime.child_preexec())
    if pid_file is not None:
        pid_file.write_text(str(proc.pid))
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # whatever is left of the group (children outlive their leader)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _wait_port(host: str, port: int, proc: subprocess.Popen, seconds: float, log_path: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"sync: {Path(proc.args[0]).name} exited ({proc.returncode}); see {log_path}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise UserError(f"sync: nothing listens on {host}:{port} after {seconds:.0f} s; see {log_path}")


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"sync: address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and math.isinf(v):
        return '"inf"'
    return repr(v)


def _write_toml(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml(values), encoding="utf-8")
    return path


def _toml(values: dict) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


# ---------------------------------------------------------------- sync-server


def cmd_sync_server(args) -> int:
    import numpy as np

    from localpers.sync import sync

    cfg = sync.SyncConfig(k=args.k, dim=args.dim, n_layer=args.n_layer, steer_dim=args.steer_dim, vocab=args.vocab,
                          rounds=args.rounds,
                          epsilon=args.epsilon, delta=args.delta, min_size=args.min_size,
                          min_contributors=args.min_contributors, steer_clip=args.steer_clip,
                          hist_clip=args.hist_clip, seed=args.seed)
    sync.check_cohort(args.devices, cfg)
    if args.min_contributors > args.devices:
        raise UserError("sync: --min-contributors cannot exceed --devices")
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"sync-server: --out {args.out} is a file, not a directory")
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((args.host, args.port)) == 0:
            raise UserError(f"sync-server: {args.host}:{args.port} is in use by another program; choose another --port")
    home = out / "flower"
    app = out / "app"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{args.host}:{args.port}"\ninsecure = true\n', encoding="utf-8")
    app.mkdir(parents=True, exist_ok=True)
    run_config = {**cfg.to_run_config(), "min-devices": args.devices, "timeout": args.timeout, "out-dir": str(out),
                  "owner": lifetime.token()}  # the ServerApp process ends with this command (lifetime.watch)
    previous = out / sync.GLOBAL_KNOWLEDGE_FILE
    start = out / "start_centroids.npy"
    start.unlink(missing_ok=True)
    if previous.is_file() and not args.fresh:
        centroids = sync.Knowledge.load(previous).centroids
        if centroids.shape == (cfg.k, cfg.dim):  # continue the previous run's communities
            np.save(start, centroids)
            run_config["start"] = str(start)
            print(f"sync-server: starting from the {cfg.k} communities of the previous run in {out} (--fresh: not)")
    (app / "pyproject.toml").write_text(APP_PYPROJECT + "\n[tool.flwr.app.config]\n" + _toml(run_config), encoding="utf-8")
    (out / "summary.json").unlink(missing_ok=True)
    with kept_unless_replaced(previous) as published:
        summary = _run_server(args, cfg, out, home, app)
    for h in summary["history"]:
        if h.get("withheld"):
            print(f"round {h['round']}: only {h['devices']} devices, fewer than --min-contributors: withheld")
        else:
            print(f"round {h['round']}: {h['devices']} devices, community sizes {[int(s) for s in h['sizes']]}")
    total = sync.rdp_epsilon(cfg.noise_multiplier, cfg.rounds, cfg.delta)
    if published():
        print(f"published {previous}; epsilon {total:.3g} in total (delta {cfg.delta:g})")
    else:
        print(f"nothing published: the run ended after {len(summary['history'])} of {cfg.rounds} rounds; see "
              f"{out / 'run.log'}" + ("; the previous run's knowledge is kept" if previous.is_file() else ""))
    return 0 if summary["complete"] else 1


@contextmanager
def kept_unless_replaced(path: Path):
    """Set `path` aside for a run that may write a new one; on exit (also on an error) restore it unless the run
    wrote a new one. Yields a function telling whether it did. A failed or interrupted run thus never loses
    what the previous run published."""
    aside = path.with_name(path.name + ".previous")
    if path.is_file():
        path.replace(aside)
    wrote = False
    try:
        yield lambda: wrote
    finally:
        wrote = path.is_file()
        if aside.is_file():
            if wrote:
                aside.unlink()
            else:
                aside.replace(path)


def _run_server(args, cfg, out: Path, home: Path, app: Path) -> dict:
    """Run the SuperLink and `flwr run` of the ServerApp until the run ends; returns its summary.json."""
    env = _env(home)
    print(f"sync-server: SuperLink on {args.host}:{args.port}; waiting for {args.devices} devices, "
          f"{cfg.rounds} rounds, epsilon {cfg.epsilon:g} per round (delta {cfg.delta:g})", flush=True)
    superlink = [_executable("flower-superlink"), "--insecure", "--host", args.host, "--port", str(args.port),
                 "--disable-runtime-dependency-installation"]
    lifetime.exit_on_signals()
    with _process_group(superlink, out / "superlink.log", env, out / "superlink.pid") as link:
        _wait_port(args.host, args.port, link, 60, out / "superlink.log")
        run = [_executable("flwr"), "run", str(app), CONNECTION, "--stream"]
        limit = args.max_seconds or (cfg.rounds * 5 + 2) * args.timeout + 120
        with _process_group(run, out / "run.log", env) as proc:
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                raise UserError(f"sync: the run did not finish in {limit:.0f} s; see {out / 'run.log'}") from None
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise UserError(f"sync: the run ended without a result; see {out / 'run.log'}")
    return json.loads(summary_path.read_text())


# ---------------------------------------------------------------- sync (device)


def _data_dir(args) -> Path:
    from localpers.store.store import data_dir

    return Path(data_dir(args.data_dir))


def print_log(data_dir: Path) -> None:
    from localpers.sync import sync

    entries = sync.read_log(data_dir)
    if not entries:
        print(f"nothing sent from {data_dir} (sync never ran)")
        return
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        if e["kind"] == "message":
            shapes = ", ".join(f"{v['key']}{v.get('shape', '')}" + (f"x{v['items']}" if "items" in v else "")
                               for v in e["values"])
            print(f"{when} sent {e['message_type']}/{e['stage'] or '-'}: {e['bytes']} bytes [{shapes}]")
        elif e["kind"] == "contribution":
            print(f"{when} round {e['round']}: vector {e['shape']} norm {e['norm_plain']:.4g} (with noise "
                  f"{e['norm_sent']:.4g}), noise std {e['noise_std']:.3g}, epsilon {e['epsilon_round']:.3g} this "
                  f"round, {e['epsilon_total']:.3g} in total (delta {e['delta']:g})")
        elif e["kind"] == "refused":
            print(f"{when} round {e['round']}: refused ({e['reason']})")
        elif e["kind"] == "received":
            print(f"{when} received global knowledge: {e['communities']} communities")


def cmd_sync(args) -> int:
    from localpers.sync import sync

    data_dir = _data_dir(args)
    if args.log:
        print_log(data_dir)
        return 0
    if not args.user:
        raise UserError("sync: --user is required (whose local signals this device contributes)")
    budget = args.epsilon_budget
    if not budget > 0:
        raise UserError(f"sync: --epsilon-budget must be positive (or inf), not {budget:g}")
    sync.load_contribution(data_dir, args.user).check_values()  # validate before joining: refused here, not mid-round
    if sync.exhausted(data_dir, budget, 1e-6):
        raise UserError(f"sync: this device has spent its epsilon budget {budget:g}")
    host, port = _split_address(args.superlink)
    # consent: the ClientApp answers only while this command runs (lifetime.alive of this token)
    node = {"data-dir": str(data_dir.resolve()), "user": args.user, "epsilon-budget": str(budget),
            "consent": lifetime.token()}
    if args.capture:
        node["capture-dir"] = str(Path(args.capture).resolve())
    node_toml = _write_toml(sync.sync_dir(data_dir) / "node.toml", node)
    home = sync.sync_dir(data_dir) / "flower"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [_executable("flower-supernode"), "--insecure", "--superlink", f"{host}:{port}",
           "--port", str(args.port), "--node-config", str(node_toml)]
    received = len([e for e in sync.read_log(data_dir) if e["kind"] == "received"])
    print(f"sync: joining {host}:{port} as user {args.user!r}; every message sent is logged "
          f"(localpers sync --log --data-dir {data_dir})", flush=True)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else math.inf
    lifetime.exit_on_signals()
    if not _wait_for_server(host, port, args, deadline):
        print(f"sync: stopped after --max-seconds {args.max_seconds:g}: no sync server answered at {host}:{port}",
              flush=True)
        return 1
    with _process_group(cmd, sync.sync_dir(data_dir) / "supernode.log", _env(home),
                        sync.sync_dir(data_dir) / "supernode.pid") as proc:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log_path = sync.sync_dir(data_dir) / "supernode.log"
                raise UserError(f"sync: flower-supernode exited ({proc.returncode}){_reason(log_path)}; see {log_path}")
            if args.once and len([e for e in sync.read_log(data_dir) if e["kind"] == "received"]) > received:
                print("sync: received the global knowledge", flush=True)
                return 0
            time.sleep(0.5)
    got = len([e for e in sync.read_log(data_dir) if e["kind"] == "received"]) - received
    print(f"sync: stopped after --max-seconds {args.max_seconds:g}: {got} global knowledge update(s) received"
          + ("" if got else f" (is `localpers sync-server` running at {host}:{port}?)"), flush=True)
    return 0 if got or not args.once else 1


def _wait_for_server(host: str, port: int, args, deadline: float) -> bool:
    """Wait until something listens at host:port, saying so once; with --once give up after --connect-timeout
    seconds (a UserError). False when --max-seconds ends the wait."""
    said, start = False, time.monotonic()
    limit = args.connect_timeout if args.once and args.connect_timeout > 0 else math.inf
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            pass
        if not said:
            print(f"sync: waiting for the sync server at {host}:{port} (is `localpers sync-server` running there?)",
                  flush=True)
            said = True
        if time.monotonic() - start >= limit:
            raise UserError(f"sync: no sync server answered at {host}:{port} in {limit:g} s; check --superlink "
                            "and that `localpers sync-server` runs there")
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _reason(log_path: Path) -> str:
    """': <message>' of the last localpers UserError in a process's log, or ''."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    found = [line.split("UserError: ", 1)[1].strip() for line in lines if "UserError: " in line]
    return f": {found[-1]}" if found else ""


def add_cli(sub) -> None:
    from localpers.personalize.logo import VOCABULARY  # LoGo's user vectors (preference counts) and histograms

    p = sub.add_parser("sync", help="join a private sync as a Flower SuperNode (opt-in; --log shows what was sent)",
                       description="Join a private sync run (`localpers sync-server`) as a Flower SuperNode: each "
                                   "round this device sends its user's LoGo contribution (clipped per-community sums "
                                   "with its share of Gaussian noise, under SecAgg+), never their history, until its "
                                   "epsilon budget is spent; the published communities are folded into the local "
                                   "LoGo knowledge. The user's signals must exist first (`localpers personalize "
                                   "--user ID --method logo`). `--log` prints every message this device has sent.")
    p.add_argument("--superlink", default="127.0.0.1:9093", help="HOST:PORT of `localpers sync-server`")
    p.add_argument("--user", help="the user whose local signals this device contributes")
    p.add_argument("--data-dir", help="user data directory (default: $LOCALPERS_HOME or the XDG data dir)")
    p.add_argument("--epsilon-budget", type=float, default=16.0,
                   help="total epsilon (delta of the run) after which this device stops contributing (inf: no limit)")
    p.add_argument("--port", type=port_number, default=9094, help="loopback port of the SuperNode's ClientApp API")
    p.add_argument("--capture", help="also keep every raw payload sent, as JSON files in this directory (audit)")
    p.add_argument("--once", action="store_true", help="leave after receiving the global knowledge")
    p.add_argument("--connect-timeout", type=float, default=120.0,
                   help="with --once: give up when no sync server answers at --superlink within this many seconds "
                        "(0: wait; default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=0, help="leave after this many seconds (0: run until Ctrl-C)")
    p.add_argument("--log", action="store_true", help="print what this device has sent (shapes, bytes, norms, epsilon)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("sync-server", help="run a private sync: Flower SuperLink + the federated communities app",
                       description="Run a private sync: a Flower SuperLink and the app that learns LoGo's "
                                   "communities over the devices that join (`localpers sync`) by federated k-means "
                                   "under SecAgg+ and differential privacy. Only community aggregates reach it; the "
                                   "published knowledge, logs and Flower state go to --out.")
    p.add_argument("--host", default="127.0.0.1", help="address the SuperLink binds (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=9093, help="the SuperLink's port for SuperNodes (default: %(default)s)")
    p.add_argument("--out", required=True, help="directory for the published knowledge, logs and Flower state")
    p.add_argument("--devices", type=int, default=3, help="devices sampled per round (the round waits for them)")
    p.add_argument("--rounds", type=int, default=3, help="federated k-means rounds (default: %(default)s)")
    p.add_argument("--k", type=int, default=8, help="number of communities")
    p.add_argument("--dim", type=int, default=len(VOCABULARY), help="user vector dimension (LoGo without embeddings: its vocabulary)")
    p.add_argument("--n-layer", type=int, default=29,
                   help="steering vector layers: the served model's n_layer - 1 (LoGo's control-vector layers; 0: none)")
    p.add_argument("--steer-dim", type=int, default=576, help="steering vector width (the model's hidden size)")
    p.add_argument("--vocab", type=int, default=len(VOCABULARY), help="public preference vocabulary size (LoGo's)")
    p.add_argument("--epsilon", type=float, default=math.inf, help="DP epsilon per round (inf: no noise)")
    p.add_argument("--delta", type=float, default=1e-6,
                   help="the δ of the (ε, δ)-DP guarantee the accountant reports (default: %(default)s)")
    p.add_argument("--min-size", type=int, default=2, help="communities smaller than this are never published")
    p.add_argument("--min-contributors", type=int, default=2,
                   help="devices whose noise shares a published sum must hold (fewer: the round is withheld)")
    p.add_argument("--steer-clip", type=float, default=8.0, help="L2 clip of a user's steering vector")
    p.add_argument("--hist-clip", type=float, default=4.0, help="L2 clip of a user's preference histogram")
    p.add_argument("--seed", type=int, default=0, help="seed of the public initial centroids")
    p.add_argument("--fresh", action="store_true", help="start from the seed's centroids even when --out holds a "
                   "previous run's communities (default: continue them, so community j stays community j)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a SecAgg+ stage waits for devices")
    p.add_argument("--max-seconds", type=float, default=0, help="give up on the run after this long (0: automatic)")
    p.set_defaults(func=cmd_sync_server)
