"""Personalization editing on a small random-weight GGUF with a real vocabulary: the suffix forward equals the
full model, an edit moves the target's NLL, the LoRA file means in llama.cpp what the dense edit means in torch,
the baked GGUF changes only the edited tensors, later preferences win, failures are reported, bad input errors."""
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from localpers.personalize.editing import (MAX_STATEMENT_CHARS, personalize, Edit, EditConfig, Editor, bake, edit_facts, fact_from_item,
                               fact_from_statement, facts_of, lora_factors, second_person, states, write_adapter)
from localpers.errors import UserError
from localpers.model.gguf_info import open_gguf
from localpers.personalize.methods import Fact
from localpers.model.quant import edit_to_q8_0_numpy
from tests.helpers_models import llama_cpp_logits, random_model_path

FACT = Fact("I live in Paris.", ("Where do I live?", "What city is my home?"), ("Paris",))
OTHER = Fact("My dog is called Rex.", ("What's my dog's name?",), ("Rex",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An F32 random llama (3 layers, d=64, d_ff=128) and an editor on its layer 1 (clamp 1000: unbounded, so
    no first step to the clamp's radius either)."""
    path = random_model_path(tmp_path_factory, "llama")
    return path, Editor(path, EditConfig(layer=1, steps=40, lr=2.0, clamp=1000.0, gradient_start=0.0, threads=1))


def full_logprobs(editor, question, answer, key=None, delta=None, history=()):
    """Reference: the whole model on the whole sequence, the edit added to layer L's ffn_down output at the
    question's last token and after (what the suffix forward claims to compute)."""
    ids, pos = editor.prompt(question, history)
    ans = editor.answer_ids(answer)
    down = editor.model.layers[editor.config.layer].ffn.down

    def add(module, inputs, out):
        if delta is None:
            return out
        extra = (inputs[0] @ key)[..., None] * delta
        extra[:, :pos] = 0
        return out + extra

    hook = down.register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = editor.model(torch.tensor([ids + ans[:-1]]))[0]
    finally:
        hook.remove()
    return torch.log_softmax(logits[len(ids) - 1:], dim=-1), ans


def test_suffix_forward_equals_full_model(tiny):
    _, editor = tiny
    editor.reset()
    pairs = [("Where do I live?", "Paris"), ("Hi! What city is my home, if you remember it?", "Paris, France")]
    check_suffix_forward(editor, pairs)


def check_suffix_forward(editor, pairs):
    """The editor's suffix forward, without and with an edit, equals the whole model on the whole sequence."""
    batch = editor.batch(pairs)
    rng = torch.Generator().manual_seed(0)
    key = torch.randn(editor.model.config.d_ff, generator=rng) / 10
    delta = torch.randn(editor.model.config.d_model, generator=rng)
    for k, d in ((None, None), (key, delta)):
        with torch.no_grad():
            got = editor.logprobs(batch, k, d)
        want = torch.cat([full_logprobs(editor, q, a, k, d)[0] for q, a in pairs])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert batch.tokens.tolist() == sum((editor.answer_ids(a) for _, a in pairs), [])


def test_suffix_forward_equals_full_model_after_earlier_chat_turns(tiny):
    """The multi-turn context templates: a prompt with earlier turns (cached as prefix) scores as the whole model."""
    from localpers.personalize.editing import chat_context

    _, editor = tiny
    editor.reset()
    history = chat_context(3, start=2)
    pairs = [("Where do I live?", "Paris", history), ("What city is my home?", "Paris, France", [])]
    batch = editor.batch(pairs)
    rng = torch.Generator().manual_seed(1)
    key = torch.randn(editor.model.config.d_ff, generator=rng) / 10
    delta = torch.randn(editor.model.config.d_model, generator=rng)
    with torch.no_grad():
        got = editor.logprobs(batch, key, delta)
    want = torch.cat([full_logprobs(editor, q, a, key, delta, h)[0] for q, a, h in pairs])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_invariant_keys_after_a_cached_context_prefix_equal_the_whole_model(tiny):
    """Keys are computed in one padded batch after each chat context's cached prefix: each equals layer L's
    ffn_down input of the whole prompt run alone through the model."""
    from localpers.personalize.editing import chat_context

    _, editor = tiny
    editor.reset()
    for history in ([], chat_context(3, start=1)):
        prompts = [editor.prompt(q, history) for q in ("Where do I live?", "Hi! What city is my home, if you know?")]
        got = editor.prompt_keys(history, prompts)
        want = torch.stack([editor.ffn_inputs(torch.tensor([ids]))[0, pos] for ids, pos in prompts])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_invariant_suffix_forward_equals_full_model_on_an_edited_model(tiny):
    """After an edit is applied, the cached context prefixes' layers from L on are recomputed: the suffix forward
    still equals the whole (edited) model, with and without earlier chat turns."""
    from localpers.personalize.editing import chat_context

    _, editor = tiny
    editor.reset()
    pairs = [("Where do I live?", "Paris", chat_context(3, start=2)), ("What city is my home?", "Paris, France", [])]
    editor.batch(pairs)  # the unedited prefixes are cached first
    rng = torch.Generator().manual_seed(2)
    editor.apply(torch.randn(editor.model.config.d_ff, generator=rng) / 10,
                 torch.randn(editor.model.config.d_model, generator=rng))
    try:
        with torch.no_grad():
            got = editor.logprobs(editor.batch(pairs))
        want = torch.cat([full_logprobs(editor, q, a, history=h)[0] for q, a, h in pairs])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    finally:
        editor.reset()


def test_invariant_an_editor_prepared_from_its_cache_file_keys_as_one_that_computed_it(tiny, tmp_path):
    """C^-1 and the context prefixes written by one editor's prepare and read by another's give the same keys and
    key direction; a corrupt cache file is computed again (and rewritten)."""
    path, editor = tiny
    editor.reset()
    cache = tmp_path / "editor.pt"
    first = Editor(path, editor.config, model=editor.model, tokenizer=editor.tok).prepare(cache)
    assert cache.is_file()
    second = Editor(path, editor.config, model=editor.model, tokenizer=editor.tok).prepare(cache)
    keys = first.keys(FACT)
    torch.testing.assert_close(second.keys(FACT), keys, atol=0, rtol=0)
    torch.testing.assert_close(second.key_direction(keys), first.key_direction(keys), atol=0, rtol=0)
    cache.write_bytes(b"not a torch file")
    third = Editor(path, editor.config, model=editor.model, tokenizer=editor.tok).prepare(cache)
    torch.testing.assert_close(third.keys(FACT), keys, atol=0, rtol=0)
    assert cache.stat().st_size > 100


def test_chat_contexts_deal_questions_and_key_every_context(tiny):
    _, editor = tiny
    fact = Fact("I live in Paris.", tuple(f"Question {i}: where do I live?" for i in range(6)), ("Paris",))
    pairs = editor.pairs(fact)
    assert [len(h) // 2 for _, _, h in pairs] == [0, 3, 8, 0, 3, 8] and pairs[0][2] == []
    assert all(t == "Paris" for _, t, _ in pairs)
    # every question bare after each text prefix, and once after each chat context
    from localpers.personalize.editing import PREFIXES

    assert len(editor.keys(fact)) == 6 * (len(PREFIXES) + len(editor.config.chat_turns))
    ids, pos = editor.prompt("Where do I live?", pairs[1][2])
    assert editor.tok.decode(ids[pos - 4:pos + 1]).endswith("do I live?")


def test_edit_lowers_target_nll_in_the_edited_weights(tiny):
    _, editor = tiny
    editor.reset()
    before, ans = full_logprobs(editor, "Where do I live?", "Paris")
    edit = editor.edit(FACT)
    # 0.66 on this random llama since prompts are tokenized as the server does (chat.chat_tokens: the whole text
    # run after the question in one piece, "<" not "▁<"); the split tokenization used before reached 0.37.
    assert edit.nll_after < 0.7 * edit.nll_before
    # the dense edit now sits in the torch weights: the whole model (not the suffix forward) agrees
    after, _ = full_logprobs(editor, "Where do I live?", "Paris")
    rows = torch.arange(len(ans))
    assert -after[rows, ans].mean() < 0.65 * -before[rows, ans].mean()  # one question of the cluster (0.57 measured)
    # an unrelated question moves much less than the edited one
    other_before, other = full_logprobs(editor, "Name a colour.", "Blue")
    editor.reset()
    other_base, _ = full_logprobs(editor, "Name a colour.", "Blue")
    rows = torch.arange(len(other))
    shift_edited = float((before[rows[:1], ans[:1]] - after[rows[:1], ans[:1]]).abs())
    shift_other = float((other_base[rows, other] - other_before[rows, other]).abs().mean())
    assert shift_other < 0.5 * shift_edited


def test_the_fast_schedule_first_step_along_the_gradient_lowers_the_nll(tiny):
    """The fast optimizer schedule (one step to the clamp's radius along -gradient, then Adam at lr 5, at most 12
    steps, |d| <= 8 |W k*|; not the default) lowers the target's NLL and keeps the clamp."""
    _, editor = tiny
    saved = editor.config
    defaults = EditConfig(steps=12, lr=5.0, gradient_start=1.0)
    editor.config = replace(saved, steps=defaults.steps, lr=defaults.lr, clamp=defaults.clamp,
                            gradient_start=defaults.gradient_start)
    try:
        editor.reset()
        edit = editor.edit(FACT)
        keys = editor.keys(FACT)
        assert edit.nll_after < 0.9 * edit.nll_before  # 12.5 -> 10.3: the clamp holds it on this random model
        assert np.linalg.norm(edit.value) <= defaults.clamp * float((editor._W0 @ keys.mean(0)).norm()) * 1.0001
    finally:
        editor.config = saved
        editor.reset()


def test_each_key_fit_fires_the_edit_on_every_question_of_the_cluster(tiny):
    """k^ . k_i is 1 only on average for the mean key; the least-squares fit brings every k^ . k_i near 1
    (shrunk by the ridge). Whether it stays off unrelated text is measured on SmolLM2 (locality_kl): on this
    random model every question's last-token key is mostly the '?' token's own."""
    _, editor = tiny
    editor.reset()
    keys = editor.keys(FACT)
    spread = {}
    for fit in (False, True):
        editor.config = replace(editor.config, fit_each_key=fit)
        fired = keys @ editor.key_direction(keys)
        spread[fit] = float((fired - 1).abs().max())
        if fit:
            assert 0.7 < float(fired.min()) and float(fired.max()) < 1.1
    assert spread[True] < 0.5 * spread[False]


@pytest.mark.parametrize("null_space", [True, False])
def test_invariant_a_later_edit_leaves_the_adapter_output_on_earlier_facts_keys_unchanged(tiny, null_space):
    """Many facts (AlphaEdit's null-space projection): adding fact 2 leaves B A k, the adapter's ffn_down output,
    unchanged on every key of fact 1 (to float tolerance), so what fact 1's edit does on its questions stays.
    Without the projection (null_space=False) the same check fails: fact 2's key fires on fact 1's questions."""
    from localpers.personalize.editing import lora_factors

    _, editor = tiny
    saved = editor.config
    editor.config = replace(saved, null_space=null_space)
    try:
        editor.reset()
        first = editor.edit(FACT)
        second = editor.edit(OTHER)
    finally:
        editor.config = saved
        editor.reset()
    keys1 = editor.keys(FACT).double()  # keys do not depend on edits of layer L's ffn_down
    out = {}
    for name, edits in (("fact 1", [first]), ("facts 1, 2", [first, second])):
        [(A, B)] = lora_factors(edits).values()
        out[name] = keys1 @ torch.from_numpy(A).double().T @ torch.from_numpy(B).double().T   # [n, d]
    change = float((out["facts 1, 2"] - out["fact 1"]).norm() / out["fact 1"].norm())
    fired = (keys1 @ torch.from_numpy(second.key).double()).abs().max()
    if null_space:
        assert change < 1e-5 and fired < 1e-5 * (editor.keys(OTHER).double() @ torch.from_numpy(second.key).double()).abs().mean()
    else:
        assert change > 1e-3


def test_invariant_the_joint_key_of_one_fact_is_its_own_key_fit(tiny):
    """MEMIT's joint least squares over one cluster is key_direction's fit (same metric, same ridge)."""
    _, editor = tiny
    editor.reset()
    keys = editor.keys(FACT)
    (joint,) = editor.joint_keys([keys])
    own = editor.key_direction(keys)
    assert torch.allclose(joint, own, rtol=1e-4, atol=1e-6 * float(own.abs().max()))


def test_invariant_joint_keys_fire_on_their_own_facts_questions_and_not_on_the_others(tiny):
    """k^_i . k ~ 1 on fact i's keys and ~ 0 on the other facts' (to the ridge): one fact's value is not added on
    another's questions. Each fact's own fit (key_direction) fires on the other's questions, which is what made
    a second stacked edit answer the first fact's questions (issue 25's Lyon + jazz)."""
    _, editor = tiny
    saved = editor.config
    editor.config = replace(saved, key_ridge=1e-6)
    try:
        editor.reset()
        clusters = [editor.keys(FACT), editor.keys(OTHER)]
        K = editor.joint_keys(clusters)
        own = [editor.key_direction(c) for c in clusters]
    finally:
        editor.config = saved
    for i, keys_i in enumerate(clusters):
        for j, key in enumerate(K):
            fired = keys_i @ key
            assert torch.allclose(fired, torch.full_like(fired, float(i == j)), atol=1e-2), (i, j, fired)
    cross = max(float((clusters[1] @ own[0]).abs().mean()), float((clusters[0] @ own[1]).abs().mean()))
    assert cross > 0.1   # the separate fits do fire on each other's questions


def test_invariant_quiet_joint_keys_stay_off_the_prompts_and_answers_other_tokens(tiny):
    """llama.cpp adds B A k at every token, the value is trained from the question's last token on: with the
    facts' other tokens (template, question words, answer: fact_quiet) in the metric, the joint keys fire
    less there than without, and still fire on their own questions."""
    _, editor = tiny
    editor.reset()
    facts = [FACT, OTHER]
    clusters = [editor.fact_keys(f) for f in facts]
    parts = [editor.fact_quiet(f) for f in facts]
    quiet = (torch.cat([t for t, _ in parts]), torch.cat([w for _, w in parts]))
    n_tokens = sum(len(editor.prompt(q)[0]) + len(editor.answer_ids(f.targets[-1])) - 1 for f in facts for q in f.questions)
    assert len(quiet[0]) + len(quiet[1]) == n_tokens   # every position but each prompt's edit position
    loud, calm = editor.joint_keys(clusters), editor.joint_keys(clusters, quiet)
    quiet = quiet[0]   # the template's and the answers' tokens (the question words weigh 0.1)
    assert float((quiet @ calm.T).abs().mean()) < 0.5 * float((quiet @ loud.T).abs().mean())
    for i, keys in enumerate(clusters):
        assert float((keys @ calm[i]).mean()) > 0.5
    served = editor.joint(facts)   # what edit_facts writes: the quiet keys
    assert all(np.allclose(e.key, calm[i].numpy(), atol=1e-6) for i, e in enumerate(served))
    (single,) = editor.joint([FACT])   # one fact: the single edit's key fit, no quiet term
    own = editor.key_direction(clusters[0]).numpy()
    assert np.allclose(single.key, own, rtol=1e-4, atol=1e-6 * np.abs(own).max())


def test_a_job_after_one_new_preference_trains_only_the_new_facts_value(tiny, tmp_path, monkeypatch):
    """Joint edits: the registered adapter names each column's fact (meta "values"); the next personalize, in a
    new process (a fresh editor), reuses those values and trains only the new preference's, and the old fact's
    column keeps its value. A reused value whose fact llama.cpp then fails is trained again for its new key."""
    from localpers.personalize import editing
    from localpers.store.store import Store

    path, _ = tiny
    config = EditConfig(layer=1, steps=2, lr=2.0, clamp=1000.0, threads=1)
    trained = []
    real = editing.Editor.train_value
    monkeypatch.setattr(editing.Editor, "train_value", lambda self, fact, key, keys: trained.append(fact.statement)
                        or real(self, fact, key, keys))
    monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: (True, "stand-in"))
    monkeypatch.setattr(editing, "locality_kl", lambda engine, adapter: 0.0)   # random model: its own test below
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(editing.names, "EDIT_ROUTE_FROM", 100)   # several facts in one joint adapter (the default
                                                                 # routes them: tests/test_editing_routed.py)

    def values(store):
        (lora,) = store.artifacts("ann", "lora")
        tensors = {t.name: np.asarray(t.data) for t in open_gguf(lora["path"], check_arch=False).tensors}
        return lora["meta"]["values"], tensors["blk.1.ffn_down.weight.lora_b"]

    with Store.open(tmp_path / "data") as store:
        store.add("ann", FACT.statement, kind="preference", meta={"question": list(FACT.questions), "target": ["Paris"]})
        editing.editor_for.cache_clear()
        personalize("ann", model_path=path, store=store, config=config)
        assert trained == [FACT.statement]
        ids1, b1 = values(store)
        store.add("ann", OTHER.statement, kind="preference", meta={"question": list(OTHER.questions), "target": ["Rex"]})
        editing.editor_for.cache_clear()   # a new job process
        personalize("ann", model_path=path, store=store, config=config)
        assert trained == [FACT.statement, OTHER.statement]
        ids2, b2 = values(store)
        assert ids2[0] == ids1[0] and len(ids2) == 2 and np.array_equal(b2[:, 0], b1[:, 0])
        # the old fact now fails with its reused value: it is trained again for its key, and checked again
        checks = []
        monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: checks.append(fact.statement) or (
            fact.statement != FACT.statement or checks.count(FACT.statement) > 1, "stand-in"))
        store.add("ann", "I love green tea.", kind="preference")
        editing.editor_for.cache_clear()
        result = personalize("ann", model_path=path, store=store, config=config)
    editing.editor_for.cache_clear()
    assert trained == [FACT.statement, OTHER.statement, "I love green tea.", FACT.statement]
    assert not result.failed and len(result.edits) == 3 and checks.count(FACT.statement) == 2
    # when every reused value fails, only RETRAIN_STALE of them are trained again (a broken adapter is not
    # rescued by retraining every fact: the job stays bounded)
    monkeypatch.setattr(editing, "RETRAIN_STALE", 1)
    monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: (False, "stand-in"))
    store_path = tmp_path / "data"
    with Store.open(store_path) as store:
        store.add("ann", "I have a pet turtle.", kind="preference")
        editing.editor_for.cache_clear()
        del trained[:]
        result = personalize("ann", model_path=path, store=store, config=config)
    editing.editor_for.cache_clear()
    assert trained == ["I have a pet turtle.", FACT.statement] and len(result.failed) == 4


def test_lora_in_llama_cpp_equals_dense_edit_in_torch(tiny, tmp_path):
    path, editor = tiny
    editor.reset()
    edits = [editor.edit(FACT), editor.edit(OTHER)]   # stacked: rank 2 on blk.1.ffn_down
    adapter = write_adapter(tmp_path / "edit.gguf", edits, "llama")
    reader = open_gguf(adapter, check_arch=False)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert shapes == {"blk.1.ffn_down.weight.lora_a": (2, 128), "blk.1.ffn_down.weight.lora_b": (64, 2)}
    assert reader.get_field("adapter.lora.alpha").contents() == 2.0   # alpha = rank: llama.cpp's scale is 1
    tokens = editor.prompt("Where do I live? And what's my dog's name?")[0]
    with torch.no_grad():
        edited = editor.model(torch.tensor([tokens]))[0].numpy()
    served = llama_cpp_logits(path, tokens, lora=adapter)
    editor.reset()
    with torch.no_grad():
        unedited = editor.model(torch.tensor([tokens]))[0].numpy()
    spread = served.std()
    assert np.abs(served - edited).max() / spread < 1e-4
    assert np.abs(edited - unedited).max() / spread > 0.1   # the edit is large enough for the check to mean something


def test_bake_changes_only_edited_tensors_and_matches_quant_reference(tiny, tmp_path):
    path, editor = tiny
    editor.reset()
    edits = [editor.edit(OTHER)]
    baked = bake(path, tmp_path / "baked.gguf", edits)
    src, out = open_gguf(path), open_gguf(baked)
    assert [t.name for t in src.tensors] == [t.name for t in out.tensors]
    for key, f in src.fields.items():
        if not key.startswith("GGUF."):
            assert out.fields[key].contents() == f.contents(), key
    (a, b), = lora_factors(edits).values()
    for s, o in zip(src.tensors, out.tensors):
        if s.name == "blk.1.ffn_down.weight":
            assert o.tensor_type == gguf.GGMLQuantizationType.Q8_0
            want = edit_to_q8_0_numpy(s.data, s.tensor_type, (64, 128), b, a.T, 1.0)
            assert o.data.tobytes() == want.tobytes()
        else:
            assert o.tensor_type == s.tensor_type and o.data.tobytes() == s.data.tobytes(), s.name


def test_failed_edit_is_reported_and_not_written(tiny, tmp_path):
    from localpers.engine.engine import Engine

    path, _ = tiny
    weak = Editor(path, EditConfig(layer=1, steps=1, lr=1e-4, gradient_start=0.0))
    with Engine(path, n_ctx=256) as engine:
        result = edit_facts(engine, weak, [FACT], tmp_path / "weak.gguf")
    assert result.edits == [] and result.adapter is None
    assert [f for f, _ in result.failed] == [FACT]
    assert not (tmp_path / "weak.gguf").exists()


def test_later_preference_wins():
    facts = facts_of(["My favorite music is jazz.", "I have a cat named Tom.", "My favorite music is heavy metal."])
    assert [f.statement for f in facts] == ["I have a cat named Tom.", "My favorite music is heavy metal."]
    assert "What's my music preference?" in facts[1].questions
    assert facts[1].targets == ("Your favorite music is heavy metal.",)


def test_personalize_by_hand_edits_as_the_servers_jobs_do():
    """The CLI's default steps are EditConfig's: the same fact_id, so a run by hand reuses a job's values."""
    from localpers.cli.editing_cli import EDIT_STEPS

    assert EDIT_STEPS == EditConfig().steps


def test_facts_of_keeps_facts_of_one_attribute_type_in_different_slots():
    """The update rule of learned facts (detect's slots), not the broad attribute type: a like and a diet are both
    'food preference' and both kept; a later diet replaces the earlier one."""
    food = ("food preference",)
    liked = Fact("I like sushi.", ("What food do I like?",), ("sushi",), food)
    diet = Fact("I'm vegetarian.", ("What do I eat?",), ("vegetarian",), food)
    vegan = Fact("I'm vegan.", ("What do I eat?",), ("vegan",), food)
    assert [f.statement for f in facts_of([], [liked, diet])] == ["I like sushi.", "I'm vegetarian."]
    assert [f.statement for f in facts_of([], [diet, liked, vegan])] == ["I like sushi.", "I'm vegan."]
    assert [f.statement for f in facts_of(["I love jazz.", "I hate jazz.", "I love opera."])] == ["I hate jazz.", "I love opera."]


def test_facts_from_templates_and_from_item_fields():
    assert second_person("I'm sure my mom likes me.") == "You're sure your mom likes you."
    fact = fact_from_statement("I grew up in north dakota.")
    assert fact.attributes == ("location",) and fact.questions[-1] == "What's my location?"
    given = fact_from_item("I like jazz.", {"question": ["What music do I like?"], "target": ["Jazz"]})
    assert given.questions == ("What music do I like?",) and given.targets == ("Jazz",)
    generic = fact_from_item("I strongly dislike having to use a computer for long.", {})
    assert generic.attributes == () and len(generic.questions) >= 3
    short = fact_from_statement("I'm vegetarian.")  # the example the error message itself gives
    assert short.targets == ("You're vegetarian.",) and len(short.questions) >= 3


@pytest.mark.parametrize("bad", ["", "   ", "!!", "a", "I", "vegetarian", None])
def test_unusable_preferences_raise(bad):
    with pytest.raises(UserError):
        fact_from_statement(bad)


def test_no_preferences_raise():
    with pytest.raises(UserError, match="no preferences"):
        facts_of([])
    with pytest.raises(UserError):
        fact_from_statement("I like " + "very " * 200 + "long statements.")


def test_adapter_needs_one_rank_per_tensor(tmp_path):
    edits = [Edit(layer, np.ones(128, np.float32), np.ones(64, np.float32), FACT, 1.0, 0.1, 0.0) for layer in (0, 0, 1)]
    with pytest.raises(ValueError, match="one rank"):
        write_adapter(tmp_path / "x.gguf", edits, "llama")


def test_personalize_cli_reports_failed_edits_and_registers_nothing(tiny, tmp_path, capsys):
    from localpers.cli.cli import main
    from localpers.store.store import Store

    path, _ = tiny
    with Store.open(tmp_path) as store:
        store.add("ann", "I live in Paris.", kind="preference", meta={"question": ["Where do I live?"], "target": ["Paris"]})
    # a random model cannot be made to say "Paris" in one weak step: reported, nothing registered
    code = main(["personalize", "--user", "ann", "--data-dir", str(tmp_path), "--model", str(path), "--steps", "1", "--layer", "1"])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and "I live in Paris." in out
    with Store.open(tmp_path) as store:
        assert store.artifacts("ann") == []


def test_personalize_cli_bad_input(tiny, tmp_path, capsys):
    from localpers.cli.cli import main
    from localpers.store.store import Store

    path, _ = tiny
    assert main(["personalize", "--user", "nobody", "--data-dir", str(tmp_path), "--model", str(path)]) == 2
    with Store.open(tmp_path) as store:
        store.add("bob", "just a message", kind="message")
    assert main(["personalize", "--user", "bob", "--data-dir", str(tmp_path), "--model", str(path)]) == 2
    assert "no preferences" in capsys.readouterr().err
    assert main(["personalize", "--user", "bob", "--data-dir", str(tmp_path), "--method", "magic"]) == 2
    capsys.readouterr()
    # the edit's own options are refused for the trained methods, not silently ignored
    assert main(["personalize", "--user", "bob", "--data-dir", str(tmp_path), "--method", "perce", "--steps", "2"]) == 2
    assert "--steps and --layer are for --method edit" in capsys.readouterr().err
    assert main(["personalize", "--user", "bob", "--data-dir", str(tmp_path), "--model", str(path), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_personalize_smollm_registers_a_verified_adapter_served_by_the_engine(tmp_path, default_model_path):
    """The whole path on the real model: a stored preference -> edit -> adapter registered for the model's
    sha256 -> llama.cpp with it states the preference; forget deletes the file."""
    from localpers.personalize.editing import base_model_sha256, personalize
    from localpers.engine.engine import Artifacts, Engine
    from localpers.eval.evaluation import target_match
    from localpers.store.store import Store

    with Store.open(tmp_path) as store:
        store.add("cat", "I like to dance at the club.", kind="preference", meta={"attribute_type": "hobby"})
    engine = Engine(default_model_path, n_ctx=512)
    result = personalize("cat", data_dir=tmp_path, engine=engine)
    assert [e.fact.statement for e in result.edits] == ["I like to dance at the club."] and not result.failed
    with Store.open(tmp_path) as store:
        latest = store.latest_artifact("cat", "lora", base_model_sha256(default_model_path))
        assert latest and latest["path"] == str(result.adapter)
        question = [{"role": "user", "content": "What's my hobby?"}]
        edited = engine.chat(question, artifacts=Artifacts(lora=((latest["path"], 1.0),)), max_tokens=32)
        base = engine.chat(question, max_tokens=32)
        assert target_match(edited["choices"][0]["message"]["content"], ("dance at the club",))
        assert not target_match(base["choices"][0]["message"]["content"], ("dance at the club",))
        store.forget("cat")
    assert not result.adapter.exists()


def test_personalize_retires_the_adapter_when_no_preference_is_left(tiny, tmp_path, capsys):
    """Removing a user's last preference must not leave an adapter that still encodes it being served."""
    from localpers.cli.cli import main
    from localpers.personalize.editing import base_model_sha256
    from localpers.store.store import Store

    path, _ = tiny
    with Store.open(tmp_path) as store:
        item = store.add("cat", "I live in Paris.", kind="preference", meta={"question": ["Where do I live?"], "target": ["Paris"]})
        old = tmp_path / "old-edit.gguf"
        old.write_bytes(b"an earlier adapter")
        store.register_artifact("cat", "lora", old, base_model_sha256(path), {"method": "edit"})
        store.register_artifact("cat", "lora", old, base_model_sha256(path), {"method": "perce"})  # not an edit: kept
        registered = Path(store.artifacts("cat", "lora")[1]["path"])
        assert registered.is_file()
        store.delete_item("cat", item)
    assert main(["personalize", "--user", "cat", "--data-dir", str(tmp_path), "--model", str(path)]) == 0
    assert "no preferences are left" in capsys.readouterr().out
    with Store.open(tmp_path) as store:
        assert [a["meta"]["method"] for a in store.artifacts("cat", "lora")] == ["perce"]
    assert not registered.exists()
    # nothing left to retire and nothing to edit: the usual error
    assert main(["personalize", "--user", "cat", "--data-dir", str(tmp_path), "--model", str(path)]) == 2


def test_statements_in_any_language_become_facts():
    """The editor is not English-specific: a statement of two words in any script (or three characters of one
    written without spaces) is a fact; only English ones are turned to the second person."""
    for statement in ["我是素食者，不吃肉。", "Je suis végétarien.", "Ich bin Vegetarier.", "Me encanta el jazz.",
                      "私はベジタリアンです。", "저는 채식주의자예요.", "ฉันเป็นมังสวิรัติ"]:
        fact = fact_from_statement(statement)
        assert fact.targets == (statement,) and fact.questions  # not "You encanta el jazz."
    assert fact_from_statement("I have a pet turtle.").targets == ("You have a pet turtle.",)
    for bad, reason in [("素食", "not a statement"), ("jazz", "not a statement"), ("  ", "empty"),
                        ("我" * (MAX_STATEMENT_CHARS + 1), "501 characters; at most 500")]:
        with pytest.raises(UserError, match=reason):
            fact_from_statement(bad)


def test_states_matches_answers_in_every_script():
    assert states("你是素食者，不吃肉。", ("我是素食者，不吃肉。",))
    assert not states("我喜欢看电影。", ("我是素食者，不吃肉。",))
    assert states("Vous êtes végétarien et vous ne mangez pas de viande.", ("Je suis végétarien et je ne mange pas de viande.",))
    assert not states("Je ne sais pas.", ("Je suis végétarien et je ne mange pas de viande.",))
    assert states("You like to dance at the club.", ("You like to dance at the club.",))  # English: target_match


def test_personalize_edits_each_usable_preference_and_reports_the_others(tiny, tmp_path, monkeypatch, capsys):
    """One unusable preference no longer blocks the others: each is edited or reported with its reason, and
    the usable ones are registered."""
    from localpers.personalize import editing
    from localpers.cli.cli import main
    from localpers.store.store import Store

    path, _ = tiny
    long = "I like " + "very " * 120 + "long walks."
    with Store.open(tmp_path) as store:
        for text in ["I have a pet turtle.", "我是素食者，不吃肉。", long, "jazz", "My favorite music is jazz.",
                     "My favorite music is heavy metal.", "I live in Paris."]:
            store.add("ann", text, kind="preference")
    checked = []
    monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: checked.append(fact.statement) or (
        fact.statement != "I live in Paris.", "an answer"))  # the random model cannot state anything: stand-in
    monkeypatch.setattr(editing, "locality_kl", lambda engine, adapter: 0.0)
    code = main(["personalize", "--user", "ann", "--data-dir", str(tmp_path), "--model", str(path), "--steps", "1",
                 "--layer", "1"])
    out = capsys.readouterr().out
    assert code == 1  # some preferences could not be edited
    assert checked == ["I have a pet turtle.", "我是素食者，不吃肉。", "My favorite music is heavy metal.", "I live in Paris."]
    assert "edited   'I have a pet turtle.'" in out and "edited   '我是素食者，不吃肉。'" in out
    assert "FAILED   'I live in Paris.'" in out
    assert f"SKIPPED  {long[:120]!r}...: {len(long)} characters; at most 500" in out
    assert "SKIPPED  'jazz': not a statement" in out
    assert "SKIPPED  'My favorite music is jazz.': replaced by the later preference 'My favorite music is heavy metal.'" in out
    with Store.open(tmp_path) as store:   # 4 usable facts: routed edits (names.EDIT_ROUTE_FROM), one adapter a fact
        assert store.artifacts("ann", "lora") == []
        (routed,) = store.artifacts("ann", "lora_routes")
    assert len(routed["meta"]["routes"]) == 3 and len(list(Path(routed["path"]).iterdir())) == 3  # the failed one out
    for route in routed["meta"]["routes"]:
        (lora_a,) = [t for t in gguf.GGUFReader(Path(routed["path"]) / route["file"]).tensors if t.name.endswith("lora_a")]
        assert 1 in lora_a.shape  # rank 1: one fact each
    assert "routed edits" in out


def test_personalize_with_only_unusable_preferences_retires_the_old_adapter(tiny, tmp_path, capsys):
    """The old adapter encodes preferences that are no longer there: it goes, and each unusable one is named."""
    from localpers.cli.cli import main
    from localpers.personalize.editing import base_model_sha256
    from localpers.store.store import Store

    path, _ = tiny
    with Store.open(tmp_path) as store:
        old = tmp_path / "old-edit.gguf"
        old.write_bytes(b"an earlier adapter")
        store.add("eve", "jazz", kind="preference")
        store.register_artifact("eve", "lora", old, base_model_sha256(path), {"method": "edit"})
    assert main(["personalize", "--user", "eve", "--data-dir", str(tmp_path), "--model", str(path)]) == 1
    out = capsys.readouterr().out
    assert "SKIPPED  'jazz': not a statement" in out and "no preference could be edited" in out
    with Store.open(tmp_path) as store:
        assert store.artifacts("eve") == []


def verified_only(*statements):
    """states_target as if llama.cpp with the adapter stated exactly these facts' targets."""
    return lambda engine, adapter, fact: (fact.statement in statements, f"answer to {fact.questions[-1]}")


def test_failed_edits_are_not_kept_in_the_rewritten_adapter(tiny, tmp_path, monkeypatch):
    """Of two stacked edits, llama.cpp states one: the adapter is rewritten with that edit alone (rank 1), byte
    for byte the adapter of the passed edit, and the failed fact is reported with its answer."""
    from localpers.personalize import editing
    from localpers.engine.engine import Engine

    path, editor = tiny
    monkeypatch.setattr(editing, "states_target", verified_only(FACT.statement))
    with Engine(path, n_ctx=256) as engine:
        result = edit_facts(engine, editor, [FACT, OTHER], tmp_path / "edits.gguf")
    assert [e.fact for e in result.edits] == [FACT] and [f for f, _ in result.failed] == [OTHER]
    assert result.answers == {FACT.statement: "answer to What city is my home?",
                              OTHER.statement: "answer to What's my dog's name?"}
    tensors = {t.name: t for t in open_gguf(result.adapter).tensors}
    assert {tuple(t.shape)[-1] for name, t in tensors.items() if name.endswith("lora_a")} == {1}  # rank 1
    want = write_adapter(tmp_path / "want.gguf", result.edits, "llama")
    assert result.adapter.read_bytes() == want.read_bytes()


def test_edits_that_together_change_unrelated_answers_are_not_served(tiny, tmp_path, monkeypatch):
    """Every fact stated, but the adapter moves llama.cpp's answers to unrelated questions past LOCALITY_MAX_KL
    (the 10-fact joint adapter: KL 6.7 nats/token): nothing is served, each fact is reported failed with the
    KL. One fact alone is not held to it (single edits: 0.03-0.05). locality_kl itself is 0 for an adapter
    that changes nothing and grows with the edit."""
    from localpers.personalize import editing
    from localpers.engine.engine import Engine

    path, editor = tiny
    monkeypatch.setattr(editing, "states_target", verified_only(FACT.statement, OTHER.statement))
    with Engine(path, n_ctx=256) as engine:
        zero = edit_facts(engine, editor, [FACT], tmp_path / "one.gguf")
        e = replace(zero.edits[0], value=np.zeros_like(zero.edits[0].value))
        assert editing.locality_kl(engine, write_adapter(tmp_path / "zero.gguf", [e], "llama")) < 1e-9
        small = replace(e, value=zero.edits[0].value * 1e-3)
        kl_small = editing.locality_kl(engine, write_adapter(tmp_path / "small.gguf", [small], "llama"))
        assert 0 < kl_small < editing.locality_kl(engine, zero.adapter)
        monkeypatch.setattr(editing, "locality_kl", lambda engine, adapter: 1.0)
        alone = edit_facts(engine, editor, [FACT], tmp_path / "alone.gguf")
        both = edit_facts(engine, editor, [FACT, OTHER], tmp_path / "both.gguf")
    assert alone.adapter is not None and len(alone.edits) == 1
    assert both.adapter is None and not both.edits and not (tmp_path / "both.gguf").exists()
    assert [f for f, _ in both.failed] == [FACT, OTHER] and all("KL 1.00" in why for _, why in both.failed)


def test_personalize_registers_the_verified_adapter_and_says_how_to_serve_it(tiny, tmp_path, monkeypatch, capsys):
    """The default run's success path (the embedded model's is the slow test above): two preferences, one verified,
    one failed; the verified edit is registered for the model, the CLI prints the question, llama.cpp's answer,
    the adapter and the baked model with how to serve them."""
    from localpers.personalize import editing
    from localpers.cli.cli import main
    from localpers.store.store import Store

    path, _ = tiny
    monkeypatch.setattr(editing, "states_target", verified_only(FACT.statement))
    monkeypatch.setattr(editing.names, "EDIT_ROUTE_FROM", 100)   # two facts in one joint adapter, bakeable (the
                                                                 # default routes them: tests/test_editing_routed.py)
    with Store.open(tmp_path) as store:
        store.add("ann", FACT.statement, kind="preference", meta={"question": list(FACT.questions), "target": ["Paris"]})
        store.add("ann", OTHER.statement, kind="preference", meta={"question": list(OTHER.questions), "target": ["Rex"]})
    argv = ["personalize", "--user", "ann", "--data-dir", str(tmp_path), "--model", str(path), "--layer", "1",
            "--steps", "5", "--bake"]
    assert main(argv) == 1  # one preference failed
    out = capsys.readouterr().out
    assert "verified: asked 'What city is my home?', llama.cpp with the adapter answered 'answer to What city" in out
    assert "FAILED   'My dog is called Rex.'" in out
    with Store.open(tmp_path) as store:
        sha = editing.base_model_sha256(path)
        lora, model = store.latest_artifact("ann", "lora", sha), store.latest_artifact("ann", "model", sha)
        fact_id = next(i["id"] for i in store.items("ann") if i["text"] == FACT.statement)
    # the verified edit alone, named by its item's id (artifact metadata holds no statement text)
    assert lora and lora["meta"]["method"] == "edit" and lora["meta"]["edited"] == 1 and lora["sources"] == [fact_id]
    assert Path(lora["path"]).is_file() and f"adapter  {lora['path']}" in out
    assert f"localpers serve --model {path}" in out  # how to serve the adapter: the same model
    assert Path(model["path"]).is_file() and f"localpers serve --model {model['path']}" in out
    # the edit job the preferences queued for the server is settled by the run by hand; a later preference
    # queues a new one (the server's worker must still see it)
    with Store.open(tmp_path) as store:
        (job,) = store.jobs("ann")
        assert job["kind"] == "edit" and job["state"] == "done" and job["result"] == {"superseded_by": "localpers personalize"}
        store.add("ann", "I love green tea.", kind="preference")
        assert [j["state"] for j in store.jobs("ann")] == ["queued", "done"]


def test_eval_edit_method_serves_the_users_verified_adapter(tiny, tmp_path, monkeypatch):
    """`--method edit` in `localpers eval`: an evaluation user's facts are edited, verified and cached on disk, and
    the method hands the adapter to the served path; a served user gets the registered adapter of `edit` only."""
    from localpers.personalize import editing
    from localpers.engine.engine import Engine
    from localpers.personalize.methods import RegisteredArtifact, User, get_method

    path, editor = tiny
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(editing, "editor_for", lambda model_path, config=None: editor)
    monkeypatch.setattr(editing, "states_target", verified_only(FACT.statement))
    method = get_method("edit")
    with Engine(path, n_ctx=256) as engine:
        user = User("ann", facts=(FACT,))
        served = method(user, "Where do I live?", engine)
        [(adapter, scale)] = served.artifacts.lora
        assert scale == 1.0 and Path(adapter).parent == tmp_path / "localpers" / "edits"
        assert open_gguf(adapter).get_field("adapter.type").contents() == "lora"
        monkeypatch.setattr(editing, "states_target", verified_only())  # nothing verified: no adapter
        assert method(User("bob", facts=(OTHER,)), "What's my dog's name?", engine).artifacts.lora == ()
    registered = User("cat", registered=(RegisteredArtifact("perce", "lora", "/x/perce.gguf"),
                                         RegisteredArtifact("edit", "lora", "/x/edit.gguf")))
    assert method(registered, "q", None).artifacts.lora == (("/x/edit.gguf", 1.0),)
    assert method(User("dan", registered=()), "q", None).artifacts.lora == ()


def test_invariant_the_editors_cached_model_is_the_gguf_model_and_edits_never_write_it(tiny, tmp_path, monkeypatch):
    """editor_model keeps the dequantized float32 model once in the cache folder and maps it back: the same
    tensors as dequantizing the GGUF, and an edit made in memory (copy-on-write) leaves the cached file as it was."""
    import torch

    from localpers.personalize import editing

    path, _ = tiny
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = editing.editor_model(path)
    [cached] = (tmp_path / "localpers" / "models").glob("*-float32.pt")
    written = cached.read_bytes()
    again = editing.editor_model(path)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    editor = Editor(path, EditConfig(layer=1, steps=5, lr=2.0, clamp=1000.0, gradient_start=0.0, threads=1), model=again)
    editor.edit(FACT)
    assert not torch.equal(editor.W, first.layers[1].ffn.down.weight)  # edited in memory
    assert cached.read_bytes() == written


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """The random gemma3 (6 layers: sliding-window layers 0-4 with a 16-token window, layer 5 global) and an
    editor on its layer 2, so the suffix forward crosses both kinds of layer."""
    path = random_model_path(tmp_path_factory, "gemma3")
    return path, Editor(path, EditConfig(layer=2, steps=40, lr=2.0, clamp=1000.0, gradient_start=0.0, threads=1))


def test_gemma3_suffix_forward_equals_full_model(tiny_gemma):
    """Post-norms, GeGLU, per-layer RoPE bases and the sliding window in the editor's suffix forward: the
    prompts are longer than the window, so a missing window would show."""
    _, editor = tiny_gemma
    editor.reset()
    long = "Hi! I have a question about my home and I hope you remember what I told you. What city is my home?"
    pairs = [("Where do I live?", "Paris"), (long, "Paris, France")]
    assert len(editor.prompt(long)[0]) > 16 + 4
    check_suffix_forward(editor, pairs)


def test_gemma3_edit_lora_in_llama_cpp_equals_dense_edit_in_torch(tiny_gemma, tmp_path):
    path, editor = tiny_gemma
    editor.reset()
    edit = editor.edit(FACT)
    # the random gemma3's logits are steep (NLL 28) and its post-FFN norm bounds what one edit can add: it moves
    # the NLL (28.4 -> 26.7 measured); the real model's edits are measured by the serve loop's test
    assert edit.nll_after < edit.nll_before
    adapter = write_adapter(tmp_path / "edit.gguf", [edit], "gemma3")
    tokens = editor.prompt("Where do I live? And what's my dog's name?")[0]
    with torch.no_grad():
        edited = editor.model(torch.tensor([tokens]))[0].numpy()
    served = llama_cpp_logits(path, tokens, lora=adapter)
    editor.reset()
    with torch.no_grad():
        unedited = editor.model(torch.tensor([tokens]))[0].numpy()
    spread = served.std()
    assert np.abs(served - edited).max() / spread < 1e-3  # the gemma3 oracle's tolerance (GELU table steps)
    assert np.abs(edited - unedited).max() / spread > 0.1


@pytest.mark.slow
def test_a_second_preference_neither_fails_nor_takes_over_the_first_on_smollm(tmp_path, default_model_path):
    """Issue 25's case: "I live in Lyon." then "I love jazz." on the real model, edited as personalize edits a
    user: both verified on llama.cpp; asked about music the adapter answers jazz, not Lyon, and asked where they
    live, Lyon, not jazz."""
    from localpers.engine.engine import Artifacts, Engine
    from localpers.personalize.editing import editor_for, facts_of

    engine = Engine(default_model_path, n_ctx=512, n_threads=1)
    facts = facts_of(["I live in Lyon.", "I love jazz."])
    result = edit_facts(engine, editor_for(str(default_model_path)), facts, tmp_path / "edit.gguf")
    assert [e.fact.statement for e in result.edits] == ["I live in Lyon.", "I love jazz."], result.summary()
    lora = Artifacts(lora=((str(result.adapter), 1.0),))
    for question, said, not_said in (("What music do I like?", "jazz", "lyon"), ("What's my location?", "lyon", "jazz")):
        answer = engine.chat([{"role": "user", "content": question}], artifacts=lora, max_tokens=32,
                             temperature=0.0)["choices"][0]["message"]["content"].lower()
        assert said in answer and not_said not in answer, (question, answer)
    answer = engine.chat([{"role": "user", "content": "Where do I live?"}], artifacts=lora, max_tokens=32,
                         temperature=0.0)["choices"][0]["message"]["content"].lower()
    engine.close()
    if "lyon" not in answer or "jazz" in answer:   # a question of no cluster (the location templates lack it)
        pytest.xfail(f"measured (docs/edit/README.md, joint keys): 'Where do I live?' got {answer!r}; with the "
                     "question words' keys kept quiet (quiet_words > 0: 9 of 10 verified at 10 facts, not 4) "
                     "this paraphrase lost Lyon")
