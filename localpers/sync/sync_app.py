"""The Flower app of private sync: federated k-means + community statistics under SecAgg+ (and DP noise).

ServerApp (`server_app`): Flower's legacy `DefaultWorkflow` with `SecAggPlusWorkflow` as the fit workflow
(the only way current Flower runs SecAgg+), driving `KMeansStrategy`: each round sends the centroids, receives
the SecAgg+ mean of the devices' flat vectors, multiplies it back to totals (every device has weight 1, so the
mean is the sum over the n devices that sent a masked vector), publishes the knowledge (localpers/sync/sync.py) and
sends the new centroids. After the last round the published knowledge goes to every device (an evaluate message)
and to `<out-dir>/global_knowledge.npz` on the server.

ClientApp (`client_app`): `SyncClient` (NumPy client) encodes the device's user, adds its noise share, and
refuses to contribute past its epsilon budget; `secaggplus_mod` masks and quantizes; `ledger_mod` (outermost)
records every message the device sends — shapes, bytes, norms, epsilon — in <data-dir>/sync/sent.jsonl, and
with node config `capture-dir` also keeps the raw payloads (for audits and tests).

Node config of a device (`localpers sync` sets it): data-dir, user, epsilon-budget, [capture-dir].
Declared in pyproject.toml under [tool.flwr.app.components].
"""
from __future__ import annotations

