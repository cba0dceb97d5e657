"""Evaluation harness without the model: readers, the world, metrics, methods, reports, CLI errors."""
import json
import math
from pathlib import Path

import pytest

from localpers.cli.cli import main
from localpers.personalize.datasets import data_path, read_inter_turns, read_lamp, read_prefeval_mcq, read_upqa
from localpers.errors import UserError
from localpers.eval.evaluation import Journal, breakdown, content_sha256, lamp_labels, locality_users, merge_reports, paired_deltas, rouge, target_match, write_report
from localpers.personalize.methods import METHODS, Personalized, User, apply, get_method, retrieve
from localpers.personalize.world import ATTRIBUTES, generate_world, history_bucket, write_world

DATA = Path(__file__).resolve().parent / "data"


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---------------------------------------------------------------- readers

def test_upqa_plain_and_cluster9_agree_on_the_canonical_fields():
    plain = read_upqa(data_path("upqa"))
    clustered = read_upqa(data_path("upqa_cluster9"))
    assert len(plain) == len(clustered) == 100
    for a, b in zip(plain, clustered):
        assert (a.target, a.question, a.attribute_type) == (b.target, b.question, b.attribute_type)
        assert a.targets == (a.target,) and len(b.targets) == 9 and b.targets[-1] == b.target
    assert plain[0].user.preferences == ("I like to dance at the club.",)
    assert len({i.attribute_type for i in plain}) == 10
    hobby = [i for i in plain if i.attribute_type == "hobby"]
    assert len(hobby[0].candidates) == 9 and hobby[0].target not in hobby[0].candidates
    assert set(hobby[0].candidates) == {i.target for i in hobby[1:]}


def test_prefeval_reader_keeps_the_following_option_first():
    items = read_prefeval_mcq(data_path("prefeval"))
    assert len(items) == 505 and all(len(i.options) == 4 for i in items)
    gluten = [i for i in items if "gluten" in i.preference and "Rome" in i.question]
    assert gluten and "gluten-free" in gluten[0].options[0]
    conversations = read_inter_turns(data_path("inter_turns"))
    assert len(conversations) == 24
    assert all(m["role"] == ("user", "assistant")[j % 2] for c in conversations for j, m in enumerate(c))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ({"a": 1}, "expected a JSON list"),
    ([{"input_attribute": "I like jazz.", "attribute_type": "music", "question": "What music?",
       "question_paraphrased": "Which genre?", "implicit_question": "Playlist?", "target": "Jazz"},
      {"input_attribute": "I like tea.", "attribute_type": "drink", "question": "",
       "question_paraphrased": "x", "implicit_question": "y", "target": "Tea"}], "item 1: field 'question'"),
    ([{"input_attribute": "I like jazz.", "attribute_type": ["music"], "question": ["What music?"],
       "question_paraphrased": "Which genre?", "implicit_question": "Playlist?", "target": ["Jazz", 3]}],
     "item 0: field 'target' must be a non-empty list of strings"),
])
def test_malformed_upqa_names_file_and_item(tmp_path, content, message):
    path = write(tmp_path, "upqa.json", content)
    with pytest.raises(UserError, match=message) as e:
        read_upqa(path)
    assert str(path) in str(e.value)


def test_malformed_prefeval_and_missing_files(tmp_path):
    bad = write(tmp_path, "topic.json", [{"preference": "I hate noise.", "question": "Hotels?",
                                          "classification_task_options": ["only one"]}])
    with pytest.raises(UserError, match="topic.json: item 0: .*at least 2 options"):
        read_prefeval_mcq(bad)
    with pytest.raises(UserError, match="no such file"):
        read_upqa(tmp_path / "missing.json")
    turns = write(tmp_path, "turns.json", [{"conversation": [{"role": "user", "content": 1}]}])
    with pytest.raises(UserError, match="turns.json: item 0"):
        read_inter_turns(turns)


