"""The command line's rough edges as a newcomer met them, each fixed: --version, `users`, what `train` and
`personalize` print and how their adapters are served (`serve --lora`), whole descriptions in --help,
`personalize --method logo` (the signals `sync` asks for), `/why` naming each item once, chat imports without the
assistant's replies, `eval` printing its results with the number of items, the paired-with-base section saying
why it is absent, the world task's own progress label, error bars, and a wrong option pointing to its own
command's help."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localpers import names
from localpers.cli.cli import build_parser, main, walk_parsers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from helpers_models import random_model_path

    return random_model_path(tmp_path_factory, "llama")


def run(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localpers", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})


def test_version_names_localpers_and_the_libraries_it_runs_on(capsys):
    from localpers import __version__

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert out.startswith(f"localpers {__version__} (llama-cpp-python ") and "torch " in out


@pytest.mark.parametrize("argv, help_of", [
    (["eval", "upqa", "--no-such-option"], "localpers eval upqa --help"),
    (["eval", "world", "--turns", "0,5"], "localpers eval world --help"),
    (["serve", "--port", "1", "--bogus"], "localpers serve --help"),
    (["users", "extra"], "localpers users --help"),
])
def test_a_wrong_option_points_to_its_own_commands_help(argv, help_of, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and f"(see: {help_of})" in err and err.count("\n") == 1, err


def test_every_command_has_a_whole_description():
    """Each command's --help starts with a description that ends a sentence (none cut at its first line)."""
    cut = []
    for parser in walk_parsers(build_parser())[1:]:
        text = (parser.description or "").strip()
        if not text or not text.endswith((".", ")")):
            cut.append(f"{parser.prog}: {text!r}")
    assert not cut, "\n".join(cut)
    train = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].description.split())
    assert "on one process or several with torch DDP" in train and "localpers serve --lora FILE" in train


