"""C++ kernels (localpers._cpu) vs the gguf numpy path, both sides on the same data in the same run.

    python -m pytest bench/bench_quant.py
    OMP_NUM_THREADS=1 python -m pytest bench/bench_quant.py --benchmark-timer=time.process_time

The second line compares one core with one core in CPU time, which holds on a machine that other processes
load; the first is wall time with all cores. The speedup table is printed at the end of the run.

Dequantization per type on a 576x1536 tensor (SmolLM2's ffn_down; real data for Q4_1) and on larger ones
(4096x11008; SmolLM2's 49152x576 token_embd for Q8_0); the fused rank-8 edit into Q8_0 on the real ffn_down
and on a 4096x11008 Q4_K tensor, checked byte-identical in the same run.
"""
from functools import cache

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import localpers
from localpers.model import quant

FFN_DOWN = (576, 1536)  # numpy shape [n_out, n_in]
LARGE = (4096, 11008)
RANK = 8


@cache
def smollm2_tensor(name):
    reader = gguf.GGUFReader(localpers.default_model_path())
    t = next(t for t in reader.tensors if t.name == name)
    return np.ascontiguousarray(t.data), t.tensor_type, tuple(reversed(t.shape.tolist()))


@cache
def tensor(qtype, shape):
    """(raw data, qtype, shape): real SmolLM2 data where the model has that tensor, random valid blocks else."""
    if (qtype, shape) == (Q.Q4_1, FFN_DOWN):
        return smollm2_tensor("blk.0.ffn_down.weight")
    if (qtype, shape) == (Q.Q8_0, (49152, 576)):
        return smollm2_tensor("token_embd.weight")
    return quant.random_blocks(np.random.default_rng(0), qtype, shape), qtype, shape


def run(benchmark, fn, args, shape):
    # numpy on the large tensors takes seconds a call: fewer rounds there
    rounds = 3 if np.prod(shape) > 10_000_000 else 20
    return benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=1)


DEQUANT_CASES = [(t, FFN_DOWN) for t in quant.DEQUANT_TYPES] + [(Q.Q4_K, LARGE), (Q.Q4_1, LARGE), (Q.Q8_0, (49152, 576))]


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
@pytest.mark.parametrize("qtype,shape", DEQUANT_CASES, ids=[f"{t.name}-{s[0]}x{s[1]}" for t, s in DEQUANT_CASES])
def test_dequantize(benchmark, record_throughput, impl, qtype, shape):
    data, qtype, shape = tensor(qtype, shape)
    benchmark.group = f"dequant {qtype.name} {shape[0]}x{shape[1]}"
    fn = quant.dequantize if impl == "cpp" else quant.dequantize_numpy
    out = run(benchmark, fn, (data, qtype, shape), shape)
    assert out.shape == shape
    record_throughput(impl, data.nbytes + out.nbytes)


EDIT_CASES = [(Q.Q4_1, FFN_DOWN), (Q.Q4_K, LARGE)]


@pytest.fixture(scope="module")
def edit_outputs():
    return {}


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
@pytest.mark.parametrize("qtype,shape", EDIT_CASES, ids=[f"{t.name}-{s[0]}x{s[1]}" for t, s in EDIT_CASES])
def test_edit_to_q8_0(benchmark, record_throughput, edit_outputs, impl, qtype, shape):
    data, qtype, shape = tensor(qtype, shape)
    rng = np.random.default_rng(1)
    U = rng.standard_normal((shape[0], RANK), dtype=np.float32)
    V = 0.01 * rng.standard_normal((shape[1], RANK), dtype=np.float32)
    benchmark.group = f"edit->Q8_0 {qtype.name} {shape[0]}x{shape[1]} r{RANK}"
    fn = quant.edit_to_q8_0 if impl == "cpp" else quant.edit_to_q8_0_numpy
    out = run(benchmark, fn, (data, qtype, shape, U, V, 0.5), shape)
    record_throughput(impl, data.nbytes + U.nbytes + V.nbytes + out.nbytes)
    # the other side ran earlier in this session on the same inputs: the bytes must be identical
    other = edit_outputs.setdefault((qtype, shape), out)
    assert np.array_equal(out, other)