def test_lamp_readers_on_hand_written_files(tmp_path):
    task, items = read_lamp(DATA / "lamp2_dev_questions.json")
    assert task == "LaMP_2" and [i.gold for i in items] == ["sci-fi", "romance", "comedy"]
    assert items[0].user.history[0].startswith("A crew travels") and items[2].user.history == ()
    assert lamp_labels(task, items) == ["comedy", "romance", "sci-fi"]
    task, items = read_lamp(DATA / "longlamp_review_questions.json")
    assert task == "LongLaMP_product_review" and lamp_labels(task, items) is None
    assert "Keeps going all day" in items[0].user.history[0]
    # Golds inline (no outputs file), and a question without a gold anywhere.
    inline = write(tmp_path, "dev_questions.json", [{"id": 1, "input": "Write.", "profile": [], "output": "Hi."}])
    assert read_lamp(inline)[1][0].gold == "Hi."
    missing = write(tmp_path, "x_questions.json", [{"id": 7, "input": "Write.", "profile": []}])
    with pytest.raises(UserError, match="item 0: no gold output for id '7'"):
        read_lamp(missing)


# ---------------------------------------------------------------- the world

def test_world_is_deterministic_and_has_the_promised_structure(tmp_path):
    world = generate_world(users=300, communities=4, steps=6, seed=3)
    assert world == generate_world(users=300, communities=4, steps=6, seed=3)
    assert world != generate_world(users=300, communities=4, steps=6, seed=4)
    sizes = [u["history_size"] for u in world["users"]]
    assert {history_bucket(s) for s in sizes} == {"1-2", "3-9", "10-49", "50+"}
    assert {u["step"] for u in world["users"]} == set(range(1, 6))
    assert len({u["community"] for u in world["users"]}) == 4
    # Community distributions drift: some community's favourite value changes over time.
    assert any(c[a]["first"] != c[a]["last"] for c in world["communities"] for a in ATTRIBUTES)
    for item, user in zip(world["upqa"], world["users"]):
        assert item["target"] == user["values"][item["attribute_type"]]
        assert item["target"] not in item["candidates"]
        assert all(p["step"] < item["step"] for p in item["profile"]) and len(item["profile"]) == item["history_size"]

    directory = write_world(world, tmp_path / "w")
    items = read_upqa(directory / "upqa.json")
    task, writing = read_lamp(directory / "longlamp_questions.json")
    assert task == "LongLaMP_world" and len(items) == len(writing) == 300
    # A user's own style shows in the gold: one of their signature phrases closes it.
    style = world["users"][0]["style"]
    assert writing[0].gold.endswith(style["sigs"][1]) and writing[0].gold.startswith(style["open"])
    statements = [p for p in world["upqa"][0]["profile"] if p["kind"] == "preference"]
    assert items[0].user.preferences == tuple(p["text"] for p in statements)


# ---------------------------------------------------------------- metrics

def test_target_match_rule():
    assert target_match("You enjoy dancing at the club on weekends.", ("Dancing at clubs",))
    assert target_match("Probably posting selfies.", ("Taking and posting selfies",))  # 2 of 3 content tokens
    assert not target_match("You like selfies.", ("Taking and posting selfies",))      # 1 of 3
    assert not target_match("I don't know you.", ("Dancing at clubs",))
    assert target_match("Clubbing!", ("Dancing at clubs", "Clubbing"))                # any synonym of the cluster
    # Words shared with other users' targets are no evidence: "music" does not make "Jazz music" right.
    others = ("Rap music", "Country music")
    assert target_match("Jazz music, mostly.", ("Jazz music",), others)
    assert not target_match("Here is some popular music.", ("Jazz music",), others)
    assert target_match("Here is some popular music.", ("Jazz music",))
    assert not target_match("Music!", ("Rap music",), ("Rap music live",))  # only shared words: all are needed
    assert target_match("Rap music.", ("Rap music",), ("Rap music live",))


