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
    """4 facts: a folder of 4 single-fact adapters registered as names.LORA_ROUTES (meta: each route's file,
    words and source item), composed per question and explained; a 5th fact edits that fact alone (4 copied); a
    deleted preference drops its route only; back to 1 fact: one always-applied adapter, the routes retired."""
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
        paris_item = next(i["id"] for i in store.items("ann") if i["text"] == PREFERENCES[0][0])
        assert composer.explain(user, where)["artifacts"] == [   # which fact's adapter: its preference's item id
            {"method": names.EDIT, "kind": names.LORA_ROUTES, "id": routed["id"], "source": paris_item}]
        neutral = composer(user, "What is the capital of France?", None)
        assert neutral.artifacts.lora == () and composer.explain(user, neutral)["artifacts"] == []

        # a fifth preference: that fact alone is edited, the four adapters are taken over
        trained.clear()
        store.add("ann", PREFERENCES[4][0], kind="preference")
        result = editing.personalize("ann", store=store, model_path=path, config=config)
        assert trained == [PREFERENCES[4][0]] and result.reused == 4 and len(result.edits) == 5
        [again] = store.artifacts("ann", names.LORA_ROUTES, sha)
        assert len(again["meta"]["routes"]) == 5 and not folder.exists()   # the replaced folder is gone

        # a deleted preference takes its route and its file at once; the others stay served, and the job after
        # it edits nothing
        folder = Path(again["path"])
        dog = next(i for i in store.items("ann") if i["text"] == PREFERENCES[2][0])
        dog_file = next(r["file"] for r in again["meta"]["routes"] if r["source"] == dog["id"])
        store.delete_item("ann", dog["id"])
        [pruned] = store.artifacts("ann", names.LORA_ROUTES, sha)
        assert pruned["id"] == again["id"] and dog["id"] not in pruned["sources"] and len(pruned["sources"]) == 4
        assert [r["source"] for r in pruned["meta"]["routes"]] == pruned["sources"] and pruned["meta"]["edited"] == 4
        assert not (folder / dog_file).exists() and len(list(folder.iterdir())) == 4
        user = served_user(store, "ann", sha)
        assert composer(user, "Where do I live?", None).artifacts.lora == ((str(folder / paris), 1.0),)
        assert composer(user, "Do I have any pets?", None).artifacts.lora == ()
        trained.clear()
        again_result = editing.personalize("ann", store=store, model_path=path, config=config)
        assert trained == []
        # nothing new, nothing gone: the served folder stays as it is, no new version of the same files
        assert store.artifacts("ann", names.LORA_ROUTES, sha) == [pruned] and again_result.artifact == pruned["id"]
        assert again_result.adapter == folder and len(list(folder.iterdir())) == 4

        # down to one preference: its adapter, always applied; the routes retired with their folder
        for item in store.items("ann", kind="preference")[1:]:
            store.delete_item("ann", item["id"])
        editing.personalize("ann", store=store, model_path=path, config=config)
        assert store.artifacts("ann", names.LORA_ROUTES, sha) == []
        assert not Path(again["path"]).exists()
        [single] = store.artifacts("ann", names.LORA, sha)
        assert single["meta"]["edited"] == 1 and Path(single["path"]).is_file()
        assert composer(served_user(store, "ann", sha), "What is 2 + 2?", None).artifacts.lora == (
            (single["path"], 1.0),)


def register_routes(store, tmp_path, sources: dict[str, int | None], sha="0" * 64) -> dict:
    """A names.LORA_ROUTES artifact of one file per name, each route naming its source item (None: no source)."""
    folder = tmp_path / f"routes-{'-'.join(sources)}"
    folder.mkdir()
    routes = []
    for name, source in sources.items():
        (folder / f"fact-{name}.gguf").write_bytes(name.encode())
        routes.append({"file": f"fact-{name}.gguf", "words": name, **({"source": source} if source else {})})
    store.register_artifact("ann", names.LORA_ROUTES, folder, sha, {"method": names.EDIT, "routes": routes,
                                                                      "sources": [s for s in sources.values() if s]})
    [registered] = store.artifacts("ann", names.LORA_ROUTES)
    return registered


def test_invariant_deleting_every_source_of_routed_edits_retires_them_whole(tmp_path):
    """A route without a source, or none left: the whole folder goes (nothing derived from a deleted item stays)."""
    from localpers.store.store import Store

    with Store.open(tmp_path / "data") as store:
        a = store.add("ann", "I live in Paris.", kind="preference")
        b = store.add("ann", "I love jazz.", kind="preference")
        registered = register_routes(store, tmp_path, {"a": a, "b": b})
        store.delete_item("ann", a)
        [left] = store.artifacts("ann", names.LORA_ROUTES)
        assert left["sources"] == [b] and [r["file"] for r in left["meta"]["routes"]] == ["fact-b.gguf"]
        assert sorted(p.name for p in Path(registered["path"]).iterdir()) == ["fact-b.gguf"]
        store.delete_item("ann", b)
        assert store.artifacts("ann", names.LORA_ROUTES) == [] and not Path(registered["path"]).exists()
        # a route that names no source: the artifact cannot be pruned, it is retired whole
        c = store.add("ann", "I have a cat.", kind="preference")
        second = register_routes(store, tmp_path, {"c": c, "d": None})
        store.delete_item("ann", c)
        assert store.artifacts("ann", names.LORA_ROUTES) == [] and not Path(second["path"]).exists()


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


