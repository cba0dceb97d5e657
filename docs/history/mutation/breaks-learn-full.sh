#!/bin/sh
# serve/learn.py: the non-equivalent survivors and unreached mutants of the full run (every mutant), as breaks.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/serve/learn.py
T=tests/test_facts.py
KX="learning_from_a_chats_messages or detect_reads or changed_something"
R='store.learn_texts(user, texts, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)'
$B $F 'learned["replaced"] or learned["retired"]' 'learned["replaced"] and learned["retired"]' -- $T -k "$KX"
$B $F 'detect_facts if facts is None else' 'detect_facts if (facts is None) or True else' -- $T -k "$KX"
$B $F '(lambda _text, _limit, _previous: facts)' '(lambda _text, _limit, _previous: None)' -- $T -k "$KX"
$B $F 'return detect_facts(text, names.MAX_FACTS_PER_MESSAGE)' 'return detect_facts(None, names.MAX_FACTS_PER_MESSAGE)' -- $T -k "$KX"
$B $F 'source: str = "memories"' 'source: str = "XXmemoriesXX"' -- $T -k "$KX"
$B $F 'source: str = "memories"' 'source: str = "MEMORIES"' -- $T -k "$KX"
$B $F "return _report($R)" 'return _report(None)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(None, texts, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(user, None, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(user, texts, detect_facts, None, source=source)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(user, texts, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=None)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(texts, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(user, detect_facts, names.MAX_FACTS_PER_MESSAGE, source=source)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(user, texts, names.MAX_FACTS_PER_MESSAGE, source=source)' -- $T -k "$KX"
$B $F "$R" 'store.learn_texts(user, texts, detect_facts, names.MAX_FACTS_PER_MESSAGE, )' -- $T -k "$KX"
