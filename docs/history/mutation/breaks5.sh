#!/bin/sh
# Worker.__init__ survivors of the serve/jobs.py shard (thread, ready, defaults), made as breaks against the
# started-worker test (the old mutant names changed with the file: JobProcess was added since the first run).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
K="tests/test_mutation_kinds.py -k started_worker"
F=localpers/serve/jobs.py
$B $F 'threads: int = 1, poll_s' 'threads: int = 2, poll_s' -- $K
$B $F 'warm: bool = False, nice: int = 10' 'warm: bool = True, nice: int = 10' -- $K
$B $F 'nice: int = 10, own_engine: bool = True' 'nice: int = 11, own_engine: bool = True' -- $K
$B $F 'own_engine: bool = True, process' 'own_engine: bool = False, process' -- $K
$B $F 'self.ready = threading.Event()' 'self.ready = None' -- $K
$B $F 'threading.Thread(target=self._run, daemon=True, name="localpers-jobs")' 'None' -- $K
$B $F 'threading.Thread(target=self._run, daemon=True' 'threading.Thread(target=None, daemon=True' -- $K
$B $F 'daemon=True, name="localpers-jobs")' 'daemon=False, name="localpers-jobs")' -- $K
$B $F 'daemon=True, name="localpers-jobs")' 'daemon=True, name="XXlocalpers-jobsXX")' -- $K
$B $F 'n_ctx=2048, n_threads=self.threads' 'n_ctx=2049, n_threads=self.threads' -- $K
# the sampled run's survivors in Worker._run (warm-up target, the idle check's `and`)
$B $F '                    _resolve(target)(engine)' '                    _resolve(None)(engine)' -- $K
$B $F 'if self.child is not None and self.child.alive and' 'if self.child is not None or self.child.alive and' -- $K
# the second sampled run: the served engine told to look for retired files after a job in the job process
$B $F 'check = getattr(engine, "check_files_soon", None)' 'check = getattr(engine, "XXcheck_files_soonXX", None)' -- tests/test_loop.py -k jobs_run_in_a_process
# JobProcess.run's survivor (the reason of a job whose process died), and the message it sends
$B $F 'raise RuntimeError(f"the job process exited with code {code}")' 'raise RuntimeError(None)' -- tests/test_mutation_kinds.py -k failing_job_process
$B $F 'self._conn.send((target, user, job_id))' 'self._conn.send(None)' -- tests/test_mutation_kinds.py -k failing_job_process
