"""Kernel benchmarks: the fused PerCE loss against its materialized-logits reference, and apply_lowrank_.

    python -m pytest bench/bench_kernels.py

PerCE, forward + backward (gradient to h_pos; the output weights stay frozen, as in LoRA training), at
(N, d, V) = (2048, 576, 49152) and (4096, 576, 49152): SmolLM2's real output weights (token_embd, dequantized from
the default model) and hidden states normalized then scaled so the logits have std 3, like a trained model's.
(Random large logits would make softmax underflow to denormals, which slows CPU arithmetic ~50x.)
- time: pytest-benchmark, fused and naive in the same run, and both alternately, 3 times each (wall and CPU time),
  since the background load of a shared machine changes between benchmark groups;
- peak memory: each case runs once more in a fresh process (python -m bench.bench_kernels IMPL N DEVICE), which
  builds its inputs, resets the kernel's peak-RSS mark (VmHWM, by writing 5 to /proc/self/clear_refs), runs forward
  + backward and reports VmHWM - RSS before: the extra memory the loss needed, torch allocations included.
  On CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before. test_perce_peak_memory: fused fp32,
  fused bf16 (inputs rounded to bf16 first) and naive, each in its own process;
- against the bare GEMMs (test_perce_vs_bare_matmuls): fused and the three GEMMs it needs, fp32 and bf16, all
  alternately: OMP_NUM_THREADS=1 python -m pytest bench/bench_kernels.py -k bare_matmuls -s
apply_lowrank_: GB/s (W read and written, U and V read) on SmolLM2's ffn_down shape and on 4096 x 11008.
Triton cases need CUDA and skip without it.
"""
import os
import re
import statistics
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import localpers
from localpers.model import quant
from localpers.kernels import apply_lowrank_, perce_linear_cross_entropy
from localpers.kernels.reference import perce_linear_cross_entropy_reference

REPO = Path(__file__).resolve().parents[1]
PERCE_N = [2048, 4096]
LOWRANK_SHAPES = [(576, 1536), (4096, 11008)]
RANK = 8
LOGIT_STD = 3.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@cache
def output_weight() -> torch.Tensor:
    """SmolLM2's tied output projection [49152, 576], fp32."""
    tensor = next(t for t in gguf.GGUFReader(localpers.default_model_path()).tensors if t.name == "token_embd.weight")
    shape = tuple(reversed(tensor.shape.tolist()))
    return torch.from_numpy(quant.dequantize(np.asarray(tensor.data), tensor.tensor_type, shape))


def perce_inputs(n: int, device: str):
    weight = output_weight().to(device)
    g = torch.Generator().manual_seed(0)
    h_neg = torch.randn(n, weight.shape[1], generator=g)
    h_neg /= h_neg.norm(dim=1, keepdim=True)
    h_neg *= LOGIT_STD / (h_neg[:256] @ output_weight().T).std()
    h_pos = h_neg + 0.3 * h_neg.std() * torch.randn(h_neg.shape, generator=g)  # the profile shifts the states
    targets = torch.randint(0, weight.shape[0], (n,), generator=g)
    targets[::8] = -100  # some positions do not count
    return h_pos.to(device), h_neg.to(device), weight, targets.to(device)


def forward_backward(impl, h_pos, h_neg, weight, targets):
    """impl: "fused" (fp32 inputs), "fused-bf16" (the inputs rounded to bf16: the bf16 GEMM path) or "naive"."""
    if impl == "fused-bf16":
        h_pos, h_neg, weight = h_pos.bfloat16(), h_neg.bfloat16(), weight.bfloat16()
    h_pos = h_pos.detach().requires_grad_()
    loss_fn = perce_linear_cross_entropy_reference if impl == "naive" else perce_linear_cross_entropy
    loss = loss_fn(h_pos, h_neg, weight, targets)[0]
    loss.backward()
    return loss.detach(), h_pos.grad


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_extra_bytes(impl: str, n: int, device: str) -> int:
    """Extra memory of one forward + backward, measured in this (fresh) process."""
    inputs = perce_inputs(n, device)
    if impl == "fused-bf16":  # inputs in bf16 before the measurement starts
        h_pos, h_neg, weight, targets = inputs
        inputs = h_pos.bfloat16(), h_neg.bfloat16(), weight.bfloat16(), targets
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward(impl, *inputs)
        return torch.cuda.max_memory_allocated() - before
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    forward_backward(impl, *inputs)
    return (_status_kib("VmHWM") - before) * 1024


