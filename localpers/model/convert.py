"""Hugging Face checkpoints (config.json, safetensors, a tokenizer) to GGUF, as llama.cpp's convert_hf_to_gguf.py
writes them, for the architectures localpers.model computes: llama, qwen2, qwen3 and gemma3 (text).

- config.json -> GGUF metadata (block count, sizes, heads, RoPE base and linear scaling, RMSNorm epsilon,
  Gemma 3's sliding window).
- safetensors -> tensors with llama.cpp's names (gguf-py's TENSOR_MAPPINGS); llama q/k rows permuted for
  ggml's adjacent-pair RoPE (convert_hf_to_gguf.py LlamaModel.permute); Gemma's RMSNorm weights stored as
  1 + w (Gemma3Model.modify_tensors); a tied lm_head is left out.
- the tokenizer: a SentencePiece `tokenizer.model` through `sentencepiece` (tokenizer.ggml.model "llama":
  pieces, scores, token types), else a BPE `tokenizer.json` through `tokenizers` ("gpt2": vocabulary, merges,
  added tokens; the pre-tokenizer named as llama.cpp knows it); special token ids and the chat template from
  tokenizer_config.json.
Matrices are written as F16 (the default), F32, Q8_0 or Q4_1 (rows not a multiple of 32 stay F16), norms and
biases as F32.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from localpers.errors import UserError
from localpers.model.gguf_write import permute_hf_rows, write_model
from localpers.model.model import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}
TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_1": gguf.GGMLQuantizationType.Q4_1}

# HF module name inside model.layers.N -> GGUF base name (llama/qwen; gemma3 overrides the norms)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GEMMA3_LAYER_NAMES = {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# tokenizers' pre-tokenizer regexes -> llama.cpp's tokenizer.ggml.pre (llama-vocab.cpp)
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
}


def read_config(model_dir: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of a Hugging Face checkpoint directory, and its raw config.json."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (a Hugging Face checkpoint directory is expected)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    names = hf.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise UserError(f"{path}: architecture {names} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if arch == "gemma3" and "text_config" in hf:
        hf = {**hf, **hf["text_config"]}

    def need(key):
        if key not in hf:
            raise UserError(f"{path}: {key} is missing")
        return hf[key]

    d_model, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    gemma = arch == "gemma3"
    # transformers 4 writes rope_theta / rope_scaling / rope_local_base_freq, transformers 5 rope_parameters
    # (for Gemma 3 one per layer type)
    rope = hf.get("rope_parameters") or {}
    global_rope, local_rope = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    rope_base = float(hf.get("rope_theta") or global_rope.get("rope_theta") or (1e6 if gemma else 10000.0))
    rope_local = float(hf.get("rope_local_base_freq") or local_rope.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or ({**global_rope} if global_rope.get("rope_type", "default") != "default" else {})
    factor = 1.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "default"):
            raise UserError(f"{path}: RoPE scaling {kind!r} is not supported (only linear)")
        factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    config = ModelConfig(
        arch=arch, n_layer=int(need("num_hidden_layers")), d_model=d_model, n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
        head_dim=int(hf.get("head_dim") or d_model // n_head), d_ff=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")), rope_base=rope_base,
        rope_scaling=factor, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        context_length=int(hf.get("max_position_embeddings", 2048)),
        tied_output=bool(hf.get("tie_word_embeddings", gemma)), qkv_bias=arch == "qwen2",
        sliding_window=int(hf.get("sliding_window") or 0) if gemma else 0,
        swa_pattern=int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6),
        rope_base_local=rope_local)
    if gemma and (config.swa_pattern != 6 or rope_local != 10000.0 or (hf.get("layer_types") and [
            t == "sliding_attention" for t in hf["layer_types"]] != [config.is_local(i) for i in range(config.n_layer)])):
        raise UserError(f"{path}: llama.cpp's Gemma 3 has sliding-window layers 5 of every 6 with RoPE base 10000; "
                        "this checkpoint differs")
    if gemma and hf.get("final_logit_softcapping"):
        raise UserError(f"{path}: final_logit_softcapping is not supported (llama.cpp's Gemma 3 ignores it)")
    if gemma and config.n_layer != 62 and float(hf.get("query_pre_attn_scalar", config.head_dim)) != config.head_dim:
        raise UserError(f"{path}: query_pre_attn_scalar != head_dim: llama.cpp scales Gemma 3's queries by "
                        "1/sqrt(head_dim)")
    return config, hf


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint's safetensors files, as float32 numpy arrays."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors files")
    tensors = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name).float().numpy()
    return tensors


def gguf_tensors(config: ModelConfig, hf_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face tensors renamed and laid out as llama.cpp's converter writes them."""
    layer_names = GEMMA3_LAYER_NAMES if config.arch == "gemma3" else LAYER_NAMES
    out, unknown = {}, []
    for name, w in hf_tensors.items():
        base, _, param = name.rpartition(".")
        if base.startswith("model.language_model."):
            base = "model." + base.removeprefix("model.language_model.")
        if base in TOP_NAMES:
            gguf_base = TOP_NAMES[base]
        elif base.startswith("model.layers."):
            index, _, module = base.removeprefix("model.layers.").partition(".")
            if module not in layer_names:
                unknown.append(name)
                continue
            gguf_base = f"blk.{index}.{layer_names[module]}"
        else:
            unknown.append(name)
            continue
        if config.arch == "llama" and gguf_base.endswith((".attn_q", ".attn_k")):
            w = permute_hf_rows(w, config.n_head if gguf_base.endswith(".attn_q") else config.n_kv_head)
        if config.arch == "gemma3" and gguf_base.endswith("norm"):
            w = w + 1.0  # Gemma's RMSNorm multiplies by 1 + w; llama.cpp's by the stored weight
        out[f"{gguf_base}.{param}"] = w
    if unknown:
        raise UserError(f"tensors a {config.arch} model does not use: {', '.join(unknown[:4])}")
    if config.tied_output:
        out.pop("output.weight", None)
    return out


