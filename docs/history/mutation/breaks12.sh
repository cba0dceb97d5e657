#!/bin/sh
# store/store.py survivors of the sample, made as breaks against the test written for them.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/store/store.py
K="tests/test_store.py -k documented_fields"
$B $F 'if not isinstance(entry, dict) or not isinstance(entry.get("input_attribute"), str):' 'if not isinstance(entry, dict) and not isinstance(entry.get("input_attribute"), str):' -- $K
$B $F '"sources": json.loads(sources), "created": created}' '"sources": json.loads(sources), "XXcreatedXX": created}' -- $K
$B $F 'checked.append(check_item(message["content"], "message", {"role": "user", "source": "chat"}))' 'checked.append(check_item(message["content"], "message", {"role": "XXuserXX", "source": "chat"}))' -- $K