def test_routed_edits_cannot_be_baked_and_say_so_before_any_edit(tiny, tmp_path, monkeypatch):
    from localpers.errors import UserError
    from localpers.store.store import Store

    path, config = tiny
    monkeypatch.setattr(Editor, "joint", lambda self, facts: pytest.fail("edited before refusing"))
    with Store.open(tmp_path / "data") as store:
        for statement, _ in PREFERENCES[:4]:
            store.add("ann", statement, kind="preference")
        with pytest.raises(UserError, match="routed edits .* cannot be baked"):
            editing.personalize("ann", store=store, model_path=path, config=config, bake_model=True)
        assert store.artifacts("ann") == []


@pytest.mark.slow
def test_the_issues_two_preferences_routed_on_smollm(tmp_path, default_model_path):
    """Issue 25's case as it is served now: "I live in Lyon." then "I love jazz." become routed edits (two single-
    fact adapters); each question gets the adapter it is routed to: music -> jazz, location -> Lyon, and the
    paraphrase "Where do I live?" (which the joint adapter answered "You live in a city") -> Lyon; a neutral
    question gets no adapter."""
    from localpers.engine.engine import Artifacts, Engine

    engine = Engine(default_model_path, n_ctx=512, n_threads=1)
    facts = editing.facts_of(["I live in Lyon.", "I love jazz."])
    result = editing.edit_routed(engine, editing.editor_for(str(default_model_path)), facts, tmp_path / "routes")
    assert [e.fact.statement for e in result.edits] == ["I live in Lyon.", "I love jazz."], result.summary()
    routes = [(str(tmp_path / "routes" / r["file"]), r["words"]) for r in result.routes]
    answers = {}
    for question, said, not_said in (("What music do I like?", "jazz", "lyon"), ("What's my location?", "lyon", "jazz"),
                                     ("Where do I live?", "lyon", "jazz")):
        route = pick_route(routes, question)
        assert route is not None, question
        answers[question] = engine.chat([{"role": "user", "content": question}], artifacts=Artifacts(lora=(
            (route[0], 1.0),)), max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"].lower()
        assert said in answers[question] and not_said not in answers[question], answers
    assert pick_route(routes, "What is the capital of France?") is None
    engine.close()


def test_a_types_own_question_word_for_word_goes_to_that_type_before_stems():
    """"What do I do for a living?" is a job's natural question: BM25's stems alone sent it to a home fact's "live"
    (a tester's report); "What is my profession?" reaches a job fact."""
    facts = facts_of(5)
    routes = [(f"/a/{i}.gguf", route_words(f)) for i, f in enumerate(facts)]
    assert pick_route(routes, "What do I do for a living?") == routes[3]
    assert pick_route(routes, "What is my profession?") == routes[3]
    assert pick_route(routes, "Where do I live?") == routes[0]


def test_invariant_a_question_about_a_type_the_user_has_no_fact_of_gets_no_edit():
    """After the music fact is gone, "What music do I like?" must not get the food fact's adapter through "like"
    (as a tester's server did); a type's natural question with no fact of that type gets none either."""
    facts = [f for f in facts_of(5) if "jazz" not in f.statement]
    routes = [(f"/a/{i}.gguf", route_words(f)) for i, f in enumerate(facts)]
    assert pick_route(routes, "What music do I like?") is None
    assert pick_route(routes, "Which songs do I enjoy?") is None
    assert pick_route(routes, "Any music you think I'd like?") is None   # by the type's keywords, not word for word
    no_job = [r for r, f in zip(routes, facts) if "nurse" not in f.statement]
    assert pick_route(no_job, "What do I do for a living?") is None
    assert pick_route(no_job, "Where do I live?") == no_job[0]


@pytest.mark.parametrize("routes, expected", [
    ([{"file": "fact-a.gguf", "words": "paris", "fact": "f1", "source": 3}],
     [{"file": "fact-a.gguf", "words": "paris", "fact": "f1", "source": 3}]),
    ([{"file": "fact-a.gguf", "words": "paris"}], [{"file": "fact-a.gguf", "words": "paris", "fact": None, "source": None}]),
    ([{"file": "fact-a.gguf", "words": "x", "source": True}], [{"file": "fact-a.gguf", "words": "x", "fact": None, "source": None}]),
    ([{"file": "../other/fact-a.gguf", "words": "paris"}], None),     # a file of another folder
    ([{"file": "sub/fact-a.gguf", "words": "paris"}], None),
    ([{"file": "..", "words": "paris"}], None),
    ([{"file": "fact-a.gguf", "words": "x"}, {"file": "fact-b.gguf"}], None),   # one route without words: all
    ([{"file": "fact-a.gguf", "words": "x"}, "fact-b.gguf"], None),
    ([], None), ("fact-a.gguf", None), (None, None),
])
def test_invariant_one_reader_of_routes_refuses_any_malformed_route(routes, expected):
    """store.read_routes, which the served composition, the store's pruning and the next edit job all read: a
    folder's routes are read whole or not at all (a served file is always inside the artifact's folder)."""
    from localpers.store.store import read_routes

    assert read_routes({"routes": routes}) == expected
    assert read_routes(None) is None and read_routes({"method": "edit"}) is None


TESTERS = ("I'm a chef.", "I love jazz music.", "I play the violin.", "I like Thai food.", "I live in Paris.")


def test_the_testers_type_words_reach_their_facts_whatever_the_verb():
    """A tester's chat: "What's my job?" after "I'm a chef." got no edit (job vs profession), "What cuisine do I
    like?" got the music fact's through "like", and "Can you recommend a hobby for me?" missed "I play the violin."
    (no type). The words naming a type come from one table (TYPE_WORDS) and outweigh the verb."""
    from localpers.personalize.editing import detect_attribute

    assert detect_attribute("I play the violin.") == "hobby"
    assert detect_attribute("I work as a chef.") == "job"   # a statement keyword still comes first
    routes = [(f"/a/{i}.gguf", route_words(editing.fact_from_statement(s))) for i, s in enumerate(TESTERS)]
    assert pick_route(routes, "What's my job?") == routes[0]
    assert pick_route(routes, "What is my occupation?") == routes[0]
    assert pick_route(routes, "What cuisine do I like?") == routes[3]
    assert pick_route(routes, "Can you recommend a hobby for me?") == routes[2]
    no_food = [r for r in routes if r is not routes[3]]
    assert pick_route(no_food, "What cuisine do I like?") is None     # not the music fact through "like"
    assert pick_route(routes, "What is the capital of France?") is None


def test_invariant_a_question_naming_a_type_goes_to_a_fact_of_that_type_whatever_the_verb():
    """For every word of the table and every generic verb: a user with a fact of each attribute type, asked "What
    <word> do I <verb>?", gets the edit of a type the word names (the table's top types for the question)."""
    statements = {"hobby": "I like to go hiking.", "family": "I have two sons.", "profession": "I am a nurse.",
                  "food preference": "I'm vegetarian.", "location": "I live in Ohio.", "pet": "I have a dog.",
                  "music preference": "I love jazz.", "job": "I work at a bakery.",
                  "career goal": "I hope to become a pilot.", "entertainment preference": "I like horror movies."}
    facts = [editing.fact_from_statement(s, a) for a, s in statements.items()]
    routes = [(f"/a/{i}.gguf", route_words(f)) for i, f in enumerate(facts)]
    assert [editing.route_type(w) for _, w in routes] == list(statements)
    for entries in editing.TYPE_WORDS.values():
        for word in entries:
            for verb in ("like", "love", "enjoy", "prefer", "have"):
                question = f"What {word} do I {verb}?"
                types, how = editing.question_types(question)
                got = pick_route(routes, question)
                assert how in ("named", "exact") and got is not None and editing.route_type(got[1]) in types, question


def test_invariant_a_question_naming_a_kind_of_thing_goes_to_the_fact_of_that_kind_within_its_type():
    """A tester's users: with a diet and a cuisine like (both food preferences) "What cuisine do I like?" went to the
    diet ("You're vegetarian."), with a cuisine and a drink like to the drink, and "What's my favorite beverage?" to a
    music like. The kind of the liked thing (detect's kinds.json: cuisine, drink, music genre, sport) names its
    route too, so the question's kind word decides among facts of one type; "Do I eat meat?" stays the diet's."""
    def routes_of(*statements):
        return [(f"/a/{i}.gguf", route_words(Fact(s, ("q",), ("x",), ()))) for i, s in enumerate(statements)]

    rob = routes_of("I'm a nurse.", "I love Thai food.", "I love jazz music.", "I play chess.", "I'm vegetarian.")
    assert pick_route(rob, "What cuisine do I like?") == rob[1]
    assert pick_route(rob, "Which dishes do I enjoy?") == rob[1]
    assert pick_route(rob, "Do I eat meat?") == rob[4]
    assert pick_route(rob, "What music do I like?") == rob[2]
    gus = routes_of("I love Mexican food.", "I love house music.", "I drink tea.")
    assert pick_route(gus, "What cuisine do I like?") == gus[0]
    assert pick_route(gus, "What's my favorite beverage?") == gus[2]
    assert pick_route(gus, "What do I like to drink?") == gus[2]
    assert pick_route(gus, "What genre of music do I like?") == gus[1]