def _special_ids(model_dir: Path, hf: dict, token_id) -> dict[str, int]:
    """bos/eos/unknown/padding ids: config.json's ids, else tokenizer_config.json's tokens looked up."""
    tc = _tokenizer_config(model_dir)
    ids = {}
    for what, key in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        value = hf.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0]
        if value is None:
            token = tc.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = token_id(token) if token is not None else None
        if value is not None:
            ids[what] = int(value)
    return ids


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


SPM_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _spm_model_type(data: bytes) -> int:
    """TrainerSpec.model_type (field 3 of ModelProto's field 2) read from the protobuf bytes, without the
    generated protobuf module (whose runtime version pin conflicts with other packages); 1 (unigram) if unset."""
    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(buf, i)
            elif wire == 2:
                n, i = _varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire in (1, 5):
                value, i = buf[i:i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
            else:
                raise ValueError(f"protobuf wire type {wire}")
            yield number, value

    for number, value in fields(data):
        if number == 2:
            return next((v for n, v in fields(value) if n == 3), 1)
    return 1


def spm_fields(model_dir: Path, hf: dict, vocab_size: int) -> dict:
    """tokenizer.* of a SentencePiece model (convert_hf_to_gguf.py _create_vocab_sentencepiece)."""
    import sentencepiece as spm

    path = model_dir / "tokenizer.model"
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    if (kind := _spm_model_type(path.read_bytes())) != 2:
        raise UserError(f"{path}: a SentencePiece {SPM_TYPES.get(kind, kind)} model; llama.cpp's SentencePiece "
                        "tokenizer merges by score, which reproduces BPE models only (Llama's, Gemma's)")
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                     T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
    added = model_dir / "added_tokens.json"
    if added.is_file():
        for piece, i in sorted(json.loads(added.read_text()).items(), key=lambda kv: kv[1]):
            if i != len(tokens):
                raise UserError(f"{added}: token {piece!r} has id {i}, expected {len(tokens)}")
            tokens.append(piece.encode())
            scores.append(-1000.0)
            types.append(T.USER_DEFINED)
    while len(tokens) < vocab_size:  # the embedding matrix may have padding rows
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(T.UNUSED)
    special = _special_ids(model_dir, hf, sp.piece_to_id)
    special.setdefault("bos", sp.bos_id())
    special.setdefault("eos", sp.eos_id())
    special.setdefault("unknown", sp.unk_id())
    tc = _tokenizer_config(model_dir)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
            "special": {k: v for k, v in special.items() if v >= 0},
            "add_bos": bool(tc.get("add_bos_token", True)), "add_eos": bool(tc.get("add_eos_token", False)),
            "add_space_prefix": sp.encode("a", out_type=str)[0].startswith("\u2581")}


