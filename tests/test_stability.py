"""Long, aggressive training of the Björck networks stays finite and 1-Lipschitz.

A helper once reported logits going NaN with Björck layers at Adam lr 1e-2 and tau 10 on real
images; this drives the same recipe (and a 10x larger learning rate) for a few hundred steps and
checks every step: finite loss, logits and weights, and a sound bound <= 1 at the end.
"""

from __future__ import annotations

import pytest
import torch

from certify.bounds import lipschitz_bound
from lipnet.losses import TauCrossEntropy
from lipnet.models import create


@pytest.mark.parametrize(("lr", "tau"), [(1e-2, 10.0), (1e-1, 100.0)])
def test_bjorck_small_cnn_trains_finite_at_high_learning_rates(lr: float, tau: float) -> None:
    torch.manual_seed(0)
    model = create("small_cnn", in_channels=1, width=8, input_size=16, conv="bjorck")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = TauCrossEntropy(tau)
    gen = torch.Generator().manual_seed(1)
    # Separable targets (class = brightest quadrant-pair pattern) so the loss keeps pushing margins up.
    x = torch.rand(256, 1, 16, 16, generator=gen)
    y = (x[:, 0, :8, :8].mean(dim=(1, 2)) * 20).long().clamp(0, 9)
    for step in range(300):
        idx = torch.randint(0, 256, (32,), generator=gen)
        logits = model(x[idx])
        loss = loss_fn(logits, y[idx])
        assert torch.isfinite(logits).all() and torch.isfinite(loss), f"non-finite at step {step}"
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"non-finite weight at step {step}"
    model.eval()
    assert lipschitz_bound(model, (1, 16, 16)) <= 1 + 1e-5
