#!/bin/sh
# The survivor of breaks.sh (top_logprobs 0 without logprobs), rerun after its test case was added, and the
# no-op index lock three more times (a race: it must be caught every time).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
$B localpers/serve/server.py 'if req.top_logprobs is not None and not req.logprobs:' 'if req.top_logprobs and not req.logprobs:' -- tests/test_security.py -k "logprobs"
for i in 1 2 3; do
$B localpers/store/store.py 'self._index_lock = threading.Lock()' 'self._index_lock = __import__("contextlib").nullcontext()' -- tests/test_mutation_kinds.py -k concurrent
done
