#!/bin/sh
# Survivors of the serve/compose.py mutation shard, made again as breaks after
# test_invariant_the_composer_explains_exactly_what_it_served_and_for_which_model was added.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
K="tests/test_mutation_kinds.py -k explains"
$B localpers/serve/compose.py 'object.__setattr__(self, "spec", "+"' 'object.__setattr__(self, "XXspecXX", "+"' -- $K
$B localpers/serve/compose.py 'return self._method(user, query, engine)' 'return self._method(user, query, None)' -- $K
$B localpers/serve/compose.py 'return {"composition": self.spec,' 'return {"XXcompositionXX": self.spec,' -- $K
$B localpers/serve/compose.py '"kind": a.kind, "id": a.id}' '"XXkindXX": a.kind, "id": a.id}' -- $K
$B localpers/serve/compose.py '"retrieved": list(personalized.retrieved)}' '"XXretrievedXX": list(personalized.retrieved)}' -- $K
$B localpers/serve/compose.py 'store.items(user, kind=names.PREFERENCE)' 'store.items(user, kind=None)' -- $K
$B localpers/serve/compose.py 'store.artifacts(user, base_model_sha256=base_model_sha256)' 'store.artifacts(user, base_model_sha256=None)' -- $K
$B localpers/serve/compose.py 'return User(id=user, registered=())' 'return User(id=None, registered=())' -- $K
