"""The served path: one llama.cpp model and context, with per-request LoRA adapters and control vectors.

Every personalization method ends as one of llama.cpp's three primitives (a LoRA adapter, a control vector,
prompt context), so generation and scoring for every method go through this one class. A llama context is not
thread-safe, so each public method holds the engine's lock. Whenever the active adapters or control vector
change, the KV cache is cleared: a cached prompt prefix computed under other adapters must never be reused
(llama.cpp's own server has had exactly this bug).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from localpers.chat import render_chat
from localpers.errors import UserError
from localpers.gguf_write import control_vector_data, read_control_vector


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
                 seed: int = 0, verbose: bool | None = None):
        import llama_cpp

        from localpers import default_model_path
        from localpers.gguf_info import open_gguf

        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        open_gguf(self.model_path)  # one-line UserError for a missing, truncated or unsupported file
        self._llama_cpp = llama_cpp
        install_llama_log()
        # n_threads=None keeps llama-cpp-python's defaults: generation on half the cores, prompts on all of
        # them. With OMP_WAIT_POLICY=PASSIVE (set by localpers, for loaded machines) two decode threads were
        # slower than one on 2 cores (19 vs 31 tokens/s) while prompts gained (89 vs 60 tokens/s): BENCHMARKS §5.
        self.llm = llama_cpp.Llama(str(self.model_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                   seed=seed, verbose=llama_verbose() if verbose is None else verbose)
        self.model_name = self.model_path.stem
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.n_embd = self.llm.n_embd()
        self.n_layer = llama_cpp.llama_model_n_layer(self.llm.model)
        meta = self.llm.metadata
        self.chat_template = meta.get("tokenizer.chat_template")
        self.bos_token = self.llm.detokenize([self.llm.token_bos()], special=True).decode("utf-8", "replace")
        self.eos_token = self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace")
        self._lock = threading.Lock()  # not an RLock: a stream may be resumed on another thread
        self._adapters: dict[str, tuple[tuple, object]] = {}  # resolved path -> (file key, llama handle)
        self._active: tuple = ((), ())  # (lora file keys with scales, control-vector file keys with scales)

    def close(self) -> None:
        """Free the adapters, the context and the model (idempotent); the engine is unusable afterwards."""
        with self._lock:
            llm, self.llm = getattr(self, "llm", None), None
            if llm is None:
                return
            self._adapters.clear()  # the model owns its adapters (llama_model::~llama_model deletes them)
            self._active = ((), ())
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
    def _lora_handle(self, path: str):
        key = _file_key(path)
        cached = self._adapters.get(key[0])
        if cached and cached[0] == key:
            return key, cached[1]
        handle = self._llama_cpp.llama_adapter_lora_init(self.llm.model, key[0].encode())
        if not handle:
            raise UserError(f"{path}: not a LoRA adapter for this model ({self.model_name})")
        if cached:  # the file was rewritten: the old handle is stale
            self._active = ((), self._active[1])
            self._llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            self._llama_cpp.llama_adapter_lora_free(cached[1])
        self._adapters[key[0]] = (key, handle)
        return key, handle

    def _control_vector_buffer(self, path: str) -> np.ndarray:
        directions = read_control_vector(path)
        for layer, vector in directions.items():
            if vector.size != self.n_embd or not 1 <= layer < self.n_layer:
                raise UserError(f"{path}: direction.{layer} does not fit this model "
                                f"({self.n_embd} wide, layers 1..{self.n_layer - 1})")
        return control_vector_data(directions, self.n_layer, self.n_embd)

    def _activate(self, artifacts: Artifacts) -> None:
        """Make `artifacts` the context's adapters and control vector; clear the KV cache if anything changed."""
        loras = [(*self._lora_handle(path), float(scale)) for path, scale in artifacts.lora]
        cvecs = tuple((_file_key(path), float(scale)) for path, scale in artifacts.control_vectors)
        wanted = (tuple((key, scale) for key, _, scale in loras), cvecs)
        if wanted == self._active:
            return
        lc = self._llama_cpp
        handles = (lc.llama_adapter_lora_p_ctypes * len(loras))(*[h for _, h, _ in loras])
        scales = (ctypes.c_float * len(loras))(*[s for _, _, s in loras])
        if lc.llama_set_adapters_lora(self.llm.ctx, handles, len(loras), scales) != 0:
            raise UserError("llama.cpp refused the LoRA adapters for this model")
        if cvecs:
            buf = sum(self._control_vector_buffer(path) * np.float32(scale) for path, scale in artifacts.control_vectors)
            rc = lc.llama_set_adapter_cvec(self.llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                           buf.size, self.n_embd, 1, self.n_layer - 1)
        else:
            rc = lc.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        if rc != 0:
            raise UserError(f"llama.cpp refused the control vectors {[p for p, _ in artifacts.control_vectors]}")
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self._active = wanted

    # -- generation -----------------------------------------------------------------------------------------
    def _prompt_tokens(self, messages: list[dict]) -> list[int]:
        tokens = self.tokenize(self.format_chat(messages))
        if len(tokens) >= self.n_ctx:
            raise UserError(f"the prompt has {len(tokens)} tokens, over the context of {self.n_ctx}")
        return tokens

    def _completion_args(self, max_tokens, temperature, top_p, seed, stop) -> dict:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    stop=stop + [self.eos_token], top_k=0 if temperature > 0 else 40, min_p=0.0, repeat_penalty=1.0)

    def chat(self, messages: list[dict], *, artifacts: Artifacts = NO_ARTIFACTS, max_tokens: int | None = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop=None) -> dict:
        """An OpenAI chat.completion for `messages`, generated under `artifacts`."""
        with self._lock:
            self._activate(artifacts)
            tokens = self._prompt_tokens(messages)
            out = self.llm.create_completion(tokens, **self._completion_args(max_tokens, temperature, top_p, seed, stop))
        choice = out["choices"][0]
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": out["created"],
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                         "finish_reason": choice["finish_reason"]}],
            "usage": out["usage"],
        }

    def chat_stream(self, messages: list[dict], *, artifacts: Artifacts = NO_ARTIFACTS, max_tokens: int | None = 256,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop=None) -> Iterator[dict]:
        """OpenAI chat.completion.chunk dicts; the engine stays locked until the stream is exhausted or closed."""
        chunk_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(delta: dict, finish_reason=None) -> dict:
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        with self._lock:
            self._activate(artifacts)
            tokens = self._prompt_tokens(messages)
            pieces = self.llm.create_completion(
                tokens, stream=True, **self._completion_args(max_tokens, temperature, top_p, seed, stop))
            yield chunk({"role": "assistant", "content": ""})
            for piece in pieces:
                choice = piece["choices"][0]
                if choice["text"]:
                    yield chunk({"content": choice["text"]})
                if choice["finish_reason"]:
                    yield chunk({}, choice["finish_reason"])

    # -- scoring --------------------------------------------------------------------------------------------
    def logits(self, tokens: list[int], *, artifacts: Artifacts = NO_ARTIFACTS) -> np.ndarray:
        """Next-token logits at every position of `tokens`, decoded from an empty cache: float32 [len(tokens), V]."""
        tokens = list(tokens)
        if len(tokens) > self.n_ctx:
            raise UserError(f"{len(tokens)} tokens are over the context of {self.n_ctx}")
        with self._lock:
            self._activate(artifacts)
            llm = self.llm
            llm.reset()
            llm._ctx.kv_cache_clear()
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

    def continuation_logprobs(self, prompt: str, continuations: list[str], *,
                              artifacts: Artifacts = NO_ARTIFACTS) -> list[tuple[list[int], np.ndarray]]:
        """For each continuation, its tokens and the log-softmax distributions [n_tokens, V] (float64) that
        predict them after `prompt` (tokenized with BOS; continuations without).

        The prompt is decoded once, reusing whatever prefix of it the KV cache already holds under the same
        artifacts (a conversation scored with more and more turns, or a question just answered), and each
        continuation is decoded in one batch on top of it, after dropping the previous continuation's cells."""
        prompt_ids = self.tokenize(prompt)
        options = [self.tokenize(c, add_bos=False) for c in continuations]
        if not all(options):
            raise UserError("a continuation to score is empty")
        if len(prompt_ids) + max(map(len, options)) > self.n_ctx:
            raise UserError(f"a prompt of {len(prompt_ids)} tokens and its continuations exceed the context "
                            f"of {self.n_ctx}")
        llm, out = self.llm, []
        with self._lock:
            self._activate(artifacts)
            cached = llm.input_ids[:llm.n_tokens]
            same = int(np.argmin(np.append(cached[:len(prompt_ids)] == prompt_ids[:len(cached)], False)))
            llm.n_tokens = min(same, len(prompt_ids) - 1)
            llm.eval(prompt_ids[llm.n_tokens:-1])  # the last prompt token goes with each continuation, for its logits
            for ids in options:
                llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
                logits = self._decode_batch([prompt_ids[-1], *ids[:-1]], n_past=llm.n_tokens).astype(np.float64)
                logits -= logits.max(axis=1, keepdims=True)
                out.append((ids, logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))))
        return out

    def continuation_logprob(self, prompt: str, continuation: str, *, artifacts: Artifacts = NO_ARTIFACTS) -> float:
        """Sum of log p(continuation tokens | prompt)."""
        [(ids, logprobs)] = self.continuation_logprobs(prompt, [continuation], artifacts=artifacts)
        return float(logprobs[np.arange(len(ids)), ids].sum())
