"""A GGUF model as a small, readable torch transformer that computes what llama.cpp computes.

Supported architectures: llama (SmolLM2, Llama 2/3, TinyLlama, Mistral), qwen2 (q/k/v biases), qwen3
(per-head q/k RMSNorm) and gemma3 (Gemma 3: see below). Weights keep GGUF row order: llama-arch q/k rows are
stored permuted for ggml's "normal" RoPE (rotate adjacent pairs), qwen2/qwen3/gemma3 use the NeoX RoPE (rotate
the two halves of a head). So anything computed on this model (LoRA factors, ROME edits) is already in GGUF order.

gemma3, as llama.cpp builds it (src/models/gemma3.cpp, the gemma3 hparams in llama-model.cpp): embeddings times
sqrt(d_model); per-head q/k RMSNorm before RoPE; queries scaled by 1/sqrt(head_dim) (1/sqrt(d_model/n_head) for
the 62-layer 27B); RMSNorm after attention and after the FFN too (post_attention_norm, post_ffw_norm: GGUF norm
weights already hold Gemma's 1 + w); GeGLU FFN with ggml's tanh GELU, which on the CPU reads a table of fp16
inputs and outputs (emulated here, gradient of the exact GELU); and, when `attention.sliding_window` is set,
sliding-window layers (query i sees keys j with i - j < window; every layer but each `swa_pattern`-th, default 6)
with RoPE base `rope.freq_base_swa` (default 10000) and scale 1, global layers with `rope.freq_base` and the file's
scaling. Logits are not soft-capped (llama.cpp's sliding-window gemma3 graph never applies
`final_logit_softcapping`; Gemma 3 checkpoints set none).

RoPE scaling: none, linear (`rope.scaling.factor`) and llama3-style per-frequency factors (the
`rope_freqs.weight` tensor) are applied as llama.cpp applies them; YaRN and LongRoPE raise UserError.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localpers.errors import UserError
from localpers.model.gguf_info import SUPPORTED_ARCHS, open_gguf
from localpers.model.quant import dequantize

NEOX_ROPE_ARCHS = {"qwen2", "qwen3", "gemma3"}
QK_NORM_ARCHS = {"qwen3", "gemma3"}
REQUIRED = object()

# Module name inside a Block -> GGUF tensor base name (without "blk.N.").
BLOCK_GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "attn.q": "attn_q",
    "attn.k": "attn_k",
    "attn.v": "attn_v",
    "attn.o": "attn_output",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
    "ffn_norm": "ffn_norm",
    "ffn.gate": "ffn_gate",
    "ffn.up": "ffn_up",
    "ffn.down": "ffn_down",
    "post_attn_norm": "post_attention_norm",  # gemma3
    "post_ffn_norm": "post_ffw_norm",  # gemma3
}
QK_NORM_NAMES = ("attn.q_norm", "attn.k_norm")
POST_NORM_NAMES = ("post_attn_norm", "post_ffn_norm")
TOP_GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


@dataclass
class ModelConfig:
    arch: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int
    vocab_size: int
    rope_base: float = 10000.0
    rope_scaling: float = 1.0  # linear factor: positions are divided by it
    norm_eps: float = 1e-5
    context_length: int = 2048
    tied_output: bool = True
    qkv_bias: bool = False  # qwen2 has q/k/v biases
    # gemma3: sliding-window attention (0: none), the period of its global layers, their local RoPE base
    sliding_window: int = 0
    swa_pattern: int = 6
    rope_base_local: float = 10000.0

    @property
    def qk_norm(self) -> bool:
        return self.arch in QK_NORM_ARCHS

    def is_local(self, layer: int) -> bool:
        """Whether `layer` uses sliding-window attention (llama.cpp's set_swa_pattern, dense_first=False)."""
        return self.sliding_window > 0 and layer % self.swa_pattern < self.swa_pattern - 1

    @property
    def attn_scale(self) -> float:
        """The attention logits' scale: 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(d/n_head)."""
        if self.arch == "gemma3" and self.n_layer == 62:
            return (self.d_model / self.n_head) ** -0.5
        return self.head_dim ** -0.5

    @property
    def neox_rope(self) -> bool:
        return self.arch in NEOX_ROPE_ARCHS

    @classmethod
    def from_gguf(cls, reader_or_path) -> "ModelConfig":
        reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) else open_gguf(reader_or_path)
        arch = field(reader, "general.architecture")
        name = getattr(reader, "path", arch)
        if arch not in SUPPORTED_ARCHS:
            raise UserError(f"{name}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def key(suffix, default=REQUIRED):
            value = field(reader, f"{arch}.{suffix}", default)
            if value is REQUIRED:
                raise UserError(f"{name}: metadata key {arch}.{suffix} is missing")
            return value

        tensors = {t.name: t for t in reader.tensors}
        d_model = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", d_model // n_head))
        n_rot = int(key("rope.dimension_count", head_dim))
        if n_rot != head_dim:
            raise UserError(f"{name}: partial RoPE ({n_rot} of {head_dim} dims per head) is not supported")

        # llama.cpp: the type defaults to linear, a missing factor means 1, and type "none" never scales
        scaling_type = key("rope.scaling.type", "linear")
        if scaling_type not in ("none", "linear"):
            raise UserError(f"{name}: RoPE scaling '{scaling_type}' is not supported (only none and linear)")
        factor = float(key("rope.scaling.factor", 0) or key("rope.scale_linear", 0) or 1)
        if scaling_type == "none":
            factor = 1.0

        return cls(
            arch=arch,
            n_layer=int(key("block_count")),
            d_model=d_model,
            n_head=n_head,
            n_kv_head=int(key("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            d_ff=int(key("feed_forward_length")),
            vocab_size=int(tensors["token_embd.weight"].shape[1]),
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_scaling=factor,
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(key("context_length", 2048)),
            tied_output="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            sliding_window=int(key("attention.sliding_window", 0)) if arch == "gemma3" else 0,
            swa_pattern=int(key("attention.sliding_window_pattern", 6)),
            rope_base_local=float(key("rope.freq_base_swa", 10000.0)),
        )


def field(reader: gguf.GGUFReader, key: str, default=None):
    """A metadata value of a GGUF file (scalar, string or list), or `default` when absent."""
    f = reader.get_field(key)
    return default if f is None else f.contents()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_angles(config: ModelConfig, n_pos: int, freq_factors: torch.Tensor | None = None, *, local: bool = False):
    """cos, sin of shape [n_pos, head_dim/2]: theta_i = pos / scaling * base^(-2i/head_dim) / factor_i.
    local: a sliding-window layer's angles (gemma3: base rope_base_local, no scaling, no factors)."""
    base = config.rope_base_local if local else config.rope_base
    inv_freq = base ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    if freq_factors is not None and not local:
        inv_freq = inv_freq / freq_factors.double()
    pos = torch.arange(n_pos, dtype=torch.float64) / (1.0 if local else config.rope_scaling)
    theta = torch.outer(pos, inv_freq)
    return theta.cos().float(), theta.sin().float()


def apply_rope(x, cos, sin, neox: bool):
    """Rotate x [B, H, T, D]. ggml "normal" mode rotates adjacent pairs (x0,x1), (x2,x3)...;
    NeoX mode rotates (x_i, x_{i+D/2})."""
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def attention_mask(n_q: int, n_k: int, window: int = 0, q_offset: int | None = None) -> torch.Tensor:
    """Bool [n_q, n_k], True where query i (at position q_offset + i; default: the last n_q of n_k) may see key
    j: causal, and with window > 0 also i - j < window (llama.cpp's LLAMA_SWA_TYPE_STANDARD)."""
    q_pos = torch.arange(n_q)[:, None] + (n_k - n_q if q_offset is None else q_offset)
    k_pos = torch.arange(n_k)[None, :]
    mask = k_pos <= q_pos
    return mask & (q_pos - k_pos < window) if window > 0 else mask


class GGMLGelu(torch.autograd.Function):
    """GELU (tanh form) as ggml computes it on the CPU: the input rounded to fp16 looks up a table of
    fp16(gelu(x)); x <= -10 gives 0 and x >= 10 gives x. Its gradient is the exact tanh GELU's."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        table = F.gelu(x.half().float(), approximate="tanh").half().to(x.dtype)
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = F.gelu(x, approximate="tanh")
            return torch.autograd.grad(y, x, grad)[0]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, window: int = 0):
        super().__init__()
        self.config = c
        self.window = window  # sliding-window size of this layer (0: global)
        self.scale = c.attn_scale
        self.q = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def qkv(self, x, cos, sin):
        """Queries, keys (both with RoPE) and values [B, heads, T, head_dim] of x [B, T, d]."""
        c = self.config
        B, T, _ = x.shape
        q = self.q(x).view(B, T, c.n_head, c.head_dim)
        k = self.k(x).view(B, T, c.n_kv_head, c.head_dim)
        v = self.v(x).view(B, T, c.n_kv_head, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin, c.neox_rope), apply_rope(k, cos, sin, c.neox_rope), v

    def forward(self, x, cos, sin):
        c = self.config
        q, k, v = self.qkv(x, cos, sin)
        mask = attention_mask(x.shape[1], x.shape[1], self.window) if self.window else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=c.n_head != c.n_kv_head)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.n_head * c.head_dim))


class FeedForward(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.act = GGMLGelu.apply if c.arch == "gemma3" else F.silu

    def inner(self, x):
        """The input of `down` [.., d_ff]: act(gate x) * up x (SwiGLU; GeGLU for gemma3)."""
        return self.act(self.gate(x)) * self.up(x)

    def forward(self, x):
        return self.down(self.inner(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int = 0):
        super().__init__()
        self.local = c.is_local(layer)
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c, c.sliding_window if self.local else 0)
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.ffn = FeedForward(c)
        # gemma3 normalizes each sublayer's output too; elsewhere these are identities
        post_norm = c.arch == "gemma3"
        self.post_attn_norm = RMSNorm(c.d_model, c.norm_eps) if post_norm else nn.Identity()
        self.post_ffn_norm = RMSNorm(c.d_model, c.norm_eps) if post_norm else nn.Identity()

    def forward(self, x, cos, sin):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin))
        return x + self.post_ffn_norm(self.ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.embed_scale = float(np.float32(np.sqrt(np.float32(c.d_model)))) if c.arch == "gemma3" else 1.0
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.output = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tied_output:
            self.output.weight = self.tok_embeddings.weight
        # llama3-style per-frequency RoPE divisors (GGUF tensor rope_freqs.weight), if the model has them
        self.register_buffer("rope_freqs", None, persistent=False)
        self.gguf_names = {
            **{name: gguf_name for name, gguf_name in TOP_GGUF_NAMES.items()},
            **{f"layers.{i}.{name}": f"blk.{i}.{gguf_name}"
               for i in range(c.n_layer) for name, gguf_name in BLOCK_GGUF_NAMES.items()
               if (name not in QK_NORM_NAMES or c.qk_norm) and (name not in POST_NORM_NAMES or c.arch == "gemma3")},
        }
        self.module_names = {v: k for k, v in self.gguf_names.items()}

    def gguf_name(self, name: str) -> str:
        """'layers.3.ffn.down' -> 'blk.3.ffn_down'; 'layers.3.ffn.down.weight' -> 'blk.3.ffn_down.weight'."""
        module, _, param = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
        return self.gguf_names[module] + (f".{param}" if param else "")

    def layer_angles(self, n_pos: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """RoPE cos, sin [n_pos, head_dim/2] of every layer (sliding-window layers have their own base)."""
        angles = {local: rope_angles(self.config, n_pos, self.rope_freqs, local=local)
                  for local in {layer.local for layer in self.layers}}
        return [angles[layer.local] for layer in self.layers]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream's input [B, T, d] (gemma3 scales the embeddings by sqrt(d_model))."""
        x = self.tok_embeddings(tokens)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def _blocks(self, tokens):
        x = self.embed(tokens)
        states = [x]
        for layer, (cos, sin) in zip(self.layers, self.layer_angles(tokens.shape[1])):
            x = layer(x, cos.to(x.dtype), sin.to(x.dtype))
            states.append(x)
        return states

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [B, T, d], the input of `.output`."""
        return self.norm(self._blocks(tokens)[-1])

    def forward(self, tokens: torch.Tensor, *, output_hidden_states: bool = False):
        """Logits (float32) [B, T, V] for token ids [B, T] at positions 0..T-1. With output_hidden_states,
        also the residual stream: n_layer+1 tensors [B, T, d] (embeddings, then after each block)."""
        states = self._blocks(tokens)
        logits = self.output(self.norm(states[-1])).float()
        return (logits, states) if output_hidden_states else logits


def tensor_array(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) shape, e.g. [n_out, n_in] for a matrix."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type, shape)


def model_state(model: "Transformer") -> dict[str, torch.Tensor]:
    """A loaded model's tensors as load_model(state=...) takes them back (rope_freqs included, when it has one)."""
    state = {k: v for k, v in model.state_dict().items() if not (k == "output.weight" and model.config.tied_output)}
    if getattr(model, "rope_freqs", None) is not None:
        state["rope_freqs"] = model.rope_freqs
    return state


def load_model(path, dtype: torch.dtype = torch.float32, requires_grad: bool = False,
               state: dict | None = None) -> Transformer:
    """Load a llama/qwen2/qwen3/gemma3 GGUF into a Transformer in eval mode (params frozen unless requires_grad).
    `state`: the tensors as model_state gave them for this file (e.g. a memory-mapped cached copy), instead of
    dequantizing the GGUF's."""
    reader = open_gguf(path)
    config = ModelConfig.from_gguf(reader)
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict()) - ({"output.weight"} if config.tied_output else set())
    if state is not None:
        state = dict(state)
        if "rope_freqs" in state:
            model.rope_freqs = state.pop("rope_freqs")
        if set(state) != expected:
            raise UserError(f"{path}: the cached tensors do not match this model")
        model.load_state_dict(state, strict=False, assign=True)
        if config.tied_output:
            model.output.weight = model.tok_embeddings.weight
        model.requires_grad_(requires_grad)
        return model.eval()
    state, unsupported = {}, []
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            model.rope_freqs = torch.from_numpy(tensor_array(tensor))
            continue
        base, _, param = tensor.name.rpartition(".")
        name = f"{model.module_names.get(base)}.{param}"
        if name in expected:
            state[name] = torch.from_numpy(tensor_array(tensor)).to(dtype)
        else:  # e.g. an output bias: computing without it would silently give other logits
            unsupported.append(tensor.name)
    if unsupported:
        raise UserError(f"{path}: tensors a {config.arch} model does not use: {', '.join(unsupported[:4])}")
    if missing := expected - set(state):
        raise UserError(f"{path}: missing tensors: {', '.join(sorted(model.gguf_name(m) for m in missing)[:4])}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tied_output:
        model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(requires_grad)
    return model.eval()