def bpe_fields(model_dir: Path, hf: dict, vocab_size: int) -> dict:
    """tokenizer.* of a byte-level BPE tokenizer.json (convert_hf_to_gguf.py _set_vocab_gpt2)."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    tok = Tokenizer.from_file(str(path))
    if spec["model"]["type"] != "BPE":
        raise UserError(f"{path}: tokenizer model {spec['model']['type']} is not supported (only BPE)")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), path)
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode())
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(added[i]["content"].encode())
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            tokens.append(by_id[i].encode())
            types.append(T.NORMAL)
    merges = spec["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    tc = _tokenizer_config(model_dir)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "special": _special_ids(model_dir, hf, tok.token_to_id),
            "add_bos": bool(tc.get("add_bos_token", False)), "add_eos": bool(tc.get("add_eos_token", False))}


def _pre_tokenizer(pre: dict | None, path: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: GPT-2's byte-level regex, or Qwen2's / Llama 3's."""
    if pre and pre["type"] == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre["type"] == "Sequence":
        steps = pre["pretokenizers"]
        splits = [s for s in steps if s["type"] == "Split"]
        if len(splits) == 1 and steps[-1]["type"] == "ByteLevel" and not steps[-1].get("use_regex", True):
            regex = splits[0]["pattern"].get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
            if regex == GPT2_REGEX:
                return "gpt-2"
    raise UserError(f"{path}: this pre-tokenizer is not one llama.cpp knows (supported: byte-level GPT-2, "
                    "Qwen2, Llama 3)")


def tokenizer_fields(model_dir: Path, hf: dict, vocab_size: int) -> list[tuple]:
    """(key, value, type, sub_type) of every tokenizer.* field, the chat template included."""
    if (model_dir / "tokenizer.model").is_file():
        t = spm_fields(model_dir, hf, vocab_size)
    elif (model_dir / "tokenizer.json").is_file():
        t = bpe_fields(model_dir, hf, vocab_size)
    else:
        raise UserError(f"{model_dir}: no tokenizer.model (SentencePiece) nor tokenizer.json (BPE)")
    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", t["model"], V.STRING, None), ("tokenizer.ggml.pre", t["pre"], V.STRING, None),
              ("tokenizer.ggml.tokens", t["tokens"], V.ARRAY, V.STRING)]
    if "scores" in t:
        fields.append(("tokenizer.ggml.scores", t["scores"], V.ARRAY, V.FLOAT32))
    fields.append(("tokenizer.ggml.token_type", [int(x) for x in t["types"]], V.ARRAY, V.INT32))
    if "merges" in t:
        fields.append(("tokenizer.ggml.merges", t["merges"], V.ARRAY, V.STRING))
    for what, i in t["special"].items():
        fields.append((f"tokenizer.ggml.{what}_token_id", i, V.UINT32, None))
    fields += [("tokenizer.ggml.add_bos_token", t["add_bos"], V.BOOL, None),
               ("tokenizer.ggml.add_eos_token", t["add_eos"], V.BOOL, None)]
    if "add_space_prefix" in t:
        fields.append(("tokenizer.ggml.add_space_prefix", t["add_space_prefix"], V.BOOL, None))
    template = _tokenizer_config(model_dir).get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        fields.append(("tokenizer.chat_template", template, V.STRING, None))
    if len(t["tokens"]) != vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {len(t['tokens'])} tokens, the model {vocab_size}")
    return fields


def convert(model_dir, out, out_type: str = "f16") -> Path:
    """Convert the Hugging Face checkpoint in `model_dir` to the GGUF file `out`; out_type f16, f32, q8_0 or q4_1.
    Everything is read and checked before the file is written."""
    model_dir = Path(model_dir)
    if out_type not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}, got {out_type!r}")
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory")
    config, hf = read_config(model_dir)
    tensors = gguf_tensors(config, read_tensors(model_dir))
    vocab = tokenizer_fields(model_dir, hf, config.vocab_size)
    if tensors["token_embd.weight"].shape != (config.vocab_size, config.d_model):
        raise UserError(f"{model_dir}: embed_tokens is {tensors['token_embd.weight'].shape}, config says "
                        f"({config.vocab_size}, {config.d_model})")
    name = hf.get("_name_or_path") or model_dir.name
    return write_model(out, config, tensors, vocab, dtype=TYPES[out_type], name=str(name))
