"""The served path: one llama.cpp model and context, with per-request LoRA adapters and control vectors.

Every personalization method ends as one of llama.cpp's three primitives (a LoRA adapter, a control vector,
prompt context), so generation and scoring for every method go through this one class. A llama context is not
thread-safe, so each public method holds the engine's lock. Whenever the active adapters or control vector
change, the KV cache is cleared: a cached prompt prefix computed under other adapters must never be reused
(llama.cpp's own server has had exactly this bug).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import queue
import random
import re
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from localpers import names
from localpers.model.chat import chat_tokens, render_chat
from localpers.errors import UserError
from localpers.engine.kvcache import DEFAULT_MAX_BYTES, KVCache


# Prompts are decoded in chunks of N_BATCH tokens (llama-cpp-python's default: prompt speed at llama.cpp's own,
# issue 32), and the KV-state cache reuses prefixes that end on a multiple of KV_BLOCK, computed by prompt
# evaluation, with the rest of the prompt decoded so that a reply never depends on what was cached
# (localpers.engine.kvcache, BENCHMARKS.md section 2 for the trade-off).
N_BATCH = 512
KV_BLOCK = 1


_LIVE: "weakref.WeakSet" = weakref.WeakSet()


class FairLock:
    """A lock handed over in arrival order (threading.Lock is not: a releasing thread that asks again usually
    wins), so that a request that yields the engine between choices gets it back only after every request that
    was already waiting. acquire(cancel=event) gives up (False) once the event is set; `waiting()` counts the
    threads in line."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._line: list[object] = []
        self._held = False

    def acquire(self, blocking: bool = True, timeout: float = -1, cancel: threading.Event | None = None) -> bool:
        me = object()
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with self._cond:
            self._line.append(me)
            try:
                while self._held or self._line[0] is not me:
                    if not blocking or (cancel is not None and cancel.is_set()):
                        return False
                    left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                self._held = True
                return True
            finally:
                self._line.remove(me)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._held = False
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._line)

    def locked(self) -> bool:
        return self._held

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def closed_at_exit(obj):
    """Register an Engine or a llama_cpp.Llama to be closed when the interpreter exits, before module teardown:
    llama-cpp-python's Llama.__del__ run during teardown fails with an ignored TypeError (its module globals are
    gone). Returns obj."""
    _LIVE.add(obj)
    return obj


@atexit.register
def _close_live() -> None:
    for obj in list(_LIVE):
        lock = getattr(obj, "_lock", None)
        if lock is not None:
            if not lock.acquire(timeout=1):  # still used by a thread that outlives the main one: leave it be
                continue
            lock.release()
        try:
            obj.close()
        except Exception:  # exiting: nothing left to report to
            pass


@dataclass(frozen=True)
class Artifacts:
    """What a personalization method hands to the served path (prompt context travels in the messages).

    Several LoRA adapters apply together, each with its scale (llama_set_adapters_lora). Several control vectors
    are summed, each times its scale, into the one control vector llama.cpp takes (llama_set_adapter_cvec adds
    the layer's vector to the residual stream after each layer 1..n_layer-1)."""

    lora: tuple[tuple[str, float], ...] = ()             # (adapter GGUF path, scale)
    control_vectors: tuple[tuple[str, float], ...] = ()  # (control-vector GGUF path, scale)

    def merge(self, other: "Artifacts") -> "Artifacts":
        return Artifacts(lora=self.lora + other.lora, control_vectors=self.control_vectors + other.control_vectors)


NO_ARTIFACTS = Artifacts()



STALE_CHECK_S = 5.0  # how often an engine looks for cached adapters whose file another process retired


class _Adapter:
    """One loaded LoRA adapter: its file key (resolved path, mtime_ns, size), llama.cpp handle (None once freed),
    how many requests hold it, and whether it is still in the engine's LRU."""
    __slots__ = ("key", "handle", "pins", "cached")

    def __init__(self, key: tuple, handle):
        self.key, self.handle, self.pins, self.cached = key, handle, 0, True

    @property
    def nbytes(self) -> int:
        return self.key[2]


