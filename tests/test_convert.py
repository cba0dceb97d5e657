"""`localpers convert` on small random Hugging Face checkpoints of each architecture, built here with
transformers (the plain-torch reference), a SentencePiece model trained with `sentencepiece` itself and a BPE
tokenizer.json trained with `tokenizers`. Checked: llama.cpp loads the file, its token ids equal the
tokenizer's on llama.cpp's own tokenizer test strings (tests/fixtures/vocab/*.inp), its logits equal
transformers' (an F32 file, llama.cpp with an F32 KV cache; F16, Q8_0 and Q4_1 files within their rounding),
and the torch model reads it too. (With F16 weights llama.cpp rounds the activations to F16 before each
matmul too: 6e-3 of a std on the random llama, so the exact comparison uses --type f32.)

Tolerances (max |diff| / std of the reference logits, as in test_model_oracle.py): CONVERT_TOL = 2e-4 for
llama/qwen2/qwen3 (summation order only); gemma3 GEMMA_CONVERT_TOL = 3e-3, since transformers computes the exact
tanh GELU and ggml a table of fp16 inputs and outputs (localpers' torch model, which uses the table, is held
to test_model_oracle's GEMMA_TOL).
"""
import io
import json

import gguf
import numpy as np
import pytest
import torch

from localpers.cli.cli import main
from localpers.engine.tokenizer import Tokenizer
from localpers.errors import UserError
from localpers.model.convert import convert
from localpers.model.model import load_model
from tests.helpers_models import TEXT, VOCAB, llama_cpp_logits, logit_error

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

CONVERT_TOL = 2e-4
GEMMA_CONVERT_TOL = 3e-3
TOL = {"llama": CONVERT_TOL, "qwen2": CONVERT_TOL, "qwen3": CONVERT_TOL, "gemma3": GEMMA_CONVERT_TOL}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_strings() -> list[str]:
    """llama.cpp's tokenizer test strings (test-tokenizer-0's .inp files), deduplicated, and TEXT."""
    strings = [TEXT]
    for inp in sorted(VOCAB.glob("*.inp")):
        strings += inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return list(dict.fromkeys(s for s in strings if s))


test_strings.__test__ = False


def train_spm(directory):
    """A BPE SentencePiece model (as Llama's and Gemma's) with byte fallback, trained on the test strings, normalizing nothing (as
    Llama's and Gemma's tokenizers)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(test_strings() * 3), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def train_bpe(directory):
    """A byte-level BPE tokenizer.json (GPT-2 pre-tokenizer) with ChatML special tokens and template."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(test_strings() * 3, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False, "chat_template": CHATML}))
    return tok


def hf_model(arch, vocab_size, special):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, **special)
    if arch == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(num_hidden_layers=2, head_dim=32, tie_word_embeddings=False, **common)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                               sliding_window=16, **common)
        model = transformers.Gemma3ForCausalLM(config)
    model.config.architectures = [type(model).__name__]
    # realistic scales: activations near unit RMS, norms near 1 (Gemma's stored w near 0: it multiplies by 1 + w)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                std = 0.5 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name:
                center = 0.0 if arch == "gemma3" else 1.0
                spread = 0.5 if "q_norm" in name or "k_norm" in name else 0.1
                p.copy_(center + spread * torch.randn(p.shape, generator=g) + (1.0 if spread == 0.5 else 0.0))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for p in model.parameters():  # the weights an F16 GGUF holds exactly (buffers such as RoPE's stay F32)
            p.copy_(p.half().float())
    return model.eval()


CASES = {"llama": "spm", "qwen2": "bpe", "qwen3": "bpe", "gemma3": "spm"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(arch) -> (directory, transformers model, encode(text) -> ids, converted F32 GGUF path)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{arch}")
            if CASES[arch] == "spm":
                sp = train_spm(directory)
                vocab_size, special = sp.vocab_size(), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}

                def encode(text):
                    return sp.encode(text)
            else:
                tok = train_bpe(directory)
                vocab_size = tok.get_vocab_size()
                special = {"bos_token_id": None, "eos_token_id": tok.token_to_id("<|im_end|>"), "pad_token_id": None}

                def encode(text):
                    return tok.encode(text, add_special_tokens=False).ids
            model = hf_model(arch, vocab_size, special)
            model.save_pretrained(directory)
            out = convert(directory, directory.parent / f"{arch}.gguf", "f32")
            cache[arch] = directory, model, encode, out
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(CASES))
def test_converted_tokenizer_matches_the_original_on_llama_cpp_test_strings(checkpoint, arch):
    _, _, encode, path = checkpoint(arch)
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in test_strings():
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == encode(text), repr(text)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", list(CASES))
def test_converted_model_logits_match_transformers(checkpoint, arch):
    directory, model, encode, path = checkpoint(arch)
    tokens = encode(TEXT)
    assert len(tokens) >= 64
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].numpy()
    assert logit_error(llama_cpp_logits(path, tokens), reference) < TOL[arch]
    ours = load_model(path)  # localpers' torch model reads the file too
    with torch.no_grad():
        assert logit_error(ours(torch.tensor([tokens]))[0].numpy(), reference) < TOL[arch]


