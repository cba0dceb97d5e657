#!/bin/sh
# personalize/detect.py survivors of the sample, made as breaks against the tests written for them.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/detect.py
K="tests/test_detect_edges.py"
$B $F 're.match(r"^(?:call me|my)\b", first, re.I)' 're.match(r"XX^(?:call me|my)\bXX", first, re.I)' -- $K
$B $F 'if attribute in ("job", "study", "employer"):' 'if attribute in ("job", "XXstudyXX", "employer"):' -- $K
$B $F 'if attribute in ("likes", "dislikes") else value' 'if attribute in ("LIKES", "dislikes") else value' -- $K
$B $F 'if attribute in ("likes", "dislikes") else value' 'if attribute in ("likes", "DISLIKES") else value' -- $K
$B $F 'return StatedFact("likes", value, statement, retire=True)  # "I no longer eat fish"' 'return StatedFact("likes", value, None, retire=True)  # "I no longer eat fish"' -- $K
$B $F 'return StatedFact("likes", value, statement, retire=True)  # "I no longer eat fish"' 'return StatedFact("likes", statement, retire=True)  # "I no longer eat fish"' -- $K
$B $F "(?=i\\b|i'm\\b|my\\b)\", \"\", s, flags=re.I)
        s = _INTRO" "(?=i\\b|i'm\\b|my\\b)\", \"XXXX\", s, flags=re.I)
        s = _INTRO" -- $K
$B $F 'if rest != clause:' 'if rest == clause:' -- $K
$B $F '(?:live|work|love|like|enjoy|hate|speak|own)s", verb, re.I)' '(?:live|work|love|like|enjoy|hate|speak|own)s", verb, None)' -- $K
