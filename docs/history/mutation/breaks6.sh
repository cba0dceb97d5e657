#!/bin/sh
# Survivors of the sampled shards, made as breaks against the tests written for them (one line each).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/serve/learn.py
K="tests/test_facts.py -k learning_from_text"
$B $F '"facts": [{"id": None, "attribute": f.attribute} for f in found]' '"XXfactsXX": [{"id": None, "attribute": f.attribute} for f in found]' -- $K
$B $F 'return {"messages": [], "preferences": [], "facts"' 'return {"XXmessagesXX": [], "preferences": [], "facts"' -- $K
$B $F 'return {"messages": [], "preferences": [], "facts"' 'return {"messages": [], "XXpreferencesXX": [], "facts"' -- $K
$B $F '"replaced": [], "retired": []}' '"replaced": [], "XXretiredXX": []}' -- $K
$B $F 'found = detect_facts(text, ' 'found = detect_facts(None, ' -- $K
$B $F 'detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)' 'detect_facts, None, source=source)' -- $K
$B $F 'detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)' 'detect_facts, names.MAX_FACTS_PER_MESSAGE, )' -- $K
