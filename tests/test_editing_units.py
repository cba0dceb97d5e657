"""Personalization editing's small parts, fast and without llama.cpp: the worker's edit job and what it reports,
the by-hand run's wait for a server's job, the editor's cached float32 model, the result's summary, the
preference-to-fact step, the adapter's factors and the shared-prefix length. The mutation shard of
personalize/editing.py runs these next to test_editing.py's tiny-model cases."""
from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from localpers import names
from localpers.errors import UserError
from localpers.personalize import editing
from localpers.personalize.editing import Edit, Result, common_prefix, lora_factors, preference_facts
from localpers.personalize.methods import Fact
from tests.helpers_models import random_model_path

FACT = Fact("I live in Paris.", ("Where do I live?", "What city is my home?"), ("Paris",))
OTHER = Fact("My dog is called Rex.", ("What's my dog's name?",), ("Rex",))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return random_model_path(tmp_path_factory, "llama")


def edit(fact, layer=1, key=(1.0, 2.0, 3.0), value=(4.0, 5.0)):
    return Edit(layer, np.array(key, np.float32), np.array(value, np.float32), fact, 2.5, 0.25, 1.04)


def test_invariant_the_edit_job_runs_personalize_for_its_job_and_reports_counts_and_the_artifact(monkeypatch):
    calls = []

    def personalize(user, **kwargs):
        calls.append((user, kwargs))
        return Result([edit(FACT), edit(OTHER)], failed=[(FACT, "no idea")], artifact=7, retired=3, reused=1)

    monkeypatch.setattr(editing, "personalize", personalize)
    store, engine = object(), object()
    assert editing.edit_job(store, "ann", engine, 42) == {"artifact": 7, "edited": 2, "failed": 1, "retired": 3,
                                                          "reused": 1}
    [(user, kwargs)] = calls
    assert user == "ann" and kwargs == {"engine": engine, "store": store, "job": 42}
    monkeypatch.setattr(editing, "personalize", lambda user, **kw: Result([]))
    assert editing.edit_job(store, "ann", engine, 43) == {"artifact": None, "edited": 0, "failed": 0, "retired": 0,
                                                          "reused": 0}


def test_result_summary_names_each_edit_failure_and_skip():
    result = Result([edit(FACT)], failed=[(OTHER, "I have no dog.")], skipped=[("jazz", "not a statement")])
    assert result.summary() == {
        "edited": [{"statement": FACT.statement, "layer": 1, "nll_before": 2.5, "nll_after": 0.25, "seconds": 1.0}],
        "failed": [{"statement": OTHER.statement, "question": "What's my dog's name?", "answer": "I have no dog."}],
        "skipped": [{"statement": "jazz", "reason": "not a statement"}]}
    assert Result([]).summary() == {"edited": [], "failed": [], "skipped": []}


def test_invariant_a_by_hand_run_waits_for_a_servers_job_and_says_so_only_then(tmp_path, tiny_path, caplog):
    """personalize by hand takes the data folder's job lock; it warns that it waits only while another holder
    (a server's running job) has it."""
    from localpers.store.store import Store

    engine = SimpleNamespace(model_path=str(tiny_path))
    with Store.open(tmp_path) as store:
        store.add("ann", "hello there", kind="message")  # a user without preferences: nothing to edit
        with caplog.at_level(logging.WARNING, logger=editing.__name__):
            with pytest.raises(UserError, match="no preferences"):
                editing.personalize("ann", store=store, engine=engine)
        assert "waiting" not in caplog.text
        held, release, errors = threading.Event(), threading.Event(), []

        def server_job():
            with Store.open(tmp_path) as other, other.job_lock():
                held.set()
                release.wait(10)

        def by_hand():
            try:
                editing.personalize("ann", store=store, engine=engine)
            except UserError as e:
                errors.append(str(e))

        server = threading.Thread(target=server_job)
        server.start()
        assert held.wait(10)
        with caplog.at_level(logging.WARNING, logger=editing.__name__):
            hand = threading.Thread(target=by_hand)
            hand.start()
            hand.join(1.0)
            assert hand.is_alive()  # waiting for the lock
            release.set()
            hand.join(10)
            server.join(10)
        assert "waiting for the running job of a server" in caplog.text
        assert errors and "no preferences" in errors[0]


