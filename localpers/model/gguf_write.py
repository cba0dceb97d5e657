"""Write the GGUF files localpers produces: whole models (random ones for tests), llama.cpp LoRA adapters and
control vectors. Tensor naming and layouts follow llama.cpp's loaders (src/llama-adapter.cpp,
common/common.cpp common_control_vector_load_one)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from localpers.model.gguf_info import open_gguf
from localpers.model.model import ModelConfig

F32 = gguf.GGMLQuantizationType.F32
FILE_TYPES = {F32: gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
              gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


def write_model(path, config: ModelConfig, tensors: dict[str, np.ndarray], vocab_from, *,
                dtype: gguf.GGMLQuantizationType = F32, name: str = "localpers-model",
                chat_template: str | None = None) -> Path:
    """A model GGUF with `tensors` (GGUF name -> float array in numpy shape, e.g. [n_out, n_in]) and the
    tokenizer metadata (tokenizer.*: vocabulary, merges, special ids, chat template) of `vocab_from` (a path
    or an open reader of a GGUF, or a list of (key, value, GGUFValueType, sub_type) fields); `chat_template`
    replaces the vocabulary's template. Matrices are stored as `dtype` (F16 where a row is not a multiple of
    the block size); norms and biases stay F32 as llama.cpp's converter keeps them."""
    if isinstance(vocab_from, list):
        fields = vocab_from
    else:
        vocab = vocab_from if isinstance(vocab_from, gguf.GGUFReader) else open_gguf(vocab_from, check_arch=False)
        fields = [(key, f.contents(), f.types[0], f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
                  for key, f in vocab.fields.items() if key.startswith("tokenizer.")]
    n_tokens = next(len(value) for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    if n_tokens != config.vocab_size:
        raise ValueError(f"the vocabulary has {n_tokens} tokens, the model {config.vocab_size}")
    arch = config.arch
    w = gguf.GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(FILE_TYPES.get(dtype, gguf.LlamaFileType.GUESSED))
    w.add_block_count(config.n_layer)
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.d_ff)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_head)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_base)
    if config.rope_scaling != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling)
    w.add_layer_norm_rms_eps(config.norm_eps)
    if config.sliding_window:
        w.add_sliding_window(config.sliding_window)
        if config.swa_pattern != 6:
            w.add_uint32(f"{arch}.attention.sliding_window_pattern", config.swa_pattern)
        if config.rope_base_local != 10000.0:
            w.add_float32(f"{arch}.rope.freq_base_swa", config.rope_base_local)
    w.add_vocab_size(config.vocab_size)
    for key, value, value_type, sub_type in fields:
        if not (chat_template is not None and key == "tokenizer.chat_template"):
            w.add_key_value(key, value, value_type, sub_type)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for tensor_name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1 or dtype == F32:
            w.add_tensor(tensor_name, array)
        elif dtype == gguf.GGMLQuantizationType.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[dtype][0]:
            w.add_tensor(tensor_name, array.astype(np.float16))
        else:
            w.add_tensor(tensor_name, gguf.quants.quantize(array, dtype), raw_dtype=dtype)
    _finish(w)
    return Path(path)


def random_model(path, arch: str, vocab_from, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4,
                 n_kv_head: int = 2, head_dim: int | None = None, d_ff: int = 128, tied_output: bool = False,
                 rope_base: float = 10000.0, rope_scaling: float = 1.0, sliding_window: int = 0, seed: int = 0,
                 dtype: gguf.GGMLQuantizationType = F32, chat_template: str | None = None) -> Path:
    """A small model with random weights at realistic scales: each matrix keeps activations near unit RMS
    (std 1/sqrt(n_in)), norms near 1, so logits stay O(1..10) and differences between implementations show.
    qwen2 gets q/k/v biases, qwen3 per-head q/k norms, gemma3 q/k norms, post-norms and (with sliding_window)
    sliding-window layers."""
    vocab = open_gguf(vocab_from, check_arch=False)
    n_vocab = len(vocab.get_field("tokenizer.ggml.tokens").data)
    config = ModelConfig(arch=arch, n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head,
                         head_dim=head_dim or d_model // n_head, d_ff=d_ff, vocab_size=n_vocab,
                         rope_base=rope_base, rope_scaling=rope_scaling, norm_eps=1e-6, context_length=512,
                         tied_output=tied_output, qkv_bias=arch == "qwen2",
                         sliding_window=sliding_window if arch == "gemma3" else 0)
    rng = np.random.default_rng(seed)

    def matrix(n_out, n_in):
        return rng.normal(0, n_in ** -0.5, (n_out, n_in))

    def norm(n, spread=0.1):
        return 1 + spread * rng.normal(size=n)

    c, q_dim, kv_dim = config, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    tensors = {"token_embd.weight": rng.normal(0, 0.5, (n_vocab, d_model)), "output_norm.weight": norm(d_model)}
    if not tied_output:
        tensors["output.weight"] = matrix(n_vocab, d_model)
    for i in range(n_layer):
        b = f"blk.{i}"
        tensors |= {
            f"{b}.attn_norm.weight": norm(d_model),
            f"{b}.attn_q.weight": matrix(q_dim, d_model),
            f"{b}.attn_k.weight": matrix(kv_dim, d_model),
            f"{b}.attn_v.weight": matrix(kv_dim, d_model),
            f"{b}.attn_output.weight": matrix(d_model, q_dim),
            f"{b}.ffn_norm.weight": norm(d_model),
            f"{b}.ffn_gate.weight": matrix(c.d_ff, d_model),
            f"{b}.ffn_up.weight": matrix(c.d_ff, d_model),
            f"{b}.ffn_down.weight": matrix(d_model, c.d_ff),
        }
        if c.qkv_bias:
            tensors |= {f"{b}.attn_{x}.bias": rng.normal(0, 0.5, n) for x, n in (("q", q_dim), ("k", kv_dim),
                                                                             ("v", kv_dim))}
        if arch == "gemma3":  # like the real model's: the post-norms shrink each sublayer's output
            tensors |= {f"{b}.post_attention_norm.weight": norm(d_model, 0.2) * 0.5,
                        f"{b}.post_ffw_norm.weight": norm(d_model, 0.2) * 0.5}
        if arch in ("qwen3", "gemma3"):  # real q/k norm weights are far from 1, which makes a missing norm visible
            tensors |= {f"{b}.attn_q_norm.weight": norm(c.head_dim, 0.5) + 1,
                        f"{b}.attn_k_norm.weight": norm(c.head_dim, 0.5) + 1}
    return write_model(path, config, tensors, vocab, dtype=dtype, name=f"random-{arch}", chat_template=chat_template)