import json
import os
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import (Context, EvaluateIns, FitIns, Message, ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from localpers.sync import lifetime, sync
from localpers.errors import UserError

SUMMARY_FILE = "summary.json"
KEY_SHARES_COLLECTED = "SecAgg+ key shares collected from"  # logged (INFO) when a round's 'share keys' stage ends


# ---------------------------------------------------------------- server


class KMeansStrategy(FedAvg):
    """Federated spherical k-means over SecAgg+ sums; keeps the knowledge of the last round in `.knowledge`."""

    def __init__(self, cfg: sync.SyncConfig, min_devices: int, wait_seconds: float = 600.0,
                 centroids: np.ndarray | None = None):
        self.cfg = cfg
        self.wait_seconds = wait_seconds
        self.centroids = sync.initial_centroids(cfg) if centroids is None else centroids
        self.knowledge: sync.Knowledge | None = None
        self.history: list[dict] = []
        super().__init__(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=min_devices,
                         min_evaluate_clients=1, min_available_clients=min_devices,
                         initial_parameters=ndarrays_to_parameters([self.centroids]))

    def configure_fit(self, server_round, parameters, client_manager):
        # Round 1 waits for min_devices; later rounds go on with every device still there (>= min_contributors).
        need = self.min_fit_clients if server_round == 1 else self.cfg.min_contributors
        # num_available() refreshes Flower's node registry (else wait_for sees it only every 5 s)
        if client_manager.num_available() < need and not client_manager.wait_for(need, timeout=self.wait_seconds):
            return []
        proxies = list(client_manager.all().values())
        sync.check_cohort(len(proxies), self.cfg)
        return [(proxy, FitIns(parameters, {"round": server_round})) for proxy in proxies]

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        n = len(results)  # devices whose masked vectors were unmasked; SecAgg+ returned their mean
        if n < self.cfg.min_contributors:  # too few noise shares: this round's sums are not private enough
            self.history.append({"round": server_round, "devices": n, "failures": len(failures), "withheld": True})
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        sums = sync.decode(mean.astype(np.float64) * n, self.cfg)
        self.knowledge = sync.publish(sums, self.centroids, self.cfg)
        self.centroids = self.knowledge.centroids
        self.history.append({"round": server_round, "devices": n, "failures": len(failures),
                             "sizes": self.knowledge.sizes.tolist(),
                             "error_bound": sync.error_bound(n, self.cfg)})
        return ndarrays_to_parameters([self.centroids]), {"devices": n}

    def run_meta(self) -> dict:
        """The run's privacy terms (rounds, epsilon a round, delta, the accountant's epsilon over the rounds,
        min_size) and its history: the published knowledge's meta, on the server and on every device."""
        cfg = self.cfg
        return {"rounds": cfg.rounds, "epsilon_per_round": cfg.epsilon, "delta": cfg.delta,
                "epsilon_total": sync.rdp_epsilon(cfg.noise_multiplier, cfg.rounds, cfg.delta),
                "min_size": cfg.min_size, "history": self.history}

    def configure_evaluate(self, server_round, parameters, client_manager):
        # Devices download the published knowledge once, after the last round, with the run's terms.
        if server_round < self.cfg.rounds or self.knowledge is None:
            return []
        self.knowledge.meta = self.run_meta()
        ins = EvaluateIns(ndarrays_to_parameters(self.knowledge.arrays()), {"meta": json.dumps(self.knowledge.meta)})
        return [(proxy, ins) for proxy in client_manager.all().values()]

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {"received": len(results)}

    def evaluate(self, server_round, parameters):
        return None


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow, with dropout before the end of 'share keys' handled.

    Upstream (flwr 1.42) keeps every node sampled at setup in `sampled_node_ids`, so a node that never
    completed 'share keys' (e.g. a device that went offline between rounds but is still listed) is later treated
    as a dropped node whose masks must be removed — but nobody holds shares of its key, and the unmask stage of
    every device fails with KeyError. Such a node never entered anyone's pairwise masks (devices mask only with
    the sources of the key shares they received), so it is simply not part of the round."""

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        # an event for logs and tests: every key share of the round is in; masked vectors are asked for next
        log(INFO, "%s %d devices", KEY_SHARES_COLLECTED, len(state.active_node_ids))
        return ok


def run_server(grid: Grid, context: Context, centroids: np.ndarray | None = None) -> KMeansStrategy:
    """Run all rounds on `grid`; write the knowledge and a summary to run config `out-dir` (when set).
    centroids: the first round's [k, dim]; default: run config `start` (a .npy file of published centroids, e.g.
    the previous run's, so that community j stays community j across runs and LoGo's fold adds like to like),
    else sync.initial_centroids (public and data-free)."""
    cfg = sync.SyncConfig.from_run_config(context.run_config)
    if centroids is None and context.run_config.get("start"):
        centroids = np.load(str(context.run_config["start"]), allow_pickle=False)
        if centroids.shape != (cfg.k, cfg.dim):
            raise UserError(f"sync: start centroids have shape {centroids.shape}, the run needs {(cfg.k, cfg.dim)}")
    min_devices = int(context.run_config.get("min-devices", 2))
    timeout = float(context.run_config.get("timeout", 60.0))
    sync.check_cohort(min_devices, cfg)
    strategy = KMeansStrategy(cfg, min_devices, wait_seconds=float(context.run_config.get("wait", 600.0)),
                              centroids=centroids)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=timeout),
                           strategy=strategy)
    if cfg.min_contributors > min_devices:
        raise UserError(f"sync: min-contributors {cfg.min_contributors} exceeds min-devices {min_devices}")
    shares, threshold = sync.secagg_shares(min_devices)
    secagg = SecAggPlus(num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
                                clipping_range=cfg.clipping_range, quantization_range=sync.QUANTIZATION_RANGE,
                                modulus_range=sync.MODULUS_RANGE, timeout=timeout)
    start = time.perf_counter()
    DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
    if strategy.knowledge is not None:
        strategy.knowledge.meta = strategy.run_meta()
    out = context.run_config.get("out-dir")
    if out:
        out = Path(str(out))
        out.mkdir(parents=True, exist_ok=True)
        if strategy.knowledge is not None:
            strategy.knowledge.save(out / sync.GLOBAL_KNOWLEDGE_FILE)
        summary = {"config": cfg.to_run_config(), "seconds": round(time.perf_counter() - start, 3),
                   "history": strategy.history, "complete": len(strategy.history) == cfg.rounds}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return strategy


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    owner = str(context.run_config.get("owner", ""))
    if owner:  # `localpers sync-server` started this run: the ServerApp ends with it
        lifetime.watch(owner)
    run_server(grid, context)


# ---------------------------------------------------------------- device


def _budget(node_config) -> float:
    return float(str(node_config.get("epsilon-budget", "inf")))


class SyncClient(NumPyClient):
    """One device: its user's local signals (sync.load_contribution) from node config data-dir and user."""

    def __init__(self, context: Context):
        self.context = context
        self.data_dir = Path(str(context.node_config["data-dir"]))
        self.user = str(context.node_config["user"])

    def fit(self, parameters, config):
        cfg = sync.SyncConfig.from_run_config(self.context.run_config)
        run_id = self.context.run_id
        z = cfg.noise_multiplier
        budget = _budget(self.context.node_config)
        after = sync.spent(self.data_dir, cfg.delta, extra=(z,))
        if after > budget:
            sync.log_sent(self.data_dir, {"kind": "refused", "run": run_id, "round": config.get("round"),
                                          "reason": f"epsilon after this round {after:.3g} > budget {budget:.3g}"})
            raise UserError(f"sync: epsilon budget {budget} reached; this device stops contributing")
        centroids = np.asarray(parameters[0], dtype=np.float64)
        contribution = sync.load_contribution(self.data_dir, self.user)
        plain, community = sync.encode(contribution, centroids, cfg)
        noisy, _ = sync.encode(contribution, centroids, cfg, rng=np.random.default_rng())
        sync.log_sent(self.data_dir, {
            "kind": "contribution", "run": run_id, "round": config.get("round"), "shape": list(noisy.shape),
            "norm_plain": round(float(np.linalg.norm(plain)), 6), "norm_sent": round(float(np.linalg.norm(noisy)), 6),
            "community": community, "noise_multiplier": z, "noise_std": cfg.share_std,
            "epsilon_round": sync.rdp_epsilon(z, 1, cfg.delta), "epsilon_total": after, "delta": cfg.delta})
        return [noisy], 1, {}

    def evaluate(self, parameters, config):
        knowledge = sync.Knowledge.from_arrays([np.asarray(p) for p in parameters], json.loads(config.get("meta", "{}")))
        knowledge.save(sync.sync_dir(self.data_dir) / sync.GLOBAL_KNOWLEDGE_FILE)
        cfg = sync.SyncConfig.from_run_config(self.context.run_config)
        save_logo_knowledge(self.data_dir, knowledge, cfg)
        sync.log_sent(self.data_dir, {"kind": "received", "run": self.context.run_id,
                                      "communities": int(knowledge.published.sum())})
        return 0.0, 1, {}