def test_invariant_the_editors_model_is_cached_once_and_read_back(tmp_path, tiny_path, monkeypatch):
    from localpers.model.model import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = editing.editor_model(tiny_path)
    [cached] = (tmp_path / "localpers" / "models").glob("*-float32.pt")
    assert not list(cached.parent.glob("*.part"))
    state = torch.load(cached, weights_only=True)
    fresh = load_model(tiny_path)
    assert state.keys() == fresh.state_dict().keys() or set(state) <= set(fresh.state_dict())
    for name, tensor in fresh.state_dict().items():
        if name in state:
            assert torch.equal(state[name], tensor), name
    for (name, a), (_, b) in zip(first.state_dict().items(), editing.editor_model(tiny_path).state_dict().items()):
        assert torch.equal(a, b), name
    # an unreadable copy is only a slower load: the GGUF again, and the copy written anew
    cached.write_bytes(b"not a torch file")
    again = editing.editor_model(tiny_path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))
    assert torch.load(cached, weights_only=True).keys() == state.keys()


class _RunsWhenUnpickled:
    """A pickle that calls _ran(path) when loaded with full unpickling (torch.load(weights_only=False))."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return _ran, (self.path,)


def _ran(path):
    with open(path, "w") as f:
        f.write("code in the cache file ran")
    return {}


def test_invariant_the_editors_cached_model_is_read_as_weights_only_never_running_code_in_it(
        tmp_path, tiny_path, monkeypatch, caplog):
    """The cache folder is only as trusted as any file on disk: a cached model that carries code (a pickle of
    anything but tensors) is refused unread, as an unusable copy (the GGUF is loaded and the copy rewritten),
    also where the environment turns torch's weights-only default off."""
    from localpers.model.model import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # turns off torch's default, not an explicit True
    editing.editor_model(tiny_path)
    [cached] = (tmp_path / "localpers" / "models").glob("*-float32.pt")
    marker = tmp_path / "ran.txt"
    torch.save(_RunsWhenUnpickled(marker), cached)
    with caplog.at_level(logging.WARNING, logger=editing.__name__):
        model = editing.editor_model(tiny_path)
    assert not marker.exists()
    assert "unusable" in caplog.text
    fresh = load_model(tiny_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert set(torch.load(cached, weights_only=True)) <= set(fresh.state_dict())


def test_invariant_an_unwritable_cache_folder_only_costs_the_copy(tmp_path, tiny_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "localpers").mkdir()
    (tmp_path / "localpers" / "models").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger=editing.__name__):
        model = editing.editor_model(tiny_path)
    assert model.config.arch == "llama" and "was not cached" in caplog.text


def test_preference_facts_skip_unusable_and_replaced_preferences_with_their_reason():
    items = [{"text": "jazz", "meta": {}}, {"text": "My favorite music is jazz.", "meta": {}},
             {"text": "I live in Paris.", "meta": {}}, {"text": "My favorite music is heavy metal.", "meta": {}}]
    facts, skipped = preference_facts(items)
    assert [f.statement for f in facts] == ["I live in Paris.", "My favorite music is heavy metal."]
    assert skipped[0][0] == "jazz" and "not a statement" in skipped[0][1]
    assert skipped[1] == ("My favorite music is jazz.",
                          "replaced by the later preference 'My favorite music is heavy metal.'")
    assert preference_facts([]) == ([], [])
    assert preference_facts([{"text": "", "meta": None}])[0] == []


def test_lora_factors_stack_keys_as_rows_and_values_as_columns_per_layer():
    a, b, c = edit(FACT, layer=2), edit(OTHER, layer=2, key=(0.0, 1.0, 0.0), value=(1.0, 1.0)), edit(FACT, layer=0)
    factors = lora_factors([a, b, c])
    assert list(factors) == ["blk.0.ffn_down", "blk.2.ffn_down"]
    A, B = factors["blk.2.ffn_down"]
    assert A.shape == (2, 3) and B.shape == (2, 2)
    assert np.array_equal(A, np.stack([a.key, b.key])) and np.array_equal(B, np.stack([a.value, b.value], axis=1))
    torch.testing.assert_close(torch.from_numpy(B @ A),
                               torch.outer(torch.from_numpy(a.value), torch.from_numpy(a.key))
                               + torch.outer(torch.from_numpy(b.value), torch.from_numpy(b.key)))


def test_common_prefix_is_the_longest_shared_start():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 3
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[1, 2, 3, 4], [1, 9, 3, 4]]) == 1


