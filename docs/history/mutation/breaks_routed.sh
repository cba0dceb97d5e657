# Routed edits and the gated facts line (issue 25): each break made once, its tests run, the file restored.
# Run: PYTHON=/path/to/venv/python sh docs/history/mutation/breaks_routed.sh > docs/history/mutation/breaks_routed.log
B="${PYTHON:-python3} bench/experiments/break_once.py"
T="tests/test_editing_routed.py tests/test_facts_recitation.py tests/test_detect_edges.py"
$B localpers/store/store.py '        if kind != names.LORA_ROUTES:
            return None' '        return None' -- $T
$B localpers/store/store.py '        keep = [r for r in routes if r["source"] not in gone]' '        keep = routes' -- $T
$B localpers/personalize/editing.py '    hits = index.search(query, 1)
    return routes[hits[0][0]] if hits else None' '    return routes[-1]' -- $T
$B localpers/personalize/editing.py '        if fid in reuse and Path(reuse[fid]).is_file():' '        if False:' -- $T
$B localpers/personalize/editing.py '            path.unlink()
    editor.reset()' '            pass
    editor.reset()' -- $T
$B localpers/serve/compose.py '                if file in served:' '                if False:' -- $T
$B localpers/personalize/methods.py '    if len(preferences) <= k and ABOUT_ME.search(query):' '    if len(preferences) <= k:' -- $T
$B localpers/personalize/methods.py '    if len(preferences) <= k and ABOUT_ME.search(query):' '    if False:' -- $T
$B localpers/names.py 'EDIT_ROUTE_FROM = 2' 'EDIT_ROUTE_FROM = 5' -- $T
$B localpers/personalize/editing.py '        if routed and bake_model:' '        if False:' -- $T
