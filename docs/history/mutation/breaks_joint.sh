#!/bin/sh
# issue 25's joint edits: each part broken once, its test run (docs/history/mutation/breaks_joint.log).
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/editing.py
T=tests/test_editing.py
$B $F 'T[torch.arange(len(K)), torch.repeat_interleave(torch.tensor([len(c) for c in clusters]))] = 1.0' 'T[:] = 1.0' -- $T -k joint_keys_fire
$B $F 'T[torch.arange(len(K)), torch.repeat_interleave(torch.tensor([len(c) for c in clusters]))] = 1.0' 'T[torch.arange(len(K)), torch.repeat_interleave(torch.tensor([len(c) for c in clusters]))] = 1.0; K = K.mean(0, keepdim=True).expand_as(K)' -- $T -k "joint_keys_fire or joint_key_of_one"
$B $F '    if not ids or not wanted.keys() & set(ids):' '    if True:' -- $T -k new_preference
$B $F '                        meta["values"] = [editor.fact_id(e.fact) for e in result.edits]' '                        meta["values"] = [editor.fact_id(e.fact) for e in result.edits][::-1]' -- $T -k new_preference
$B $F '    if stale:   # trained for an earlier key' '    if False:   # trained for an earlier key' -- $T -k new_preference
$B $F '        key = slot_of(fact)' '        key = fact.attributes[-1] if fact.attributes else fact.questions[-1] + "|" + fact.statement' -- $T -k "slots or later_pref"
$B $F '                C = C + weight * scale / Q.diagonal().mean() * Q' '                C = C + 0 * Q' -- $T -k quiet
$B $F '        K = self.joint_keys(clusters, (torch.cat([t for t, _ in quiet]), torch.cat([w for _, w in quiet])))' '        K = self.joint_keys(clusters)' -- $T -k quiet
$B $F '                template += [k[:n0], k[pos + 1:]]' '                template += [k[:n0]]' -- $T -k quiet
$B $F 'if len(facts) > 1 else None' 'if len(facts) > 0 else None' -- $T -k quiet
$B $F 'if f.statement in reused][:RETRAIN_STALE]' 'if f.statement in reused]' -- $T -k new_pref
$B $F "(kl := locality_kl(engine, path)) > LOCALITY_MAX_KL" "(kl := locality_kl(engine, path)) > 10 * LOCALITY_MAX_KL" -- $T -k unrelated_answers
$B $F "kls.append(float((np.exp(base) * (base - mine)).sum(axis=1).mean()))" "kls.append(float((np.exp(base) * (base - mine)).sum(axis=1).mean()) * 0)" -- $T -k unrelated_answers