def test_users_lists_the_users_a_store_holds(tmp_path, capsys):
    from localpers.store.store import Store

    assert main(["users", "--data-dir", str(tmp_path)]) == 0
    assert f"no localpers data in {tmp_path}" in capsys.readouterr().out and not any(tmp_path.iterdir())
    with Store.open(tmp_path) as store:
        store.add("alice", "I'm vegetarian.", kind=names.PREFERENCE)
        store.add("alice", "Lentil soup was great.")
        store.add("john doe", "Hello")
    assert main(["users", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["alice  2 items (1 preference), 0 artifacts",
                                                    "john doe  1 item (0 preferences), 0 artifacts"]
    assert main(["users", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1] == {"user": "john doe", "items": 1, "preferences": 0,
                                                      "artifacts": 0}


def test_import_of_a_chat_keeps_only_what_the_user_wrote_and_says_so(tmp_path, capsys):
    from localpers.store.store import Store

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Any ideas for dinner?"},
                                             {"role": "assistant", "content": "Risotto?"},
                                             {"role": "user", "content": "I'm vegetarian."}]}) + "\n")
    assert main(["import", "--user", "ann", str(chat), "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "imported 2 items" in out and "left out 2 chat message(s)" in out and "assistant's replies" in out
    with Store.open(tmp_path / "d") as store:
        assert [i["text"] for i in store.items("ann")] == ["Any ideas for dinner?", "I'm vegetarian."]
    only_replies = tmp_path / "replies.jsonl"
    only_replies.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hi!"}]}) + "\n")
    assert main(["import", "--user", "ann", str(only_replies), "--data-dir", str(tmp_path / "d")]) == 2
    assert "no message of the user's own" in capsys.readouterr().err


def test_invariant_an_imported_group_chat_keeps_only_the_importing_users_messages(tmp_path, capsys):
    """A group chat's other participants (a `name` that is not the user's) are left out of an import, as the
    served routes leave them out (store.said_by): their "I live in Rome." never becomes the user's."""
    from localpers.store.store import Store

    chat = tmp_path / "group.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "name": "dora", "content": "I live in Rome."},
                                             {"role": "user", "name": "Ann", "content": "I live in Oslo."},
                                             {"role": "assistant", "content": "Nice!"},
                                             {"role": "user", "content": "I'm vegetarian."}]}) + "\n")
    assert main(["import", "--user", "ann", str(chat), "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "imported 2 items" in out and "left out 2 chat message(s)" in out and "other participants" in out
    with Store.open(tmp_path / "d") as store:
        assert [i["text"] for i in store.items("ann")] == ["I live in Oslo.", "I'm vegetarian."]
    assert main(["import", "--user", "dora", str(chat), "--data-dir", str(tmp_path / "d")]) == 0
    with Store.open(tmp_path / "d") as store:
        assert [i["text"] for i in store.items("dora")] == ["I live in Rome.", "I'm vegetarian."]
    others = tmp_path / "others.jsonl"   # only another participant's message: nothing of ann's to import
    others.write_text(json.dumps({"messages": [{"role": "user", "name": "bob", "content": "I live in Rome."},
                                               {"role": "assistant", "content": "Nice!"}]}) + "\n")
    assert main(["import", "--user", "ann", str(others), "--data-dir", str(tmp_path / "d")]) == 2
    assert "no message of the user's own" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"          # a speaker that is no string is refused, not taken for the user
    bad.write_text(json.dumps({"messages": [{"role": "user", "name": 5, "content": "I live in Rome."}]}) + "\n")
    assert main(["import", "--user", "ann", str(bad), "--data-dir", str(tmp_path / "d")]) == 2
    assert '"name" must be a string' in capsys.readouterr().err


def test_why_names_a_retrieved_text_once(tmp_path):
    """A stated preference is stored twice (the chat message and the preference learnt from it): retrieval
    for a served user, and so /why, shows it once; a composition never lists an item id twice."""
    from localpers.personalize.methods import Personalized, combine
    from localpers.serve.compose import Composer, served_user
    from localpers.serve.learn import learn_from_chat
    from localpers.store.store import Store

    with Store.open(tmp_path) as store:
        learn_from_chat(store, "ann", [{"role": "user", "content": "I'm vegetarian."}])
        assert len(store.search("ann", "vegetarian dinner", k=5)) == 2   # the message and the preference
        person = served_user(store, "ann", "sha", [{"role": "user", "content": "A vegetarian dinner idea?"}])
        composer = Composer("rag")
        explained = composer.explain(person, composer(person, "A vegetarian dinner idea?", None))
    assert len(explained["retrieved"]) == 1
    assert combine([Personalized(retrieved=(3, 4)), Personalized(retrieved=(4, 5))]).retrieved == (3, 4, 5)


def test_personalize_logo_computes_the_signals_sync_reads(tmp_path, tiny_llama):
    from localpers.personalize import world
    from localpers.personalize.signals import load_contribution
    from localpers.store.store import Store

    data = tmp_path / "d"
    w = world.generate_world(12, seed=3)
    with Store.open(data) as store:
        for entry in w["upqa"]:
            for p in entry["profile"][:4]:
                store.add(entry["user_id"], p["text"])
        user = store.users()[0]
    with pytest.raises(Exception, match="personalize --user"):
        load_contribution(data, user)  # what `localpers sync --user` says before the signals exist
    out = run("personalize", "--user", user, "--method", "logo", "--model", str(tiny_llama), "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert "communities" in out.stdout and f"localpers sync --user {user}" in out.stdout
    assert load_contribution(data, user).vector.shape
    refused = run("personalize", "--user", user, "--method", "logo", "--steps", "3", "--data-dir", str(data))
    assert refused.returncode == 2 and "for --method edit" in refused.stderr


def test_train_says_what_it_trained_and_serve_lora_serves_it(tmp_path, tiny_llama):
    """`localpers train` prints its steps, tokens and loss and the command that serves the adapter; `serve
    --lora FILE` applies that file to every request: the reply is the engine's reply with the adapter."""
    from fastapi.testclient import TestClient

    from localpers.engine.engine import Artifacts, Engine
    from localpers.serve.server import create_app

    questions = [{"id": str(i), "input": f"Write a short post about topic {i}.",
                  "profile": [{"id": f"{i}-{j}", "text": f"Hey all! Topic {i} note {j} was unreal."} for j in range(3)]}
                 for i in range(4)]
    (tmp_path / "q_questions.json").write_text(json.dumps(questions))
    (tmp_path / "q_outputs.json").write_text(json.dumps(
        {"task": "LongLaMP_test", "golds": [{"id": str(i), "output": f"Topic {i} was lovely."} for i in range(4)]}))
    adapter = tmp_path / "perce.gguf"
    out = run("train", "--model", str(tiny_llama), "--data", str(tmp_path / "q_questions.json"), "--out", str(adapter),
              "--steps", "2", "--batch", "2", "--lr", "0.05", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "trained  perce LoRA (rank 8" in out.stdout and "2 steps" in out.stdout and "loss" in out.stdout
    assert f"localpers serve --model {tiny_llama} --lora {adapter}" in out.stdout

    request = {"model": "localpers", "messages": [{"role": "user", "content": "Write a short post."}], "max_tokens": 8,
               "temperature": 0}
    with Engine(tiny_llama, n_ctx=512, n_threads=1) as engine:
        want = engine.chat(request["messages"], artifacts=Artifacts(lora=((str(adapter), 1.0),)), max_tokens=8,
                           temperature=0)["choices"][0]["message"]["content"]
        plain = engine.chat(request["messages"], max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
        assert want != plain  # the trained adapter changes the reply, so serving it is visible
        app = create_app(engine=engine, data_dir=str(tmp_path / "home"), lora=[adapter])
        with TestClient(app, base_url="http://127.0.0.1") as client:
            for user in ({}, {"user": "ann"}):
                reply = client.post("/v1/chat/completions", json={**request, **user}).json()
                assert reply["choices"][0]["message"]["content"] == want
        app.state.store.close()


def test_serve_lora_refuses_what_is_no_adapter_before_starting(tmp_path, tiny_llama, capsys):
    assert main(["serve", "--lora", str(tmp_path / "missing.gguf"), "--port", "65000"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", "--lora", str(tiny_llama), "--port", "65000"]) == 2
    assert "not a llama.cpp LoRA adapter" in capsys.readouterr().err


def report_of(rows: list[dict], methods=("base", "rag")) -> dict:
    from localpers.eval.evaluation import _summary

    results, counts = {}, {}
    for m in methods:
        results[m], counts[m] = _summary({"explicit_acc": [r["explicit_ok"] for r in rows if r["method"] == m]})
    return {"task": "upqa", "model": "m", "config": {}, "rules": ["r"], "results": results, "counts": counts,
            "items": rows}


def test_reports_give_the_number_of_items_and_why_base_pairing_is_absent(tmp_path):
    from localpers.eval.evaluation import summary, write_report

    one = report_of([{"id": "a", "method": "base", "explicit_ok": False}, {"id": "a", "method": "rag", "explicit_ok": True}])
    paths = write_report(tmp_path / "one", one)
    text = (tmp_path / "one" / "report.md").read_text()
    assert "| method | items | explicit_acc |" in text and "| rag | 1 | 1.000 |" in text
    assert "Not computed: it needs at least 2 items scored by base and by the method (this run has 1)" in text
    printed = summary(one, paths)
    assert "| rag | 1 | 1.000 |" in printed and "paired with base: not computed" in printed
    assert str(tmp_path / "one" / "report.md") in printed

    rows = [{"id": i, "method": m, "explicit_ok": m == "rag" or i == 0} for i in range(4) for m in ("base", "rag")]
    write_report(tmp_path / "four", report_of(rows))
    text = (tmp_path / "four" / "report.md").read_text()
    assert "| rag | 4 | 1.000 |" in text and "| rag | 4 | +0.750 ± " in text


def test_plots_have_error_bars(tmp_path, monkeypatch):
    """The results chart's bars carry the 95% interval of each mean over the items (0 where all agree)."""
    import matplotlib.axes

    from localpers.eval.evaluation import plot_report

    drawn = []
    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: drawn.append(k.get("yerr")) or original(self, *a, **k))
    rows = [{"id": i, "method": m, "explicit_ok": m == "rag" or i % 2 == 0} for i in range(4) for m in ("base", "rag")]
    plot_report(report_of(rows), tmp_path)
    base, rag = drawn
    assert base[0] == pytest.approx(1.96 * np.std([1, 0, 1, 0], ddof=1) / 2) and rag == [0.0]


def test_eval_prints_its_results_and_the_world_task_is_labelled_world(tmp_path, default_model_path):
    out = run("eval", "world", "--users", "12", "--communities", "2", "--steps", "2", "--limit", "2", "--mc-only",
              "--method", "base,rag", "--threads", "1", "--out", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    assert "| method | items | mc_acc |" in out.stdout and "| rag | 2 |" in out.stdout, out.stdout
    assert "paired with base" in out.stdout and str(tmp_path / "w" / "report.md") in out.stdout
    assert "world questions" in out.stderr and "upqa:" not in out.stderr


def test_serve_lora_for_another_model_fails_the_load_with_its_reason(tmp_path, tiny_llama, capfd):
    """An adapter llama.cpp refuses for the served model (wrong shapes) is no silent no-op: the load fails, /health
    says so, and the server's log names the file."""
    import time

    from fastapi.testclient import TestClient

    from localpers.model.gguf_write import write_lora
    from localpers.serve.server import create_app

    foreign = write_lora(tmp_path / "foreign.gguf", "llama",
                         {"blk.1.ffn_down": (np.zeros((1, 7), np.float32), np.zeros((5, 1), np.float32))}, 1.0)
    app = create_app(tiny_llama, data_dir=str(tmp_path / "home"), lora=[foreign])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(600):
            if client.get("/health").status_code != 503:
                break
            time.sleep(0.05)
        assert client.get("/health").status_code == 500
    app.state.store.close()
    assert f"--lora {foreign}" in capfd.readouterr().err


@pytest.mark.parametrize("argv", [["history", "--user", "alice"], ["export", "--user", "alice"],
                                  ["search", "--user", "alice", "Rome"],
                                  ["search", "--user", "alice", "Rome", "--mode", "dense"],
                                  ["forget", "--user", "alice", "--yes"]])
def test_a_reading_command_on_a_folder_without_a_store_says_so_and_makes_nothing(argv, tmp_path, capsys):
    missing = tmp_path / "x" / "nonexist"
    assert main([*argv, "--data-dir", str(missing)]) == 2
    assert capsys.readouterr().err == f"localpers: error: no localpers data in {missing}\n"
    assert not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    assert main([*argv, "--data-dir", str(tmp_path / "x")]) == 2
    assert "no localpers data in" in capsys.readouterr().err and not any((tmp_path / "x").iterdir())


@pytest.mark.parametrize("argv", [["remember", "--user", "alice", "I live in Rome."], ["history", "--user", "a"],
                                  ["serve", "--port", "1"]])
def test_a_data_folder_that_cannot_be_made_is_one_line(argv, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for folder in (tmp_path / "file" / "sub", Path("/proc/localpers-nope")):
        assert main([*argv, "--data-dir", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("localpers: error: ") and err.count("\n") == 1 and str(folder) in err, err


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """`folder` as a read-only mount sees it: a read-only bind mount where the tests run as root (root writes
    through any mode bits), else its mode bits cleared; skips where root cannot mount."""
    if os.geteuid() != 0:
        paths = [folder, *folder.iterdir()]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o500 if p.is_dir() else 0o400)
        try:
            yield folder
        finally:
            for p in paths:
                p.chmod(modes[p])
        return
    view = folder.parent / (folder.name + "-ro")
    view.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(view)], capture_output=True).returncode:
        pytest.skip("root without the right to mount: no read-only folder to test with")
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_reading_commands_work_on_a_read_only_store_and_writing_ones_say_why_they_cannot(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["remember", "--user", "alice", "I live in Rome.", "--data-dir", str(store)]) == 0
    capsys.readouterr()
    with read_only_folder(store) as ro:
        assert main(["history", "--user", "alice", "--data-dir", str(ro)]) == 0
        assert capsys.readouterr().out.count("I live in Rome.") == 2  # the message and the fact
        assert main(["export", "--user", "alice", "--data-dir", str(ro)]) == 0
        assert json.loads(capsys.readouterr().out)["user"] == "alice"
        assert main(["users", "--data-dir", str(ro)]) == 0
        assert capsys.readouterr().out.startswith("alice  2 items")
        assert main(["search", "--user", "alice", "Rome", "--data-dir", str(ro)]) == 0
        assert "I live in Rome." in capsys.readouterr().out
        for argv in (["remember", "--user", "alice", "I live in Milan."], ["serve", "--port", "1"]):
            assert main([*argv, "--data-dir", str(ro)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"localpers: error: cannot write the data folder {ro}: ") and err.count("\n") == 1
