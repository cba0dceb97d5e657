#!/bin/sh
# serve/compose.py: the non-equivalent survivors of the full run (every mutant), as breaks.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/serve/compose.py
T=tests/test_mutation_kinds.py
KX=served_user
G='upqa_fact(item["text"], item["meta"]) for item in preferences) if f is not None)'
$B $F 'if preferences else []' 'if (preferences) or True else []' -- $T -k "$KX"
$B $F 'k=min(1000, 2 * k' 'k=min(1001, 2 * k' -- $T -k "$KX"
$B $F 'texts.add(hit["text"])' 'texts.add(None)' -- $T -k "$KX"
$B $F "facts = tuple(f for f in ($G" 'facts = None' -- $T -k "$KX"
$B $F 'upqa_fact(item["text"], item["meta"])' 'upqa_fact(None, item["meta"])' -- $T -k "$KX"
$B $F 'if f is not None)' 'if f is None)' -- $T -k "$KX"
$B $F 'facts=facts, search=search' 'facts=None, search=search' -- $T -k "$KX"
$B $F 'facts=facts, search=search' 'search=search' -- $T -k "$KX"
