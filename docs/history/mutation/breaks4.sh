#!/bin/sh
# Survivors of the serve/jobs.py shard, made again as breaks after the jobs test was extended.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
K="tests/test_mutation_kinds.py -k failing_job"
$B localpers/serve/jobs.py '(self.store, job["user"], engine, job["id"])' '(self.store, job["user"], None, job["id"])' -- $K
$B localpers/serve/jobs.py 'self.store.finish_job(job["id"], names.DONE, result=result)' 'self.store.finish_job(job["id"], names.DONE, result=None)' -- $K
$B localpers/serve/jobs.py 'job = self.store.claim_job(list(JOB_KINDS))' 'job = self.store.claim_job(None)' -- $K
$B localpers/serve/jobs.py '        self.current = job' '        self.current = None' -- $K
