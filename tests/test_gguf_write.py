"""GGUF writer: models, LoRA adapters and control vectors that llama.cpp loads and applies exactly as the
torch model predicts (LoRA merged into the weights, control vector added to the residual stream)."""
import gguf
import numpy as np
import pytest
import torch

from localpers.model.gguf_info import open_gguf
from localpers.model.gguf_write import (control_vector_data, permute_hf_rows, read_control_vector, write_control_vector,
                                  write_lora, write_model)
from localpers.model.model import apply_rope, load_model
from localpers.engine.tokenizer import Tokenizer
from tests.helpers_models import ORACLE_TOL, TEXT, llama_cpp_logits, logit_error, random_model_path

# As RANDOM_TOL in test_model_oracle.py (F32 models and KV cache: only summation order differs). Measured:
# LoRA 5e-6 (llama), 4e-6 (qwen2); control vector 4e-6, 3e-6; the adapters themselves move the logits by 3..5.
TOL = 2e-4
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RANK, ALPHA, SCALE = 4, 8.0, 0.5


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


def random_lora(model, targets=LORA_TARGETS, seed=0):
    """{gguf base name: (A [r, n_in], B [n_out, r])} large enough to move the logits clearly."""
    rng = np.random.default_rng(seed)
    factors = {}
    for i in range(model.config.n_layer):
        for target in targets:
            n_out, n_in = model.get_submodule(model.module_names[f"blk.{i}.{target}"]).weight.shape
            factors[f"blk.{i}.{target}"] = (rng.normal(0, n_in ** -0.5, (RANK, n_in)),
                                            rng.normal(0, 0.3 * RANK ** -0.5, (n_out, RANK)))
    return factors


def merge_lora(model, factors, b_rows=lambda name, b: b):
    """W += scale * alpha / r * B @ A, llama.cpp's LoRA arithmetic folded into the weights."""
    for name, (a, b) in factors.items():
        weight = model.get_submodule(model.module_names[name]).weight
        delta = SCALE * ALPHA / RANK * b_rows(name, b) @ a
        weight.data += torch.from_numpy(delta).float()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def case(request, tmp_path_factory):
    path = random_model_path(tmp_path_factory, request.param)
    tokens = Tokenizer.from_gguf(path).encode(TEXT, add_bos=True)
    return path, tokens, llama_cpp_logits(path, tokens)


def test_lora_round_trip(case, tmp_path):
    path, tokens, base = case
    model = load_model(path)
    factors = random_lora(model)
    adapter = write_lora(tmp_path / "lora.gguf", model.config.arch, factors, ALPHA)
    merge_lora(model, factors)
    served = llama_cpp_logits(path, tokens, lora=adapter, lora_scale=SCALE)
    assert logit_error(served, base) > 1000 * TOL  # the adapter really changes the model
    assert logit_error(logits(model, tokens), served) < ORACLE_TOL[model.config.arch]


def test_lora_file_layout(tmp_path):
    a, b = np.ones((4, 64)), np.arange(128 * 4).reshape(128, 4)
    path = write_lora(tmp_path / "lora.gguf", "qwen3", {"blk.1.ffn_gate": (a, b)}, 16)
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta == {"general.architecture": "qwen3", "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": 16.0}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"blk.1.ffn_gate.weight.lora_a", "blk.1.ffn_gate.weight.lora_b"}
    # ggml order (ne0 first): A is [n_in, r], B is [r, n_out]; llama.cpp checks these against the base
    assert list(tensors["blk.1.ffn_gate.weight.lora_a"].shape) == [64, 4]
    assert list(tensors["blk.1.ffn_gate.weight.lora_b"].shape) == [4, 128]
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_gate.weight.lora_b"].data), b.astype(np.float32))


