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
