"""Routed edits (issue 25, many preferences): a user with names.EDIT_ROUTE_FROM facts or more gets one single-fact
LoRA adapter per fact, and a request applies only the one its question is routed to. On a random tiny llama with
llama.cpp's check stood in for (the embedded model's figures: BENCHMARKS.md §4)."""
from pathlib import Path

import pytest

from localpers import names
from localpers.personalize import editing
from localpers.personalize.editing import EditConfig, Editor, pick_route, route_words
from localpers.personalize.methods import Fact, RegisteredArtifact, User
from tests.helpers_models import random_model_path

PREFERENCES = [("I live in Paris.", "Paris"), ("I love jazz music.", "jazz"), ("I have a dog named Rex.", "Rex"),
               ("I work as a nurse.", "nurse"), ("I'm vegetarian.", "vegetarian")]


def facts_of(n):
    return [editing.fact_from_statement(s) for s, _ in PREFERENCES[:n]]


def test_invariant_a_question_is_routed_to_the_adapter_of_the_fact_it_asks_about():
    facts = facts_of(5)
    routes = [(f"/a/{i}.gguf", route_words(f)) for i, f in enumerate(facts)]
    assert pick_route(routes, "Where do I live?") == routes[0]
    assert pick_route(routes, "What music do I like?") == routes[1]
    assert pick_route(routes, "Do I have any pets?") == routes[2]
    assert pick_route(routes, "Where do I work?") == routes[3]
    assert pick_route(routes, "What should I cook tonight?") == routes[4]   # implicit: through the type's words
    # a neutral question, an empty one, no routes: no edit at all
    for query in ("What is the capital of France?", "Write a haiku about the sea.", "", "   "):
        assert pick_route(routes, query) is None, query
    assert pick_route([], "Where do I live?") is None
    # the statement's own words count: of two facts of one type, the one the question names
    two = [("/a/x.gguf", route_words(Fact("I love jazz.", ("q",), ("jazz",), ("music preference",)))),
           ("/a/y.gguf", route_words(Fact("I love techno.", ("q",), ("techno",), ("music preference",))))]
    assert pick_route(two, "Should I go to the jazz festival?") == two[0]
    assert pick_route(two, "Any techno clubs nearby?") == two[1]


def test_a_served_user_with_routed_edits_gets_the_routed_adapter_beside_the_others():
    routes = (("/r/fact-a.gguf", route_words(facts_of(1)[0])), ("/r/fact-b.gguf", route_words(facts_of(2)[1])))
    user = User("ann", registered=(RegisteredArtifact(names.EDIT, names.LORA_ROUTES, "/r", 3, routes),
                                   RegisteredArtifact(names.PERCE, names.LORA, "/p.gguf", 4)))
    assert editing.edit_method(user, "Where do I live?", None).artifacts.lora == (("/r/fact-a.gguf", 1.0),)
    assert editing.edit_method(user, "Which songs do I enjoy?", None).artifacts.lora == (("/r/fact-b.gguf", 1.0),)
    assert editing.edit_method(user, "What is 2 + 2?", None).artifacts.lora == ()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = random_model_path(tmp_path_factory, "llama")
    return path, EditConfig(layer=1, steps=3, lr=2.0, clamp=1000.0, gradient_start=0.0, threads=1, chat_turns=())


