#!/bin/sh
# personalize/training.py survivors of the seeded samples that mutmut cannot activate: _job and _method run at
# import time (perce_job = _job(...), perce_method = _method(...)), before mutmut's forked child switches a mutant
# on, so their mutants "survive" whatever the tests; made here as breaks (the file changed before the import).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/training.py
U=tests/test_training_units.py
K="$U::test_invariant_a_training_job_uses_the_job_config_and_registers_only_while_it_runs $U::test_the_evaluation_methods_are_named_after_their_method $U::test_invariant_a_served_user_gets_only_the_adapter_registered_for_the_method"
$B $F 'out = train_user(store, user, engine, objective, config=JOB_CONFIG, job=job_id)' 'out = train_user(store, user, engine, objective, config=None, job=job_id)' -- $K
$B $F 'return Personalized(artifacts=Artifacts(lora=((served.path, 1.0),))) if served else Personalized()' 'return Personalized(artifacts=None) if served else Personalized()' -- $K
$B $F "method.__name__ = f\"{name.replace('-', '_')}_method\"" 'method.__name__ = None' -- $K
$B $F "method.__name__ = f\"{name.replace('-', '_')}_method\"" "method.__name__ = f\"{name.replace('_')}_method\"" -- $K
