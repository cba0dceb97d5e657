#!/bin/sh
# sync/sync_app.py: the missing-test survivors of the extra sample (100, seed 11), as breaks.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/sync/sync_app.py
K="over_its_budget or publishes_its_privacy_terms"
$B $F 'node_config.get("epsilon-budget", "inf")' 'node_config.get("epsilon-budget", None)' -- tests/test_privacy.py tests/test_sync_app.py -k "$K"
$B $F 'context.run_config.get("wait", 600.0)' 'context.run_config.get("XXwaitXX", 600.0)' -- tests/test_privacy.py tests/test_sync_app.py -k "$K"
$B $F '{"kind": "refused", "run": run_id, "round": config.get("round"),' '{"kind": "refused", "run": run_id, "round": config.get(None),' -- tests/test_privacy.py tests/test_sync_app.py -k "$K"
$B $F '{"kind": "refused", "run": run_id, "round": config.get("round"),' '{"kind": "refused", "run": run_id, "round": config.get("XXroundXX"),' -- tests/test_privacy.py tests/test_sync_app.py -k "$K"
