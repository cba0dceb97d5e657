"""Fused PerCE loss against the materialized-logits reference: loss, token weights, PIR and gradients.

Triton reads TRITON_INTERPRET when @triton.jit runs, that is when a kernel module (and triton.language itself) is
imported, so a pytest process that may already hold compiled-mode Triton cannot switch to the interpreter. The
"triton" cases (here and in test_kernels_lowrank.py) therefore run here on a CUDA machine, and otherwise in a child
pytest started with TRITON_INTERPRET=1 on CPU tensors (test_interpreted_kernels).
"""
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from localpers.kernels import perce_linear_cross_entropy
from localpers.kernels import perce_loss
from localpers.kernels.reference import perce_linear_cross_entropy_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_CUDA else "cpu"
BACKENDS = ["torch", "triton"] if INTERPRETED or ON_CUDA else ["torch"]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding to nearest moves x by at most |x| * 2^-8


def make_case(n, d, v, dtype, seed, ignored_fraction=0.2, profile_effect=1.0, transposed=False):
    """Hidden states and output weights with logits of std ~2 (no softmax underflow), targets with ignored rows;
    transposed: h_pos, h_neg and weight as transposes of contiguous tensors (column-major)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g) * (2 / d ** 0.5)
    h_neg = torch.randn(n, d, generator=g)
    h_pos = h_neg + profile_effect * torch.randn(n, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored_fraction] = -100
    token_weights = torch.rand(n, generator=g) * 3
    floats = [x.to(DEVICE, dtype) for x in (h_pos, h_neg, weight)]
    if transposed:
        floats = [x.T.contiguous().T for x in floats]
    return [*floats, targets.to(DEVICE), token_weights.to(DEVICE)]


def run(fn, h_pos, h_neg, weight, targets, token_weights, weight_grad, grad_scale=1.0, **kwargs):
    """Loss, weights, PIR and the gradients of grad_scale * loss, for the kernel or the reference."""
    h_pos = h_pos.detach().requires_grad_()
    weight = weight.detach().requires_grad_(weight_grad)
    loss, weights, pir = fn(h_pos, h_neg, weight, targets, token_weights=token_weights, **kwargs)
    (grad_scale * loss).backward()
    return loss.detach(), weights, pir, h_pos.grad, weight.grad


def kernel(backend):
    return lambda *args, **kwargs: perce_linear_cross_entropy(*args, **kwargs, return_pir=True, backend=backend)


def assert_bf16_path_close(got, want, h_pos, h_neg, weight, targets):
    """The torch path's bf16 GEMMs against the fp32 reference on the same (bf16) inputs, within what bf16 rounding
    explains. With u = 2^-8 and M = max |logit|: each logit is rounded once (|error| <= u |z| <= uM), so a
    log-softmax value moves by at most 2uM (its target logit and its log-sum-exp, a softmax-weighted mean), PIR and
    the clipped weights (1-Lipschitz) by 4uM, and the loss, mean of w_t * nll_t, by mean(4uM nll_t + 2uM w_t).
    Gradients, norm-wise, to first order: the softmax of rounded logits moves each p_v by at most 2uM p_v (and by
    O((1 - p_t) uM) where p_t -> 1, so the bound stays relative to the small gradient of a confident row), and the
    exp tile, its GEMM output and the result are each rounded to bf16 once: 2uM + 4u of the gradient's norm. (On
    SmolLM2's weights, M ~ 22, the error is 0.4%, well inside: BENCHMARKS, session 7.)"""
    u = BF16_UNIT_ROUNDOFF
    rows = [h for h in (h_pos, h_neg) if h is not None]
    m = max(float((h.float() @ weight.float().T).abs().max()) for h in rows)
    valid = targets != -100
    loss, weights, pir, grad_h, grad_w = want
    n_valid = max(int(valid.sum()), 1)
    nll_sum = float(-(torch.log_softmax(h_pos.float() @ weight.float().T, -1)
                      .gather(1, torch.where(valid, targets, 0)[:, None])[:, 0] * valid).sum())
    weight_error = 4 * u * m if pir is not None else 0.0
    loss_bound = (weight_error * nll_sum + 2 * u * m * float(weights.sum())) / n_valid
    assert abs(float(got[0]) - float(loss)) <= loss_bound + 1e-6, (float(got[0]), float(loss), loss_bound)
    torch.testing.assert_close(got[1], weights, rtol=0, atol=weight_error + 1e-6, msg=lambda m: f"weights: {m}")
    if pir is not None:
        torch.testing.assert_close(got[2], pir, rtol=0, atol=4 * u * m + 1e-6, msg=lambda m: f"pir: {m}")
    for name, x, y in (("grad h_pos", got[3], grad_h), ("grad weight", got[4], grad_w)):
        if y is None:
            assert x is None, name
            continue
        assert x.dtype == y.dtype, name
        error, size = float((x.float() - y.float()).norm()), float(y.float().norm())
        bound = (2 * u * m + 4 * u) * size + 1e-6 * y.numel() ** 0.5
        assert error <= bound, f"{name}: |error| {error:.3g} vs |grad| {size:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 80), d=st.integers(1, 70), v=st.integers(1, 700),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), percontrast=st.booleans(),
       weight_grad=st.booleans(), profile_effect=st.sampled_from([0.05, 1.0]), chunk_rows=st.integers(1, 40),
       vocab_tile=st.integers(1, 300), flash=st.booleans(), transposed=st.booleans(),
       grad_scale=st.sampled_from([1.0, -2.5]), seed=st.integers(0, 2**16))
