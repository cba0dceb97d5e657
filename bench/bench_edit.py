"""Time of one preference edit on SmolLM2-135M-Instruct: a UPQA cluster9 item (its 9 question paraphrases and
the attribute's 4 natural questions), the default EditConfig, torch fp32 on the CPU.
Target (issue 6): <= 30 s per preference on the 2-core machine.

    python -m pytest bench/bench_edit.py --benchmark-only --benchmark-columns=min,median,max,rounds

The edit's parts are timed in the same run (the cached forward of the prompts, the key, the Adam steps), so a
figure taken while other processes load the CPU can still be read as proportions.
"""
import time

import pytest

from localpers import default_model_path
from localpers.personalize.datasets import data_path, read_upqa
from localpers.personalize.editing import EditConfig, Editor, facts_of


@pytest.fixture(scope="module")
def editor_and_facts():
    items = read_upqa(data_path("upqa_cluster9"))
    facts = [facts_of(i.user.preferences, i.user.facts)[0] for i in items[::10][:3]]
    assert all(len(f.questions) == 13 for f in facts)
    return Editor(default_model_path(), EditConfig()), facts


@pytest.mark.parametrize("threads", [1, 2])
def test_edit_one_preference(benchmark, editor_and_facts, threads):
    import torch

    editor, facts = editor_and_facts
    torch.set_num_threads(threads)
    editor.key_direction(editor.keys(facts[0]))  # C^-1 and the model are set up once per user, not per edit
    queue = iter(facts * 10)

    def one_edit():
        editor.reset()
        return editor.edit(next(queue))

    edit = benchmark.pedantic(one_edit, rounds=3, iterations=1)
    t0 = time.perf_counter()
    batch = editor.batch(editor.pairs(edit.fact))
    t1 = time.perf_counter()
    editor.keys(edit.fact)
    t2 = time.perf_counter()
    benchmark.extra_info.update(threads=threads, prompts=len(batch.x), cached_forward_s=round(t1 - t0, 2),
                                key_s=round(t2 - t1, 2), last_edit_s=round(edit.seconds, 2))
    assert edit.nll_after < edit.nll_before
