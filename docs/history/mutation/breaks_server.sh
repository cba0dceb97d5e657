#!/bin/sh
# serve/server.py: survivors of the seeded samples (seed 28 of the earlier run and of this one, seed 7), re-made as
# breaks against tests/test_server_app.py (the stand-in engine's tests, seconds each).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/serve/server.py
T=tests/test_server_app.py
$B $F '{"str", "int", "float", "bool"}' '{"str", "INT", "float", "bool"}' -- $T -k union_member_tags
$B $F 'sha = model_sha256(engine.model_path)' 'sha = None' -- $T -k artifacts_for_the_served
$B $F 'mark_broken(store, user, path, reason)' 'mark_broken(store, None, path, reason)' -- $T -k artifacts_for_the_served
$B $F 'log.warning("not stored in %r'"'"'s history: %s: %s"' 'log.warning("NOT STORED IN %R'"'"'S HISTORY: %S: %S"' -- $T -k store_refuses
$B $F 'if not changed(learned):' 'if changed(learned):' -- $T -k learning_reports
$B $F 'if not changed(learned):' 'if not changed(None):' -- $T -k learning_reports
$B $F 'for key in ("facts", "replaced", "retired")' 'for key in ("FACTS", "replaced", "retired")' -- $T -k learning_reports
$B $F 'raise UserError(f"--lora {broken[0][0]}: {broken[0][1]}")' 'raise UserError(f"--lora {broken[0][0]}: {broken[0][2]}")' -- $T -k loads_in_the_background
$B $F 'app.state.owner = owner or os.environ.get(extra.OWNER_ENV) or None' 'app.state.owner = owner or os.environ.get(extra.OWNER_ENV) and None' -- $T -k owner
$B $F 'process=jobs == "process").start()' 'process=jobs == "XXprocessXX").start()' -- $T -k job_worker
$B $F 'msg = {"role": "system" if m.role == "developer" else m.role' 'msg = {"role": "system" if m.role == "DEVELOPER" else m.role' -- $T -k roles_tool_calls
$B $F 'msg["tool_calls"] = [{"id": c.id' 'msg["tool_calls"] = None and [{"id": c.id' -- $T -k roles_tool_calls
$B $F 'return JSONResponse(error_body(message, type_, code, param), status_code=status)' 'return JSONResponse(error_body(message, type_, code, ), status_code=status)' -- $T -k openai_error_body
$B $F 'raise APIError(503, "the model is still loading", "server_error", "model_loading")' 'raise APIError(503, "THE MODEL IS STILL LOADING", "server_error", "model_loading")' -- $T -k loads_in_the_background
$B $F '{ctype or '"'"'none'"'"'!r}", "unsupported_media_type"' '{ctype or '"'"'none'"'"'!r}", "XXunsupported_media_typeXX"' -- $T -k each_refusal
$B $F '"(or --insecure-no-api-key to accept that risk)")' '"(OR --INSECURE-NO-API-KEY TO ACCEPT THAT RISK)")' -- $T -k reachable_server
$B $F 'insecure_no_api_key: bool = False, lora=(),' 'insecure_no_api_key: bool = True, lora=(),' -- $T -k reachable_server
$B $F 'if not is_loopback(host) and not api_key and not insecure_no_api_key:' 'if not is_loopback(host) and not api_key or not insecure_no_api_key:' -- $T -k options_and_job
$B $F 'jobs="process", warm_jobs=True, host=host' 'warm_jobs=True, host=host' -- $T -k options_and_job
$B $F 'http=limits.bounded_protocol(cap, header_timeout, body_timeout)' 'http=limits.bounded_protocol(cap, header_timeout, None)' -- $T -k options_and_job
$B $F 'aliases=aliases, owner=owner, strict_model_names=strict_model_names)' 'aliases=aliases, owner=owner, strict_model_names=None)' -- $T -k options_and_job
$B $F 'scope.get("method") in ("POST", "PUT", "PATCH") \' 'scope.get("method") in ("POST", "XXPUTXX", "PATCH") \' -- $T -k chunked
# seed 7
$B $F 'end = h.find("]")' 'end = h.rfind("]")' -- $T -k host_of_a_host_header
$B $F 'if e.errno == 98 or "in use" in str(e).lower():' 'if e.errno == 98 and "in use" in str(e).lower():' -- $T -k bind
$B $F 'key=len, reverse=True)' 'key=None, reverse=True)' -- $T -k client_text
$B $F 'is not a token id of this model (0..{n_vocab - 1})' 'is not a token id of this model (0..{n_vocab - 2})' -- $T -k sampling_takes
$B $F 'jobs="process", warm_jobs=True, host=host, allowed_hosts' 'jobs="process", warm_jobs=True, allowed_hosts' -- $T -k options_and_job
# seed 3
$B $F '"model_type", "missing"):' '"model_type", "XXmissingXX"):' -- $T -k one_line_naming
$B $F 'threading.Thread(target=load, daemon=True, name="localpers-load")' 'threading.Thread(target=load, daemon=False, name="localpers-load")' -- $T -k loads_in_the_background
$B $F 'def error_body(message: str, type_: str = "invalid_request_error"' 'def error_body(message: str, type_: str = "INVALID_REQUEST_ERROR"' -- $T -k openai_error_body
$B $F '"(or --insecure-no-api-key to accept that risk)")' '"XX(or --insecure-no-api-key to accept that risk)XX")' -- $T -k reachable_server
$B $F 'origin.split("://", 1)[-1].lower() != host.lower()' 'origin.split("://", 2)[-1].lower() != host.lower()' -- $T -k guard_refusal