def save_logo_knowledge(data_dir: str | Path, knowledge: sync.Knowledge, cfg: sync.SyncConfig) -> Path | None:
    """Fold a sync run's published knowledge into the device's LoGo knowledge (DATA_DIR/logo/knowledge.npz),
    which the served `logo` method reads: one sync run (its Lloyd rounds) is one LoGo round, so it is folded
    with logo.fold into the previous synced knowledge (decay 0.5 ** (1 / logo.HALF_LIFE)) when that has the same
    shapes, and starts over otherwise (a first run, or knowledge this device computed alone). Published
    communities only (unpublished ones are zeros, so never served); meta["source"] = logo.SYNC_SOURCE, which
    makes logo.refresh_knowledge keep it. None (nothing written) when the run's vocabulary is not LoGo's
    (`--vocab len(logo.VOCABULARY)`)."""
    from localpers.personalize import logo

    if cfg.vocab != len(logo.VOCABULARY):
        return None
    path = logo.knowledge_dir(data_dir) / logo.KNOWLEDGE_FILE
    previous = None
    if path.is_file():
        try:
            previous = logo.GlobalKnowledge.load(path)
        except UserError:
            previous = None
    return logo_knowledge(previous, knowledge, cfg).save(path)


def logo_knowledge(previous, knowledge: sync.Knowledge, cfg: sync.SyncConfig):
    """LoGo's GlobalKnowledge after folding one sync run's published knowledge into `previous` (a
    logo.GlobalKnowledge or None; dropped unless it came from sync with the same shapes): logo.fold with
    logo.HALF_LIFE, min_size cfg.min_size, meta source logo.SYNC_SOURCE (no file written: see
    save_logo_knowledge). cfg.vocab must be len(logo.VOCABULARY)."""
    from localpers.personalize import logo

    sums = logo.RoundSums(**sync.logo_round_sums(knowledge))
    if previous is not None and (previous.meta.get("source") != logo.SYNC_SOURCE or any(
            getattr(previous.sums, f).shape != getattr(sums, f).shape for f in vars(sums))):
        previous = None
    meta = {"source": logo.SYNC_SOURCE, "embedder": None if cfg.dim == len(logo.VOCABULARY) else f"sync-dim-{cfg.dim}",
            "community_cvecs": {}, "sync": {k: knowledge.meta.get(k) for k in ("rounds", "epsilon_total", "delta")}}
    return logo.fold(previous, sums, start=knowledge.centroids.astype(np.float32), half_life=logo.HALF_LIFE,
                     min_size=cfg.min_size, meta=meta)


