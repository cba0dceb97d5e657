"""The plain-torch references the kernels are tested against (localpers.kernels.reference), checked on their own
against torch's cross-entropy and a hand-written low-rank update: an oracle that is wrong would make every kernel
test pass or fail for the wrong reason. Small cases, fp32 and float64 oracles, milliseconds each."""
import pytest
import torch
import torch.nn.functional as F

from localpers.kernels.reference import apply_lowrank_reference, perce_linear_cross_entropy_reference as ref


def case(n=9, d=6, v=11, seed=0, ignored=(1, 4), spread=1.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g)
    h_neg = torch.randn(n, d, generator=g)
    h_pos = h_neg + spread * torch.randn(n, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignored)] = -100
    return h_pos, h_neg, weight, targets


def nll(h, weight, targets, ignore_index=-100):
    """Per-token negative log-likelihood in float64, 0 at ignored tokens (torch's cross-entropy)."""
    return F.cross_entropy(h.double() @ weight.double().T, targets, ignore_index=ignore_index, reduction="none")


def test_invariant_with_given_weights_the_loss_is_their_weighted_nll_mean_over_valid_tokens():
    h_pos, h_neg, weight, targets = case()
    valid = targets != -100
    w = torch.linspace(0.5, 3.0, len(targets))  # nonzero at the ignored tokens too: they must not count
    h = h_pos.clone().requires_grad_()
    loss, weights, pir = ref(h, h_neg, weight, targets, token_weights=w)
    assert pir is None
    assert torch.equal(weights, torch.where(valid, w, 0.0)) and not weights.requires_grad
    expected = (w.double() * nll(h_pos, weight, targets)).sum() / valid.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    h64 = h_pos.double().requires_grad_()
    ((w.double() * nll(h64, weight, targets)).sum() / valid.sum()).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bounds", [None, (-1.0, 0.3), (0.5, 2.0)])
def test_invariant_percontrast_weights_are_the_clipped_pir_and_no_gradient_reaches_them(bounds):
    """PIR_t = log p_pos(y_t) - log p_neg(y_t) at valid tokens (0 at ignored ones), w_t = clip(PIR_t, low, high)
    with the defaults (0.8, 5.0); the case has PIR values below and above each bound."""
    h_pos, h_neg, weight, targets = case(n=40, spread=2.0, ignored=(0, 7, 19))
    valid = targets != -100
    low, high = bounds or (0.8, 5.0)
    kwargs = {} if bounds is None else {"min_weight": low, "max_weight": high}
    h, hn = h_pos.clone().requires_grad_(), h_neg.clone().requires_grad_()
    loss, weights, pir = ref(h, hn, weight, targets, **kwargs)
    want_pir = torch.where(valid, nll(h_neg, weight, targets) - nll(h_pos, weight, targets), 0.0)
    torch.testing.assert_close(pir.double(), want_pir, rtol=1e-5, atol=1e-5)
    assert not pir[~valid].any()
    assert torch.equal(weights, torch.where(valid, pir.clamp(low, high), 0.0)) and not weights.requires_grad
    assert (pir[valid] < low).any() and (pir[valid] > high).any(), "the case does not reach both bounds"
    assert (weights[valid] == low).any() and (weights[valid] == high).any()
    expected = (weights.double() * nll(h_pos, weight, targets)).sum() / valid.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert hn.grad is None and h.grad[valid].abs().sum() > 0 and not h.grad[~valid].any()


def test_one_valid_token_is_its_own_mean():
    h_pos, h_neg, weight, targets = case(n=4, ignored=(0, 1, 3))
    loss, _, _ = ref(h_pos, h_neg, weight, targets, token_weights=torch.full((4,), 2.0))
    torch.testing.assert_close(loss.double(), 2.0 * nll(h_pos, weight, targets)[2], rtol=1e-5, atol=1e-6)


def test_an_all_ignored_batch_is_zero_loss_and_a_one_token_vocabulary_works():
    h_pos, h_neg, weight, targets = case(n=5, ignored=range(5))
    loss, weights, pir = ref(h_pos, h_neg, weight, targets)
    assert loss.item() == 0.0 and not weights.any() and not pir.any()
    # V = 1: the only token has log-probability 0; an ignored row's placeholder target must be that token
    h_pos, h_neg, weight, targets = case(n=4, v=1, ignored=(1, 2))
    loss, weights, pir = ref(h_pos, h_neg, weight, targets)
    assert loss.item() == 0.0 and not pir.any()
    assert torch.equal(weights, torch.tensor([0.8, 0.0, 0.0, 0.8]))


def test_the_ignore_index_is_the_callers():
    h_pos, h_neg, weight, targets = case(n=6, ignored=())
    targets[:] = torch.tensor([3, 2, 5, 2, 0, 1])
    loss, weights, _ = ref(h_pos, h_neg, weight, targets, ignore_index=2, token_weights=torch.ones(6))
    valid = targets != 2
    assert torch.equal(weights, valid.float())
    expected = nll(h_pos, weight, targets, ignore_index=2).sum() / valid.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_the_lowrank_reference_is_w_plus_scale_u_vt_in_ws_dtype(dtype):
    g = torch.Generator().manual_seed(2)
    W, U, V = (torch.randn(*shape, generator=g).to(dtype) for shape in ((7, 5), (7, 2), (5, 2)))
    before = W.clone()
    exact = W.double() + U.double() @ V.double().T
    out = apply_lowrank_reference(W, U, V)
    assert out.dtype == dtype and torch.equal(W, before)
    torch.testing.assert_close(out.double(), exact.to(dtype).double(), rtol=1e-2 if dtype == torch.bfloat16 else
                               1e-6, atol=1e-5)
    scaled = apply_lowrank_reference(W, U, V, scale=-0.5)
    torch.testing.assert_close(scaled.double(), (W.double() - 0.5 * U.double() @ V.double().T).to(dtype).double(),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-5)
