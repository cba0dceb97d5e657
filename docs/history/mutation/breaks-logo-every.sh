#!/bin/sh
# personalize/logo.py, every mutant (issue 28): each survivor judged a missing test, made as a break and run
# against the new tests of test_logo_units.py (every one was also re-run as a mutant with --mutants:
# localpers.personalize.logo.rerun.txt). Run from the repository root; never commit while it runs.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/logo.py
T=tests/test_logo_units.py
K="scale or below_one or skew_counts or min_share_and or smoothing or any_keyword or one_steering or rewritten or afresh or options_given or default_model_and or served_model_and or does_not_stop or untouched or prepare_world"
$B $F 'return _served(user, query)' 'return _served(None, query)' -- $T -k "$K"
$B $F 'return _served(user, query)' 'return _served(user, None)' -- $T -k "$K"
$B $F 'knowledge.sums.steering_count[c] <= 0:' 'knowledge.sums.steering_count[c] < 0:' -- $T -k "$K"
$B $F 'knowledge.sums.steering_count[c] <= 0:' 'knowledge.sums.steering_count[c] <= 1:' -- $T -k "$K"
$B $F 'knowledge.published[c] and knowledge.sums.steering_count[c] > 0' 'knowledge.published[c] and knowledge.sums.steering_count[c] > 1' -- $T -k "$K"
$B $F '_load_signals(str(sp), _file_key(sp))' '_load_signals(str(sp), None)' -- $T -k "$K"
$B $F '_load_knowledge(kpath, _file_key(kpath))' '_load_knowledge(kpath, None)' -- $T -k "$K"
$B $F '_nonzero_control_vector(artifact.path, _file_key(artifact.path))' '_nonzero_control_vector(artifact.path, None)' -- $T -k "$K"
$B $F 'knowledge.meta.get("community_cvecs", {})' 'knowledge.meta.get("community_cvecs", None)' -- $T -k "$K"
$B $F '" ".join(ATTRIBUTES[a]["values"][v])' '"XX XX".join(ATTRIBUTES[a]["values"][v])' -- $T -k "$K"
$B $F 'refresh_knowledge(store, model_path=engine.model_path, job=(user, job_id))' 'refresh_knowledge(store, model_path=None, job=(user, job_id))' -- $T -k "$K"
$B $F 'refresh_knowledge(store, model_path=engine.model_path, job=(user, job_id))' 'refresh_knowledge(store, model_path=engine.model_path, job=None)' -- $T -k "$K"
$B $F 'normalized_entropy(signals.counts) if signals.counts.sum() > 0 else 0.0' 'normalized_entropy(signals.counts) if signals.counts.sum() > 1 else 0.0' -- $T -k "$K"
$B $F 'global_weight = min(1.0,' 'global_weight = min(2.0,' -- $T -k "$K"
$B $F 'community_posterior(signals.counts, knowledge, params.smoothing)' 'community_posterior(signals.counts, knowledge, )' -- $T -k "$K"
$B $F 'values.max() / values.sum() < params.min_share' 'values.max() * values.sum() < params.min_share' -- $T -k "$K"
$B $F 'values.max() / values.sum() < params.min_share' 'values.max() / values.sum() <= params.min_share' -- $T -k "$K"
$B $F 'if total <= 0:' 'if total <= 1:' -- $T -k "$K"
$B $F 'np.maximum(knowledge.sizes, 1e-9)' 'np.maximum(knowledge.sizes, 1.000000001)' -- $T -k "$K"
$B $F 'options.get("random_assignment", False)' 'options.get("random_assignment", True)' -- $T -k "$K"
$B $F 'per_user.values()], k=k, half_life=half_life,' 'per_user.values()], k=k,' -- $T -k "$K"
$B $F 'else np.zeros((config.n_layer - 1, config.d_model), np.float32))' 'else np.zeros((config.n_layer + 1, config.d_model), np.float32))' -- $T -k "$K"
$B $F 'else np.zeros((config.n_layer - 1, config.d_model), np.float32))' 'else np.zeros((config.n_layer - 2, config.d_model), np.float32))' -- $T -k "$K"
$B $F '{len(ids)}.gguf", steering, config.arch)' '{len(ids)}.gguf", steering, None)' -- $T -k "$K"
$B $F '_save_with_community_cvecs(knowledge, kpath, config.arch)  # the synced' '_save_with_community_cvecs(knowledge, kpath, None)  # the synced' -- $T -k "$K"
$B $F 'not knowledge.meta.get("community_cvecs") and' 'not knowledge.meta.get(None) and' -- $T -k "$K"
$B $F '                continue
            if np.linalg.norm' '                break
            if np.linalg.norm' -- $T -k "$K"
$B $F 'model_path = Path(model_path) if model_path else default_model_path()
    config' 'model_path = Path(model_path) if (model_path) or True else default_model_path()
    config' -- $T -k "$K"
$B $F 'window: bool = False, random_assignment: bool = False,' 'window: bool = False, random_assignment: bool = True,' -- $T -k "$K"
$B $F 'None, None, embedding_weight)))' 'None, None, )))' -- $T -k "$K"
$B $F 'advance(knowledge, signals, k=k,' 'advance(knowledge, signals, k=None,' -- $T -k "$K"
$B $F 'random_assignment=random_assignment, restarts=restarts)' 'random_assignment=None, restarts=restarts)' -- $T -k "$K"
$B $F 'min_size=min_size, seed=seed,
                                random_assignment' 'min_size=min_size,
                                random_assignment' -- $T -k "$K"
$B $F 'random_assignment=random_assignment, restarts=restarts)' 'random_assignment=random_assignment, )' -- $T -k "$K"
# survivors among the 470 mutants the partial run had not reached (advance)
K2="weighs_the_carried or draws_anew"
$B $F 'carried = previous.sums.scaled(0.5 ** (1.0 / half_life)) if' 'carried = previous.sums.scaled(1.5 ** (1.0 / half_life)) if' -- $T -k "$K2"
$B $F 'carried = previous.sums.scaled(0.5 ** (1.0 / half_life)) if' 'carried = previous.sums.scaled(0.5 ** (2.0 / half_life)) if' -- $T -k "$K2"
$B $F 'default_rng(seed + (previous.round if previous else 0))' 'default_rng(seed + (previous.round if (previous) and False else 0))' -- $T -k "$K2"
$B $F 'return fold(previous, round_sums, start=start,' 'return fold(previous, round_sums, start=None,' -- $T -k nobody_joined
$B $F 'p = d2 / d2.sum() if d2.sum() > 0 else None' 'p = d2 / d2.sum() if d2.sum() > 1 else None' -- $T -k however_close
$B $F 'x / np.where(norm > 0, norm, 1), 0)' 'x / np.where(norm > 1, norm, 1), 0)' -- $T -k short_vectors
