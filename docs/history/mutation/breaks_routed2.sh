# Routing by the question's attribute type (issue 25, after a tester's report): each break made once, caught.
# Run: PYTHON=/path/to/venv/python sh docs/history/mutation/breaks_routed2.sh > docs/history/mutation/breaks_routed2.log
B="${PYTHON:-python3} bench/experiments/break_once.py"
T="tests/test_editing_routed.py tests/test_editing_units.py"
$B localpers/personalize/editing.py '        if not mine:
            return None' '        if not mine:
            mine = routes' -- $T
$B localpers/personalize/editing.py '        routes = mine if exact else routes' '        routes = routes' -- $T
$B localpers/personalize/editing.py '    return ({name for name, score in scores.items() if score == top} if top else set()), False' '    return set(), False' -- $T
