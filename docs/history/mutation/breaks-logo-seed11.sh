#!/bin/sh
# personalize/logo.py: the missing-test survivor of the extra sample (100, seed 11), as a break.
P=${PYTHON:-/work/venv/bin/python}
$P bench/experiments/break_once.py localpers/personalize/logo.py 'min_size=min_size, seed=seed, meta={"embedder"' 'min_size=min_size, meta={"embedder"' -- tests/test_logo_units.py -k clusters_with_the_seed