def test_converted_llama_q_k_rows_are_permuted_for_ggml_rope(checkpoint):
    """Without convert_hf_to_gguf's q/k permutation the file would still load, with other logits."""
    directory, model, encode, path = checkpoint("llama")
    reader = gguf.GGUFReader(path)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = np.asarray(q.data, np.float32).reshape(64, 64)
    hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(stored, hf)
    assert np.array_equal(stored, hf.reshape(4, 2, 8, 64).swapaxes(1, 2).reshape(64, 64))


def test_converted_metadata_template_and_special_tokens(checkpoint):
    _, _, _, qwen = checkpoint("qwen2")
    tok = Tokenizer.from_gguf(qwen)
    reader = gguf.GGUFReader(qwen)
    assert reader.get_field("tokenizer.chat_template").contents() == CHATML
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    eos = reader.get_field("tokenizer.ggml.eos_token_id").contents()
    assert tok.decode([eos]) in ("<|im_end|>", "") and "output.weight" not in {t.name for t in reader.tensors}
    _, _, _, gemma = checkpoint("gemma3")
    reader = gguf.GGUFReader(gemma)
    assert reader.get_field("gemma3.attention.sliding_window").contents() == 16
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert abs(float(np.mean(norm.data)) - 1.0) < 0.1  # stored as 1 + w


@pytest.mark.parametrize("out_type,qtype", [("f16", gguf.GGMLQuantizationType.F16),
                                            ("q8_0", gguf.GGMLQuantizationType.Q8_0),
                                            ("q4_1", gguf.GGMLQuantizationType.Q4_1)])
def test_convert_cli_quantized_types(checkpoint, tmp_path, capsys, out_type, qtype):
    directory, model, encode, _ = checkpoint("llama")
    out = tmp_path / f"m-{out_type}.gguf"
    assert main(["convert", str(directory), "--out", str(out), "--type", out_type]) == 0
    assert "wrote" in capsys.readouterr().out
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == qtype
    expected = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    if out_type == "f16":
        assert np.array_equal(np.asarray(down.data).reshape(expected.shape), expected.astype(np.float16))
    else:  # gguf-py's quantizer, byte for byte
        assert np.array_equal(np.asarray(down.data).reshape(-1), gguf.quants.quantize(expected, qtype).reshape(-1))
    tokens = encode(TEXT)
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].numpy()
    ours = llama_cpp_logits(out, tokens)
    # rounding, not a bug: a random model's logits are flat (f16 measured 0.003 of a std, top-1 0.996; q4_1 top-1 0.71)
    assert logit_error(ours, reference) < {"f16": 0.03, "q8_0": 0.3, "q4_1": 1.5}[out_type]
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() > {"f16": 0.95, "q8_0": 0.8, "q4_1": 0.6}[out_type]


def test_convert_refuses_a_unigram_sentencepiece_model(tmp_path, checkpoint):
    """llama.cpp's SentencePiece tokenizer merges by score: a unigram model would tokenize differently."""
    directory, _, _, _ = checkpoint("llama")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(test_strings() * 3), model_writer=model, vocab_size=300,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((directory / f).read_bytes())
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(UserError, match="unigram model"):
        convert(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_convert_refuses_bad_input(tmp_path, checkpoint, capsys):
    with pytest.raises(UserError, match="no config.json"):
        convert(tmp_path, tmp_path / "x.gguf")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(UserError, match="not supported"):
        convert(tmp_path, tmp_path / "x.gguf")
    directory, _, _, path = checkpoint("llama")
    assert main(["convert", str(directory), "--out", str(path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
