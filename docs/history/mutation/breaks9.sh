#!/bin/sh
# sync/sync.py survivors of the sample, made as breaks against the tests written for them.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/sync/sync.py
K="tests/test_sync.py -k invariant"
$B $F 'histograms=t[:, 1 + d + ld:].copy())' 'histograms=t[:, 1 + d - ld:].copy())' -- $K
$B $F 'if rng is not None and cfg.share_std > 0:' 'if rng is not None and cfg.share_std > 1:' -- $K
$B $F 'spent(data_dir, delta) >= budget' 'spent(data_dir, delta) > budget' -- $K
$B $F 'return c / np.linalg.norm(c, axis=1, keepdims=True)' 'return c / np.linalg.norm(c, keepdims=True)' -- $K
$B $F 'return {"vector_sum": k.centroids * sizes[:, None], "count": sizes,' 'return {"vector_sum": k.centroids * sizes[:, None], "COUNT": sizes,' -- $K
$B $F 'sizes = np.where(k.published, k.sizes, 0.0)' 'sizes = np.where(None, k.sizes, 0.0)' -- $K
$B $F 'sizes = np.where(k.published, k.sizes, 0.0)' 'sizes = np.where(k.published, k.sizes, 1.0)' -- $K
