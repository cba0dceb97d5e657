"""Tokenizer: llama.cpp's own tokenization (vocab-only), special tokens, decoding and chat templates."""
import pytest

from localpers.errors import UserError
from localpers.engine.tokenizer import Tokenizer
from tests.helpers_models import TEXT, VOCAB

VOCABS = ["llama-spm", "phi-3", "gpt-2", "deepseek-llm"]


def vocab_path(name):
    return VOCAB / f"ggml-vocab-{name}.gguf"


@pytest.fixture(scope="module")
def smollm(default_model_path):
    return Tokenizer.from_gguf(default_model_path)


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_tokenizer_test_vectors(name):
    """llama.cpp's tokenizer test vectors (tokenized without BOS, special text not parsed)."""
    path = vocab_path(name)
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = path.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(expected) == 46
    tokenizer = Tokenizer.from_gguf(path)
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text, add_bos=False, special=False) == [int(i) for i in ids.split()], repr(text)


def test_byte_level_bpe_decodes_test_vectors_exactly():
    """Byte-level BPE is lossless (GPT-2's vocabulary is not used here: llama.cpp, like Hugging Face, cleans up
    spaces before punctuation when decoding it)."""
    path = vocab_path("deepseek-llm")
    tokenizer = Tokenizer.from_gguf(path)
    for text in path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]:
        assert tokenizer.decode(tokenizer.encode(text, add_bos=False)) == text


def test_bos_follows_the_model():
    spm = Tokenizer.from_gguf(vocab_path("llama-spm"))  # tokenizer.ggml.add_bos_token = true
    assert spm.bos_id == 1 and spm.bos_token == "<s>" and spm.eos_token == "</s>"
    assert spm.encode("Hello world") == [1, 15043, 3186]
    assert spm.encode("Hello world", add_bos=False) == [15043, 3186]
    assert spm.decode([15043, 3186]) == "Hello world"  # SentencePiece's leading space is dropped


def test_smollm2_tokens_and_round_trip(smollm):
    assert smollm.bos_id == 1 and smollm.eos_id == 2
    assert (smollm.bos_token, smollm.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm.encode("Hello")[0] != smollm.bos_id  # SmolLM2 adds no BOS
    assert smollm.encode("<|im_start|>user") == [1, 4093]
    assert len(smollm.encode("<|im_start|>user", special=False)) > 2  # plain text when not parsed
    assert smollm.decode(smollm.encode(TEXT)) == TEXT


def test_smollm2_chat_template(smollm):
    assert "<|im_start|>" in smollm.chat_template
    prompt = smollm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tokens = smollm.encode(prompt)
    assert tokens[0] == smollm.bos_id and tokens.count(smollm.eos_id) == 2
    assert smollm.decode(tokens) == prompt


def test_chat_template_from_gguf_or_chatml():
    phi3 = Tokenizer.from_gguf(vocab_path("phi-3"))
    assert phi3.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
    spm = Tokenizer.from_gguf(vocab_path("llama-spm"))  # no template in the file: ChatML
    assert spm.chat_template is None
    assert spm.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
