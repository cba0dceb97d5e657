"""Rank-r edit kernels: apply_lowrank_ against W + scale * U @ V.T, and the Triton Q8_0 edit byte for byte against
localpers.model.quant.edit_to_q8_0_numpy (gguf's dequantizers and Q8_0 quantizer).

As in test_kernels_perce.py: Triton picks interpreter or compiler when its modules are imported, so without CUDA
the Triton cases here run in the TRITON_INTERPRET=1 child pytest of test_kernels_perce.py::test_interpreted_kernels.
"""
import os
import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from localpers.errors import UserError
from localpers.kernels import apply_lowrank_, edit_to_q8_0_triton
from localpers.kernels.lowrank import EDIT_SOURCE_TYPES
from localpers.kernels.reference import apply_lowrank_reference
from localpers.model.quant import edit_to_q8_0_numpy, random_blocks

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_HERE = INTERPRETED or ON_CUDA
BACKENDS = ["torch", "triton"] if TRITON_HERE else ["torch"]
triton_only = pytest.mark.skipif(
    not TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 child of test_kernels_perce.py::test_interpreted_kernels")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(n_out=st.integers(1, 150), n_in=st.integers(1, 150), rank=st.integers(1, 20),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), transposed=st.booleans(),
       scale=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_apply_lowrank_matches_reference(backend, n_out, n_in, rank, dtype, transposed, scale, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g).to(dtype)
    if transposed:  # a strided view, as a transposed weight would be
        W = W.T.contiguous().T
    U, V = torch.randn(n_out, rank, generator=g), torch.randn(n_in, rank, generator=g) / rank
    W, U, V = W.to(DEVICE), U.to(DEVICE), V.to(DEVICE)
    expected = apply_lowrank_reference(W, U, V, scale)
    out = apply_lowrank_(W, U, V, scale, backend=backend)
    assert out is W
    # low precision: one rounding of the fp32 result, plus torch's own rounding of U @ V.T on CPU
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(W, expected, **tolerance)


def assert_same_q8_0_bytes(data, qtype, shape, U, V, scale):
    expected = edit_to_q8_0_numpy(data, qtype, shape, U, V, scale)
    got = edit_to_q8_0_triton(torch.from_numpy(data).to(DEVICE), qtype, shape, torch.from_numpy(U).to(DEVICE),
                              torch.from_numpy(V).to(DEVICE), scale)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.cpu().numpy(), expected.reshape(got.shape))


@triton_only
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter evaluates 1 / d where d == 0
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # d > 65504: inf on both sides
@settings(max_examples=15, deadline=None)
@given(qtype=st.sampled_from(EDIT_SOURCE_TYPES), n_out=st.integers(1, 5), n_blocks=st.integers(1, 12),
       rank=st.integers(1, 6), scale=st.sampled_from([1.0, 0.37, -2.0, 0.0]),
       block_scales=st.sampled_from([0.02, None]), seed=st.integers(0, 2**16))
def test_triton_edit_to_q8_0_is_byte_identical(qtype, n_out, n_blocks, rank, scale, block_scales, seed):
    rng = np.random.default_rng(seed)
    n_in = n_blocks * GGML_QUANT_SIZES[qtype][0]  # 32 or 256 per block: partial 256-column programs for 32
    # random bytes; fp16 scales 0.02 * |N(0, 1)| or (None) any finite fp16, subnormals included
    data = random_blocks(rng, qtype, (n_out, n_in), scale=block_scales).reshape(n_out, -1)
    U = rng.standard_normal((n_out, rank)).astype(np.float32)
    V = (rng.standard_normal((n_in, rank)) * 0.01).astype(np.float32)
    if seed % 4 == 0:  # an all-zero block row: d = 0 takes the 1/d = 0 branch
        data[0] = 0
        U[0] = 0
    assert_same_q8_0_bytes(data, qtype, (n_out, n_in), U, V, scale)


