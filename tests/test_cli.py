"""The `localpers` command as a new user meets it: every option documented with its default, typos of closed
vocabularies answered with a did-you-mean, options that do nothing in a combination refused, finished reports never
clobbered, one-line errors, no traceback when the reader of a pipe leaves, and no llama.cpp log or interpreter-exit
noise on stderr unless --verbose asks for it."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localpers.cli.cli import build_parser, main, walk_parsers

REPO = Path(__file__).resolve().parents[1]


def every_option():
    for parser in walk_parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                yield parser.prog, action


def test_every_option_of_every_command_has_help_with_its_default():
    """An option is documented when it has help text that states its default (or that it is required)."""
    undocumented = []
    for prog, action in every_option():
        name = "/".join(action.option_strings) or action.dest
        text = (action.help or "").replace("%(default)s", str(action.default))
        if not text.strip():
            undocumented.append(f"{prog} {name}: no help")
        elif action.option_strings and "default" not in text and not action.required:
            undocumented.append(f"{prog} {name}: help does not say the default")
    assert not undocumented, "\n".join(undocumented)
    progs = {prog for prog, _ in every_option()}
    assert {"localpers eval upqa", "localpers eval world", "localpers eval merge", "localpers serve"} <= progs


def help_text(*argv) -> str:
    result = subprocess.run([sys.executable, "-m", "localpers", *argv, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps lines: compare words


def test_help_texts_show_what_a_user_needs():
    from localpers.personalize.editing import EditConfig

    assert "(default: 127.0.0.1" in help_text("serve") and "(default: 8000)" in help_text("serve")
    merge = help_text("eval", "merge")
    assert "usage: localpers eval merge" in merge and "weighing each mean" in merge
    assert "write report.json, report.md and plots." in help_text("eval")  # the description is not cut
    world = help_text("eval", "world")
    for option in ("--users", "--communities", "--steps", "--seed"):
        assert option in world
    assert f"(default: {EditConfig().layer})" in help_text("personalize")


@pytest.mark.parametrize("argv, message", [
    (["remember", "--user", "a", "--kind", "prefrence", "x"], "unknown kind 'prefrence': did you mean 'preference'"),
    (["history", "--user", "a", "--kind", "reveiw"], "did you mean 'review'"),
    (["search", "--user", "a", "--mode", "dens", "q"], "unknown mode 'dens': did you mean 'dense'"),
    (["eval", "upqq"], "unknown task 'upqq': did you mean 'upqa'"),
    (["evl", "upqa"], "unknown command 'evl': did you mean 'eval'"),
    (["eval", "upqa", "--method", "base,edti"], "unknown method 'edti': did you mean 'edit'"),
    (["personalize", "--user", "a", "--method", "edt"], "did you mean 'edit'"),
    (["search", "--user", "a", "--embedder", "minilm", "q"], "--embedder is for --mode dense or hybrid"),
    (["eval", "lamp", "--data", "q.json", "--turns", "0,5"], "unrecognized arguments: --turns 0,5"),
    (["eval", "prefeval", "--max-tokens", "5"], "unrecognized arguments: --max-tokens 5"),
    (["eval", "world", "--data", ".", "--users", "5"], "--users and --data do not go together"),
    (["eval", "merge", "a", "b"], "the following arguments are required: --out"),
])
def test_typos_and_options_that_do_nothing_are_refused_in_one_line(argv, message, capsys, tmp_path):
    assert main([*argv[:1], *(["--data-dir", str(tmp_path)] if argv[0] in ("remember", "history", "search") else []),
                 *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_a_finished_report_is_never_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text('{"reference": true}')
    missing = str(tmp_path / "missing")  # were the report not protected, each run would stop at its missing input
    for argv in (["eval", "upqa", "--out", str(out), "--data", missing], ["eval", "world", "--out", str(out), "--data", missing],
                 ["eval", "merge", missing, "--out", str(out)]):
        assert main(argv) == 2
        assert "already holds a finished report" in capsys.readouterr().err
    assert (out / "report.json").read_text() == '{"reference": true}' and sorted(os.listdir(out)) == ["report.json"]
    # --force passes that check: the run goes on to its next one (here, a missing data file)
    assert main(["eval", "upqa", "--out", str(out), "--force", "--data", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_history_into_a_closed_pipe_ends_quietly(tmp_path):
    """`localpers history --user bob | head -1`: no BrokenPipeError traceback once head has left."""
    from localpers.store.store import Store, check_item

    with Store.open(tmp_path) as store:  # 400 kB of history: more than a pipe holds
        store.add_many("bob", [check_item(f"item {i} " + "x" * 200, ts=1.7e9 + i) for i in range(2000)])
    child = subprocess.Popen([sys.executable, "-m", "localpers", "history", "--user", "bob", "--data-dir",
                              str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline().startswith(b"#1 ")
    child.stdout.close()  # what head does after its lines
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141 and err == "", err


def test_personalize_layer_help_matches_the_edit_config():
    from localpers.personalize.editing import EditConfig
    from localpers.cli.editing_cli import EDIT_LAYER

    assert EDIT_LAYER == EditConfig().layer


ENGINE_RUN = """
import sys
import numpy as np
from localpers.engine.engine import Artifacts, Engine
from localpers.model.gguf_write import write_lora

model, adapter = sys.argv[1:3]
write_lora(adapter, "llama", {"blk.1.ffn_down": (np.zeros((1, 128), np.float32), np.zeros((64, 1), np.float32))}, 1.0)
engine = Engine(model, n_ctx=4096)  # over the model's 512 training context: llama.cpp warns
engine.chat([{"role": "user", "content": "Hi"}], artifacts=Artifacts(lora=((adapter, 1.0),)), max_tokens=2)
if sys.argv[3] == "close":
    engine.close()
    engine.close()  # idempotent
print("done")
"""


@pytest.mark.parametrize("close", ["close", "leave-it-to-exit"])
def test_llama_cpp_log_stays_out_of_normal_output(tmp_path_factory, close):
    """A model loaded over its training context, an adapter applied, and exit: nothing on stderr (no llama.cpp
    warning, no Llama.__del__ noise at interpreter exit) unless LOCALPERS_VERBOSE=1 (`localpers --verbose`)."""
    from tests.helpers_models import random_model_path

    model = random_model_path(tmp_path_factory, "llama")
    adapter = tmp_path_factory.mktemp("adapter") / "zero.gguf"
    env = {k: v for k, v in os.environ.items() if k != "LOCALPERS_VERBOSE"}
    argv = [sys.executable, "-c", ENGINE_RUN, str(model), str(adapter), close]
    quiet = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == "done\n" and quiet.stderr == "", quiet.stderr[-2000:]
    verbose = subprocess.run(argv, cwd=REPO, env={**env, "LOCALPERS_VERBOSE": "1"}, capture_output=True, text=True,
                             timeout=120)
    assert verbose.returncode == 0 and "n_ctx_seq (4096) > n_ctx_train (512)" in verbose.stderr


def test_a_tokenizer_alone_keeps_llama_cpp_log_out(tmp_path_factory):
    """Training loads only the vocabulary (Tokenizer.from_gguf, vocab_only): that load's llama.cpp warnings stay
    out of normal output too."""
    from tests.helpers_models import random_model_path

    model = random_model_path(tmp_path_factory, "llama")
    code = "import sys; from localpers.engine.tokenizer import Tokenizer; print(len(Tokenizer.from_gguf(sys.argv[1])))"
    env = {k: v for k, v in os.environ.items() if k != "LOCALPERS_VERBOSE"}
    run = subprocess.run([sys.executable, "-c", code, str(model)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