def describe(content) -> list[dict]:
    """Every value of a RecordDict as {record, key, type, shape/bytes}: what a message carries, without values."""
    rows = []
    for rname, record in content.items():
        for key, value in record.items():
            row = {"record": rname, "key": key, "type": type(value).__name__}
            if hasattr(value, "shape"):
                row["shape"] = list(value.shape)
                row["bytes"] = len(value.data)
            elif isinstance(value, (bytes, bytearray)):
                row["bytes"] = len(value)
            elif isinstance(value, list):
                row["items"] = len(value)
                row["bytes"] = sum(len(v) if isinstance(v, (bytes, bytearray)) else 8 for v in value)
            rows.append(row)
    return rows


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "numpy"):
        return {"array": value.numpy().tolist()}
    return value


def check_consent(context: Context) -> None:
    """End this ClientApp process, sending nothing, unless the `localpers sync` command that consented (node
    config `consent`, a lifetime.token) is still running; also watch it for as long as this process lives."""
    consent = str(context.node_config.get("consent", ""))
    if not consent:  # a SuperNode not started by `localpers sync` (flwr's own tools, the in-process simulation)
        return
    if not lifetime.alive(consent):
        os._exit(1)
    global _watching
    if not _watching:
        _watching = lifetime.watch(consent)


_watching = None


def ledger_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: answer only while the consenting `localpers sync` runs (check_consent, before and after the
    reply is computed); log every reply this device sends (after SecAgg+ masked it) to sync/sent.jsonl."""
    check_consent(context)
    incoming = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    stage = incoming.get(Key.STAGE) if incoming is not None else None  # secaggplus_mod pops it
    reply = call_next(msg, context)
    check_consent(context)
    data_dir = Path(str(context.node_config["data-dir"]))
    rows = describe(reply.content) if reply.has_content() else []
    sync.log_sent(data_dir, {"kind": "message", "run": context.run_id, "message_type": msg.metadata.message_type,
                             "stage": stage, "bytes": sum(r.get("bytes", 0) for r in rows), "values": rows,
                             "error": reply.error.reason if reply.has_error() else None})
    capture = context.node_config.get("capture-dir")
    if capture and reply.has_content():
        path = Path(str(capture))
        path.mkdir(parents=True, exist_ok=True)
        payload = {rname: {k: _jsonable(v) for k, v in record.items()} for rname, record in reply.content.items()}
        name = f"{time.time_ns()}-{msg.metadata.message_type}-{stage or 'plain'}.json"
        (path / name).write_text(json.dumps({"stage": stage, "content": payload}))
    return reply


def _client_fn(context: Context):
    return SyncClient(context).to_client()


client_app = ClientApp(client_fn=_client_fn, mods=[ledger_mod, secaggplus_mod])


# ---------------------------------------------------------------- in-process simulation


class LocalGrid(Grid):
    """A Flower Grid that delivers each message to a ClientApp in this process: the exact ServerApp, ClientApp,
    mods and SecAgg+ protocol, without sockets (for tests and the 100/1,000-device benchmark). Every message is
    deep-copied on the way, as serialization would; nodes listed in `drop_at` (node id -> SecAgg+ stage) stop
    answering from that stage on, like a device that went offline."""

    def __init__(self, node_configs: list[dict], run_config: dict, app: ClientApp = client_app):
        from flwr.common import RecordDict
        from flwr.supercore.run import Run

        self.app = app
        self._run = Run.create_empty(run_id=1)
        self.contexts = {i + 2: Context(run_id=1, node_id=i + 2, node_config=cfg, state=RecordDict(),
                                        run_config=run_config) for i, cfg in enumerate(node_configs)}
        self.replies: dict[str, Message] = {}
        self.drop_at: dict[int, str] = {}
        self.dropped: set[int] = set()
        self.sent_bytes: dict[int, int] = {}
        self._next = 0

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        import copy

        ids = []
        for msg in messages:
            self._next += 1
            msg_id = f"m{self._next}"
            msg = copy.deepcopy(msg)
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            incoming = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = incoming.get(Key.STAGE) if incoming is not None else None
            if node in self.dropped or (stage is not None and self.drop_at.get(node) == stage):
                self.dropped.add(node)
                continue
            try:
                reply = self.app(message=msg, context=self.contexts[node])
            except Exception as e:  # as Flower's run_clientapp: the exception becomes an error reply
                from flwr.common import Error
                from flwr.common.constant import ErrorCode

                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(e)), reply_to=msg)
            # an error reply carries nothing (and must not reset what the device sent before)
            self.sent_bytes[node] = self.sent_bytes.get(node, 0) + (sum(
                r.get("bytes", 0) for r in describe(reply.content)) if reply.has_content() else 0)
            self.replies[msg_id] = copy.deepcopy(reply)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def simulate(node_configs: list[dict], run_config: dict, drop_at: dict[int, str] | None = None,
             centroids: np.ndarray | None = None):
    """Run the ServerApp against len(node_configs) in-process devices (first-round centroids: see run_server);
    returns (strategy, grid)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as Flower's run_simulation does
    grid = LocalGrid(node_configs, run_config)
    grid.drop_at = dict(drop_at or {})
    from flwr.common import RecordDict

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)
    strategy = run_server(grid, context, centroids)
    return strategy, grid