@triton_only
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter evaluates 1 / d where d == 0
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # d > 65504: inf on both sides
@pytest.mark.parametrize("qtype", EDIT_SOURCE_TYPES, ids=lambda t: t.name)
def test_triton_edit_to_q8_0_reads_every_type(qtype):
    """Every source type, deterministically (the property test above reaches a type only by random draw): any
    finite fp16 scale (subnormals included), a full and a partial 256-column program, an all-zero row."""
    rng = np.random.default_rng(int(qtype))
    block_size = GGML_QUANT_SIZES[qtype][0]
    n_out, n_in = 3, block_size * (2 if block_size == 256 else 9)
    data = random_blocks(rng, qtype, (n_out, n_in), scale=None).reshape(n_out, -1)
    data[2] = 0
    U = rng.standard_normal((n_out, 2)).astype(np.float32)
    V = (rng.standard_normal((n_in, 2)) * 0.01).astype(np.float32)
    U[2] = 0
    assert_same_q8_0_bytes(data, qtype, (n_out, n_in), U, V, 0.37)


@pytest.fixture(scope="module")
def model_tensors(default_model_path):
    return {t.name: t for t in gguf.GGUFReader(default_model_path).tensors}


@triton_only
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter evaluates 1 / d where d == 0
@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.ffn_down.weight"])  # Q8_0 and Q4_1 in SmolLM2
def test_triton_edit_to_q8_0_on_model_rows(name, model_tensors):
    tensor = model_tensors[name]
    rows = np.array(tensor.data[:3])
    n_in = int(tensor.shape[0])
    rng = np.random.default_rng(0)
    U = rng.standard_normal((3, 4)).astype(np.float32)
    V = (rng.standard_normal((n_in, 4)) * 0.01).astype(np.float32)
    assert_same_q8_0_bytes(rows, tensor.tensor_type, (3, n_in), U, V, 0.5)


def test_edit_to_q8_0_triton_rejects_bad_input():
    data = torch.zeros(2, 40, dtype=torch.uint8)  # two Q4_1 rows of 64
    U, V = torch.zeros(2, 1), torch.zeros(64, 1)
    with pytest.raises(UserError, match="Q5_0"):
        edit_to_q8_0_triton(data, Q.Q5_0, (2, 64), U, V)
    with pytest.raises(UserError, match="needs 80 uint8 bytes"):
        edit_to_q8_0_triton(data[:1], Q.Q4_1, (2, 64), U, V)
    with pytest.raises(ValueError, match="do not fit"):
        edit_to_q8_0_triton(data, Q.Q4_1, (2, 64), U, V[:32])
    with pytest.raises(UserError, match=r"Q4_1 tensor of shape \(2, 48\): n_in must be a multiple of 32"):
        edit_to_q8_0_triton(data, Q.Q4_1, (2, 48), U, V[:48])