class Pinned:
    """An artifact set loaded for one request (Engine.pin): its LoRA adapters held (not freed while held, even
    once retired) and its control vectors read. `artifacts`: the same set as paths. release() (or leaving a
    `with` block) lets it go; it is idempotent."""

    def __init__(self, engine: "Engine", loras: tuple, cvecs: tuple):
        self._engine, self.loras, self.cvecs = engine, loras, cvecs  # (path, _Adapter, scale), (path, key, data, scale)
        self.artifacts = Artifacts(lora=tuple((p, s) for p, _, s in loras),
                                   control_vectors=tuple((p, s) for p, _, _, s in cvecs))
        self._released = False
        self._claimed = threading.Lock()

    def claim(self) -> bool:
        """True for the first caller only: between a request handler and the generation thread it hands the
        set to, the one that claims it releases it (the thread, once it runs; the handler, when it never ran)."""
        return self._claimed.acquire(blocking=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._release(self)

    def __enter__(self) -> "Pinned":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Cancelled(Exception):
    """A generation stopped because its `cancel` event was set (its client went away)."""


@dataclass(frozen=True)
class Sampling:
    """How one completion is sampled (OpenAI's chat-completions fields, validated by the server)."""
    max_tokens: int | None = 256          # None: up to the end of the context
    temperature: float = 0.0              # 0: greedy
    top_p: float = 1.0
    seed: int | None = None               # choice i of n uses seed + i
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0         # llama.cpp's penalties sampler (over the last 64 tokens)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    top_logprobs: int | None = None       # None: no logprobs; k: the chosen token's and the k most likely
    grammar: str | None = None            # GBNF that the completion must match (llama.cpp grammar sampler)


def _stops(stop) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)


# Tool calls as Hermes-style templates (Qwen2.5, Qwen3, SmolLM3, Hermes) ask the model to write them.
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def message_of(text: str, finish_reason: str, tools: bool) -> dict:
    """The assistant message and finish reason of a choice; with tools, <tool_call>{"name", "arguments"}
    </tool_call> blocks become OpenAI tool_calls."""
    calls = []
    if tools:
        for block in _TOOL_CALL.findall(text):
            try:
                call = json.loads(block)
            except json.JSONDecodeError:
                continue
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                args = call.get("arguments", {})
                calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                              "function": {"name": call["name"], "arguments": args if isinstance(args, str)
                                           else json.dumps(args, ensure_ascii=False)}})
    if not calls:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    rest = _TOOL_CALL.sub("", text).strip()
    return {"message": {"role": "assistant", "content": rest or None, "tool_calls": calls},
            "finish_reason": "tool_calls"}


def usage_of(out: dict) -> dict:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


@lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def model_sha256(path: str | Path) -> str:
    """SHA-256 of a model file: the identity of the base model that an adapter or a control vector belongs to."""
    return _sha256(*_file_key(path))


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """Identify a file by path and content version, so a rewritten adapter is reloaded (and rehashed)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


VERBOSE_ENV = "LOCALPERS_VERBOSE"


def llama_verbose() -> bool:
    """Whether llama.cpp's own log goes to stderr: `localpers --verbose` (or LOCALPERS_VERBOSE=1) turns it on.
    Off, llama-cpp-python shows only llama.cpp's errors (its logger at ERROR level)."""
    return os.environ.get(VERBOSE_ENV) == "1"


_LLAMA_LOG: list = []  # the installed ctypes callback (kept alive here: llama.cpp holds a bare pointer to it)
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


def install_llama_log() -> None:
    """Route llama.cpp's log (model loading, "n_ctx_seq (512) > n_ctx_train (0)" and the like) to stderr only when
    llama_verbose(), keeping its errors. llama-cpp-python 0.3.36's own callback maps ggml's levels by an older
    enum (WARN taken for ERROR), so its warnings leaked into normal output whatever `verbose` said."""
    if _LLAMA_LOG:
        return
    import sys

    import llama_cpp

    last = [0]

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):
        if level != GGML_LOG_LEVEL_CONT:
            last[0] = level
        if last[0] >= GGML_LOG_LEVEL_ERROR or llama_verbose():
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    _LLAMA_LOG.append(log)