def permute_hf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Hugging Face llama q/k projection (or of a LoRA B factor for it) the way
    convert_hf_to_gguf.py does: each head's two halves are interleaved so that ggml's adjacent-pair RoPE
    equals HF's rotate-half RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora(path, arch: str, factors: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, *,
               hf_order: bool = False, n_head: int | None = None, n_kv_head: int | None = None) -> Path:
    """A llama.cpp LoRA adapter: for each GGUF base name (e.g. 'blk.3.ffn_down'), A [r, n_in] and
    B [n_out, r], so that llama.cpp computes W x + scale * alpha / r * B (A x).

    llama.cpp pairs tensors '<tensor>.lora_a' / '<tensor>.lora_b' where <tensor> is the base model's tensor
    name ('blk.3.ffn_down.weight'). With hf_order=True the factors come from a Hugging Face-layout model:
    for llama-arch attn_q/attn_k the rows of B are permuted like the base weights (needs n_head, n_kv_head)."""
    if hf_order and arch == "llama" and not (n_head and n_kv_head):
        raise ValueError("hf_order=True needs n_head and n_kv_head to permute attn_q/attn_k")
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for base, (a, b) in factors.items():
        base = base.removesuffix(".weight")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{base}: A is {a.shape} and B is {b.shape}; expected A [r, n_in], B [n_out, r]")
        if hf_order and arch == "llama" and base.endswith((".attn_q", ".attn_k")):
            b = permute_hf_rows(b, n_head if base.endswith(".attn_q") else n_kv_head)
        w.add_tensor(f"{base}.weight.lora_a", np.ascontiguousarray(a))
        w.add_tensor(f"{base}.weight.lora_b", np.ascontiguousarray(b))
    _finish(w)
    return Path(path)


def write_control_vector(path, directions: dict[int, np.ndarray], arch: str) -> Path:
    """A llama.cpp control vector: 'direction.<il>' is added to the residual stream after block il
    (0-based). llama.cpp never steers block 0, so il starts at 1."""
    if any(int(il) < 1 for il in directions):
        raise ValueError("llama.cpp control vectors cannot steer layer 0; directions start at layer 1")
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", arch)  # what repeng writes; llama.cpp reads no metadata
    w.add_uint32("controlvector.layer_count", len(directions))
    for il, direction in sorted(directions.items()):
        w.add_tensor(f"direction.{int(il)}", np.ascontiguousarray(direction, dtype=np.float32).reshape(-1))
    _finish(w)
    return Path(path)


def read_control_vector(path) -> dict[int, np.ndarray]:
    """The directions of a control-vector GGUF, {layer: [d_model]}."""
    reader = open_gguf(path, check_arch=False)
    return {int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32)
            for t in reader.tensors if t.name.startswith("direction.")}


def control_vector_data(directions: dict[int, np.ndarray], n_layer: int, d_model: int) -> np.ndarray:
    """The flat buffer llama_set_adapter_cvec takes: n_layer-1 rows of d_model, layer 1 first."""
    data = np.zeros((n_layer - 1, d_model), np.float32)
    for il, direction in directions.items():
        data[il - 1] += direction
    return data.reshape(-1)


def _finish(w: gguf.GGUFWriter):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
