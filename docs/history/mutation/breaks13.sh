#!/bin/sh
# serve/compose.py survivors of the sample (after the composer-explains test joined the shard), as breaks.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/serve/compose.py
K="tests/test_mutation_kinds.py -k crowd_out"
$B $F 'hits = store.search(user, query, k=min(1000, 2 * k + len(said)))' 'hits = store.search(user, query, )' -- $K
$B $F 'if m["role"] == "user"), "")' 'if m["role"] == "user"), )' -- $K
$B $F 'if m["role"] == "user"), "")' 'if m["ROLE"] == "user"), "")' -- $K
