#!/bin/sh
# store/store.py: the missing-test survivors and unreached mutants of the further sample (100, seed 11), as breaks.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/store/store.py
T=tests/test_store.py
K="edge_value_and_defaults or tell_upqa or empty_passphrase or retries_only or export_names or quote_it or supersede_queued_settles"
$B $F 'stack.extend((v, depth + 1)' 'stack.extend((v, depth + 2)' -- $T -k "$K"
$B $F 'def check_item(text, kind="message"' 'def check_item(text, kind="XXmessageXX"' -- $T -k "$K"
$B $F 'not 0 <= ts <= MAX_TS' 'not 0 <= ts < MAX_TS' -- $T -k "$K"
$B $F 'all(isinstance(r, dict) and "input_attribute" in r for r in data)' 'all(isinstance(r, dict) or "input_attribute" in r for r in data)' -- $T -k "$K"
$B $F '"messages" in entry and "text" not in entry' '"messages" in entry and "XXtextXX" not in entry' -- $T -k "$K"
$B $F 'raise UserError("LOCALPERS_PASSPHRASE is set but empty")' 'raise UserError(None)' -- $T -k "$K"
$B $F 'return row is not None and row[0] == names.FAILED' 'return row is not None or row[0] == names.FAILED' -- $T -k "$K"
$B $F '{"id": job_id, "object": "job"' '{"id": job_id, "XXobjectXX": "job"' -- $T -k "$K"
$B $F 'out.append({"id": item["id"], "attribute"' 'out.append({"ID": item["id"], "attribute"' -- $T -k "$K"
$B $F '"statement": item["text"],' '"STATEMENT": item["text"],' -- $T -k "$K"
$B $F 'name = message.get("name")' 'name = message.get("XXnameXX")' -- $T -k "$K"
$B $F '            "created": created,' '            "CREATED": created,' -- $T -k "$K"
$B $F '.get("user")' '.get(None)' -- $T -k "$K"
$B $F 'part.get("text", "")' 'part.get("text", )' -- $T -k "$K"
$B $F 'out["facts"] = [f for f in out["facts"] if f["id"] not in {i for i, _ in held}]' 'out["XXfactsXX"] = [f for f in out["facts"] if f["id"] not in {i for i, _ in held}]' -- $T -k "$K"
$B $F '" kind = ? AND created < ? AND user_id = (SELECT id FROM users WHERE name = ?)"' '"XX kind = ? AND created < ? AND user_id = (SELECT id FROM users WHERE name = ?)XX"' -- $T -k "$K"
