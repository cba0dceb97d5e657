"""Open GGUF files with one-line errors for user mistakes, and describe a model for `localpers info`."""
from __future__ import annotations

import os
import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from localpers.errors import UserError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


class GGUFFile(gguf.GGUFReader):
    """gguf's reader, parsing over a plain ndarray view of the memory map: np.memmap's per-slice
    bookkeeping made reading SmolLM2's 100k vocabulary strings take 3x longer."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(path)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.memmap):
        self._data = value.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        """Arrays (a vocabulary: 100k+ tokens, merges, scores, types) parsed in one pass: numbers as one part,
        strings as one part each, instead of several numpy views per element; contents() reads both layouts."""
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item = gguf.GGUFValueType(int(item_type[0]))
        parts, offs = [item_type, length], orig_offs + 12
        if item == gguf.GGUFValueType.STRING:
            for _ in range(int(length[0])):
                (n,) = struct.unpack_from("<Q", self.data, offs)
                parts.append(self.data[offs + 8 : offs + 8 + n])
                offs += 8 + n
        elif item in self.gguf_scalar_to_np:
            parts.append(self._get(offs, self.gguf_scalar_to_np[item], length[0]))
            offs += parts[-1].nbytes
        else:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, list(range(2, len(parts))), [gguf.GGUFValueType.ARRAY, item]


def open_gguf(path, *, check_arch: bool = True) -> GGUFFile:
    """A GGUF reader over `path`; UserError naming the file for a missing, non-GGUF, truncated or corrupt
    file, and (with check_arch) for an architecture localpers does not support."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file")
    try:
        reader = GGUFFile(path)  # the reader fails on any header, metadata or tensor data cut short
    except (ValueError, IndexError, KeyError, OSError, struct.error):
        raise UserError(f"{path}: truncated or corrupt GGUF file") from None
    if check_arch:
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
        if arch not in SUPPORTED_ARCHS:
            raise UserError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    return reader


def describe(path=None) -> str:
    """A human-readable summary of a GGUF model (the default model when path is None)."""
    if path is None:
        from localpers import default_model_path

        try:
            path = default_model_path()
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    reader = open_gguf(path)

    def get(key, default="?"):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    rows = [
        ("file", f"{path} ({os.path.getsize(path) / 2**20:.1f} MiB)"),
        ("name", get("general.name")),
        ("architecture", arch),
        ("parameters", f"{n_params:,} ({n_params / 1e6:.1f} M)"),
        ("tensor types", ", ".join(f"{name}: {n}" for name, n in types.most_common())),
        ("vocabulary", f"{get('tokenizer.ggml.model')} ({get('tokenizer.ggml.pre', 'default')} pre-tokenizer), "
                       f"{len(tokens.data) if tokens is not None else '?'} tokens"),
        ("context length", get(f"{arch}.context_length")),
        ("layers", get(f"{arch}.block_count")),
        ("embedding size", get(f"{arch}.embedding_length")),
        ("feed-forward size", get(f"{arch}.feed_forward_length")),
        ("attention heads", f"{get(f'{arch}.attention.head_count')} "
                            f"(key/value heads: {get(f'{arch}.attention.head_count_kv')})"),
        ("rope base", get(f"{arch}.rope.freq_base", 10000.0)),
        ("chat template", "yes" if reader.get_field("tokenizer.chat_template") is not None else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