def test_rouge_is_rouge_score():
    assert rouge("the cat sat", "the cat sat") == {"rouge1": 1.0, "rougeL": 1.0}
    scores = rouge("cat sat down", "the cat sat")
    assert scores["rouge1"] == pytest.approx(2 / 3) and scores["rougeL"] == pytest.approx(2 / 3)


def test_breakdown_groups_rows_by_history_bucket_and_step():
    rows = [{"id": "a", "method": "base", "history_size": 1, "step": 2, "mc_ok": True},
            {"id": "b", "method": "base", "history_size": 60, "step": 2, "mc_ok": False},
            {"id": "c", "method": "base", "history_size": 2, "step": 5, "mc_ok": False}]
    out = breakdown(rows, {"mc_ok": "mc_acc"})["base"]
    assert out["history"] == {"1-2": {"mc_acc": 0.5, "n": 2}, "50+": {"mc_acc": 0.0, "n": 1}}
    assert out["step"] == {"2": {"mc_acc": 0.5, "n": 2}, "5": {"mc_acc": 0.0, "n": 1}}


# ---------------------------------------------------------------- methods

def test_methods_registry_and_composition():
    user = User("u", preferences=("I am vegetarian.",),
                history=("I am vegetarian.", "Went climbing today.", "Best vegetarian lasagna ever."))
    assert get_method("base")(user, "dinner?", None) == Personalized()
    p = get_method("prompt+rag")(user, "Any vegetarian dinner ideas?", None)
    assert "I am vegetarian." in p.system and "Best vegetarian lasagna ever." in p.user_prefix
    assert "climbing" not in p.user_prefix            # no shared term with the query
    messages = apply(p, [{"role": "user", "content": "Any vegetarian dinner ideas?"}])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].endswith("Any vegetarian dinner ideas?") and messages[1]["content"].startswith("<history")
    assert retrieve(("jazz night", "jazz tonight", "tea"), "jazz", k=3) == ["jazz tonight", "jazz night"]  # tie: newest
    with pytest.raises(UserError, match="unknown method 'nope'"):
        get_method("prompt+nope")
    assert {"base", "prompt", "rag"} <= set(METHODS)


# ---------------------------------------------------------------- report and CLI