def test_permute_hf_rows_turns_rotate_half_into_adjacent_pair_rope():
    """HF llama applies RoPE to the two halves of each head; GGUF stores q/k rows permuted so that ggml's
    adjacent-pair RoPE gives the same numbers. permute_hf_rows must be exactly that permutation."""
    n_head, head_dim, d, T = 3, 8, 16, 5
    w_hf = torch.randn(n_head * head_dim, d, dtype=torch.float64)
    x = torch.randn(T, d, dtype=torch.float64)
    theta = torch.outer(torch.arange(T, dtype=torch.float64), 10000.0 ** -(torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = theta.cos(), theta.sin()

    def heads(q):  # [T, n_head*head_dim] -> [n_head, T, head_dim]
        return q.view(T, n_head, head_dim).transpose(0, 1)

    hf = apply_rope(heads(x @ w_hf.T), cos, sin, neox=True)
    w_gguf = torch.from_numpy(permute_hf_rows(w_hf.numpy(), n_head))
    ggml = apply_rope(heads(x @ w_gguf.T), cos, sin, neox=False)
    hf_rows = hf.transpose(0, 1).reshape(T, -1)
    expected = torch.from_numpy(permute_hf_rows(hf_rows.T.numpy(), n_head)).T  # the same rows, GGUF order
    assert torch.allclose(ggml.transpose(0, 1).reshape(T, -1), expected)
    assert not torch.allclose(hf_rows, expected)


def test_lora_hf_order_round_trip(tmp_path_factory, tmp_path):
    """Factors in Hugging Face row order, written with hf_order=True: llama.cpp must apply them as the GGUF-order
    merge of permute_hf_rows(B) @ A (attn_q with n_head, attn_k with n_kv_head; other targets untouched)."""
    path = random_model_path(tmp_path_factory, "llama")
    tokens = Tokenizer.from_gguf(path).encode(TEXT, add_bos=True)
    model = load_model(path)
    c = model.config
    factors = random_lora(model, targets=("attn_q", "attn_k", "attn_v"), seed=1)
    adapter = write_lora(tmp_path / "lora.gguf", "llama", factors, ALPHA, hf_order=True, n_head=c.n_head,
                         n_kv_head=c.n_kv_head)
    heads = {"attn_q": c.n_head, "attn_k": c.n_kv_head}
    merge_lora(model, factors, b_rows=lambda name, b: permute_hf_rows(b, heads[name.split(".")[-1]])
               if name.split(".")[-1] in heads else b)
    served = llama_cpp_logits(path, tokens, lora=adapter, lora_scale=SCALE)
    assert logit_error(logits(model, tokens), served) < TOL
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(adapter).tensors}
    assert not np.allclose(written["blk.0.attn_q.weight.lora_b"], factors["blk.0.attn_q"][1])
    assert np.allclose(written["blk.0.attn_v.weight.lora_b"], factors["blk.0.attn_v"][1])


def test_control_vector_round_trip(case, tmp_path):
    """direction.<il> is added to the residual stream after block il; block 0 cannot be steered."""
    path, tokens, base = case
    model = load_model(path)
    c = model.config
    rng = np.random.default_rng(2)
    directions = {il: rng.normal(0, 0.5, c.d_model) for il in range(1, c.n_layer)}
    file = write_control_vector(tmp_path / "cvec.gguf", directions, c.arch)
    assert open_gguf(file, check_arch=False).get_field("controlvector.model_hint").contents() == c.arch
    read = read_control_vector(file)
    assert read.keys() == directions.keys() and all(np.allclose(read[il], directions[il]) for il in read)
    served = llama_cpp_logits(path, tokens, cvec=control_vector_data(read, c.n_layer, c.d_model))
    assert logit_error(served, base) > 1000 * TOL

    def steered(shift):
        hooks = [model.layers[il - shift].register_forward_hook(
            lambda module, args, out, d=torch.from_numpy(d).float(): out + d) for il, d in directions.items()]
        try:
            return logits(model, tokens)
        finally:
            for hook in hooks:
                hook.remove()

    assert logit_error(steered(shift=0), served) < ORACLE_TOL[c.arch]
    assert logit_error(steered(shift=1), served) > 10 * ORACLE_TOL[c.arch]  # one block early is caught


def test_control_vector_rejects_layer_zero(tmp_path):
    with pytest.raises(ValueError, match="layer 0"):
        write_control_vector(tmp_path / "cvec.gguf", {0: np.ones(8)}, "llama")


def test_write_model_round_trip_through_load_model(tmp_path_factory, tmp_path):
    """A model written from another model's tensors (by GGUF name) loads back with identical weights;
    F16 storage rounds only the matrices."""
    model = load_model(random_model_path(tmp_path_factory, "qwen3"))
    tensors = {model.gguf_name(name): p.numpy() for name, p in model.state_dict().items()
               if not (model.config.tied_output and name == "output.weight")}
    vocab = random_model_path(tmp_path_factory, "qwen3")
    for dtype, atol in ((gguf.GGMLQuantizationType.F32, 0), (gguf.GGMLQuantizationType.F16, 2e-3)):
        copy = load_model(write_model(tmp_path / f"{dtype.name}.gguf", model.config, tensors, vocab, dtype=dtype))
        assert copy.config == model.config
        for name, p in model.state_dict().items():
            assert torch.allclose(copy.state_dict()[name], p, atol=atol, rtol=0), name
        norm = copy.layers[0].attn.q_norm.weight
        assert torch.equal(norm, model.layers[0].attn.q_norm.weight)  # 1-D tensors stay F32