# ---------------------------------------------------------------- Flower's simulation engine (Ray)


def simulation_apps(node_configs: list[dict], run_config: dict) -> tuple[ServerApp, ClientApp]:
    """The sync ServerApp and ClientApp (same strategy, SecAgg+ workflow, mods) for Flower's simulation engine
    (`flwr.simulation.run_simulation`, Ray backend), with len(node_configs) virtual devices.

    The simulation engine gives a virtual device only node config {partition-id, num-partitions} and the apps an
    empty run config (which it refuses to let a ClientApp change); `device_mod` (outermost) hands the mods
    below it a view of the device's Context with node config node_configs[partition-id] (data-dir, user,
    epsilon-budget) and the run config, sharing its state, so the ClientApp below it is the one `localpers
    sync` runs. node_configs and run_config are captured by value (Ray ships the
    ClientApp to its worker processes)."""
    nodes = [dict(n) for n in node_configs]
    config = dict(run_config)
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config.update(config)
        run_server(grid, context)

    def device_mod(msg: Message, context: Context, call_next) -> Message:
        # a device's view of the same Context (state shared: SecAgg+ keeps its keys there between stages)
        device = Context(run_id=context.run_id, node_id=context.node_id, state=context.state, run_config=config,
                         node_config={**context.node_config, **nodes[int(context.node_config["partition-id"])]})
        return call_next(msg, device)

    return server, ClientApp(client_fn=_client_fn, mods=[device_mod, ledger_mod, secaggplus_mod])


def simulate_ray(node_configs: list[dict], run_config: dict, num_cpus: int = 2, cpus_per_device: float = 1.0) -> dict:
    """Run the sync over len(node_configs) virtual devices with Flower's simulation engine (Ray: num_cpus
    CPUs, one ClientApp actor per cpus_per_device). run_config needs `out-dir`, and a `timeout` (seconds a
    SecAgg+ stage waits) long enough for every device of a stage to pass through the actors — and, in the first
    stage, for Ray to start them (tens of seconds on a loaded machine): a stage that times out drops the late
    devices. Returns the run's summary.json (history, seconds, complete). Raises UserError when the [sim] extra
    (Ray) is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError('sync: the simulation engine needs Ray: pip install "localpers[sim]" (bash install.sh sim)')
    from flwr.simulation import run_simulation

    if not run_config.get("out-dir"):
        raise UserError("sync: simulate_ray needs run config out-dir")
    server, client = simulation_apps(node_configs, run_config)
    backend = {"client_resources": {"num_cpus": cpus_per_device, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}
    run_simulation(server_app=server, client_app=client, num_supernodes=len(node_configs), backend_config=backend)
    summary = Path(str(run_config["out-dir"])) / SUMMARY_FILE
    if not summary.exists():
        raise UserError("sync: the simulation ended without a result (see Flower's log above)")
    return json.loads(summary.read_text())
