#!/bin/sh
# personalize/editing.py after the joint edits (main at 88d41fd): the survivors of the seeded samples (seed 28,
# seed 7) judged "missing test", made as breaks against the tests written for them (tests/test_editing_units.py).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/editing.py
K=tests/test_editing_units.py
# seed 28
$B $F 'state=torch.load(cache, mmap=True, weights_only=True)' 'state=torch.load(cache, mmap=True, weights_only=False)' -- $K
$B $F '    return edit_method(user, query, engine, STACKED)' '    return edit_method(user, query, STACKED)' -- $K
# seed 7
$B $F 'saved = torch.load(cache, weights_only=True)' 'saved = torch.load(cache, weights_only=None)' -- $K
$B $F 'return fact_from_statement(text, attributes[-1] if attributes else None)' 'return fact_from_statement(text, attributes[+1] if attributes else None)' -- $K
$B $F 'if fid in wanted and column < B.shape[1] and B.shape[0] == editor.model.config.d_model:' 'if fid in wanted or column < B.shape[1] and B.shape[0] == editor.model.config.d_model:' -- $K
$B $F 'loss = loss + cfg.kl_weight * F.kl_div(self.logprobs(neutral, key, delta), neutral_base,' 'loss = loss + cfg.kl_weight * F.kl_div(self.logprobs(neutral, key, None), neutral_base,' -- $K
$B $F 'a, z = self.prompt("A", history)[0], self.prompt("Z", history)[0]' 'a, z = self.prompt("A", history)[0], self.prompt("Z", )[0]' -- $K
# seed 28 on main at 452566c (after the locality guard and the retrain cap)
$B $F '    return edit_method(user, query, engine, STACKED)' '    return edit_method(user, query, None, STACKED)' -- $K
$B $F '                nll_after, time.perf_counter() - t0, kept)' '                nll_after, time.perf_counter() - t0, None)' -- $K
$B $F '                cache.parent.mkdir(parents=True, exist_ok=True)' '                cache.parent.mkdir(exist_ok=True)' -- $K
