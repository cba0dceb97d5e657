#!/bin/sh
# personalize/logo.py: the seeded samples' survivors (seeds 28 and 7) that tests/test_logo_units.py now kills,
# each made again as a break against the test that catches it (the mutant's own change).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py localpers/personalize/logo.py"
T=tests/test_logo_units.py
# seed 28, _lloyd_10: two Lloyd steps at least
$B 'else max(1, iterations)' 'else max(2, iterations)' -- $T -k advance_is_lloyd
# seed 28, context_prefix_27: the note's separator (survived only because the shard's -k deselected the test)
$B '"; ".join(lines)' '"XX; XX".join(lines)' -- $T -k context_prefix_lists
# seed 7, advance_42: the carried sums' decay in the Lloyd iterations
$B 'scaled(0.5 ** (1.0 / half_life)) if previous' 'scaled(0.5 * (1.0 / half_life)) if previous' -- $T -k nearest_its_final
# an extra sample (seed 1, 100 mutants): its survivors that a new check kills
# (the first two break the pattern built at import: rc=2, every test fails at collection; the mutants
# themselves, active only when _keyword_pattern is called, are killed by its direct call: logo.rerun.txt)
$B '"|".join(map(re.escape, phrases))' '"|".join(map(re.escape, None))' -- $T -k every_value_name
$B 'for i, (a, v) in enumerate(zip(VOCAB_ATTRIBUTE, VOCAB_VALUE)):' 'for i, (a, v) in enumerate(zip(None, VOCAB_VALUE)):' -- $T -k every_value_name
$B 'knowledge.sums.steering_count[c] > 0:' 'knowledge.sums.steering_count[c] >= 0:' -- $T -k another_embedder
$B 'mediator, embed, steer,' 'mediator, None, steer,' -- $T -k prepare_world_prepares
$B 'job=job[1] if job and job[0] == user else None)' 'job=job[1] if job and job[1] == user else None)' -- $T -k that_job_still_runs
$B 'steerer = Steerer(model_path) if steer else None' 'steerer = Steerer(None) if steer else None' -- $T -k refresh_round_writes
# a second extra sample (seed 2, 100 mutants): its survivors that a new check kills
$B 'knowledge.steering[c], arch))' 'knowledge.steering[c], None))' -- $T -k refresh_round_writes
$B 'inertia < best[2] - 1e-9:' 'inertia < best[2] + 1e-9:' -- $T -k restarts_keep
$B 'inertia < best[2] - 1e-9:' 'inertia < best[2] - 1.000000001:' -- $T -k restarts_keep
$B 'if agreement >= params.min_agreement:' 'if agreement > params.min_agreement:' -- $T -k at_min_agreement
$B '                if job and job[0] == user:
                    raise' '                if job or job[0] == user:
                    raise' -- $T -k forgotten_during
$B 'load_model(self.model_path)' 'load_model(None)' -- $T -k steerer_loads