def test_chat_context_wraps_around_the_neutral_chats():
    n = len(editing.NEUTRAL_CHATS)
    turns = editing.chat_context(3, start=n - 1)
    assert [m["role"] for m in turns] == ["user", "assistant"] * 3
    assert (turns[0]["content"], turns[1]["content"]) == editing.NEUTRAL_CHATS[-1]
    assert (turns[2]["content"], turns[3]["content"]) == editing.NEUTRAL_CHATS[0]
    assert editing.chat_context(0) == []


def test_invariant_a_template_fact_asks_with_its_attributes_synonyms_then_natural_then_canonical_questions():
    fact = editing.fact_from_statement("My favorite music is jazz.")
    synonyms, _ = editing.ATTRIBUTES["music preference"]
    templated = tuple(t.format(s) for s in synonyms for t in editing.QUESTION_TEMPLATES)[:8]
    assert fact.attributes == ("music preference",)
    assert fact.questions == templated + editing.NATURAL_QUESTIONS["music preference"] + (
        "What's my music preference?",)
    assert fact.targets == ("Your favorite music is jazz.",)
    # the caller's attribute wins over the keywords; no attribute: the generic cluster
    assert editing.fact_from_statement("My favorite music is jazz.", "hobby").questions[0] == "What's my hobby?"
    plain = editing.fact_from_statement("I avoid strong fragrances.")
    assert plain.questions == editing.GENERIC_QUESTIONS and plain.attributes == ()


def test_invariant_a_given_fact_of_a_known_attribute_gets_that_attributes_questions_before_its_own():
    few = Fact("I grow tomatoes on the balcony.", ("What's my hobby?",), ("tomatoes",), ("hobby",))
    grown = editing.with_template_questions(few)
    assert grown.questions[-1] == "What's my hobby?"  # the canonical question stays last
    expected = [q for q in editing.fact_from_statement(few.statement, "hobby").questions if q != "What's my hobby?"]
    assert list(grown.questions[:-1]) == expected
    many = replace_questions(few, ("Q1?", "Q2?", "Q3?"))
    assert editing.with_template_questions(many).questions == editing.NATURAL_QUESTIONS["hobby"] + ("Q1?", "Q2?", "Q3?")
    unknown = Fact("I grow tomatoes.", ("Q?",), ("tomatoes",), ("gardening",))
    assert editing.with_template_questions(unknown) == unknown


def replace_questions(fact, questions):
    from dataclasses import replace

    return replace(fact, questions=questions)


def test_edit_methods_pass_their_config_and_serve_registered_users_only_their_edits(monkeypatch):
    from localpers.personalize.methods import Personalized, RegisteredArtifact, User

    seen, engine = [], object()
    monkeypatch.setattr(editing, "user_adapter",
                        lambda user, engine, config=None: seen.append((engine, config)) or "/c/a.gguf")
    user = User("v", preferences=("I live in Paris.",))
    assert editing.edit_method(user, "q", engine).artifacts.lora == (("/c/a.gguf", 1.0),)
    assert editing.edit_1turn(user, "q", engine).artifacts.lora == (("/c/a.gguf", 1.0),)
    assert editing.edit_stacked(user, "q", engine).artifacts.lora == (("/c/a.gguf", 1.0),)
    assert editing.edit_allq(user, "q", engine).artifacts.lora == (("/c/a.gguf", 1.0),)
    assert editing.edit_joint(user, "q", engine).artifacts.lora == (("/c/a.gguf", 1.0),)
    assert seen == [(engine, None), (engine, editing.SINGLE_TURN), (engine, editing.STACKED),
                    (engine, editing.ALL_QUESTIONS), (engine, None)]
    assert editing.SINGLE_TURN.chat_turns == () and editing.STACKED.joint is False
    assert editing.ALL_QUESTIONS.train_questions == 0
    # an evaluation user with several facts: the routed adapter of the question; edit-joint: one joint adapter
    two = User("w", preferences=("I live in Paris.", "I love jazz music."))
    words = [editing.route_words(editing.fact_from_statement(s)) for s in two.preferences]
    monkeypatch.setattr(editing, "user_routes", lambda user, engine, config=None: (
        ("/r/paris.gguf", words[0]), ("/r/jazz.gguf", words[1])))
    assert editing.edit_method(two, "What music do I like?", engine).artifacts.lora == (("/r/jazz.gguf", 1.0),)
    assert editing.edit_method(two, "What is 2 + 2?", engine).artifacts.lora == ()
    assert editing.edit_joint(two, "What music do I like?", engine).artifacts.lora == (("/c/a.gguf", 1.0),)
    monkeypatch.setattr(editing, "user_adapter", lambda user, engine, config=None: None)
    assert editing.edit_method(user, "q", None) == Personalized()
    served = User("u", registered=(RegisteredArtifact(names.EDIT, names.LORA, "/a/edit.gguf"),
                                   RegisteredArtifact(names.PERCE, names.LORA, "/a/perce.gguf")))
    assert editing.edit_method(served, "q", None).artifacts.lora == (("/a/edit.gguf", 1.0),)
    for ablation in (editing.edit_1turn, editing.edit_stacked, editing.edit_allq, editing.edit_joint):
        with pytest.raises(UserError, match="evaluation ablation"):
            ablation(served, "q", None)


