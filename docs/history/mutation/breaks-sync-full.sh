#!/bin/sh
# sync/sync.py: one break per function among the full run's non-equivalent survivors (every one of them was
# also re-run as a mutant with --mutants: localpers.sync.sync.rerun.txt), against the new tests of test_sync.py.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/sync/sync.py
T=tests/test_sync.py
K="secagg_shares_every or error_bound_is or check_cohort_refuses or sync_config_refuses or run_config_has or assign_picks or composed_epsilon or publish_gives or knowledge_saves or noisy_share or ledger_is_written"
$B $F 'if n <= 16:' 'if n < 16:' -- $T -k "$K"
$B $F 'return shares, shares // 2 + 1' 'return shares, shares / 2 + 1' -- $T -k "$K"
$B $F 'return n * 2.0 * cfg.clipping_range / quantization_range' 'return n * 3.0 * cfg.clipping_range / quantization_range' -- $T -k "$K"
$B $F 'if n < 2:' 'if n <= 2:' -- $T -k "$K"
$B $F '(modulus_range - 1) // quantization_range' '(modulus_range - 2) // quantization_range' -- $T -k "$K"
$B $F 'if self.steer_clip <= 0 or self.hist_clip <= 0:' 'if self.steer_clip <= 0 and self.hist_clip <= 0:' -- $T -k "$K"
$B $F 'if not (self.epsilon > 0 and 0 < self.delta < 1):' 'if not (self.epsilon > 0 and 0 < self.delta <= 1):' -- $T -k "$K"
$B $F 'str(v) if isinstance(v, float) and math.isinf(v) else v' 'str(v) if isinstance(v, float) or math.isinf(v) else v' -- $T -k "$K"
$B $F 'norms = np.linalg.norm(centroids, axis=1)' 'norms = np.linalg.norm(centroids, axis=None)' -- $T -k "$K"
$B $F 'math.log1p(-1.0 / a)' 'math.log1p(+1.0 / a)' -- $T -k "$K"
$B $F 'return max(best, 0.0)' 'return max(best, 1.0)' -- $T -k "$K"
$B $F 'sizes = np.rint(np.maximum(sums.counts, 0.0))' 'sizes = np.rint(np.maximum(sums.counts, 1.0))' -- $T -k "$K"
$B $F 'ok = published & (norms > 0)' 'ok = published & (norms >= 0)' -- $T -k "$K"
$B $F 'sums.steering * cfg.steer_clip / safe' 'sums.steering / cfg.steer_clip / safe' -- $T -k "$K"
$B $F 'np.maximum(sums.histograms * cfg.hist_clip, 0.0)' 'np.maximum(sums.histograms * cfg.hist_clip, 1.0)' -- $T -k "$K"
$B $F 'with np.load(path, allow_pickle=False) as z:' 'with np.load(path, allow_pickle=True) as z:' -- $T -k "$K"
$B $F 'published=p.astype(bool), meta=meta or {}' 'published=p.astype(bool), meta=meta and {}' -- $T -k "$K"
$B $F 'histograms=z["histograms"], published=z["published"], meta=json.loads(str(z["meta"]))' 'histograms=z["histograms"], published=z["published"], ' -- $T -k "$K"
$B $F 'meta=np.array(json.dumps(self.meta))' 'meta=np.array(json.dumps(None))' -- $T -k "$K"
$B $F '-cfg.clipping_range, cfg.clipping_range)' 'None, cfg.clipping_range)' -- $T -k "$K"
$B $F 'sum(encode(c, centroids, cfg, rng)[0] for c in contributions)' 'sum(encode(c, centroids, cfg, None)[0] for c in contributions)' -- $T -k "$K"
$B $F '"time": round(time.time(), 3)' '"time": round(3)' -- $T -k "$K"
$B $F '        path.parent.mkdir(parents=True, exist_ok=True)
        tmp' '        path.parent.mkdir(exist_ok=True)
        tmp' -- $T -k "$K"
$B $F '    path.parent.mkdir(parents=True, exist_ok=True)
    with open' '    path.parent.mkdir(parents=False, exist_ok=True)
    with open' -- $T -k "$K"
$B $F 'return n * 2.0 * cfg.clipping_range / quantization_range' 'return n * 2.0 / cfg.clipping_range / quantization_range' -- $T -k error_bound_is  # error_bound_2, after the re-run: the test now has a config with noise (c != 1)
