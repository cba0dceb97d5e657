"""Shared by the server tests and bench/bench_serve_load.py: a live uvicorn server on a free loopback port, the
`localpers serve` process, and users with distinct adapters and control vectors."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, limit_s: float = 30, poll_s: float = 0.05) -> bool:
    """Poll `predicate()` until it is true or `limit_s` passes (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def wait_until_up(url: str, proc: subprocess.Popen | None = None, limit_s: float = 120) -> None:
    """Until `url`/health answers 200 (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def serve_process(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m localpers serve ARGS` from the repository root."""
    return subprocess.Popen([sys.executable, "-m", "localpers", "serve", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def eog_ids(engine) -> list[int]:
    """Every end-of-generation token of the engine's vocabulary (banned with logit_bias for endless replies)."""
    import llama_cpp

    vocab = engine.llm._model.vocab
    return [i for i in range(engine.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def make_users(engine, store, workdir: Path) -> dict[str, dict]:
    """Four users registered in `store` for the engine's model: base (nothing), a LoRA adapter, a control vector,
    another adapter with another control vector. Returns {user: {"lora": path|None, "cvec": path|None}}."""
    from localpers import names
    from localpers.engine.engine import model_sha256
    from localpers.model.gguf_write import write_control_vector, write_lora

    sha = model_sha256(engine.model_path)

    def lora(path, seed):
        rng = np.random.default_rng(seed)
        d_ff = engine.llm.metadata.get(f"{engine.llm.metadata['general.architecture']}.feed_forward_length")
        d_ff = int(d_ff)
        factors = {f"blk.{il}.ffn_down": (rng.normal(0, 1 / np.sqrt(d_ff), (8, d_ff)),
                                          rng.normal(0, 1.0, (engine.n_embd, 8))) for il in range(engine.n_layer)}
        return write_lora(path, engine.llm.metadata["general.architecture"], factors, alpha=8)

    def cvec(path, seed):
        rng = np.random.default_rng(seed)
        layers = range(max(1, engine.n_layer // 4), max(2, 3 * engine.n_layer // 4))
        return write_control_vector(path, {il: rng.normal(0, 2.0, engine.n_embd) for il in layers},
                                    engine.llm.metadata["general.architecture"])

    users = {"ann": {"lora": None, "cvec": None},
             "ben": {"lora": lora(workdir / "ben.gguf", 1), "cvec": None},
             "cai": {"lora": None, "cvec": cvec(workdir / "cai-cvec.gguf", 2)},
             "dee": {"lora": lora(workdir / "dee.gguf", 3), "cvec": cvec(workdir / "dee-cvec.gguf", 4)}}
    for user, files in users.items():
        store.add(user, "I like the sea.", kind="preference")
        if files["lora"]:
            store.register_artifact(user, names.LORA, files["lora"], sha, meta={"method": names.EDIT, "sources": []})
        if files["cvec"]:
            store.register_artifact(user, names.CONTROL_VECTOR, files["cvec"], sha,
                                    meta={"method": names.EDIT, "sources": []})
    return users