def test_invariant_preparing_without_a_cache_file_reads_none_and_warns_of_none(tiny_path, tmp_path, caplog):
    """prepare() reads its cache only when it is given one that exists; without, it computes C^-1 and the context
    prefixes, quietly; a given cache is written, then read back to the same C^-1."""
    config = editing.EditConfig(layer=1, steps=1, threads=1, chat_turns=(1,))
    with caplog.at_level(logging.WARNING, logger=editing.__name__):
        editor = editing.Editor(tiny_path, config).prepare()
    assert caplog.text == "" and editor._cov_inv is not None
    cache = tmp_path / "new" / "folders" / "editor.pt"   # any path: its folders are made
    editing.Editor(tiny_path, config, model=editor.model).prepare(cache)
    assert cache.is_file() and not list(cache.parent.glob("*.part"))
    again = editing.Editor(tiny_path, config, model=editor.model).prepare(cache)
    assert caplog.text == "" and torch.equal(again._cov_inv, editor._cov_inv)


def test_invariant_a_baked_model_keeps_every_metadata_field_with_its_type(tiny_path, tmp_path):
    from localpers.model.gguf_info import open_gguf

    config = editing.EditConfig(layer=1, steps=1, threads=1, chat_turns=())
    d_ff = editing.Editor(tiny_path, config).W.shape[1]
    n_embd = editing.Editor(tiny_path, config).W.shape[0]
    e = Edit(1, np.ones(d_ff, np.float32), np.full(n_embd, 1e-3, np.float32), FACT, 1.0, 0.5, 0.1)
    baked = editing.bake(tiny_path, tmp_path / "baked.gguf", [e])
    source, out = open_gguf(tiny_path), open_gguf(baked)
    fields = {k: f for k, f in source.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() <= out.fields.keys()
    for key, f in fields.items():
        assert out.fields[key].types == f.types, key
        assert out.fields[key].contents() == f.contents(), key


def test_invariant_the_fast_schedules_first_step_goes_its_fraction_of_the_clamp_radius(tiny_path):
    config = editing.EditConfig(layer=1, steps=1, lr=1.0, clamp=2.0, gradient_start=0.5, stop_nll=0.0, threads=1,
                                chat_turns=())
    editor = editing.Editor(tiny_path, config)
    radius = config.clamp * float((editor.W @ editor.keys(FACT).mean(0)).norm())
    e = editor.edit(FACT)  # one step: the gradient step alone
    assert float(np.linalg.norm(e.value)) == pytest.approx(config.gradient_start * radius, rel=1e-5)
    assert torch.equal(e.keys, editor.keys(FACT))   # the Edit keeps the fact's keys (a retrain reuses them)


def test_invariant_an_edit_with_the_kl_term_stays_finite_and_still_lowers_the_target_nll(tiny_path):
    config = editing.EditConfig(layer=1, steps=3, lr=1.0, clamp=1000.0, kl_weight=1.0, stop_nll=0.0, threads=1,
                                chat_turns=())
    e = editing.Editor(tiny_path, config).edit(FACT)
    assert np.isfinite(e.value).all() and np.abs(e.value).sum() > 0
    assert e.nll_after < e.nll_before


def test_invariant_continuations_after_the_context_prefix_or_from_scratch_when_a_prompt_does_not_start_with_it(
        tiny_path):
    editor = editing.Editor(tiny_path, editing.EditConfig(layer=1, threads=1, chat_turns=()))
    context = editor.context_prefix(())
    n = len(context.ids)
    ids, _ = editor.prompt("Where do I live?")
    assert n > 0 and tuple(ids[:n]) == context.ids
    prefix, rest = editor._continuations((), [ids + [7, 8], ids])
    assert prefix.ids == context.ids and prefix is context
    assert rest.tolist() == [ids[n:] + [7, 8], ids[n:] + [0, 0]]  # right-padded
    # a prompt the template renders otherwise (not starting with the prefix), or no longer than it: from scratch
    for odd in ([ids[1:], ids], [list(context.ids), ids]):
        prefix, rest = editor._continuations((), odd)
        assert prefix.ids == () and len(prefix.caches) == editor.model.config.n_layer
        assert rest.tolist() == [s + [0] * (max(map(len, odd)) - len(s)) for s in odd]


def test_invariant_the_editors_prepared_cache_is_read_as_weights_only_never_running_code_in_it(
        tiny_path, tmp_path, monkeypatch, caplog):
    """prepare()'s cache file (C^-1 and the context prefixes) is read weights-only, as the cached model is: one
    that carries code is refused unread and computed again, also with torch's weights-only default turned off."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    config = editing.EditConfig(layer=1, steps=1, threads=1, chat_turns=())
    cache, marker = tmp_path / "editor.pt", tmp_path / "ran.txt"
    torch.save({"cov_inv": _RunsWhenUnpickled(marker), "prefixes": {}}, cache)
    with caplog.at_level(logging.WARNING, logger=editing.__name__):
        editor = editing.Editor(tiny_path, config).prepare(cache)
    assert not marker.exists() and "unusable" in caplog.text
    assert editor._cov_inv is not None and torch.equal(torch.load(cache, weights_only=True)["cov_inv"], editor._cov_inv)


def test_invariant_a_stored_preference_with_only_an_attribute_type_gets_that_types_questions():
    """A stored preference whose meta names its attribute type but no question or target is templated for that
    type (a cluster of types: its canonical, last, one), not for the type its keywords suggest."""
    statement = "I spend Saturdays at the climbing gym."
    for meta, attribute in (({"attribute_type": "hobby"}, "hobby"),
                            ({"attribute_type": ["pastime", "weekend plans", "entertainment preference"]},
                             "entertainment preference")):
        fact = editing.fact_from_item(statement, meta)
        assert fact == editing.fact_from_statement(statement, attribute)
        assert fact.attributes == (attribute,) and fact.questions[-1] == f"What's my {attribute}?"


def test_invariant_reused_values_are_the_current_adapters_columns_of_the_facts_still_wanted(tiny_path, tmp_path):
    """reuse_values gives the editor, for each fact still to edit, the column the current edit adapter holds for
    it (meta "values": each column's fact id); ids of facts no longer wanted, ids past the adapter's columns and an
    adapter of another width reuse nothing (never an error: only a slower job)."""
    editor = editing.Editor(tiny_path, editing.EditConfig(layer=1, threads=1, chat_turns=()))
    d, d_ff = editor.W.shape
    gone = Fact("I live in Rome.", ("Where do I live?",), ("Rome",))
    values = [np.full(d, v, np.float32) for v in (1.0, 2.0, 3.0)]
    edits = [Edit(1, np.ones(d_ff, np.float32), v, f, 1.0, 0.5, 0.1) for v, f in zip(values, (FACT, gone, OTHER))]
    adapter = editing.write_adapter(tmp_path / "edit.gguf", edits[:2], "llama")   # OTHER's column is not in it

    def store(ids, path=adapter, method=names.EDIT):
        artifact = {"method": method, "meta": {"values": ids}, "path": str(path)}
        return SimpleNamespace(artifacts=lambda user, kind, sha: [artifact])

    ids = [editor.fact_id(f) for f in (FACT, gone, OTHER)]
    assert editing.reuse_values(store(ids), "ann", "sha", editor, [OTHER, FACT]) == 1
    assert set(editor._values) == {editor.fact_id(FACT)}
    assert np.array_equal(editor._values[editor.fact_id(FACT)], values[0])
    # a column of a fact that is not wanted is not read; nothing wanted, another method or width: nothing reused
    editor._values.clear()
    assert editing.reuse_values(store(ids[1:2] + ids[:1]), "ann", "sha", editor, [FACT]) == 1
    assert np.array_equal(editor._values[editor.fact_id(FACT)], values[1])
    editor._values.clear()
    assert editing.reuse_values(store(ids), "ann", "sha", editor, [OTHER]) == 0
    assert editing.reuse_values(store(ids, method=names.PERCE), "ann", "sha", editor, [FACT]) == 0
    narrow = [Edit(1, np.ones(d_ff, np.float32), np.ones(d - 1, np.float32), FACT, 1.0, 0.5, 0.1)]
    other_width = editing.write_adapter(tmp_path / "narrow.gguf", narrow, "llama")
    assert editing.reuse_values(store(ids, path=other_width), "ann", "sha", editor, [FACT]) == 0
    assert editor._values == {}


def test_invariant_the_kl_term_keeps_the_neutral_chats_answers_closer_to_the_unedited_model(tiny_path):
    """With kl_weight the value is trained against the edited model's drift on the neutral chats: the same edit
    with a heavy KL term changes their answers' distributions less than without it."""
    def drift(kl_weight):
        config = editing.EditConfig(layer=1, steps=4, lr=1.0, clamp=1000.0, kl_weight=kl_weight, stop_nll=0.0,
                                    threads=1, chat_turns=())
        editor = editing.Editor(tiny_path, config)
        e = editor.edit(FACT)
        editor.reset()
        batch, base = editor.neutral()
        edited = editor.logprobs(batch, torch.from_numpy(e.key), torch.from_numpy(e.value))
        return float(torch.nn.functional.kl_div(edited, base, log_target=True, reduction="batchmean"))

    free, held = drift(0.0), drift(50.0)
    assert 0 <= held < 0.5 * free


def test_invariant_the_context_prefix_of_a_history_holds_all_of_it(tiny_path):
    """A history's context prefix (computed once, shared by every prompt after it) runs up to the question's
    text: after it a prompt holds only its question turn, as much as after the bare template's prefix."""
    editor = editing.Editor(tiny_path, editing.EditConfig(layer=1, threads=1, chat_turns=()))
    bare = len(editor.context_prefix(()).ids)
    for history in (editing.chat_context(1), editing.chat_context(3, start=2)):
        prefix = editor.context_prefix(history)
        for question in ("Where do I live?", "What's my dog's name?"):
            ids, pos = editor.prompt(question, history)
            alone, alone_pos = editor.prompt(question)
            assert tuple(ids[:len(prefix.ids)]) == prefix.ids
            assert len(ids) - len(prefix.ids) == len(alone) - bare and pos - len(prefix.ids) == alone_pos - bare


class StreamingEngine:
    """Engine.chat as llama.cpp streams it: `pieces` one decoding step each; a set `cancel` stops it within a step
    (raising engine.Cancelled), as Engine._decode's stopping criterion does."""

    def __init__(self, pieces):
        self.pieces, self.decoded, self.calls = pieces, 0, []

    def chat(self, messages, *, artifacts, max_tokens, temperature, cancel=None, on_delta=None):
        from localpers.engine.engine import Cancelled

        self.calls.append((messages, artifacts, max_tokens, temperature))
        for piece in self.pieces:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            self.decoded += 1
            if on_delta:
                on_delta(0, piece)
        return {"choices": [{"message": {"content": "".join(self.pieces)}}]}


def test_invariant_the_llama_cpp_check_stops_decoding_once_the_answer_states_the_target(tmp_path):
    engine = StreamingEngine(["You", " live", " in", " Paris", ",", " France", ".", " It", " is", " a", " city"])
    ok, answer = editing.states_target(engine, tmp_path / "a.gguf", FACT)
    assert ok and answer.startswith("You live in Paris")
    assert engine.decoded < len(engine.pieces)   # stopped early
    [(messages, artifacts, max_tokens, temperature)] = engine.calls
    assert messages == [{"role": "user", "content": FACT.questions[-1]}]
    assert artifacts.lora == ((str(tmp_path / "a.gguf"), 1.0),)
    assert (max_tokens, temperature) == (editing.CHECK_MAX_TOKENS, 0.0)


@pytest.mark.parametrize("pieces", [
    ["You", " like", " Paris", "ian", " food", "."],       # a word that starts with the target is not the target
    ["You", " live", " in", " Par", "ma", "."],
    ["I", " don't", " know", "."],
])
def test_invariant_the_early_stop_gives_the_full_answers_verdict(tmp_path, pieces):
    engine = StreamingEngine(pieces)
    ok, answer = editing.states_target(engine, tmp_path / "a.gguf", FACT)
    assert ok == editing.states("".join(pieces), FACT.targets) == False  # noqa: E712
    assert answer == "".join(pieces) and engine.decoded == len(pieces)


def test_invariant_a_target_in_the_last_piece_is_judged_on_the_whole_answer(tmp_path):
    engine = StreamingEngine(["You", " live", " in", " Paris"])   # no whitespace after it: the end decides
    assert editing.states_target(engine, tmp_path / "a.gguf", FACT) == (True, "You live in Paris")