@pytest.fixture(scope="module")
def summary(request):
    """Printed after the run: fused/naive ratios per PerCE shape ("perce") and throughput lines ("lines")."""
    results = {"perce": {}, "lines": []}
    yield results
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        reporter.section("kernels, same run (median times; PerCE peak extra memory measured in a fresh process)")
        for (device, n), r in sorted(results["perce"].items()):
            if {"fused", "naive"} <= r.keys():
                (tf, mf), (tn, mn) = r["fused"], r["naive"]
                reporter.write_line(f"PerCE {device} N={n:5d}: fused {tf:7.3f} s {mf / 2**20:8.1f} MiB | naive "
                                    f"{tn:7.3f} s {mn / 2**20:8.1f} MiB | time {tf / tn:5.2f}x, memory "
                                    f"{mf / mn:6.1%} of naive")
        for line in results["lines"]:
            reporter.write_line(line)


def record_throughput(benchmark, summary, n_bytes):
    seconds = benchmark.stats.stats.median
    summary["lines"].append(f"{benchmark.group:<45} {seconds * 1e3:9.3f} ms {n_bytes / seconds / 1e9:7.2f} GB/s")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", PERCE_N)
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_perce_forward_backward(benchmark, summary, impl, n, device):
    inputs = perce_inputs(n, device)
    benchmark.group = f"PerCE fwd+bwd {device} N={n} d=576 V=49152"
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    rounds = 3 if n <= 2048 else 2  # the naive case takes a minute a round at 4096 on 2 busy cores
    result = benchmark.pedantic(lambda: (forward_backward(impl, *inputs), sync())[0], rounds=rounds)
    results = summary["perce"].setdefault((device, n), {})
    if "result" in results:  # the other implementation ran this shape just before: same loss, same gradient
        for got, want in zip(result, results["result"]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    results["result"] = result
    child = subprocess.run([sys.executable, "-m", "bench.bench_kernels", impl, str(n), device], cwd=REPO,
                           capture_output=True, text=True, check=True)
    peak = int(child.stdout.split()[-1])
    benchmark.extra_info["peak_extra_bytes"] = peak
    results[impl] = (benchmark.stats.stats.median, peak)


@pytest.mark.parametrize("n", PERCE_N)
def test_perce_interleaved_time_ratio(summary, n, rounds=3):
    """fused and naive alternately, so that both see the same background load (the machine is shared); wall time
    and this process's CPU time (less sensitive to other processes on the same cores)."""
    inputs = perce_inputs(n, "cpu")
    wall, cpu = {"fused": [], "naive": []}, {"fused": [], "naive": []}
    for _ in range(rounds):
        for impl in wall:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            forward_backward(impl, *inputs)
            wall[impl].append(time.perf_counter() - start_wall)
            cpu[impl].append(time.process_time() - start_cpu)
    line = f"PerCE cpu N={n} interleaved x{rounds} (medians):"
    for name, seconds in (("wall", wall), ("CPU", cpu)):
        fused, naive = (statistics.median(t) for t in seconds.values())
        line += f" {name} fused {fused:.2f} s naive {naive:.2f} s = {fused / naive:.2f}x;"
    summary["lines"].append(line)


def bare_matmuls(h_pos, h_neg, weight, grad_logits):
    """The products the fused loss cannot avoid (gradient to h only, as in LoRA training): both logits GEMMs
    and the input-gradient GEMM, into preallocated outputs."""
    torch.mm(h_pos, weight.T, out=grad_logits)
    torch.mm(h_neg, weight.T, out=grad_logits)
    return torch.mm(grad_logits, weight)


def test_perce_vs_bare_matmuls(summary, n=2048, rounds=3):
    """Fused PerCE forward + backward (fp32 inputs, and the same inputs rounded to bf16: the bf16 GEMM path)
    against the three bare GEMMs it needs in each dtype, all four alternately in one loop (the machine is shared):
    CPU time of this process (medians; run with OMP_NUM_THREADS=1 for one core's figures) and wall time."""
    h_pos, h_neg, weight, targets = perce_inputs(n, "cpu")
    low = h_pos.bfloat16(), h_neg.bfloat16(), weight.bfloat16()
    buffers = {dtype: torch.empty(n, weight.shape[0], dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    runs = {"fused fp32": lambda: forward_backward("fused", h_pos, h_neg, weight, targets),
            "bare fp32": lambda: bare_matmuls(h_pos, h_neg, weight, buffers[torch.float32]),
            "fused bf16": lambda: forward_backward("fused", *low, targets),
            "bare bf16": lambda: bare_matmuls(*low, buffers[torch.bfloat16])}
    cpu, wall = ({name: [] for name in runs} for _ in range(2))
    load = os.getloadavg()[0]
    for _ in range(rounds):
        for name, run in runs.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            run()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    c = {name: statistics.median(t) for name, t in cpu.items()}
    w = {name: statistics.median(t) for name, t in wall.items()}
    summary["lines"].append(
        f"PerCE cpu N={n} x{rounds} alternately, {torch.get_num_threads()} thread(s), load {load:.1f}..."
        f"{os.getloadavg()[0]:.1f}: CPU s " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()) +
        " | wall s " + ", ".join(f"{k} {v:.2f}" for k, v in w.items()))
    summary["lines"].append(
        f"  CPU time: fused/bare fp32 {c['fused fp32'] / c['bare fp32']:.3f}x, fused/bare bf16 "
        f"{c['fused bf16'] / c['bare bf16']:.3f}x, fused bf16/fused fp32 {c['fused bf16'] / c['fused fp32']:.3f}x "
        f"(bare bf16/bare fp32 {c['bare bf16'] / c['bare fp32']:.3f}x: the floor on this CPU)")


@pytest.mark.parametrize("n", [16, 64])
def test_perce_training_shape(summary, n, rounds=5):
    """The loss at one training example's size (n target tokens, the whole vocabulary), as training.py calls it:
    fp32, and bf16 with the weight cast to bf16 beforehand (once per optimizer step; its cost on its own line).
    CPU time of this process, medians of `rounds` alternate runs."""
    h_pos, h_neg, weight, targets = perce_inputs(n, "cpu")
    weight_bf16 = weight.bfloat16()
    runs = {"fp32": lambda: forward_backward("fused", h_pos, h_neg, weight, targets),
            "bf16": lambda: forward_backward("fused", h_pos, h_neg, weight_bf16, targets),
            "weight cast": lambda: weight.bfloat16()}
    cpu = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            run()
            cpu[name].append(time.process_time() - start)
    summary["lines"].append(f"PerCE cpu N={n} (one example): " + ", ".join(
        f"{name} {statistics.median(t) * 1e3:.1f} ms" for name, t in cpu.items()))


def test_perce_bf16_error(summary, n=512):
    """The bf16 path's error against the fp32 reference on the same inputs (rounded to bf16), SmolLM2's output
    weights: loss, token weights and PIR (largest absolute error), gradients to h and to the weight (relative,
    Frobenius norm); beside it the fp32 path's error, and M = max |logit| (tests/test_kernels_perce.py bounds the
    bf16 errors by multiples of u M, u = 2^-8)."""
    h_pos, h_neg, weight, targets = (x.bfloat16() if x.is_floating_point() else x for x in perce_inputs(n, "cpu"))

    def run(fn, h, w, **kwargs):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss, token_weights, pir = fn(h, h_neg, w, targets, **kwargs)[:3]
        loss.backward()
        return loss.detach().float(), token_weights, pir, h.grad.float(), w.grad.float()

    want = run(perce_linear_cross_entropy_reference, h_pos.float(), weight.float())
    got = {"bf16": run(perce_linear_cross_entropy, h_pos, weight, return_pir=True),
           "fp32": run(perce_linear_cross_entropy, h_pos.float(), weight.float(), return_pir=True)}
    m = float((h_pos.float() @ weight.float().T).abs().max())
    line = f"PerCE cpu N={n} error vs the fp32 reference (M = {m:.1f}):"
    for path, result in got.items():
        a = [float((x - y).abs().max()) for x, y in zip(result[:3], want[:3])]
        r = [float((x - y).norm() / y.norm()) for x, y in zip(result[3:], want[3:])]
        line += (f" {path}: loss {a[0]:.2g}, weights {a[1]:.2g}, PIR {a[2]:.2g} (max abs), grad h {r[0]:.2%}, "
                 f"grad W {r[1]:.2%} (rel);")
    summary["lines"].append(line)


@pytest.mark.parametrize("n", PERCE_N)
def test_perce_peak_memory(summary, n):
    """Peak extra memory of one forward + backward, each in a fresh process: fused fp32, fused bf16, naive."""
    peaks = {}
    for impl in ("fused", "fused-bf16", "naive"):
        child = subprocess.run([sys.executable, "-m", "bench.bench_kernels", impl, str(n), "cpu"], cwd=REPO,
                               capture_output=True, text=True, check=True)
        peaks[impl] = int(child.stdout.split()[-1])
    naive = peaks["naive"]
    summary["lines"].append(f"PerCE cpu N={n} peak extra memory: naive {naive / 2**20:.1f} MiB, " + ", ".join(
        f"{impl} {peaks[impl] / 2**20:.1f} MiB = {peaks[impl] / naive:.1%}" for impl in ("fused", "fused-bf16")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=[f"{m}x{n}" for m, n in LOWRANK_SHAPES])
def test_apply_lowrank(benchmark, summary, shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=g).to(device, dtype)
    U = torch.randn(shape[0], RANK, generator=g).to(device, dtype)
    V = (torch.randn(shape[1], RANK, generator=g) * 1e-3).to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    benchmark.group = f"apply_lowrank_ {shape[0]}x{shape[1]} r{RANK} {device} {str(dtype).removeprefix('torch.')}"
    benchmark.pedantic(lambda: (apply_lowrank_(W, U, V, 0.5), sync()), rounds=10, warmup_rounds=1)
    record_throughput(benchmark, summary, 2 * W.nbytes + U.nbytes + V.nbytes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_K])
def test_edit_to_q8_0_triton(benchmark, summary, qtype):
    from localpers.kernels import edit_to_q8_0_triton

    shape = (4096, 11008)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(quant.random_blocks(rng, qtype, shape)).cuda()
    U = torch.randn(shape[0], RANK, device="cuda")
    V = torch.randn(shape[1], RANK, device="cuda") * 0.01
    benchmark.group = f"edit->Q8_0 Triton {qtype.name} {shape[0]}x{shape[1]} r{RANK}"
    out = benchmark.pedantic(lambda: (edit_to_q8_0_triton(data, qtype, shape, U, V, 0.5), torch.cuda.synchronize())[0],
                             rounds=10, warmup_rounds=1)
    record_throughput(benchmark, summary, data.nbytes + out.nbytes + U.nbytes + V.nbytes)


if __name__ == "__main__":  # one peak-memory measurement: python -m bench.bench_kernels IMPL N DEVICE
    print(peak_extra_bytes(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
