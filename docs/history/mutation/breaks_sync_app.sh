#!/bin/sh
# sync/sync_app.py: survivors of the seeded samples (seeds 28 and 7), re-made as breaks against tests/test_sync_app.py.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/sync/sync_app.py
T=tests/test_sync_app.py
# the bug the seed-7 sample revealed: devices were sent the knowledge before its meta (the run's terms) was set
$B $F '        self.knowledge.meta = self.run_meta()
        ins' '        ins' -- $T -k privacy_terms
$B $F '{"meta": json.dumps(self.knowledge.meta)}' '{"META": json.dumps(self.knowledge.meta)}' -- $T -k privacy_terms
$B $F 'path = Path(str(capture))' 'path = Path(str(None))' -- $T -k capture
$B $F 'out = context.run_config.get("out-dir")' 'out = context.run_config.get("XXout-dirXX")' -- $T -k out_dir
$B $F 'cfg = sync.SyncConfig.from_run_config(self.context.run_config)
        save_logo_knowledge' 'cfg = None
        save_logo_knowledge' -- $T -k logo_knowledge
$B $F '"community_cvecs": {}, "sync"' '"COMMUNITY_CVECS": {}, "sync"' -- $T -k logo_knowledge
$B $F 'getattr(previous.sums, f).shape != getattr(sums, f).shape' 'getattr(previous.sums, f).shape != getattr(sums, None).shape' -- $T -k logo_knowledge
$B $F 'backend = {"client_resources": {"num_cpus": cpus_per_device' 'backend = {"client_resources": {"NUM_CPUS": cpus_per_device' -- $T -k simulation_engine
$B $F 'device = Context(run_id=context.run_id, node_id=context.node_id, state' 'device = Context(run_id=context.run_id, state' -- $T -k simulation_engine
$B $F 'row["shape"] = list(value.shape)' 'row["SHAPE"] = list(value.shape)' -- $T -k ledger_describes
$B $F 'row["items"] = len(value)' 'row["ITEMS"] = len(value)' -- $T -k ledger_describes
$B $F 'rows = describe(reply.content) if reply.has_content() else []' 'rows = describe(reply.content) if (reply.has_content()) or True else []' -- $T -k ledger_describes
$B $F 'strategy = run_server(grid, context, centroids)' 'strategy = run_server(grid, context, )' -- $T -k centroids_given
$B $F 'if n < self.cfg.min_contributors:' 'if n <= self.cfg.min_contributors:' -- $T -k min_contributors
$B $F '"error_bound": sync.error_bound(n, self.cfg)}' '"ERROR_BOUND": sync.error_bound(n, self.cfg)}' -- $T -k privacy_terms
$B $F 'return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)' 'return Message(content, dst_node_id, message_type, ttl=ttl, group_id=None)' -- $T -k ledger_describes
# the final seed-28 sample's two missing tests
$B $F '        out.mkdir(parents=True, exist_ok=True)' '        out.mkdir(parents=True, exist_ok=None)' -- $T -k privacy_terms
$B $F '{"kind": "received", "run": self.context.run_id' '{"kind": "received", "RUN": self.context.run_id' -- $T -k folds_each_sync_run
# the final seed-7 sample's two missing tests
$B $F '        out.mkdir(parents=True, exist_ok=True)' '        out.mkdir(exist_ok=True)' -- $T -k privacy_terms
$B $F 'num_cpus: int = 2, cpus_per_device: float = 1.0) -> dict:' 'num_cpus: int = 2, cpus_per_device: float = 2.0) -> dict:' -- $T -k simulation_engine
# the seed-3 sample's three missing tests
$B $F 'return {"array": value.numpy().tolist()}' 'return {"XXarrayXX": value.numpy().tolist()}' -- $T -k ledger_describes
$B $F '"seconds": round(time.perf_counter() - start, 3)' '"seconds": round(time.perf_counter() + start, 3)' -- $T -k privacy_terms
$B $F 'min_devices = int(context.run_config.get("min-devices", 2))' 'min_devices = int(context.run_config.get("MIN-DEVICES", 2))' -- $T -k privacy_terms
