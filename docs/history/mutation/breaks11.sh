#!/bin/sh
# personalize/logo.py survivor choose_k_14 as a break against its new test.
P=${PYTHON:-/work/venv/bin/python}
$P bench/experiments/break_once.py localpers/personalize/logo.py 'round(math.sqrt(n / 20))' 'round(math.sqrt(n / 21))' -- tests/test_logo.py -k choose_k_is
