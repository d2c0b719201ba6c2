"""Lipschitz-bounded attention pooling over a set of instances or positions.

Inputs are bags ``(batch, K, features)``: K instances (or spatial positions) per sample. The
constants are for the Frobenius norm of a bag. Softmax-weighted sums ``sum_k alpha_k v_k`` are not
Lipschitz when the values are unbounded (values can grow in directions that leave the scores
unchanged); Lemma 2 (``docs/proofs/attention.md#lemma-softmax-aggregation``, applied in
:class:`SoftAttentionPooling`) bounds them once the values are projected onto a ball.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    ball_projection,
    check_int,
    check_positive,
    spectral_norm,
)

__all__ = ["LSEPooling", "LossAttentionMIL", "SoftAttentionPooling"]


def _check_bag(x: Tensor, features: int | None, who: str) -> None:
    if x.ndim != 3 or (features is not None and x.shape[2] != features):
        want = "features" if features is None else str(features)
        raise ValueError(f"{who} expects bags of shape (batch, K, {want}), got {tuple(x.shape)}")


class LSEPooling(nn.Module):
    """Log-sum-exp pooling over the instances, per feature: ``y_c = (LSE_k(beta x_kc) - log K) / beta``.

    Self-gated soft attention: the gradient of ``y_c`` is ``softmax_k(beta x_kc)``, whose L2 norm is
    at most 1 (attained as the weights concentrate on one instance), and different ``c`` read
    disjoint coordinates, so the Jacobian has orthogonal rows of norm at most 1. Guarantee:
    exactly 1-Lipschitz for every ``beta > 0`` (the true constant is 1, approached as
    ``beta -> inf``, where the pooling tends to max-pooling; ``beta -> 0`` gives the mean).
    Used as the LSE MIL pooling of Shi et al. (AAAI 2020) on instance logits.
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)

    def forward(self, x: Tensor) -> Tensor:
        _check_bag(x, None, type(self).__name__)
        return (torch.logsumexp(self.beta * x, dim=1) - math.log(x.shape[1])) / self.beta

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: rows of the Jacobian are softmax vectors on disjoint coordinates."""
        return 1.0

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class SoftAttentionPooling(NormalizedModule):
    """Soft attention pooling (show-attend-tell, Xu et al., ICML 2015) on projected positions.

    ``a_i <- Pi_rho(a_i)`` (each position onto the ball of radius ``rho``), scores
    ``e_i = w^T tanh(W_a a_i + b_a)`` (a learned query folded into ``b_a``), ``alpha = softmax(e)``,
    output ``z = sum_i alpha_i a_i``.

    Lemma 2 (re-derived): ``dz = sum_i alpha_i da_i + sum_i d(alpha_i) a'_i``. The first part is
    ``<= ||alpha||_2 ||dA||_F <= min(1, sqrt(max alpha)) ||dA||``. For the second, along the score
    segment, ``A'^T J(q) de = sum_i q_i (de_i - mean_q de) a'_i`` has norm
    ``<= rho sqrt(Var_q(de)) <= rho min(1/sqrt 2, sqrt(max q)) ||de||`` (Popoviciu), and
    ``||de|| <= ||w|| ||W_a|| ||dA||``. The scores lie in ``[-||w||_1, ||w||_1]``, so
    ``max alpha <= e^{2 ||w||_1} / K``:

        L = min(1, e^{||w||_1} / sqrt K) + rho ||w|| ||W_a|| min(1 / sqrt 2, e^{||w||_1} / sqrt K)

    (without ``K``: ``1 + rho ||w|| ||W_a|| / sqrt 2``). Guarantee: ``L``-Lipschitz on all of
    R^{K x dim}; with ``normalize=True`` at most 1-Lipschitz (up to the rounding of ``L``).
    """

    def __init__(
        self, dim: int, attention_dim: int = 16, radius: float = 1.0, normalize: bool = True
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("attention_dim", attention_dim)
        self.dim = dim
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        self.proj = nn.Linear(dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def attention(self, x: Tensor) -> Tensor:
        """The weights ``alpha``, shape ``(batch, K)``."""
        _check_bag(x, self.dim, type(self).__name__)
        return (
            self.score(torch.tanh(self.proj(ball_projection(x, self.radius, dim=-1)))).squeeze(-1).softmax(-1)
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_bag(x, self.dim, type(self).__name__)
        a = ball_projection(x, self.radius, dim=-1)
        alpha = self.score(torch.tanh(self.proj(a))).squeeze(-1).softmax(dim=-1)
        z = (alpha.unsqueeze(-1) * a).sum(dim=1)
        return self._normalized(z, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        w = self.score.weight.to(torch.float64)
        lip_scores = spectral_norm(w) * spectral_norm(self.proj.weight)
        first, second = w.new_tensor(1.0), w.new_tensor(1.0 / math.sqrt(2.0))
        if input_shape is not None:
            peak = (w.abs().sum() * SLACK).exp() / math.sqrt(input_shape[0])
            first, second = torch.minimum(first, peak), torch.minimum(second, peak)
        return (first + self.radius * lip_scores * second) * SLACK

    def extra_repr(self) -> str:
        return f"dim={self.dim}, radius={self.radius}, normalize={self.normalize}"


class LossAttentionMIL(NormalizedModule):
    """Loss-based attention for multiple-instance learning (Shi et al., AAAI 2020), bounded.

    One linear classifier ``z_k = W h_k + b`` gives the instance logits and, through their mass,
    the attention: ``z_k <- Pi_rho(z_k)`` (projected onto the ball of radius ``rho``),
    ``alpha = softmax_k(beta LSE_c(z_k))``, bag logits ``sum_k alpha_k z_k`` (equal to
    ``W sum_k alpha_k h_k + b`` without the projection, as in the paper).

    Lemma 2 with values ``z_k`` (``||z_k|| <= rho``, moving ``<= ||W|| ||dh||`` in Frobenius norm) and
    scores ``beta LSE_c(z_k)`` (LSE is 1-Lipschitz: its gradient is a softmax), so
    ``||d scores|| <= beta ||W|| ||dH||``:

        L = ||W|| (1 + beta rho / sqrt 2).

    Guarantee: ``L``-Lipschitz from the bag of instance features to the bag logits on all of
    R^{K x in_features}; with ``normalize=True`` at most 1-Lipschitz (up to the rounding of
    ``L``). :meth:`with_attention` also returns ``alpha`` and the (projected, equally scaled)
    instance logits that the instance loss of Shi et al. uses.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        beta: float = 1.0,
        radius: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("num_classes", num_classes)
        self.in_features, self.num_classes = in_features, num_classes
        self.beta = check_positive("beta", beta)
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        self.classifier = nn.Linear(in_features, num_classes)

    def with_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(bag_logits (batch, C), alpha (batch, K), instance_logits (batch, K, C))``."""
        _check_bag(x, self.in_features, type(self).__name__)
        z = ball_projection(self.classifier(x), self.radius, dim=-1)
        alpha = (self.beta * torch.logsumexp(z, dim=-1)).softmax(dim=-1)
        bag = (alpha.unsqueeze(-1) * z).sum(dim=1)
        if self.normalize:
            divisor = self._divisor(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
            bag, z = bag / divisor, z / divisor
        return bag, alpha, z

    def forward(self, x: Tensor) -> Tensor:
        return self.with_attention(x)[0]

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        return (
            spectral_norm(self.classifier.weight) * (1.0 + self.beta * self.radius / math.sqrt(2.0)) * SLACK
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, beta={self.beta}, "
            f"radius={self.radius}, normalize={self.normalize}"
        )