def test_apply_lowrank_defaults_to_torch_on_cpu_at_unit_scale_and_names_an_unknown_backend():
    """No backend: a CPU weight takes torch's path; no scale: 1. An unknown backend is a ValueError naming it."""
    g = torch.Generator().manual_seed(0)
    W, U, V = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g), torch.randn(4, 2, generator=g)
    expected = W + U @ V.T
    assert apply_lowrank_(W, U, V) is W
    torch.testing.assert_close(W, expected)
    with pytest.raises(ValueError, match="'cuda'"):
        apply_lowrank_(W, U, V, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_factors_without_their_rank_axis_are_refused_as_not_fitting(backend):
    """A one-dimensional U or V (a rank-one factor without its r axis) is a ValueError, never an index error."""
    W = torch.zeros(5, 4, device=DEVICE)
    for U, V in ((torch.zeros(5, 1), torch.zeros(4)), (torch.zeros(5), torch.zeros(4, 1))):
        with pytest.raises(ValueError, match="do not fit"):
            apply_lowrank_(W, U.to(DEVICE), V.to(DEVICE), backend=backend)


@triton_only
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter evaluates 1 / d where d == 0
def test_triton_edit_to_q8_0_scales_by_one_by_default():
    rng = np.random.default_rng(5)
    data = random_blocks(rng, Q.Q8_0, (2, 64), scale=0.02).reshape(2, -1)
    U = rng.standard_normal((2, 1)).astype(np.float32)
    V = (rng.standard_normal((64, 1)) * 0.1).astype(np.float32)
    got = edit_to_q8_0_triton(torch.from_numpy(data).to(DEVICE), Q.Q8_0, (2, 64), torch.from_numpy(U).to(DEVICE),
                              torch.from_numpy(V).to(DEVICE))
    np.testing.assert_array_equal(got.cpu().numpy(), edit_to_q8_0_numpy(data, Q.Q8_0, (2, 64), U, V, 1.0).reshape(got.shape))



def compile_for_hopper(kernel, types, constexprs, **options):
    """PTX of a Triton kernel compiled for sm_90; needs no GPU (Triton's bundled ptxas), only compiled-mode Triton.
    types: Triton type of each runtime argument ("*fp32", "i32", ...); constexprs: the value of each other one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(name),): value
                                                      for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel: needs Triton in compiled mode")
@pytest.mark.parametrize("qtype", EDIT_SOURCE_TYPES, ids=lambda t: t.name)
def test_compiled_q8_0_edit_rounds_like_numpy(qtype):
    """On a GPU the interpreter's byte identity holds only if every float op rounds as numpy's float32 does: the
    compiled kernel must use IEEE round-to-nearest add/sub/mul/div and no fused multiply-add."""
    from localpers.kernels.lowrank_triton import Q8_0_BLOCKS_PER_PROGRAM, _edit_to_q8_0_kernel

    types = {"src_ptr": "*u8", "u_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*u8", "n_in": "i32", "rank": "i32",
             "src_row_bytes": "i32", "scale": "fp32"}
    ptx = compile_for_hopper(_edit_to_q8_0_kernel, types, dict(QTYPE=int(qtype), BLOCKS=Q8_0_BLOCKS_PER_PROGRAM),
                             enable_fp_fusion=False)
    float_ops = set(re.findall(r"\b(?:add|sub|mul|div|fma|mad|rcp)\.[a-z0-9.]*f32\b", ptx))
    assert float_ops and float_ops <= {"add.rn.f32", "sub.rn.f32", "mul.rn.f32", "div.rn.f32"}, float_ops
    assert "cvt.rn.f16.f32" in ptx  # d stored as fp16 with round-to-nearest-even, like numpy's astype


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels: needs Triton in compiled mode")
@pytest.mark.parametrize("dtype,precision", [("fp32", "ieee"), ("bf16", "tf32")])
def test_other_kernels_compile_for_hopper(dtype, precision):
    """The interpreter runs Python, the compiler needs valid Triton: the PerCE and apply_lowrank_ kernels must build
    (a minute or two on 2 cores with a cold Triton cache)."""
    from localpers.kernels import lowrank_triton, perce_triton

    pointer = f"*{dtype}"
    types = {"h_ptr": pointer, "w_ptr": pointer, "u_ptr": pointer, "v_ptr": pointer, "targets_ptr": "*i64",
             "scale": "fp32", **{name: "*fp32" for name in ("out_ptr", "lse_ptr", "coef_ptr", "dh_ptr", "dw_ptr")},
             **{name: "i32" for name in ("N", "V", "D", "M", "R", "n_splits", "stride_h", "stride_w", "stride_wm",
                                         "stride_wn", "stride_u", "stride_v")}}
    blocks = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, PRECISION=precision)
    kernels = {perce_triton._partial_logsumexp_kernel: dict(blocks, VOCAB_PER_PROGRAM=perce_triton.VOCAB_PER_PROGRAM),
               perce_triton._backward_kernel: dict(blocks, COMPUTE_DH=True, COMPUTE_DW=True),
               lowrank_triton._apply_lowrank_kernel: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, PRECISION=precision)}
    for kernel, constexprs in kernels.items():
        ptx = compile_for_hopper(kernel, types, constexprs)
        name = kernel.fn.__name__
        assert ".target sm_90" in ptx and re.search(rf"\.entry {name}\b", ptx), f"{name}: no sm_90 entry point"
        # tl.dot on tensor cores: bf16 inputs (and tf32) use MMA instructions; "ieee" fp32 must not use them
        mma = re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.[a-z0-9.]*", ptx)
        if precision == "ieee":
            assert not mma, f"{name}: fp32 'ieee' dot compiled to tensor-core MMA: {sorted(set(mma))[:3]}"
        else:
            assert mma, f"{name}: a {dtype} dot without tensor-core MMA"
