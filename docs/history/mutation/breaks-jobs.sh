#!/bin/sh
# serve/jobs.py: the second run's survivors and unreached mutants, made again as breaks against
# tests/test_jobs_units.py (the third run's samples had no survivor).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py localpers/serve/jobs.py"
T=tests/test_jobs_units.py
$B 'self.lowered = False  # yield_to_chat' 'self.lowered = True  # yield_to_chat' -- $T
$B '        self.started += 1
        self.lowered = False' '        self.started += 1
        self.lowered = True' -- $T
$B 'name="localpers-job"' 'name="XXlocalpers-jobXX"' -- $T
$B '_resolve(target)(store, user, engine, job_id)' '_resolve(target)(None, user, engine, job_id)' -- $T
$B 'engine = Engine(model_path, n_ctx=2048, n_threads=threads)' 'engine = Engine(model_path, n_ctx=None, n_threads=threads)' -- $T
$B 'ctypes.CDLL("libc.so.6", use_errno=True)' 'ctypes.CDLL(None, use_errno=True)' -- $T
$B 'if not self.alive or self.lowered:' 'if not self.alive and self.lowered:' -- $T
$B 'time.monotonic() - self.child.last_used > self.idle_exit_s' 'time.monotonic() + self.child.last_used > self.idle_exit_s' -- $T
# the extra sample's survivors (seed 1, 100 mutants): each made again as a break against test_jobs_units.py
$B 'else [Path(str(pid))]:' 'else [Path(str(None))]:' -- $T
$B 'log.exception("job %s (%s) failed", job["id"], job["kind"])' 'log.exception("job %s (%s) failed", None, job["kind"])' -- $T
$B 'log.exception("job %s (%s) failed", job["id"], job["kind"])' 'log.exception("XXjob %s (%s) failedXX", job["id"], job["kind"])' -- $T
$B 'log.warning("warming up %s jobs failed: %s", kind, e)' 'log.warning("warming up %s jobs failed: %s", kind, None)' -- $T
$B '            if failures == 1:' '            if failures != 1:' -- $T
$B 'log.exception("the job worker hit an error; it retries")' 'log.exception("THE JOB WORKER HIT AN ERROR; IT RETRIES")' -- $T
$B 'log.warning("the job worker shares the served engine: %s", e)' 'log.warning("the job worker shares the served engine: %s", None)' -- $T
$B 'log.warning("jobs left running are queued again later: %s", e)' 'log.warning(e)' -- $T
$B 'log.warning("jobs left running are queued again later: %s", e)' 'log.warning("jobs left running are queued again later: %s", )' -- $T
$B '        self._thread.join(timeout)' '        self._thread.join(None)' -- $T
# the full run's survivors (every mutant of jobs.py) that a new check kills
$B 'if Path(f"/proc/{pid}/task").is_dir() else' 'if (Path(f"/proc/{pid}/task").is_dir()) and False else' -- $T
$B '            if failures == 1:' '            if failures == 2:' -- $T
$B 'if hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)' 'if hasattr(os, "XXsetpriorityXX"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)' -- $T
$B 'check = getattr(engine, "check_files_soon", None)' 'check = getattr(engine, "check_files_soon", )' -- $T
$B 'with self.store.job_lock(wait=False) as held:' 'with self.store.job_lock(wait=True) as held:' -- $T
$B 'took = f"in {time.monotonic() - started:.1f} s"' 'took = f"in {time.monotonic() + started:.1f} s"' -- $T
$B 'names.FAILED if state == names.QUEUED else state, reason=reason,
                                      result=result)
                say(f"job {job['"'"'id'"'"']} ({job['"'"'kind'"'"']}) cancelled' 'names.FAILED if state == names.QUEUED else state, reason=None,
                                      result=result)
                say(f"job {job['"'"'id'"'"']} ({job['"'"'kind'"'"']}) cancelled' -- $T
