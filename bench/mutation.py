"""Mutation testing of localpers, one module at a time (a shard), each against its own fast test selection.

    nice -n 19 python3 bench/mutation.py localpers/serve/compose.py [MODULE ...] [--timeout SECONDS]

The shards and their tests are pyproject.toml's [tool.localpers.mutation-shards] (module -> pytest arguments);
`[tool.mutmut]` lists the same modules for a plain `mutmut run`. mutmut 3 reads only [tool.mutmut], so each shard
runs in a temporary copy of the committed checkout (HEAD) whose [tool.mutmut] names that one module and its tests, with
`mutmut run --max-children 1` (the CPU is shared). Prints one line per shard (killed, survived, timeouts, not
run) and writes each survivor's diff (`mutmut show`) to docs/history/mutation/<module>.survivors.txt, to be
judged there: equivalent (harmless, say why) or a missing test (add one).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "history" / "mutation"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def shards() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["localpers"]["mutation-shards"]


def copy_checkout(dest: Path) -> None:
    """The committed tree (HEAD: never a file a break_once run has open), plus the built extension."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for so in (ROOT / "localpers").glob("_cpu*.so"):
        shutil.copy2(so, dest / "localpers" / so.name)


def shard_pyproject(text: str, module: str, tests: list[str]) -> str:
    """pyproject.toml with [tool.mutmut] mutating `module` only, against `tests`."""
    start = text.index("[tool.mutmut]")
    end = text.find("\n[", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    keep = [line for line in section.splitlines()[1:] if line.startswith(("source_paths", "also_copy"))]
    new = "\n".join(["[tool.mutmut]", *keep, f"only_mutate = {json.dumps([module])}",
                     f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
                     'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]', ""])
    return text[:start] + new + ("" if end < 0 else text[end:])


def tally(work: Path) -> tuple[Counter, list[str]]:
    counts, survivors = Counter(), []
    for meta in (work / "mutants").rglob("*.meta"):
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            status = STATUS.get(code, "suspicious")
            counts[status] += 1
            if status == "survived":
                survivors.append(name)
    return counts, sorted(survivors)


def run_shard(module: str, tests: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="localpers-mut-") as tmp:
        work = Path(tmp)
        copy_checkout(work)
        (work / "pyproject.toml").write_text(shard_pyproject((ROOT / "pyproject.toml").read_text(), module, tests))
        started = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "1"], cwd=work,
                               capture_output=True, text=True, timeout=timeout)
            finished, tail = r.returncode == 0, (r.stdout + r.stderr)[-2000:]
        except subprocess.TimeoutExpired as e:
            finished, tail = False, f"stopped after {timeout:.0f} s: {(e.stdout or b'')[-500:]!r}"
        counts, survivors = tally(work)
        diffs = []
        for name in survivors:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                                   text=True)
            diffs.append(f"## {name}\n{shown.stdout.strip()}\n")
        OUT.mkdir(parents=True, exist_ok=True)
        stem = module.replace("/", ".").removesuffix(".py")
        (OUT / f"{stem}.survivors.txt").write_text(
            f"# survivors of {module} against {' '.join(tests)}\n\n" + "\n".join(diffs))
        return {"module": module, "finished": finished, "seconds": round(time.time() - started),
                **dict(counts), "tail": tail if not finished else ""}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="shards to run (default: all, in pyproject's order)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per shard")
    args = ap.parse_args()
    table = shards()
    for module in args.modules or list(table):
        if module not in table:
            sys.exit(f"{module}: not a shard of [tool.localpers.mutation-shards] ({', '.join(table)})")
        result = run_shard(module, table[module], args.timeout)
        print(json.dumps(result), flush=True)
