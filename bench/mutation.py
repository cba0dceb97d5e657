"""Mutation testing of localpers, one module at a time (a shard), each against its own fast test selection.

    nice -n 19 python3 bench/mutation.py localpers/serve/compose.py [MODULE ...] [--timeout SECONDS]
    nice -n 19 python3 bench/mutation.py --sample 35 --seed 28 [MODULE ...]     # a seeded random sample per module

The shards and their tests are pyproject.toml's [tool.localpers.mutation-shards] (module -> pytest arguments);
`[tool.mutmut]` lists the same modules for a plain `mutmut run`. mutmut 3 reads only [tool.mutmut], so each shard
runs in a temporary copy of the committed checkout (HEAD) whose [tool.mutmut] names that one module and its tests, with
`mutmut run --max-children 1` (the CPU is shared). With `--sample K` the shard first generates every mutant of the
module (`mutmut run` with a filter that matches none: mutants and the test-coverage stats, no mutant run), then
runs K of them drawn with `random.Random(seed).sample` from the sorted names (all of them when the module has K or
fewer). Prints one line per shard (total mutants, sampled, killed, survived, timeouts, no tests = mutants in code
the shard's tests never reach, not run) and writes each survivor's diff (`mutmut show`) to
docs/history/mutation/<module>.survivors.txt, to be judged there: equivalent (harmless, say why) or a missing
test (add one). `--mutants NAME ...` runs exactly those mutants of a single module (the re-run after new tests).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
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
                     'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]',
                     # each mutant's child forks from a server that only imported and collected the tests (not
                     # from the process that ran them all): llama.cpp's and the C++ kernels' OpenMP teams there
                     # left forked children waiting forever (libgomp is not fork-safe)
                     'process_isolation = "forkserver"', ""])
    return text[:start] + new + ("" if end < 0 else text[end:])


def exit_codes(work: Path) -> dict[str, int | None]:
    """Every generated mutant's name -> its exit code (None: not run), from mutmut's .meta files."""
    codes = {}
    for meta in (work / "mutants").rglob("*.meta"):
        codes.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return codes


def tally(work: Path) -> tuple[Counter, list[str]]:
    counts, survivors = Counter(), []
    for name, code in exit_codes(work).items():
        status = STATUS.get(code, "suspicious")
        counts[status] += 1
        if status == "survived":
            survivors.append(name)
    return counts, sorted(survivors)


def draw(names: list[str], k: int, seed: int) -> list[str]:
    """K names drawn without replacement, the same for the same names, K and seed (all when K >= len)."""
    names = sorted(names)
    return names if k >= len(names) else sorted(random.Random(seed).sample(names, k))


def mutmut(work: Path, args: list[str], timeout: float) -> tuple[bool, str]:
    """`mutmut run` in its own process group; past `timeout` the whole group is killed (mutmut forks a child per
    mutant: killing mutmut alone left them running, orphaned). OMP_NUM_THREADS=1 and process_isolation=forkserver
    (shard_pyproject): libgomp is not fork-safe, and a mutant's child forked from a parent that had run an OpenMP
    team (the C++ dequantizer, torch, llama.cpp's ggml) waited forever in its first parallel region
    (gomp_team_barrier_wait_end at 0 CPU seconds, so mutmut's CPU-time limit never ended it)."""
    proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", "1", *args], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode == 0, out[-2000:]
    except subprocess.TimeoutExpired:
        return False, f"stopped after {timeout:.0f} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: mutmut and any mutant runner it forked
        proc.wait()


def run_shard(module: str, tests: list[str], timeout: float, sample: int | None = None, seed: int = 28,
              mutants: list[str] | None = None) -> dict:
    """Mutate `module` against `tests`: every mutant, a seeded sample of `sample`, or the named `mutants`."""
    with tempfile.TemporaryDirectory(prefix="localpers-mut-") as tmp:
        work = Path(tmp)
        copy_checkout(work)
        (work / "pyproject.toml").write_text(shard_pyproject((ROOT / "pyproject.toml").read_text(), module, tests))
        started = time.time()
        chosen: list[str] = []
        if sample is None and not mutants:
            finished, tail = mutmut(work, [], timeout)
        else:
            # generate the mutants and the stats only: a filter no mutant name matches stops mutmut before any run
            mutmut(work, ["no-mutant-is-named-this"], timeout)
            every = list(exit_codes(work))
            chosen = [m for m in mutants if m in every] if mutants else draw(every, sample, seed)
            if not chosen:
                raise SystemExit(f"{module}: no mutant generated or none of the names given ({len(every)} generated)")
            finished, tail = mutmut(work, chosen, timeout - (time.time() - started))
        counts, survivors = tally(work)
        total = sum(counts.values())
        counts["not run"] = counts.pop("not checked", 0)
        unreached = sorted(n for n, c in exit_codes(work).items() if STATUS.get(c) == "no tests")
        diffs = []
        for name in survivors + unreached:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                                   text=True)
            diffs.append(f"## {name}{' (no test reaches it)' if name in unreached else ''}\n{shown.stdout.strip()}\n")
        OUT.mkdir(parents=True, exist_ok=True)
        stem = module.replace("/", ".").removesuffix(".py")
        what = "named mutants" if mutants else f"a sample of {len(chosen)} (seed {seed})" if chosen else "every mutant"
        # a re-run of named mutants never overwrites the judged survivors of the sample
        (OUT / f"{stem}.{'rerun' if mutants else 'survivors'}.txt").write_text(
            f"# survivors of {module} ({what} of {total}) against {' '.join(tests)}\n\n" + "\n".join(diffs))
        return {"module": module, "finished": finished, "seconds": round(time.time() - started), "total": total,
                "sampled": len(chosen) if chosen else total, "seed": seed if sample is not None else None,
                **dict(counts), "tail": tail if not finished else ""}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="shards to run (default: all, in pyproject's order)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per shard")
    ap.add_argument("--sample", type=int, help="run K mutants per module, drawn with --seed (default: every mutant)")
    ap.add_argument("--seed", type=int, default=28, help="the sample's seed (default 28)")
    ap.add_argument("--mutants", nargs="+", help="run exactly these mutant names (one module only)")
    args = ap.parse_args()
    table = shards()
    modules = args.modules or list(table)
    if args.sample is not None and args.sample < 1:
        sys.exit("--sample must be at least 1")
    if args.mutants and len(modules) != 1:
        sys.exit("--mutants needs exactly one module")
    for module in modules:
        if module not in table:
            sys.exit(f"{module}: not a shard of [tool.localpers.mutation-shards] ({', '.join(table)})")
    for module in modules:
        result = run_shard(module, table[module], args.timeout, args.sample, args.seed, args.mutants)
        print(json.dumps(result), flush=True)
