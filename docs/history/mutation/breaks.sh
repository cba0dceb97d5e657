#!/bin/sh
# Issue 28's breaks: each one made, the tests run, the file restored (bench/experiments/break_once.py).
#   nice -n 10 sh docs/history/mutation/breaks.sh > docs/history/mutation/breaks.log 2>&1
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
S=tests/test_security.py; V=tests/test_privacy.py; K=tests/test_mutation_kinds.py; D=tests/test_detect_edges.py
$B localpers/serve/server.py 'path.startswith("/v1") and headers' 'path.startswith("/v1") and path != "/v1/chat/completions" and headers' -- $S -k "every_route"
$B localpers/serve/server.py '_host_name(host) not in self.allowed_hosts' 'not any(_host_name(host).startswith(h) for h in self.allowed_hosts)' -- $S -k "look_alike_hosts"
$B localpers/serve/server.py 'origin.split("://", 1)[-1].lower() != host.lower()' '_host_name(origin.split("://", 1)[-1]) != _host_name(host)' -- $S -k "origins"
$B localpers/serve/server.py 'origin is not None and "*"' 'origin not in (None, "null") and "*"' -- $S -k "origins"
$B localpers/serve/server.py 'ge=1, le=MAX_N)' 'ge=1, le=MAX_N + 1)' -- $S -k "bounds"
$B localpers/serve/server.py 'ge=0, le=2)' 'ge=0, le=2.5)' -- $S -k "bounds"
$B localpers/serve/server.py 'top_logprobs=(req.top_logprobs or 0) if req.logprobs else None' 'top_logprobs=req.top_logprobs if req.logprobs else None' -- $S -k "logprobs"
$B localpers/serve/server.py 'if req.top_logprobs is not None and not req.logprobs:' 'if req.top_logprobs and not req.logprobs:' -- $S -k "logprobs"
$B localpers/serve/server.py 'not 0 <= int(key) < n_vocab' 'not 0 <= int(key) <= n_vocab' -- $S -k "logit_bias"
$B localpers/sync/sync_app.py 'return [noisy], 1, {}' 'return [plain], 1, {}' -- $V
$B localpers/sync/sync.py 'rng.normal(0.0, cfg.share_std, flat.shape)' 'rng.normal(0.0, cfg.share_std / 4, flat.shape)' -- $V
$B localpers/store/store.py '" WHERE i.user_id = ? GROUP BY v.model"' '" WHERE ? > 0 GROUP BY v.model"' -- $V -k export
$B localpers/personalize/detect.py 'if s.endswith("?") or' 'if s.endswith("??") or' -- $D
$B localpers/personalize/detect.py "can(?! ?'?t| ?not| only| never| no longer)|" "can|" -- $D
$B localpers/store/retrieval.py 'self.model.encode(texts,' 'self.model.encode([t[:8] for t in texts],' -- $K -k minilm
$B localpers/store/retrieval.py 'self.llm.embed(text, normalize=True' 'self.llm.embed(text[:8], normalize=True' -- $K -k gguf
$B localpers/serve/compose.py 'k=min(1000, 2 * k + len(said))' 'k=k' -- $K -k crowd_out
$B localpers/store/store.py 'self._index_lock = threading.Lock()' 'self._index_lock = __import__("contextlib").nullcontext()' -- $K -k concurrent
$B localpers/personalize/editing.py 'M = (self._cov_inv @ K.T) if self.config.covariance else K.T' 'M = K.T' -- $K -k whitened
$B localpers/personalize/methods.py 'control_vectors=tuple((a.path, 1.0) for a in mine if a.kind == names.CONTROL_VECTOR)' 'control_vectors=()' -- $K -k every_artifact
$B localpers/engine/engine.py 'lora=self.lora + other.lora' 'lora=other.lora or self.lora' -- $K -k every_artifact
$B localpers/serve/jobs.py 'names.FAILED, reason=f"{type(e).__name__}: {e}"' 'names.DONE, reason=f"{type(e).__name__}: {e}"' -- $K -k failing_job
$B localpers/serve/jobs.py 'self.store.finish_job(job["id"], names.FAILED, reason=str(e))' 'self.store.finish_job(job["id"], names.DONE, result={"note": str(e)})' -- $K -k failing_job
