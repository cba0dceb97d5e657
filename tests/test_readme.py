"""The README's commands stay true. Every shell line of the ```bash blocks of README.md and of the reference pages
docs/*.md is read (so commands other engineers add are covered too); each `localpers` command must parse with the real parser (default run), and the
slow test runs them all, with small limits, in a temporary copy of the repository: every command succeeds and no
tracked file changes (reference results under docs/ are reproduced elsewhere, never clobbered).

Lines that start a server, need a running server, install, or run the whole suite are skipped, and listed here."""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Prefixes of README lines not run: each starts a server, needs one, installs packages or runs for hours.
SKIPPED = {
    "bash install.sh": "installs packages (install.sh is what set this machine up)",
    "python3 -m venv": "makes a virtual environment (the tests run in the one they were started from)",
    "localpers chat": "interactive: reads the terminal (tests/test_chat_cli.py drives it in a pseudo-terminal)",
    "localpers sync": "needs a sync server and devices (tests/test_sync_processes.py runs them as processes)",
    "localpers train": "needs LaMP/LongLaMP data (tests/test_training.py trains on a small file)",
    "localpers import --user alice reviews.json": "needs the user's own writing (tests/test_training.py imports some)",
    "localpers personalize --user alice --method perce": "needs 8+ items of the user's writing (tests/test_training.py)",
    "localpers personalize --user alice --method logo": "a LoGo round with CAA steering over every user of the store "
                                                        "(tests/test_cli_newcomer.py runs it on a small model)",
    "python3 -m pytest": "the whole test suite",
    "localpers serve": "starts a server that runs until stopped (tests/test_server.py serves the app)",
    "curl ": "needs a running server",
    "mutmut ": "mutation testing: hours of test runs (BENCHMARKS.md)",
    "nice -n 19 python3 bench/mutation.py": "mutation testing: hours of test runs (BENCHMARKS.md)",
}
# Small values for the options that size a run, so that every eval command finishes in seconds to minutes.
SMALL = {"--users": "3", "--communities": "2", "--steps": "2", "--turns": "0,1", "--limit": "1"}


DOCUMENTS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    """The shell lines of the ```bash blocks of README.md, then of docs/*.md, continuation lines joined, comments
    dropped."""
    text = "\n".join((REPO / name).read_text() for name in DOCUMENTS)
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment (none of the commands quote a '#')
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def without_optional(line: str) -> str:
    """`history --user alice [--json]` -> `history --user alice`: the README's [optional] parts left out."""
    return re.sub(r"\s*\[[^\]]*\]", "", line)


def skipped(line: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if line.startswith(prefix)), None)


def localpers_argvs(line: str) -> list[list[str]]:
    """The argument lists of the `localpers` commands in a line (a `for` loop's body included)."""
    out = []
    for part in re.split(r";|&&|\bdo\b|\bdone\b", line):
        words = shlex.split(part.replace("$i", "0"))
        if words and words[0] == "localpers":
            out.append(words[1:])
    return out


def test_the_readme_has_commands_and_every_skip_is_named():
    lines = readme_commands()
    assert any(line.startswith("localpers eval") for line in lines)
    assert any(line.startswith("localpers remember") for line in lines)
    for line in lines:
        assert skipped(line) or localpers_argvs(line), f"README line neither run nor listed in SKIPPED: {line}"


def test_every_readme_localpers_command_parses():
    """Options that were renamed or dropped make the README wrong: every command parses with the real parser
    (the generic synopsis lines with TASK/M/PATH placeholders are skipped)."""
    from localpers.cli.cli import build_parser
    from localpers.errors import UserError

    checked = 0
    for line in readme_commands():
        if skipped(line) or re.search(r"\b(TASK|DIR|PATH|M\[|N\b|S\b)", line):
            continue
        for argv in localpers_argvs(without_optional(line)):
            try:
                build_parser().parse_args(argv)
            except SystemExit as e:  # --version and --help exit 0 once they have printed
                if e.code != 0:
                    pytest.fail(f"README command does not parse: localpers {shlex.join(argv)}: {e}")
            except UserError as e:
                pytest.fail(f"README command does not parse: localpers {shlex.join(argv)}: {e}")
            checked += 1
    assert checked >= 10


def small(line: str) -> str:
    """The command with small run sizes: SMALL's values, and --limit 1 (4 for a sharded run) on every eval."""
    for option, value in SMALL.items():
        line = re.sub(rf"{option} \S+", f"{option} {value}", line)
    if "localpers eval" in line and "eval merge" not in line:
        limit = "4" if "--shard" in line else "1"
        line = re.sub(r"(localpers eval \w+)", rf"\1 --limit {limit} --threads 1", line)
    return line


def tracked_digests(root: Path, files: list[str]) -> dict[str, str]:
    return {path: hashlib.sha256((root / path).read_bytes()).hexdigest() if (root / path).is_file() else None
            for path in files}


@pytest.mark.slow
def test_readme_commands_run_in_a_copy_of_the_repository(tmp_path, default_model_path):
    """Every README command, in order, in a copy of the checkout (a shell with `localpers` = this checkout's
    `python -m localpers`, its data in a fresh LOCALPERS_HOME): all succeed, and no tracked file changes."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "mutants", "__pycache__", "*.egg-info"))
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    before = tracked_digests(copy, tracked)
    (copy / "history.jsonl").write_text('{"text": "I cook pasta most evenings."}\n{"text": "Dinner ideas with beans.", "kind": "message"}\n')
    env = {**os.environ, "LOCALPERS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(copy),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "LOCALPERS_PASSPHRASE": "readme test"}
    prelude = f"set -e; localpers() {{ {shlex.quote(sys.executable)} -m localpers \"$@\"; }}; "
    for line in readme_commands():
        if skipped(line) or re.search(r"\b(TASK|DIR|PATH|M\[)", line):
            continue
        command = small(without_optional(line)).replace("path/to/model.gguf", str(default_model_path))
        result = subprocess.run(["bash", "-c", prelude + command], cwd=copy, env=env, capture_output=True, text=True,
                                timeout=1800)
        # personalize exits 1 when a preference could not be edited: it ran, and said so
        ok = result.returncode == 0 or (line.startswith("localpers personalize") and result.returncode == 1
                                        and "FAILED" in result.stdout)
        assert ok, f"README command failed: {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    changed = sorted(path for path, digest in tracked_digests(copy, tracked).items() if before[path] != digest)
    assert not changed, f"README commands changed tracked files: {changed}"
