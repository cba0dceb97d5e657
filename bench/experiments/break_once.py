"""Make one break in the code, run the tests that should catch it, restore the file.

    python3 bench/experiments/break_once.py FILE OLD NEW -- PYTEST_ARGS...

OLD must occur exactly once in FILE. Prints pytest's verdict; a caught break shows rc=1 and the failing test.
(BENCHMARKS.md, "Quality": the table of breaks and the tests that catch them.) Never commit while it runs."""
import subprocess
import sys

if __name__ == "__main__":
    path, old, new = sys.argv[1:4]
    args = sys.argv[sys.argv.index("--") + 1:]
    source = open(path).read()
    if source.count(old) != 1:
        sys.exit(f"{old!r} occurs {source.count(old)} times in {path}, not once")
    open(path, "w").write(source.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                           capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.startswith(("FAILED", "ERROR")) or " passed" in l or " failed" in l]
        print(f"BREAK {path}: {old!r} -> {new!r}\n  rc={r.returncode}", *lines[-3:], sep="\n  ")
    finally:
        open(path, "w").write(source)
