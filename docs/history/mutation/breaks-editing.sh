#!/bin/sh
# personalize/editing.py survivors of the seeded samples (and of a pre-merge sample), made as breaks against the
# tests written for them (tests/test_editing_units.py).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/editing.py
K=tests/test_editing_units.py
$B $F 'synonyms = ATTRIBUTES[attribute][0]' 'synonyms = ATTRIBUTES[attribute][1]' -- $K
$B $F 'extra = fact_from_statement(fact.statement, attribute).questions' 'extra = fact_from_statement(fact.statement, None).questions' -- $K
$B $F 'adapter = user_adapter(user, engine, config)' 'adapter = user_adapter(user, engine, None)' -- $K
$B $F 'torch.save(model_state(model), partial)' 'torch.save(model_state(None), partial)' -- $K
$B $F '            if not free:' '            if free:' -- $K
$B $F '    return {"artifact": result.artifact, "edited": len(result.edits), "failed": len(result.failed),' '    return {"ARTIFACT": result.artifact, "edited": len(result.edits), "failed": len(result.failed),' -- $K
$B $F '"retired": result.retired}' '"RETIRED": result.retired}' -- $K
$B $F 'if cache is not None and cache.is_file() and not self._prefixes:' 'if cache is not None and cache.is_file() or not self._prefixes:' -- $K
$B $F 'delta -= cfg.gradient_start * max_norm * delta.grad / (delta.grad.norm() + 1e-12)' 'delta -= cfg.gradient_start * max_norm * delta.grad / (delta.grad.norm() + 1.000000000001)' -- $K
$B $F 'loss = loss + cfg.kl_weight * F.kl_div(self.logprobs(neutral, key, delta), neutral_base,' 'loss = loss + cfg.kl_weight / F.kl_div(self.logprobs(neutral, key, delta), neutral_base,' -- $K
$B $F 'if any(tuple(s[:n]) != prefix.ids or len(s) <= n for s in seqs):' 'if any(tuple(s[:n]) == prefix.ids or len(s) <= n for s in seqs):' -- $K
$B $F '            prefix, n = empty_prefix(self.model), 0' '            prefix, n = empty_prefix(None), 0' -- $K
