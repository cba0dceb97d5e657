#!/bin/sh
# personalize/detect.py, the seed-11 sample's open survivors and every mutant (partial): each survivor judged a
# missing test, made as a break and run against tests/test_detect_bounds.py (each fixed mutant also re-run with
# --mutants: localpers.personalize.detect.rerun.txt). Run from the repository root; never commit while it runs.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/personalize/detect.py
T=tests/test_detect_bounds.py
# seed 11's open survivors
$B $F '("is", "are", "'"'"'s")' '("is", "are", "'"'"'S")' -- $T
$B $F "(?:\\s+|(?='s\\s+" "(?:\\s+|(?=XX's\\s+" -- $T
$B $F 'r"\s+(?:again|now|still|too|these days|nowadays|instead)(?=\s*,)", "", c, flags=re.I)' 'r"\s+(?:again|now|still|too|these days|nowadays|instead)(?=\s*,)", "", c, )' -- $T
$B $F 'bare = not s or _ELLIPTIC_SELF.match(s.rstrip(".!")) or re.fullmatch' 'bare = not s or _ELLIPTIC_SELF.match(s.rstrip(".!")) and re.fullmatch' -- $T
$B $F 'value = _TRAILING.sub("", value).strip(" ,.;:!-")' 'value = _TRAILING.sub("", value).strip(None)' -- $T
$B $F 'if _QUESTION_START.match(clause) and not _SUBJECT.match(clause):
        return False' 'if _QUESTION_START.match(clause) and not _SUBJECT.match(clause):
        return True' -- $T
