"""Per-user KV state: a bounded RAM cache of llama.cpp context states, keyed by (artifact set, token prefix).

The engine has one llama.cpp context. Its KV cache is cleared whenever the active LoRA adapters or control
vectors change (a prefix computed under other adapters must never be reused), and llama-cpp-python drops
whatever part of it a new prompt does not share. Without this cache two users taking turns re-process their whole
conversation on every request (issue 14: 2.58 s to the first token on a 735-token conversation instead of
0.003 s). Here, before the context's content is thrown away, its KV cells are copied out with llama.cpp's
sequence-state API (llama_state_seq_get_data, the KV cells of sequence 0 only: no logits, no whole-context
buffers); before a prompt is evaluated, the cached state under the same artifact set that shares the longest
prefix with the prompt is copied back (llama_state_seq_set_data) when it beats what the context already holds.
A state is only ever restored under the artifact set it was computed under, so isolation stays byte-exact: the
restored cells are the very bytes the context held.

Replies equal to the ones an empty cache gives (issue 13: a greedy reply is byte-identical whatever was served
before): llama.cpp's numbers for a token depend on whether it is decoded alone (a batch of one takes other matmul
kernels than a batch of many; F32 LoRA matmuls take llamafile's sgemm), not on the size or start of the
multi-token batch it is decoded in (issue 32; tests/test_kvcache.py checks KV bytes and logits byte for byte,
with and without a LoRA). llama-cpp-python decodes a prompt in n_batch chunks from its first uncached token. So a
reusable prefix ends on a multiple of `block` (the engine's KV_BLOCK: 1, any token) and every cell of it was
computed by a prompt evaluation in a batch of several tokens (`valid`), never by token-by-token generation; the
suffix is decoded from a start chosen so that the prompt's last token is decoded alone exactly when an empty cache
decodes it alone (`start`).

Memory: a state costs n_tokens * n_layer * 2 * n_head_kv * head_dim * 2 bytes (F16 K and V); 22.5 KiB per
token on SmolLM2-135M, so 16.5 MiB for a 735-token conversation. The cache holds at most `max_bytes` (default
256 MiB), evicting the least recently used state first; a state over the bound is not kept.
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict

import numpy as np

DEFAULT_MAX_BYTES = 256 << 20
MIN_TOKENS = 32   # shorter prefixes are cheaper to recompute than to copy around


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class KVCache:
    """LRU of (artifact key, tokens) -> KV bytes of llama.cpp sequence 0, for one llama_cpp.Llama.

    The engine calls `stash(key)` before it clears the context for another artifact set, and `resume(key, tokens)`
    before it evaluates a prompt under the artifact set `key` (any hashable identity of the active adapters and
    control vectors, with the files' content versions). Not thread-safe: the engine's lock serialises calls."""

    def __init__(self, llm, max_bytes: int = DEFAULT_MAX_BYTES, min_tokens: int = MIN_TOKENS,
                 block: int | None = None):
        import llama_cpp

        self.llm, self.max_bytes, self.min_tokens = llm, int(max_bytes), min_tokens
        self.n_batch = int(llm.n_batch)  # llama-cpp-python's prompt chunks, from the first uncached token
        self.block = self.n_batch if block is None else int(block)  # reusable prefixes end on a multiple of this
        self.valid = 0  # leading context cells computed by an aligned prompt evaluation (see the module doc)
        self._lc = llama_cpp
        self._states: OrderedDict[tuple, ctypes.Array] = OrderedDict()   # (key, tokens) -> sequence state
        self.nbytes = 0
        self.hits = self.saves = 0

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        self._states.clear()
        self.nbytes = 0

    # -- saving -----------------------------------------------------------------------------------------------
    def aligned(self, n: int) -> int:
        return n - n % self.block

    def start(self, n: int, n_prompt: int) -> int:
        """The largest aligned start <= n from which decoding the rest of an n_prompt-token prompt in n_batch chunks
        decodes its last token alone (a batch of one) exactly when decoding it from an empty context does."""
        n = self.aligned(n)
        if n_prompt % self.n_batch == 1:  # an empty context decodes the last token alone: so must the suffix
            return n - n % self.n_batch
        if (n_prompt - n) % self.n_batch == 1:
            return self.aligned(n - 1)
        return n

    def evaluated(self, n_prompt: int) -> None:
        """The engine is about to decode the rest of a prompt of n_prompt tokens after resume(), from llm.n_tokens:
        its cells are reusable, but for a last token decoded alone."""
        alone = (n_prompt - int(self.llm.n_tokens)) % self.n_batch == 1
        self.valid = n_prompt - 1 if alone else n_prompt

    def invalidate(self) -> None:
        """The context's cells were computed some other way (scoring, a cleared cache): nothing is reusable."""
        self.valid = 0

    def _truncate(self, n: int) -> None:
        """Keep only the context's first n cells."""
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, n, -1)
        llm.n_tokens = min(int(llm.n_tokens), n)
        self.valid = min(self.valid, n)

    def stash(self, key) -> None:
        """Copy the context's reusable content (llm.input_ids[:n], computed under `key`, n the aligned length of
        its valid cells) into the cache; the cells past n are dropped (the context is about to be cleared or
        overwritten)."""
        llm = self.llm
        n = self.aligned(min(int(llm.n_tokens), self.valid))
        if self.max_bytes <= 0 or n < self.min_tokens:
            return
        tokens = tuple(int(t) for t in llm.input_ids[:n])
        entry = (key, tokens)
        if entry in self._states:
            self._states.move_to_end(entry)
            return
        # Cells past n (a generated reply, a scored continuation, an unaligned tail) are not part of the prefix.
        self._truncate(n)
        size = self._lc.llama_state_seq_get_size(llm.ctx, 0)
        if size > self.max_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        written = self._lc.llama_state_seq_get_data(llm.ctx, buf, size, 0)
        if written == 0 or written > size:
            return
        # A kept state that is a prefix of this one is superseded: restoring this one serves it as well.
        for old in [e for e in self._states if e[0] == key and len(e[1]) <= n and tokens[:len(e[1])] == e[1]]:
            self._drop(old)
        # kept as the buffer llama.cpp wrote (no copy; restoring reads it in place)
        self._states[entry] = buf if written == size else (ctypes.c_uint8 * written).from_buffer_copy(buf)
        self.nbytes += written
        self.saves += 1
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._states)))

    def _drop(self, entry) -> None:
        self.nbytes -= len(self._states.pop(entry))

    # -- restoring --------------------------------------------------------------------------------------------
    def resume(self, key, tokens: list[int]) -> int:
        """Before evaluating `tokens` under `key`: make the context hold the longest reusable prefix of `tokens`
        (at most len(tokens) - 1: the last prompt token is always decoded, for its logits; a start() from which
        the suffix decodes as from an empty context) that the context or the cache has under `key`, stashing the
        context's content first if the prompt would discard it. Returns the number of prompt tokens the context
        then holds (llm.n_tokens)."""
        llm = self.llm
        n = int(llm.n_tokens)
        limit = max(len(tokens) - 1, 0)
        held = self.start(min(common_prefix(llm.input_ids[:n], tokens), self.valid, limit), len(tokens))
        if self.aligned(min(n, self.valid)) - held >= self.min_tokens:
            # the prompt is about to overwrite another conversation: keep it (before choosing a state to
            # restore: stashing may drop a kept state that it supersedes)
            self.stash(key)
        best, best_len = None, held
        for entry in self._states:
            if entry[0] == key and len(entry[1]) > best_len:
                length = self.start(min(common_prefix(entry[1], tokens), limit), len(tokens))
                if length > best_len:
                    best, best_len = entry, length
        if best is None or best_len - held < self.min_tokens:
            self._truncate(held)
            return held
        state = self._states[best]
        self._states.move_to_end(best)
        llm._ctx.kv_cache_clear()
        if self._lc.llama_state_seq_set_data(llm.ctx, state, len(state), 0) != len(state):
            llm.reset()
            llm._ctx.kv_cache_clear()
            self.valid = 0
            self._drop(best)
            return 0
        length = len(best[1])
        llm.input_ids[:length] = best[1]
        llm.n_tokens = length
        self.valid = length
        self._truncate(best_len)
        llm._requires_eval = True   # the restored cells carry no logits: the next decode must produce them
        self.hits += 1
        return best_len
