"""MultiTaskAttentionNetwork: per-task sound bounds, normalisation, active clamp, gradients, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_common import TOL, grads_flow, measured_lipschitz
from torch import Tensor, nn

from certify.exact import jacobian_spectral_norm
from lipnet.attention import MultiTaskAttentionNetwork

SHAPE = (1, 3, 3)


class _Task(nn.Module):
    """One task's output of the network, as a module for the measuring helpers."""

    def __init__(self, net: MultiTaskAttentionNetwork, task: int) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: Tensor) -> Tensor:
        return self.net.task_outputs(x)[self.task]


def _sharp(normalize: bool, seed: int = 0) -> MultiTaskAttentionNetwork:
    torch.manual_seed(seed)
    net = MultiTaskAttentionNetwork(1, 2, (1, 2), depth=2, clamp=2.0, normalize=normalize)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("gate"):
                p.mul_(4.0)
    return net.double()


def test_per_task_bounds_dominate_measured() -> None:
    net = _sharp(normalize=False)
    task_bounds = [net.lipschitz_bound(SHAPE, task=t) for t in range(net.num_tasks)]
    assert net.lipschitz_bound(SHAPE) == pytest.approx(math.sqrt(sum(b * b for b in task_bounds)), rel=1e-8)
    for t, bound in enumerate(task_bounds):
        assert bound <= net.lipschitz_bound(task=t) * (1 + 1e-12)
        assert measured_lipschitz(_Task(net, t), SHAPE, (0.1, 1.0, 10.0)) <= bound * (1 + TOL)
    assert measured_lipschitz(net, SHAPE, (0.3, 3.0)) <= net.lipschitz_bound(SHAPE) * (1 + TOL)


def test_normalized_tasks_are_one_lipschitz() -> None:
    net = _sharp(normalize=True, seed=1)
    for t in range(net.num_tasks):
        assert net.lipschitz_bound(SHAPE, task=t) <= 1 + 1e-15
        assert measured_lipschitz(_Task(net, t), SHAPE, (0.3, 3.0)) <= 1 + TOL
    assert net.lipschitz_bound(SHAPE) <= math.sqrt(2) * (1 + 1e-8)


def test_clamp_is_active() -> None:
    # Without the clamp the masks multiply unbounded backbone features; the gate biases are set so
    # the last mask's logits are 0 at a large input (its steepest point; the bound ignores biases).
    # A 1x1 image makes every mask a single pixel, so the biases can zero the logits exactly.
    net = _sharp(normalize=False, seed=2)
    shape = (1, 1, 1)
    bound = net.lipschitz_bound(shape, task=0)
    x = torch.full(shape, 1e5, dtype=torch.float64)

    def unclamped(z: Tensor) -> Tensor:
        p0 = net.act(net.convs[0](z))
        p1 = net.act(net.convs[1](p0))
        a0 = net.gate_out[0][0](net.gate_in[0][0](p0).relu()).sigmoid() * p0
        inp = torch.cat([p1, a0], dim=1)
        return net.heads[0](net.gate_out[0][1](net.gate_in[0][1](inp).relu()).sigmoid() * p1)

    with torch.no_grad():
        z = x.unsqueeze(0)
        p0 = net.act(net.convs[0](z))
        p1 = net.act(net.convs[1](p0))
        a0 = net.gate_out[0][0](net.gate_in[0][0](p0).relu()).sigmoid() * p0
        inp = torch.cat([p1, a0], dim=1)
        g_in, g_out = net.gate_in[0][1], net.gate_out[0][1]
        g_in.bias.zero_()
        g_in.bias.copy_(1.0 - g_in(inp).flatten())
        g_out.bias.zero_()
        g_out.bias.copy_(-g_out(g_in(inp).relu()).flatten())
    assert jacobian_spectral_norm(unclamped, x) > 3 * bound
    assert jacobian_spectral_norm(_Task(net, 0), x) <= bound * (1 + TOL)


def test_gradients_flow_and_bad_arguments() -> None:
    torch.manual_seed(3)
    grads_flow(MultiTaskAttentionNetwork(1, 4, (1, 2)), torch.randn(4, *SHAPE))
    with pytest.raises(ValueError):
        MultiTaskAttentionNetwork(1, 3, (1,))
    with pytest.raises(ValueError):
        MultiTaskAttentionNetwork(1, 2, ())
    with pytest.raises(ValueError):
        MultiTaskAttentionNetwork(1, 2, (1, 0))
    with pytest.raises(ValueError):
        MultiTaskAttentionNetwork(1, 2, (1,), clamp=-1.0)
    with pytest.raises(ValueError, match="task"):
        MultiTaskAttentionNetwork(1, 2, (1,)).lipschitz_bound(task=1)
    with pytest.raises(ValueError, match="expects"):
        MultiTaskAttentionNetwork(1, 2, (1,))(torch.randn(1, 2, 3, 3))