def test_write_report_writes_json_markdown_and_plots(tmp_path):
    report = {"task": "prefeval", "model": "m", "config": {"seed": 0}, "rules": ["rule one"],
              "results": {"base": {"followed@0": 0.5, "followed@5": 0.25}, "rag": {"followed@0": 0.75, "followed@5": 0.5}},
              "items": [{"id": "x", "method": m, "turns": t, "followed": True} for m in ("base", "rag") for t in (0, 5)]}
    paths = write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["results"]["rag"]["followed@5"] == 0.5
    markdown = (tmp_path / "report.md").read_text()
    assert "| rag | 1 | 0.750 | 0.500 |" in markdown and "- rule one" in markdown  # 1: the number of items
    for name in ("results.png", "followed_by_turns.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and tmp_path / name in paths


def test_paired_deltas_compare_each_method_with_base_on_the_same_items(tmp_path):
    rows = [{"id": i, "method": m, "turns": 0, "followed": ok}
            for i, (b, r) in enumerate([(0, 1), (0, 1), (1, 1), (0, 0)]) for m, ok in (("base", b), ("rag", r))]
    rows += [{"id": "u", "method": "base", "mc_ok": True, "explicit_ok": None}, {"id": "u", "method": "rag", "mc_ok": True}]
    deltas = paired_deltas(rows)
    assert set(deltas) == {"rag"} and set(deltas["rag"]) == {"followed@0"}  # one pair is not enough for mc_acc
    d = deltas["rag"]["followed@0"]  # differences 1, 1, 0, 0
    assert d["n"] == 4 and d["delta"] == 0.5 and d["ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    report = {"task": "prefeval", "model": "m", "config": {}, "rules": [], "items": rows,
              "results": {"base": {"followed@0": 0.25}, "rag": {"followed@0": 0.75}}}
    write_report(tmp_path, report)
    # differences 1, 1, 0, 0: every resample's mean is a multiple of 1/4, from 0 to 1; the 95% range is 0..1
    assert "| rag | 4 | +0.500 ± 0.566 [+0.00, +1.00] |" in (tmp_path / "report.md").read_text()
    assert d["boot95"] == (0.0, 1.0)
    assert json.loads((tmp_path / "report.json").read_text())["vs_base"]["rag"]["followed@0"]["n"] == 4


def _shard(shard: str, results: dict, counts: dict, ids: list[str], **config) -> dict:
    return {"task": "lamp", "model": "m", "config": {"seed": 0, "shard": shard, **config}, "rules": ["r"],
            "results": {"base": results}, "counts": {"base": counts}, "items": [{"id": i, "method": "base"} for i in ids]}


def test_merge_weighs_each_mean_by_its_items():
    a = _shard("0/3", {"accuracy": 0.5, "rmse": 1.0}, {"accuracy": 4, "rmse": 4}, ["a", "b", "c", "d"])
    b = _shard("2/3", {"accuracy": 1.0, "rmse": 2.0}, {"accuracy": 1, "rmse": 1}, ["e"])
    merged = merge_reports([a, b])
    assert merged["results"]["base"]["accuracy"] == pytest.approx((4 * 0.5 + 1.0) / 5)
    assert merged["results"]["base"]["rmse"] == pytest.approx(math.sqrt((4 * 1.0 + 4.0) / 5))
    assert merged["counts"]["base"] == {"accuracy": 5, "rmse": 5} and len(merged["items"]) == 5
    assert merged["config"] == {"seed": 0, "shard": "0,2/3"}  # a partial merge says which shards it holds
    c = _shard("1/3", {"accuracy": 0.0, "rmse": 0.0}, {"accuracy": 5, "rmse": 5}, list("fghij"))
    assert merge_reports([a, b, c])["config"] == {"seed": 0}  # all shards: the config of a full run


def test_merge_matches_inputs_by_content_not_by_path(tmp_path):
    for name, text in (("a/d.json", "[1]"), ("b/d.json", "[1]"), ("b/.hidden", "x"), ("c/d.json", "[2]")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    digest = {name: content_sha256(tmp_path / name) for name in "abc"}
    assert digest["a"] == digest["b"] != digest["c"]  # names and bytes count, dot-files do not
    assert content_sha256(tmp_path / "a" / "d.json") != digest["a"]
    a = _shard("0/2", {"accuracy": 1.0}, {"accuracy": 1}, ["x"], data=str(tmp_path / "a")) | {"inputs": {"data": digest["a"]}}
    b = _shard("1/2", {"accuracy": 0.0}, {"accuracy": 1}, ["y"], data=str(tmp_path / "b")) | {"inputs": {"data": digest["b"]}}
    merged = merge_reports([a, b])  # one run, its shards read from two places
    assert merged["inputs"] == {"data": digest["a"]} and merged["results"]["base"]["accuracy"] == 0.5
    a_without_digest, b_without_digest = ({k: v for k, v in r.items() if k != "inputs"} for r in (a, b))
    with pytest.raises(UserError, match="config data differ"):  # without digests, only the paths can say
        merge_reports([a_without_digest, b_without_digest])


@pytest.mark.parametrize("parts, message", [
    ([_shard("0/2", {}, {}, []), _shard("0/2", {}, {}, [])], "distinct shards of one split"),
    ([_shard("0/2", {}, {}, []), _shard("1/3", {}, {}, [])], "distinct shards of one split"),
    ([_shard("0/2", {}, {}, []), _shard("1/2", {}, {}, [], limit=5)], "different runs: config limit differ"),
    ([_shard("0/2", {}, {}, [], data="/a/d.json") | {"inputs": {"data": "1"}},
      _shard("1/2", {}, {}, [], data="/a/d.json") | {"inputs": {"data": "2"}}], "different runs: data content differ"),
    ([{"task": "lamp", "config": {}, "results": {}}], r"reports of `localpers eval \.\.\. --shard I/N` runs"),
])
def test_merge_refuses_reports_that_do_not_belong_together(parts, message):
    with pytest.raises(UserError, match=message):
        merge_reports(parts)


@pytest.mark.parametrize("argv, message", [
    (["eval", "upqa", "--shard", "2/2"], "--shard 2/2: I must be in 0..N-1"),
    (["eval", "upqa", "--shard", "half"], "--shard must look like I/N"),
    (["eval", "lamp", "--data", str(DATA / "lamp2_dev_questions.json"), "--limit", "2", "--shard", "3/4"],
     "--shard 3/4 holds no items: there are only 2"),
    (["eval", "merge", "--out", "/nonexistent/m"], "the following arguments are required: DIR"),
    (["eval", "merge", "/nonexistent", "--out", "/nonexistent/m"], "report.json: cannot read the report"),
    (["eval", "upqa", "extra"], "unrecognized arguments: extra"),
    (["eval", "nosuchtask"], "unknown task 'nosuchtask'"),
    (["eval", "upqa", "--data", "/nonexistent/upqa.json"], "no such file"),
    (["eval", "lamp"], "the following arguments are required: --data"),
    (["eval", "upqa", "--threads", "0"], "--threads must be at least 1"),
    (["eval", "upqa", "--method", "base,magic", "--data", str(DATA / "lamp2_dev_questions.json")], "unknown method 'magic'"),
    (["eval", "upqa", "--data", str(DATA / "lamp2_dev_questions.json")], "item 0: field 'target'"),
    (["eval", "prefeval", "--turns", "0,x", "--data", str(DATA)], "--turns must be comma-separated integers"),
    (["eval", "prefeval", "--data", str(DATA)], "lamp2_dev_outputs.json: expected a JSON list of PrefEval item"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err)


def test_generate_only_writes_the_world(tmp_path, capsys):
    assert main(["eval", "world", "--users", "5", "--steps", "3", "--generate-only", "--out", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "world" / "upqa.json").read_text())) == 5
    assert json.loads((tmp_path / "world" / "world.json").read_text())["config"]["users"] == 5


def test_locality_users_are_spread_over_the_items():
    assert locality_users(list(range(7))) == list(range(7))
    spread = locality_users(list(range(1000)))
    assert len(spread) == 100 and spread[:2] == [0, 10] and spread[-1] == 990


def test_journal_resumes_and_never_overwrites_another_run(tmp_path):
    path, run = tmp_path / "progress.jsonl", {"task": "t", "config": {"seed": 0}}
    journal = Journal(path, run)
    assert journal.score(("t", "base", 0), lambda: ({"acc": [True]}, [{"id": (1, 2)}])) == [{"acc": [True]}, [{"id": [1, 2]}]]
    assert journal.score(("t", "base", 1), lambda: 0.5) == 0.5

    def scored_again():
        raise AssertionError("a journaled item was scored again")

    # A run killed while writing leaves a cut line: it is dropped (that item is scored again), the rest kept.
    path.write_text(path.read_text() + '["t/base/2", {"acc": [tr')
    resumed = Journal(path, run)
    assert resumed.score(("t", "base", 0), scored_again) == [{"acc": [True]}, [{"id": [1, 2]}]]
    assert resumed.score(("t", "base", 1), scored_again) == 0.5
    assert resumed.score(("t", "base", 2), lambda: 7) == 7
    assert Journal(path, run).done == {"t/base/0": [{"acc": [True]}, [{"id": [1, 2]}]], "t/base/1": 0.5, "t/base/2": 7}

    before = path.read_bytes()
    with pytest.raises(UserError, match="progress of another run"):
        Journal(path, {**run, "config": {"seed": 1}})
    assert path.read_bytes() == before
    assert Journal(None).score(("t", "base", 0), lambda: 3) == 3
