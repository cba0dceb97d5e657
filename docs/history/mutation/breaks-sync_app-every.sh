#!/bin/sh
# sync/sync_app.py, the sample of 200 (seed 5; issue 28's fallback for every mutant): each survivor judged a
# missing test, made as a break and run against the new tests of test_sync_app.py (each also re-run as a mutant
# with --mutants: localpers.sync.sync_app.rerun.txt). Run from the repository root; never commit while it runs.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/sync/sync_app.py
T=tests/test_sync_app.py
K="without_min_devices or secagg_stage_waits or round_of_each or every_round_is_withheld or names_its_run"
$B $F 'get("min-devices", 2)' 'get("min-devices", None)' -- $T -k "$K"
$B $F 'get("timeout", 60.0)' 'get(None, 60.0)' -- $T -k "$K"
$B $F 'modulus_range=sync.MODULUS_RANGE, timeout=timeout)' 'modulus_range=sync.MODULUS_RANGE, timeout=None)' -- $T -k "$K"
$B $F 'FitIns(parameters, {"round": server_round})' 'FitIns(parameters, {"XXroundXX": server_round})' -- $T -k "$K"
$B $F 'config.get("meta", "{}")' 'config.get("meta", None)' -- $T -k "$K"
$B $F 'self.knowledge: sync.Knowledge | None = None' 'self.knowledge: sync.Knowledge | None = ""' -- $T -k "$K"
$B $F '{"kind": "message", "run": context.run_id,' '{"kind": "message", "RUN": context.run_id,' -- $T -k "$K"
$B $F '{"kind": "refused", "run": run_id,' '{"kind": "refused", "XXrunXX": run_id,' -- $T -k "$K"
$B $F '{"kind": "refused", "run": run_id,' '{"kind": "refused", "RUN": run_id,' -- $T -k "$K"
# the every-mutant run (908, 71 survivors left unjudged): each judged a missing test, made as a break and run
# against the new tests (re-run as mutants with --mutants: localpers.sync.sync_app.rerun.txt)
K2="capture_holds or consenting_command or simulation_engines or byte_count or logo_knowledge_is_unreadable or key_shares or holding_a_pickle or secagg_terms or later_rounds or one_device"
$B $F 'os._exit(1)' 'os._exit(None)' -- $T -k "$K2"
$B $F 'sum(r.get("bytes", 0) for r in rows)' 'sum(r.get("bytes", 1) for r in rows)' -- $T -k "$K2"
$B $F 'if capture and reply.has_content():' 'if capture or reply.has_content():' -- $T -k "$K2"
$B $F 'path.mkdir(parents=True, exist_ok=True)' 'path.mkdir(parents=None, exist_ok=True)' -- $T -k "$K2"
$B $F 'path.mkdir(parents=True, exist_ok=True)' 'path.mkdir(exist_ok=True)' -- $T -k "$K2"
$B $F 'path.mkdir(parents=True, exist_ok=True)' 'path.mkdir(parents=False, exist_ok=True)' -- $T -k "$K2"
$B $F 'allow_pickle=False' 'allow_pickle=True' -- $T -k "$K2"
$B $F 'max_weight=1.0,' 'max_weight=2.0,' -- $T -k "$K2"
$B $F '        except UserError:
            previous = None' '        except UserError:
            previous = ""' -- $T -k "$K2"
$B $F 'device = Context(run_id=context.run_id,' 'device = Context(run_id=None,' -- $T -k "$K2"
$B $F 'results[0][1]' 'results[1][1]' -- $T -k "$K2"
$B $F 'if server_round == 1 else' 'if (server_round == 1) or True else' -- $T -k "$K2"
$B $F 'self.dropped.add(node)' 'self.dropped.add(None)' -- $T -k "$K2"
$B $F 'log(INFO, "%s %d devices", KEY_SHARES_COLLECTED,' 'log(INFO, "%s %d devices", None,' -- $T -k "$K2"
$B $F 'log(INFO, "%s %d devices", KEY_SHARES_COLLECTED,' 'log(INFO, "XX%s %d devicesXX", KEY_SHARES_COLLECTED,' -- $T -k "$K2"
# LocalGrid.sent_bytes (bench_sync's bytes a device; earlier judged "read by nothing", but bench_sync reads it):
# the real bug first (an error reply reset the device's count to 0), then the mutants of the fixed line
$B $F 'self.sent_bytes.get(node, 0) + (sum(
                r.get("bytes", 0) for r in describe(reply.content)) if reply.has_content() else 0)' 'self.sent_bytes.get(node, 0) + sum(
                r.get("bytes", 0) for r in describe(reply.content)) if reply.has_content() else 0' -- $T -k "$K2"
$B $F 'self.sent_bytes[node] = self.sent_bytes.get(node, 0) + (sum(' 'self.sent_bytes[node] = None and (sum(' -- $T -k "$K2"
$B $F 'if reply.has_content() else 0)' 'if (reply.has_content()) and False else 0)' -- $T -k "$K2"
$B $F 'if reply.has_content() else 0)' 'if reply.has_content() else 1)' -- $T -k "$K2"
$B $F 'self.sent_bytes.get(node, 0) + (sum(' 'self.sent_bytes.get(node, 0) - (sum(' -- $T -k "$K2"
$B $F 'self.sent_bytes.get(node, 0) + (sum(' 'self.sent_bytes.get(None, 0) + (sum(' -- $T -k "$K2"
$B $F 'self.sent_bytes.get(node, 0) + (sum(' 'self.sent_bytes.get(node, 1) + (sum(' -- $T -k "$K2"
$B $F 'r.get("bytes", 0) for r in describe(reply.content)' 'r.get("XXbytesXX", 0) for r in describe(reply.content)' -- $T -k "$K2"
$B $F 'r.get("bytes", 0) for r in describe(reply.content)' 'r.get("BYTES", 0) for r in describe(reply.content)' -- $T -k "$K2"
$B $F 'r.get("bytes", 0) for r in describe(reply.content)' 'r.get(None, 0) for r in describe(reply.content)' -- $T -k "$K2"
$B $F 'r.get("bytes", 0) for r in describe(reply.content)' 'r.get("bytes", 1) for r in describe(reply.content)' -- $T -k "$K2"
