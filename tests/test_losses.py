"""Loss functions of the disentanglers against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from vgmedgen.model.losses import cosine_alignment, decorrelation, dice_loss, kl_divergence, l1_recon, mse

BIG = 30.0  # sigmoid(30) = 1 - 9e-14: logits of +-BIG are hard 1 / 0 probabilities


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core box, two OpenMP threads competing with other
    processes made a training step ~40x slower (spin-waiting), one thread keeps it at ~0.07 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dice_loss_known_answer() -> None:
    # Sample 0: prediction covers 2 pixels, target 1 of them -> Dice 2*1/(2+1) = 2/3, loss 1/3.
    # Sample 1: prediction equals the target -> loss 0.
    logits = torch.tensor([[[[BIG, BIG], [-BIG, -BIG]]], [[[BIG, -BIG], [-BIG, -BIG]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    loss = dice_loss(logits, target)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([1.0 / 3.0, 0.0]), atol=1e-5, rtol=0)


def test_dice_loss_soft_prediction_and_empty_cases() -> None:
    # Logit 0 -> p = 0.5 everywhere on a 2x2 with one positive pixel:
    # 1 - (2 * 0.5) / (2 + 1) = 2/3.
    soft = dice_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))
    torch.testing.assert_close(soft, torch.tensor([2.0 / 3.0]), atol=1e-5, rtol=0)
    # Empty target with empty prediction is a perfect match; with a full prediction, the worst.
    empty = torch.zeros(2, 1, 3, 3)
    loss = dice_loss(torch.tensor([-BIG, BIG]).view(2, 1, 1, 1).expand(2, 1, 3, 3), empty)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.0]), atol=1e-4, rtol=0)


def test_dice_loss_has_gradient() -> None:
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    dice_loss(logits, target).sum().backward()
    # Raising the logit of a positive pixel lowers the loss; of a negative pixel, raises it.
    assert logits.grad[0, 0, 0, 0] < 0 < logits.grad[0, 0, 3, 3]


def test_kl_divergence_values() -> None:
    zero = kl_divergence(torch.zeros(3, 8), torch.zeros(3, 8))
    torch.testing.assert_close(zero, torch.zeros(3))
    # mu = 1 in two dims, unit variance: 0.5 * sum(mu^2) = 1.
    torch.testing.assert_close(kl_divergence(torch.ones(1, 2), torch.zeros(1, 2)), torch.tensor([1.0]))
    # mu = 0, variance 2 in one dim: -0.5 * (1 + ln 2 - 2) = 0.5 * (1 - ln 2).
    got = kl_divergence(torch.zeros(1, 1), torch.full((1, 1), math.log(2.0)))
    torch.testing.assert_close(got, torch.tensor([0.5 * (1.0 - math.log(2.0))]))


def test_cosine_alignment_values() -> None:
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    target = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    expected = torch.tensor([0.0, 1.0, 2.0, 1.0 - 1.0 / math.sqrt(2.0)])
    torch.testing.assert_close(cosine_alignment(pred, target), expected)


def test_mse_and_l1_values() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 4.0], [3.0, -1.0]])
    torch.testing.assert_close(mse(pred, target), torch.tensor([2.0, 5.0]))
    recon = torch.zeros(2, 3, 2, 2)
    image = torch.zeros(2, 3, 2, 2)
    image[0] = 0.5
    image[1, 0, 0, 0] = -1.2
    torch.testing.assert_close(l1_recon(recon, image), torch.tensor([0.5, 0.1]))


def test_decorrelation_values() -> None:
    a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    # A linear function of a: correlation 1 -> loss 1; of the opposite sign: also 1.
    torch.testing.assert_close(decorrelation(a, 3 * a + 1), torch.tensor(1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(decorrelation(a, -a), torch.tensor(1.0), atol=1e-4, rtol=0)
    # Orthogonal centred columns: correlation 0.
    b = torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    torch.testing.assert_close(decorrelation(a, b), torch.tensor(0.0), atol=1e-6, rtol=0)
    # Two dims each, checked against Pearson correlations computed by hand: mean of C_ij^2.
    a2 = torch.cat([a, b], dim=1)
    b2 = torch.cat([a, torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])], dim=1)

    def corr(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).mean() / (x.pow(2).mean().sqrt() * y.pow(2).mean().sqrt()))

    expected = sum(corr(a2[:, i], b2[:, j]) ** 2 for i in range(2) for j in range(2)) / 4
    # corr(a, a) = 1, corr(b, a) = 0, corr(b, [1,-1,1,-1]) = 0, corr(a, [1,-1,1,-1]) = -0.4472.
    assert expected == pytest.approx((1.0 + 0.2) / 4, abs=1e-6)
    torch.testing.assert_close(decorrelation(a2, b2), torch.tensor(expected), atol=1e-4, rtol=0)
    # A batch of one has no correlation.
    assert float(decorrelation(a[:1], b[:1])) == 0.0


def test_decorrelation_gradient_lowers_correlation() -> None:
    torch.manual_seed(0)
    a = torch.randn(16, 3, requires_grad=True)
    b = (a.detach() @ torch.randn(3, 2)).requires_grad_(True)
    opt = torch.optim.SGD([a, b], lr=2.0)
    before = float(decorrelation(a, b).detach())
    for _ in range(50):
        opt.zero_grad()
        decorrelation(a, b).backward()
        opt.step()
    assert float(decorrelation(a, b).detach()) < 0.1 * before


@pytest.mark.parametrize("fn", [cosine_alignment, mse])
def test_vector_losses_are_per_sample(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    pred, target = torch.randn(5, 7), torch.randn(5, 7)
    out = fn(pred, target)
    assert out.shape == (5,)
    torch.testing.assert_close(out[2:3], fn(pred[2:3], target[2:3]))
