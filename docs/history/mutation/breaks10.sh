#!/bin/sh
# sync/sync_app.py survivors of the sample, made as breaks against the test written for them.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/sync/sync_app.py
K="tests/test_sync.py -k strategy_waits"
$B $F 'need and not client_manager.wait_for(' 'need and client_manager.wait_for(' -- $K
$B $F '"failures": len(failures),
                             "sizes"' '"XXfailuresXX": len(failures),
                             "sizes"' -- $K