def test_personalize_routes_many_facts_reuses_their_adapters_and_goes_back_to_one_adapter(tiny, tmp_path, monkeypatch):
    """4 facts: a folder of 4 single-fact adapters registered as names.LORA_ROUTES (meta: each route's file and
    words, the facts' item ids), composed per question and explained; a 5th fact edits that fact alone (4 copied);
    back to 2 facts: one joint LoRA again, the routes retired with their files."""
    from localpers.engine.engine import model_sha256
    from localpers.serve.compose import Composer, served_user
    from localpers.store.store import Store

    path, config = tiny
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: (True, "ok"))
    monkeypatch.setattr(editing, "locality_kl", lambda engine, adapter: 0.0)   # a random model's KL means nothing
    trained = []
    real_joint = Editor.joint
    monkeypatch.setattr(Editor, "joint", lambda self, facts: trained.extend(f.statement for f in facts) or real_joint(self, facts))
    sha = model_sha256(path)
    with Store.open(tmp_path / "data") as store:
        for statement, _ in PREFERENCES[:4]:
            store.add("ann", statement, kind="preference")
        result = editing.personalize("ann", store=store, model_path=path, config=config)
        [routed] = store.artifacts("ann", names.LORA_ROUTES, sha)
        assert store.artifacts("ann", names.LORA, sha) == []
        folder = Path(routed["path"])
        assert len(result.edits) == 4 and sorted(trained) == sorted(s for s, _ in PREFERENCES[:4])
        assert sorted(p.name for p in folder.iterdir()) == sorted(r["file"] for r in routed["meta"]["routes"])
        assert len(routed["meta"]["routes"]) == 4 and len(routed["sources"]) == 4
        for route in routed["meta"]["routes"]:   # each file is a rank-one llama.cpp LoRA
            edit = editing.read_edit(folder / route["file"], 1, facts_of(1)[0])
            assert edit.key.ndim == 1 and edit.value.ndim == 1

        user = served_user(store, "ann", sha)
        composer = Composer("edit+rag")
        where = composer(user, "Where do I live?", None)
        paris = next(r["file"] for r in routed["meta"]["routes"] if "Paris" in r["words"])
        assert where.artifacts.lora == ((str(folder / paris), 1.0),)
        assert composer.explain(user, where)["artifacts"] == [
            {"method": names.EDIT, "kind": names.LORA_ROUTES, "id": routed["id"]}]
        neutral = composer(user, "What is the capital of France?", None)
        assert neutral.artifacts.lora == () and composer.explain(user, neutral)["artifacts"] == []

        # a fifth preference: that fact alone is edited, the four adapters are taken over
        trained.clear()
        store.add("ann", PREFERENCES[4][0], kind="preference")
        result = editing.personalize("ann", store=store, model_path=path, config=config)
        assert trained == [PREFERENCES[4][0]] and result.reused == 4 and len(result.edits) == 5
        [again] = store.artifacts("ann", names.LORA_ROUTES, sha)
        assert len(again["meta"]["routes"]) == 5 and not folder.exists()   # the replaced folder is gone

        # down to two preferences: one joint adapter, the routes retired
        for item in store.items("ann", kind="preference")[2:]:
            store.delete_item("ann", item["id"])   # the routes derived from it are retired at once
        assert store.artifacts("ann", names.LORA_ROUTES, sha) == [] and not Path(again["path"]).exists()
        editing.personalize("ann", store=store, model_path=path, config=config)
        assert store.artifacts("ann", names.LORA_ROUTES, sha) == []
        assert not Path(again["path"]).exists()
        [joint] = store.artifacts("ann", names.LORA, sha)
        assert joint["meta"]["edited"] == 2 and Path(joint["path"]).is_file()


def test_routed_edits_leave_out_failed_facts_and_remove_an_empty_folder(tiny, tmp_path, monkeypatch):
    from localpers.engine.engine import Engine

    path, config = tiny
    editor = Editor(path, config)
    passes = {PREFERENCES[0][0], PREFERENCES[2][0]}
    monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: (fact.statement in passes, "no"))
    with Engine(path, n_ctx=256) as engine:
        result = editing.edit_routed(engine, editor, facts_of(4), tmp_path / "routes")
        assert [e.fact.statement for e in result.edits] == [PREFERENCES[0][0], PREFERENCES[2][0]]
        assert [f.statement for f, _ in result.failed] == [PREFERENCES[1][0], PREFERENCES[3][0]]
        assert sorted(p.name for p in (tmp_path / "routes").iterdir()) == sorted(r["file"] for r in result.routes)
        monkeypatch.setattr(editing, "states_target", lambda engine, adapter, fact: (False, "no"))
        none = editing.edit_routed(engine, editor, facts_of(4), tmp_path / "none")
        assert none.adapter is None and none.edits == [] and not (tmp_path / "none").exists()
