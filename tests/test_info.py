"""`localpers info` and open_gguf: a summary of real models, one-line errors for bad files."""
import numpy as np
import pytest

from localpers.cli import cli
from localpers.errors import UserError
from localpers.model.gguf_info import describe, open_gguf
from tests.helpers_models import VOCAB, random_model_path


def test_describe_default_model():
    text = describe()
    assert "architecture       llama" in text
    assert "Q4_1: 210, F32: 61, Q8_0: 1" in text  # SmolLM2-135M Q4_1: token_embd is Q8_0, norms F32
    assert "49152 tokens" in text
    assert "context length     8192" in text
    assert "attention heads    9 (key/value heads: 3)" in text
    assert "134.5 M" in text


def test_describe_counts_parameters_of_written_model(tmp_path_factory):
    path = random_model_path(tmp_path_factory, "qwen3")
    reader = open_gguf(path)
    expected = sum(int(np.prod(t.shape)) for t in reader.tensors)
    text = describe(path)
    assert f"parameters         {expected:,}" in text
    assert "architecture       qwen3" in text
    assert "gpt2 (deepseek-llm pre-tokenizer), 102400 tokens" in text


@pytest.fixture
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    good = random_model_path(tmp_path_factory, "llama").read_bytes()
    (tmp / "text.gguf").write_text("not a model\n")
    (tmp / "empty.gguf").write_bytes(b"")
    cases = {"text.gguf": "not a GGUF file", "empty.gguf": "not a GGUF file", "missing.gguf": "no such file"}
    for n in (4, 100, 5000, len(good) // 2, len(good) - 1):  # cut in header, metadata, tensor data
        (tmp / f"cut{n}.gguf").write_bytes(good[:n])
        cases[f"cut{n}.gguf"] = "truncated or corrupt GGUF file"
    return tmp, cases


def test_open_gguf_one_line_errors(bad_files):
    tmp, cases = bad_files
    for name, problem in cases.items():
        with pytest.raises(UserError) as e:
            open_gguf(tmp / name)
        assert str(e.value) == f"{tmp / name}: {problem}"
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        open_gguf(VOCAB / "ggml-vocab-gpt-2.gguf")


def test_cli_info_prints_error_without_traceback(bad_files, capsys):
    tmp, _ = bad_files
    assert cli.main(["info", "--model", str(tmp / "cut100.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == f"localpers: error: {tmp / 'cut100.gguf'}: truncated or corrupt GGUF file\n"
    assert cli.main(["info", "--model", str(VOCAB / "ggml-vocab-phi-3.gguf")]) == 2
    assert "unsupported architecture 'phi3'" in capsys.readouterr().err


def test_fast_reader_reads_what_gguf_reads(tmp_path_factory):
    """GGUFFile's one-pass array parsing gives the same metadata and tensors as gguf's own reader."""
    import gguf

    from localpers.model.gguf_info import GGUFFile

    path = random_model_path(tmp_path_factory, "llama")  # SentencePiece vocabulary: strings, scores, types
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in theirs.fields.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in theirs.tensors]