def test_matches_reference(backend, n, d, v, dtype, percontrast, weight_grad, profile_effect, chunk_rows,
                           vocab_tile, flash, transposed, grad_scale, seed):
    """fp32 inputs: the reference's numbers (fp32 throughout). bf16 inputs: the Triton path multiplies in fp32 (the
    same tolerance as before); the torch path multiplies in bf16 (assert_bf16_path_close). flash=False: the torch
    path's own tiled loop where it would call torch's CPU flash attention (fp32 with a gradient to h).
    transposed: column-major inputs (that kernel reads a transposed input wrong unless it is made contiguous)."""
    h_pos, h_neg, weight, targets, token_weights = make_case(n, d, v, dtype, seed, profile_effect=profile_effect,
                                                             transposed=transposed)
    if percontrast:
        token_weights = None
    else:
        h_neg = None
    # several row chunks and vocabulary tiles, the last of each partial
    with (mock.patch.object(perce_loss, "CHUNK_ROWS", chunk_rows),
          mock.patch.object(perce_loss, "VOCAB_TILE", vocab_tile),
          mock.patch.object(perce_loss, "FLASH_CPU", perce_loss.FLASH_CPU if flash else None)):
        got = run(kernel(backend), h_pos, h_neg, weight, targets, token_weights, weight_grad, grad_scale)
    want = run(perce_linear_cross_entropy_reference, h_pos, h_neg, weight, targets, token_weights, weight_grad,
               grad_scale)
    if dtype == torch.bfloat16 and backend == "torch":
        assert_bf16_path_close(got, want, h_pos, h_neg, weight, targets)
    else:
        names = ["loss", "token_weights", "pir", "grad h_pos", "grad weight"]
        for name, x, y in zip(names, got, want):
            if y is None:
                assert x is None, name
            else:
                torch.testing.assert_close(x, y, **TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")
    assert got[1].requires_grad is False
    if percontrast:  # the weights are the clipped PIR at valid positions and 0 elsewhere
        valid = targets != -100
        assert torch.equal(got[1][valid], got[2][valid].clamp(0.8, 5.0)) and not got[1][~valid].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_major_inputs(backend):
    """Transposed (column-major) h_pos, h_neg and weight give the contiguous inputs' numbers."""
    case = make_case(37, 24, 300, torch.float32, seed=7)
    got = run(kernel(backend), *make_case(37, 24, 300, torch.float32, seed=7, transposed=True)[:4], None, True)
    want = run(kernel(backend), *case[:4], None, True)
    for name, x, y in zip(["loss", "token_weights", "pir", "grad h_pos", "grad weight"], got, want):
        torch.testing.assert_close(x, y, **TOLERANCE[torch.float32], msg=lambda m: f"{name}: {m}")


def test_bf16_autocast_takes_the_bf16_path():
    """Under bf16 autocast, fp32 inputs get the bf16 GEMMs (as F.linear would), the same numbers as bf16 inputs;
    outside it they stay on the exact fp32 path."""
    h_pos, h_neg, weight, targets, _ = (x.cpu() for x in make_case(40, 24, 300, torch.float32, seed=6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = perce_linear_cross_entropy(h_pos, h_neg, weight, targets, backend="torch", return_pir=True)
    low = perce_linear_cross_entropy(h_pos.bfloat16(), h_neg.bfloat16(), weight.bfloat16(), targets, backend="torch",
                                     return_pir=True)
    exact = perce_linear_cross_entropy(h_pos, h_neg, weight, targets, backend="torch", return_pir=True)
    assert all(torch.equal(x, y) for x, y in zip(got, low))
    assert not torch.equal(got[2], exact[2])
    want = perce_linear_cross_entropy_reference(h_pos, h_neg, weight, targets)
    torch.testing.assert_close(exact[2], want[2], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("percontrast", [True, False])
def test_bf16_confident_tokens_keep_their_gradient(percontrast):
    """Targets the model already predicts (p_t up to 1 - 1e-6): the gradient c_t (softmax - onehot) W is tiny
    against W[y_t], and a path that rounds the target tile's exp(tile) @ W[tile] (~W[y_t] + the gradient) to bf16
    before subtracting W[y_t] loses the gradient (99% error on the most confident row). The torch path sums p_v W_v
    over v != y_t only and adds (p_t - 1) W[y_t] in fp32, so the bf16 bounds hold row by row here too."""
    h_pos, h_neg, weight, targets, token_weights = make_case(48, 32, 500, torch.bfloat16, seed=5, profile_effect=0.1)
    targets = ((h_pos.float() @ weight.float().T).argmax(1)).to(DEVICE)  # the most likely token
    h_pos, h_neg = 6 * h_pos, 6 * h_neg  # logits up to ~50: p_t of the argmax from ~0.2 to ~1 - 1e-6
    p_target = torch.softmax(h_pos.float() @ weight.float().T, 1).gather(1, targets[:, None])
    assert p_target.min() < 0.9 and p_target.max() > 1 - 1e-3, "the case does not reach confident tokens"
    if not percontrast:
        h_neg = None
    else:
        token_weights = None
    with mock.patch.object(perce_loss, "CHUNK_ROWS", 20), mock.patch.object(perce_loss, "VOCAB_TILE", 64):
        got = run(kernel("torch"), h_pos, h_neg, weight, targets, token_weights, True)
    want = run(perce_linear_cross_entropy_reference, h_pos, h_neg, weight, targets, token_weights, True)
    assert_bf16_path_close(got, want, h_pos, h_neg, weight, targets)
    # row by row, on the confident rows: relative error within the first-order bound 2uM + 4u
    u, m = BF16_UNIT_ROUNDOFF, float((h_pos.float() @ weight.float().T).abs().max())
    confident = (p_target[:, 0] > 1 - 1e-3) & (targets != -100) & (want[3].float().norm(dim=1) > 0)
    assert confident.sum() >= 3
    error = (got[3] - want[3]).float().norm(dim=1)[confident] / want[3].float().norm(dim=1)[confident]
    assert error.max() <= 2 * u * m + 4 * u, (error.max(), 2 * u * m + 4 * u)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bounds", [(0.5, 2.0), (-1.0, 0.3)])
def test_clip_bounds_are_the_callers(backend, bounds):
    """Non-default clip bounds reach the weights, the loss and the gradients; the case has PIR values between
    each bound and the default one (0.8, 5.0), so a kernel that clips at the defaults gives other numbers."""
    low, high = bounds
    h_pos, h_neg, weight, targets, _ = make_case(64, 24, 80, torch.float32, seed=11, profile_effect=0.5)
    got = run(kernel(backend), h_pos, h_neg, weight, targets, None, True, min_weight=low, max_weight=high)
    want = run(perce_linear_cross_entropy_reference, h_pos, h_neg, weight, targets, None, True, min_weight=low,
               max_weight=high)
    for name, x, y in zip(["loss", "token_weights", "pir", "grad h_pos", "grad weight"], got, want):
        torch.testing.assert_close(x, y, **TOLERANCE[torch.float32], msg=lambda m: f"{name}: {m}")
    valid = targets != -100
    pir = got[2][valid]
    assert torch.equal(got[1][valid], pir.clamp(low, high))
    between = lambda a, b: ((pir > min(a, b)) & (pir < max(a, b))).any()
    assert between(low, 0.8) and between(high, 5.0), "the case does not tell these bounds from the defaults"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_is_torch_cross_entropy(backend):
    h_pos, _, weight, targets, _ = make_case(50, 24, 300, torch.float32, seed=1)
    h = h_pos.clone().requires_grad_()
    loss, weights, nll = perce_linear_cross_entropy(h, None, weight, targets,
                                                    token_weights=torch.ones(50, device=DEVICE), return_nll=True,
                                                    backend=backend)
    loss.backward()
    h_ref = h_pos.clone().requires_grad_()
    expected = F.cross_entropy(h_ref @ weight.T, targets, ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.grad, h_ref.grad)
    assert torch.equal(weights, (targets != -100).float())
    torch.testing.assert_close(nll, F.cross_entropy(h_pos @ weight.T, targets, ignore_index=-100, reduction="none"))
    assert not nll.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("percontrast", [True, False])
def test_all_ignored_batch_is_zero_loss_with_zero_gradients(backend, percontrast):
    h_pos, h_neg, weight, targets, token_weights = make_case(70, 33, 200, torch.float32, seed=2)
    targets[:] = -100
    h = h_pos.requires_grad_()
    w = weight.requires_grad_()
    loss, weights, pir = perce_linear_cross_entropy(h, h_neg if percontrast else None, w, targets,
                                                    token_weights=None if percontrast else token_weights,
                                                    return_pir=True, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert not h.grad.any() and not w.grad.any() and not weights.any()
    assert pir is None or not pir.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_reaches_h_neg(backend):
    h_pos, h_neg, weight, targets, _ = make_case(20, 16, 64, torch.float32, seed=3)
    h_pos.requires_grad_()
    h_neg.requires_grad_()
    perce_linear_cross_entropy(h_pos, h_neg, weight, targets, backend=backend)[0].backward()
    assert h_neg.grad is None and h_pos.grad.abs().sum() > 0


def test_needs_exactly_one_weighting():
    h_pos, h_neg, weight, targets, token_weights = make_case(4, 8, 16, torch.float32, seed=4)
    with pytest.raises(ValueError, match="exactly one"):
        perce_linear_cross_entropy(h_pos, h_neg, weight, targets, token_weights=token_weights)
    with pytest.raises(ValueError, match="exactly one"):
        perce_linear_cross_entropy(h_pos, None, weight, targets)
    with pytest.raises(ValueError, match="shapes do not fit"):
        perce_linear_cross_entropy(h_pos, h_neg, weight[:, :5], targets)


@pytest.mark.skipif(INTERPRETED or ON_CUDA, reason="the triton cases run in this process")
def test_interpreted_kernels():
    """The "triton" cases of both kernel test modules, in a child pytest with TRITON_INTERPRET=1 (CPU tensors)."""
    tests = Path(__file__).resolve().parent
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton",
                            str(tests / "test_kernels_perce.py"), str(tests / "test_kernels_lowrank.py")],
                           cwd=tests.parent, env={**os.environ, "TRITON_INTERPRET": "1"},
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-4000:] + child.stderr[-2000:]
    assert "skipped" not in child.stdout, child.stdout[-2000:]