class Engine:
    """One llama.cpp model and context. Close it (close(), or use it as a context manager) when done: that frees
    the model and its adapters now, instead of in Llama.__del__ at interpreter exit, when the modules it needs
    may already be gone."""

    def __init__(self, model_path: str | Path | None = None, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, verbose: bool | None = None, kv_cache_bytes: int = DEFAULT_MAX_BYTES,
                 adapter_cache_bytes: int = names.ADAPTER_CACHE_BYTES):
        import llama_cpp

        from localpers import default_model_path
        from localpers.model.gguf_info import open_gguf

        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        open_gguf(self.model_path)  # one-line UserError for a missing, truncated or unsupported file
        self._llama_cpp = llama_cpp
        install_llama_log()
        # n_threads=None keeps llama-cpp-python's defaults: generation on half the cores, prompts on all of
        # them. With OMP_WAIT_POLICY=PASSIVE (set by localpers, for loaded machines) two decode threads were
        # slower than one on 2 cores (19 vs 31 tokens/s) while prompts gained (89 vs 60 tokens/s): BENCHMARKS §5.
        try:
            self.llm = llama_cpp.Llama(str(self.model_path), n_ctx=n_ctx, n_threads=n_threads,
                                       n_threads_batch=n_threads, n_batch=N_BATCH, n_ubatch=N_BATCH, seed=seed,
                                       verbose=llama_verbose() if verbose is None else verbose)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise UserError(f"{self.model_path}: llama.cpp cannot load this model ({e})") from None
        self.model_name = self.model_path.stem
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.n_embd = self.llm.n_embd()
        self.n_layer = llama_cpp.llama_model_n_layer(self.llm.model)
        meta = self.llm.metadata
        self.chat_template = meta.get("tokenizer.chat_template")
        self.bos_token = self.llm.detokenize([self.llm.token_bos()], special=True).decode("utf-8", "replace")
        self.eos_token = self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace")
        self._lock = FairLock()  # first come, first served (not re-entrant: a stream may resume on another thread)
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # resolved path -> loaded adapter, LRU first
        self.adapter_cache_bytes = adapter_cache_bytes
        self._checked_files = time.monotonic()
        self._pins_lock = threading.Lock()  # guards _Adapter.pins/.cached and _unheld (release never waits for _lock)
        self._unheld: list[_Adapter] = []  # retired adapters whose last request ended while the engine was busy
        self._active: tuple = ((), ())  # (lora file keys with scales, control-vector file keys with scales)
        self._active_entries: tuple = ()  # the _Adapters set in the context
        # KV states per (artifact set, token prefix), so users taking turns resume instead of recomputing.
        self.kv_cache = KVCache(self.llm, kv_cache_bytes, block=KV_BLOCK)
        closed_at_exit(self)
        self.generated = 0  # tokens sampled since the engine started (monitoring; tests count decoding steps)

    def close(self) -> None:
        """Free the adapters, the context and the model (idempotent); the engine is unusable afterwards."""
        with self._lock:
            llm, self.llm = getattr(self, "llm", None), None
            if llm is None:
                return
            self._adapters.clear()  # the model owns its adapters (llama_model::~llama_model deletes them)
            self._active, self._active_entries = ((), ()), ()
            llm.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids as llama.cpp sees them; add_bos adds BOS only where the model's vocabulary asks for it."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt)

    # -- artifacts ------------------------------------------------------------------------------------------
    # Loaded LoRA adapters are an LRU of at most `adapter_cache_bytes` (the files' sizes: llama.cpp loads an
    # adapter's tensors into memory as the file holds them). A request pins the artifact set it was composed
    # with (pin(): adapters loaded, control vectors read), so a retired or rewritten file never fails a request
    # that already holds it; an adapter leaves the LRU when it is evicted, retired (retire_file) or its file
    # changed on disk, and llama.cpp frees it when the last request holding it ends.
    def _load_lora(self, path: str) -> "_Adapter":
        """The loaded adapter of the file at `path` (held lock), loading it when its file is new or changed."""
        key = _file_key(path)
        entry = self._adapters.get(key[0])
        if entry is not None and entry.key == key:
            self._adapters.move_to_end(key[0])
            return entry
        handle = self._llama_cpp.llama_adapter_lora_init(self.llm.model, key[0].encode())
        if not handle:
            raise UserError(f"{path}: not a LoRA adapter for this model ({self.model_name})")
        if entry is not None:  # the file was rewritten: the old content goes once no request holds it
            self._uncache(entry)
        entry = self._adapters[key[0]] = _Adapter(key, handle)
        return entry

    def _uncache(self, entry: "_Adapter") -> None:
        if self._adapters.get(entry.key[0]) is entry:
            del self._adapters[entry.key[0]]
        with self._pins_lock:
            entry.cached = False
            unheld = entry.pins == 0
        if unheld:
            self._free(entry)

    def _free(self, entry: "_Adapter") -> None:
        """Free one adapter's llama.cpp memory (held lock; no request holds it), first taking it out of the
        context if it is active there."""
        if entry.handle is None:
            return
        if any(e is entry for e in self._active_entries):
            self._deactivate()
        self._llama_cpp.llama_adapter_lora_free(entry.handle)
        entry.handle = None

    def _evict(self) -> None:
        """Keep the unpinned cached adapters within the byte bound, least recently used first; every
        STALE_CHECK_S also drop cached adapters whose file is gone or changed (retired by another process)."""
        now = time.monotonic()
        if now - self._checked_files > STALE_CHECK_S:
            self._checked_files = now
            for entry in list(self._adapters.values()):
                try:
                    fresh = _file_key(entry.key[0]) == entry.key
                except UserError:
                    fresh = False
                if not fresh:
                    self._uncache(entry)
        total = sum(e.nbytes for e in self._adapters.values())
        for entry in list(self._adapters.values()):
            if total <= self.adapter_cache_bytes:
                break
            if entry.pins == 0:
                total -= entry.nbytes
                self._uncache(entry)

    def adapter_stats(self) -> dict:
        """{"cached": adapters in the LRU, "bytes": their file bytes, "pinned": held by requests, "bound":
        adapter_cache_bytes} (monitoring and benchmarks)."""
        with self._lock:
            return {"cached": len(self._adapters), "bytes": sum(e.nbytes for e in self._adapters.values()),
                    "pinned": sum(e.pins > 0 for e in self._adapters.values()), "bound": self.adapter_cache_bytes}

    def check_files_soon(self) -> None:
        """Look for cached adapters whose file another process retired at the next pin (not after
        STALE_CHECK_S)."""
        self._checked_files = float("-inf")

    def retire_file(self, path: str | Path) -> None:
        """The file at `path` is no longer served (a retired artifact): its adapter leaves the LRU now and is
        freed once no request holds it. The store calls this for the artifacts it retires (store.on_retire)."""
        key = str(Path(path).resolve())
        with self._lock:
            entry = self._adapters.get(key)
            if entry is not None and self.llm is not None:
                self._uncache(entry)

    def _control_vector_buffer(self, path: str) -> np.ndarray:
        from localpers.model.gguf_write import control_vector_data, read_control_vector  # imports torch: only when used

        directions = read_control_vector(path)
        for layer, vector in directions.items():
            if vector.size != self.n_embd or not 1 <= layer < self.n_layer:
                raise UserError(f"{path}: direction.{layer} does not fit this model "
                                f"({self.n_embd} wide, layers 1..{self.n_layer - 1})")
        return control_vector_data(directions, self.n_layer, self.n_embd)

    def _pin_locked(self, artifacts: Artifacts) -> tuple["Pinned", list[tuple[str, str]]]:
        self._free_unheld()
        loras, cvecs, broken = [], [], []
        for path, scale in artifacts.lora:
            try:
                entry = self._load_lora(path)
            except Exception as e:  # any failure to load means: serve without it
                broken.append((path, str(e) or type(e).__name__))
                continue
            with self._pins_lock:
                entry.pins += 1
            loras.append((path, entry, float(scale)))
        for path, scale in artifacts.control_vectors:
            try:
                cvecs.append((path, _file_key(path), self._control_vector_buffer(path), float(scale)))
            except Exception as e:
                broken.append((path, str(e) or type(e).__name__))
        self._evict()
        return Pinned(self, tuple(loras), tuple(cvecs)), broken

    def pin(self, artifacts: Artifacts) -> tuple["Pinned", list[tuple[str, str]]]:
        """Load and hold the artifacts llama.cpp can apply to this model for one request: (Pinned, [(path,
        reason)] of those it cannot: a missing, truncated or foreign file), so that a request is served without
        a broken artifact instead of failing, and with what it was composed with even if those files are
        retired before it ends. Release the Pinned (release(), or `with`) when the request ends."""
        with self._lock:
            return self._pin_locked(artifacts)

    def usable(self, artifacts: Artifacts) -> tuple[Artifacts, list[tuple[str, str]]]:
        """The artifacts llama.cpp can apply to this model, and (path, reason) for each it cannot."""
        pinned, broken = self.pin(artifacts)
        pinned.release()
        return pinned.artifacts, broken

    def _unpin(self, loras) -> None:
        with self._pins_lock:
            for _, entry, _ in loras:
                entry.pins -= 1
                if entry.pins == 0 and not entry.cached:
                    self._unheld.append(entry)

    def _release(self, pinned: "Pinned") -> None:
        """Let a request's adapters go; never waits for the engine: when another request holds it, a retired
        adapter no request holds any more is freed by the engine's next pin or generation."""
        self._unpin(pinned.loras)
        if self._lock.acquire(blocking=False):
            try:
                if self.llm is not None:
                    self._free_unheld()
                    self._evict()
            finally:
                self._lock.release()

    def _free_unheld(self) -> None:
        """Free the retired adapters that no request holds any more (held lock)."""
        with self._pins_lock:
            entries, self._unheld = [e for e in self._unheld if e.pins == 0], []
        for entry in entries:
            self._free(entry)

    @contextmanager
    def _held(self, artifacts: "Artifacts | Pinned"):
        """Inside the lock: the artifacts as a Pinned set (pinned for this call when given as paths; a file
        that cannot be loaded then raises UserError)."""
        if isinstance(artifacts, Pinned):
            self._free_unheld()
            yield artifacts
            return
        pinned, broken = self._pin_locked(artifacts)
        try:
            if broken:
                raise UserError(broken[0][1])
            yield pinned
        finally:
            self._unpin(pinned.loras)
            self._free_unheld()

    def _deactivate(self) -> None:
        """No adapters and no control vector in the context (held lock); the KV it holds is stashed first."""
        lc = self._llama_cpp
        self.kv_cache.stash(self._active)
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.kv_cache.invalidate()
        lc.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        lc.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        self._active, self._active_entries = ((), ()), ()

    def _activate(self, pinned: "Pinned") -> None:
        """Make the pinned artifacts the context's adapters and control vector; clear the KV cache if anything
        changed."""
        wanted = (tuple((entry.key, scale) for _, entry, scale in pinned.loras),
                  tuple((key, scale) for _, key, _, scale in pinned.cvecs))
        entries = tuple(entry for _, entry, _ in pinned.loras)
        if wanted == self._active and all(a is b for a, b in zip(entries, self._active_entries)):
            return
        lc = self._llama_cpp
        handles = (lc.llama_adapter_lora_p_ctypes * len(entries))(*[e.handle for e in entries])
        scales = (ctypes.c_float * len(entries))(*[s for _, _, s in pinned.loras])
        self.kv_cache.stash(self._active)  # the context still holds KV computed under the previous artifacts
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.kv_cache.invalidate()
        self._active, self._active_entries = ((), ()), ()
        if lc.llama_set_adapters_lora(self.llm.ctx, handles, len(entries), scales) != 0:
            raise UserError("llama.cpp refused the LoRA adapters for this model")
        self._active_entries = entries
        if pinned.cvecs:
            buf = sum(data * np.float32(scale) for _, _, data, scale in pinned.cvecs)
            rc = lc.llama_set_adapter_cvec(self.llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                           buf.size, self.n_embd, 1, self.n_layer - 1)
        else:
            rc = lc.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        if rc != 0:
            raise UserError("llama.cpp refused the control vectors for this model")
        self._active = wanted

    # -- generation -----------------------------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict], *, tools: list | None = None) -> list[int]:
        """The prompt-safe token ids of a conversation (localpers.model.chat.chat_tokens: only the template's own
        markers are special tokens). Raises UserError when the template refuses it or it overflows the context."""
        tokens = chat_tokens(self.llm, self.chat_template, messages, bos_token=self.bos_token,
                             eos_token=self.eos_token, tools=tools).ids
        if len(tokens) >= self.n_ctx:
            raise UserError(f"the prompt has {len(tokens)} tokens, over the context of {self.n_ctx}")
        return tokens

    _prompt_tokens = chat_tokens

    @contextmanager
    def _locked(self, cancel: threading.Event | None):
        """Hold the engine; a request cancelled while it waits gives up its place (raises Cancelled)."""
        if not self._lock.acquire(cancel=cancel):
            raise Cancelled()
        try:
            yield
        finally:
            self._lock.release()

    def _yield_to_waiting(self, cancel: threading.Event | None) -> bool:
        """Between two choices of one request: if other requests wait for the engine, let them all go first (the
        lock is first come, first served), then take it back. True when it was handed over (the caller then
        re-activates its artifacts). Raises Cancelled when cancelled meanwhile (holding the engine again)."""
        if not self._lock.waiting():
            return False
        self._lock.release()
        self._lock.acquire()
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        return True

    def complete(self, messages: list[dict], *, artifacts: "Artifacts | Pinned" = NO_ARTIFACTS, sampling: Sampling = Sampling(),
                 n: int = 1, tools: list | None = None, cancel: threading.Event | None = None,
                 on_delta: Callable[[int, str], None] | None = None) -> dict:
        """Generate `n` completions of the conversation under `artifacts`, one after the other, holding the engine
        for the whole call (never across a yield: streaming goes through on_delta(choice index, text piece),
        called from this thread). `cancel`, once set, stops the work within one decoding step (or while waiting
        for the engine) and raises Cancelled. Each choice starts from an empty KV cache, so a reply never
        depends on the requests served before it (greedy replies are byte-identical to the request run alone).

        Returns {"choices": [{"index", "text", "finish_reason" ("stop" | "length"), "tokens", "logprobs"
        (a list of OpenAI token-logprob objects, or None)}], "prompt_tokens", "completion_tokens"}."""
        with self._locked(cancel), self._held(artifacts) as pinned:
            self._activate(pinned)
            prompt = self.chat_tokens(messages, tools=tools)
            grammar = self._grammar(sampling.grammar) if sampling.grammar else None
            choices = []
            for i in range(n):
                if i and self._yield_to_waiting(cancel):  # fairness: a long request lets waiting ones through
                    self._activate(pinned)
                seed = None if sampling.seed is None else sampling.seed + i
                emit = (lambda piece, i=i: on_delta(i, piece)) if on_delta else None
                choices.append({"index": i, **self._decode(prompt, sampling, seed, grammar, cancel, emit)})
        return {"choices": choices, "prompt_tokens": len(prompt),
                "completion_tokens": sum(c["tokens"] for c in choices)}

    def _grammar(self, gbnf: str):
        from llama_cpp.llama_grammar import LlamaGrammar

        try:
            return LlamaGrammar.from_string(gbnf, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"llama.cpp refused the grammar: {e}") from None

    def _decode(self, prompt: list[int], s: Sampling, seed: int | None, grammar, cancel, emit) -> dict:
        """One completion of `prompt` (already tokenized; the engine is held). Stop strings end the text before
        them (and are never streamed: text that may start one is held back until it cannot)."""
        lc, llm = self._llama_cpp, self.llm
        # Reuse the longest prefix of the prompt that the context or the KV-state cache holds under these very
        # artifacts (localpers.engine.kvcache): restored cells are the bytes computed for that prefix, so the reply is the
        # one an empty cache gives (tests/test_kvcache.py checks byte-exact isolation).
        self.kv_cache.resume(self._active, prompt)
        self.kv_cache.evaluated(len(prompt))  # generate() decodes the rest of the prompt in aligned chunks
        llm.set_seed(seed if seed is not None else random.getrandbits(32))
        bias_ids = np.array([t for t, _ in s.logit_bias], dtype=np.intc)
        bias = np.array([b for _, b in s.logit_bias], dtype=np.single)
        want_logprobs = s.top_logprobs is not None
        row: list = [None]

        def process(input_ids, logits):
            if want_logprobs:
                raw = logits.astype(np.float64)
                row[0] = raw - (raw.max() + np.log(np.exp(raw - raw.max()).sum()))
            if len(bias_ids):
                logits[bias_ids] += bias
            return logits

        processors = lc.LogitsProcessorList([process]) if want_logprobs or len(bias_ids) else None
        stopping = lc.StoppingCriteriaList([lambda ids, logits: cancel is not None and cancel.is_set()])
        budget = self.n_ctx - len(prompt)
        max_tokens = budget if s.max_tokens is None else min(s.max_tokens, budget)
        tokens, logprobs, text, sent, finish = [], [] if want_logprobs else None, "", 0, "length"
        generator = llm.generate(
            prompt, top_k=0 if s.temperature > 0 else 40, top_p=s.top_p, min_p=0.0, temp=s.temperature,
            repeat_penalty=1.0, frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
            logits_processor=processors, stopping_criteria=stopping, grammar=grammar)
        try:
            for token in generator if max_tokens > 0 else ():
                if lc.llama_vocab_is_eog(llm._model.vocab, token):
                    finish = "stop"
                    break
                tokens.append(token)
                self.generated += 1
                if want_logprobs:
                    logprobs.append(self._token_logprob(token, row[0], s.top_logprobs))
                text = llm.detokenize(tokens, prev_tokens=prompt).decode("utf-8", "ignore")
                cut = min((at for at in (text.find(stop) for stop in s.stop) if at >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                if len(tokens) >= max_tokens:
                    break
                safe = len(text) - max((k for stop in s.stop for k in range(1, len(stop))
                                        if text.endswith(stop[:k])), default=0)
                if emit and safe > sent:
                    emit(text[sent:safe])
                    sent = safe
        finally:
            generator.close()
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if emit and len(text) > sent:
            emit(text[sent:])
        return {"text": text, "finish_reason": finish, "tokens": len(tokens), "logprobs": logprobs}

    def _token_piece(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=True)

    def _token_logprob(self, token: int, logprobs: np.ndarray, top: int) -> dict:
        """OpenAI's token-logprob object: the chosen token's log-probability under the model (before sampling
        adjustments) and the `top` most likely tokens."""
        def entry(t):
            piece = self._token_piece(int(t))
            return {"token": piece.decode("utf-8", "replace"), "logprob": float(logprobs[t]), "bytes": list(piece)}

        best = np.argsort(-logprobs)[:top] if top else []
        return {**entry(token), "top_logprobs": [entry(t) for t in best]}

    def chat(self, messages: list[dict], *, artifacts: "Artifacts | Pinned" = NO_ARTIFACTS, max_tokens: int | None = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop=None,
             cancel: threading.Event | None = None, **more) -> dict:
        """An OpenAI chat.completion for `messages`, generated under `artifacts`. `more` takes the other Sampling
        fields (presence_penalty, logit_bias, top_logprobs, grammar ...) and complete's n and tools."""
        n, tools, on_delta = more.pop("n", 1), more.pop("tools", None), more.pop("on_delta", None)
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=_stops(stop), **more)
        out = self.complete(messages, artifacts=artifacts, sampling=sampling, n=n, tools=tools, cancel=cancel,
                            on_delta=on_delta)
        return self.chat_response(out, tools=bool(tools))

    def chat_response(self, out: dict, *, tools: bool = False, response_id: str | None = None) -> dict:
        """complete's result as an OpenAI chat.completion object."""
        return {
            "id": response_id or "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": c["index"], **message_of(c["text"], c["finish_reason"], tools),
                         "logprobs": None if c["logprobs"] is None else {"content": c["logprobs"], "refusal": None}}
                        for c in out["choices"]],
            "usage": usage_of(out),
        }

    def chat_stream(self, messages: list[dict], *, artifacts: "Artifacts | Pinned" = NO_ARTIFACTS, max_tokens: int | None = 256,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop=None,
                    **more) -> Iterator[dict]:
        """OpenAI chat.completion.chunk dicts. Generation runs on a thread of its own that holds the engine;
        closing this iterator (or dropping it) cancels that generation within one decoding step, so an abandoned
        stream never keeps the engine. Prompt errors raise from the first next()."""
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        chunk_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(index: int, delta: dict, finish_reason=None) -> dict:
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}

        def work():
            try:
                events.put(("done", self.chat(messages, artifacts=artifacts, max_tokens=max_tokens,
                                              temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                              cancel=cancel, on_delta=lambda i, t: events.put(("delta", i, t)),
                                              **more)))
            except BaseException as e:  # handed to the consumer
                events.put(("error", e))

        threading.Thread(target=work, daemon=True, name="localpers-stream").start()
        try:
            started: set[int] = set()
            while True:
                event = events.get()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "done":
                    for choice in event[1]["choices"]:
                        if choice["index"] not in started:
                            yield chunk(choice["index"], {"role": "assistant", "content": ""})
                        yield chunk(choice["index"], {}, choice["finish_reason"])
                    return
                _, index, text = event
                if index not in started:
                    started.add(index)
                    yield chunk(index, {"role": "assistant", "content": ""})
                yield chunk(index, {"content": text})
        finally:
            cancel.set()

    # -- scoring --------------------------------------------------------------------------------------------
    def logits(self, tokens: list[int], *, artifacts: "Artifacts | Pinned" = NO_ARTIFACTS) -> np.ndarray:
        """Next-token logits at every position of `tokens`, decoded from an empty cache: float32 [len(tokens), V]."""
        tokens = list(tokens)
        if len(tokens) > self.n_ctx:
            raise UserError(f"{len(tokens)} tokens are over the context of {self.n_ctx}")
        with self._lock, self._held(artifacts) as pinned:
            self._activate(pinned)
            llm = self.llm
            llm.reset()
            llm._ctx.kv_cache_clear()
            self.kv_cache.invalidate()
            rows = []
            for start in range(0, len(tokens), llm.n_batch):
                rows.append(self._decode_batch(tokens[start:start + llm.n_batch], n_past=start))
            llm.reset()  # n_tokens = 0: the next generation re-evaluates its prompt from scratch
        return np.concatenate(rows) if rows else np.zeros((0, self.n_vocab), np.float32)

    def _decode_batch(self, tokens: list[int], n_past: int) -> np.ndarray:
        """Decode `tokens` at positions n_past.. with logits for each: float32 [len(tokens), V] (a copy)."""
        self.llm._batch.set_batch(batch=tokens, n_past=n_past, logits_all=True)
        self.llm._ctx.decode(self.llm._batch)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(len(tokens), self.n_vocab)).copy()

    def continuation_logprobs(self, prompt: str | list[dict], continuations: list[str], *,
                              artifacts: "Artifacts | Pinned" = NO_ARTIFACTS) -> list[tuple[list[int], np.ndarray]]:
        """For each continuation, its tokens and the log-softmax distributions [n_tokens, V] (float64) that
        predict them after `prompt`: a conversation (messages, tokenized prompt-safe as the served path does,
        chat_tokens) or raw text (tokenized with BOS, special tokens parsed); continuations without BOS.

        The prompt is decoded once, reusing whatever prefix of it the KV cache already holds under the same
        artifacts (a conversation scored with more and more turns, or a question just answered), and each
        continuation is decoded in one batch on top of it, after dropping the previous continuation's cells."""
        prompt_ids = self.chat_tokens(prompt) if isinstance(prompt, list) else self.tokenize(prompt)
        options = [self.tokenize(c, add_bos=False) for c in continuations]
        if not all(options):
            raise UserError("a continuation to score is empty")
        if len(prompt_ids) + max(map(len, options)) > self.n_ctx:
            raise UserError(f"a prompt of {len(prompt_ids)} tokens and its continuations exceed the context "
                            f"of {self.n_ctx}")
        llm, out = self.llm, []
        with self._lock, self._held(artifacts) as pinned:
            self._activate(pinned)
            self.kv_cache.resume(self._active, prompt_ids)  # n_tokens: an aligned prefix of prompt_ids[:-1]
            llm.eval(prompt_ids[llm.n_tokens:-1])  # the last prompt token goes with each continuation, for its logits
            self.kv_cache.evaluated(len(prompt_ids) - 1)
            for ids in options:
                llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
                logits = self._decode_batch([prompt_ids[-1], *ids[:-1]], n_past=llm.n_tokens).astype(np.float64)
                logits -= logits.max(axis=1, keepdims=True)
                out.append((ids, logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))))
        return out

    def continuation_logprob(self, prompt: str | list[dict], continuation: str, *, artifacts: "Artifacts | Pinned" = NO_ARTIFACTS) -> float:
        """Sum of log p(continuation tokens | prompt)."""
        [(ids, logprobs)] = self.continuation_logprobs(prompt, [continuation], artifacts=artifacts)
        return float(logprobs[np.arange(len(ids)), ids].sum())
