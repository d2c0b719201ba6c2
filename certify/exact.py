"""Exact L2 operator norms of small linear maps, by materialising the matrix in float64.

These are the ground truth the sound bounds of :mod:`certify.rules.conv` are tested against, and
the bound :mod:`certify.rules.conv` itself returns when a layer's dense matrix is small enough.

* :func:`dense_matrix` pushes the identity basis of the input space through the map (float64,
  in batches) and returns the ``out_dim x in_dim`` matrix ``A`` with ``fn(x) - fn(0) = A x``.
* :func:`dense_operator_norm` returns ``sigma_max(A) * (1 + FLOAT64_SLACK)``: for an affine map
  ``x -> A x + b`` this is an upper bound of its L2 Lipschitz constant ``sigma_max(A)`` whose only
  slack is float64 rounding (the largest eigenvalue of the Gram matrix on the smaller side, by
  a backward-stable symmetric eigensolver, is within ``O(n * 2.2e-16)`` relative of the true one).
* :func:`jacobian_spectral_norm` is the spectral norm of the Jacobian of a (possibly nonlinear)
  map at one point: the local Lipschitz constant there, hence a *lower* bound of the global one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from certify.contract import FLOAT64_SLACK

__all__ = ["dense_matrix", "dense_operator_norm", "jacobian_spectral_norm"]

#: Basis vectors pushed through ``fn`` per call, so that memory stays at ``chunk * in_dim`` floats.
_CHUNK = 512
#: Relative tolerance of the affinity check: rounding of a float64 forward pass is far below it.
_AFFINE_RTOL = 1e-9


def _check_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape!r}")
    return shape


def _flat_output(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    y = fn(x)
    if not isinstance(y, Tensor):
        raise ValueError(f"fn must return a tensor, got {type(y).__name__}")
    if y.dtype != torch.float64:
        raise ValueError(f"fn must compute in float64 (give it float64 weights), got output dtype {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise ValueError("fn must keep the batch dimension: one output per input sample")
    return y.reshape(y.shape[0], -1)


def dense_matrix(
    fn: Callable[[Tensor], Tensor], input_shape: tuple[int, ...], *, device: torch.device | str = "cpu"
) -> Tensor:
    """The float64 matrix ``A`` (``out_dim x in_dim``, on CPU) of the affine map ``fn``.

    ``fn`` takes a float64 batch of shape ``(B, *input_shape)`` on ``device`` and returns
    ``(B, ...)``. Column ``j`` of ``A`` is ``fn(e_j) - fn(0)``. A random affinity check is run and
    a ``ValueError`` is raised when ``fn`` is visibly not affine (a ReLU or a max-pooling inside).
    """
    shape = _check_shape(input_shape)
    n = math.prod(shape)
    with torch.no_grad():
        zero = torch.zeros((1, *shape), dtype=torch.float64, device=device)
        offset = _flat_output(fn, zero)
        columns = []
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            basis = torch.zeros((stop - start, n), dtype=torch.float64, device=device)
            rows = torch.arange(stop - start, device=device)
            basis[rows, rows + start] = 1.0
            columns.append((_flat_output(fn, basis.reshape(-1, *shape)) - offset).cpu())
        matrix = torch.cat(columns).T.contiguous()
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn((2, n), generator=gen, dtype=torch.float64)
        got = _flat_output(fn, probe.reshape(2, *shape).to(device)).cpu() - offset.cpu()
        want = probe @ matrix.T
        scale = want.abs().max().item() + offset.abs().max().item()
        if not torch.isfinite(got).all() or (got - want).abs().max().item() > _AFFINE_RTOL * max(scale, 1.0):
            raise ValueError("fn is not affine: its output on random inputs differs from its matrix")
    return matrix


def _largest_singular_value(matrix: Tensor) -> float:
    # The Gram matrix on the smaller side and a symmetric eigensolver are several times faster
    # than an SVD, and lambda_max of the Gram matrix is still accurate to O(n eps) relative.
    a = matrix.detach().to(device="cpu", dtype=torch.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(a.shape)}")
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        raise ValueError("matrix contains NaN or Inf: no operator norm exists")
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    top = torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).item()
    return math.sqrt(top)


def dense_operator_norm(
    fn: Callable[[Tensor], Tensor], input_shape: tuple[int, ...], *, device: torch.device | str = "cpu"
) -> float:
    """Exact L2 operator norm of the linear (or affine) map ``fn`` on inputs of ``input_shape``.

    Returns ``sigma_max(A) * (1 + FLOAT64_SLACK)`` where ``A`` is :func:`dense_matrix` of ``fn``;
    ``input_shape`` excludes the batch dimension. Cost: ``prod(input_shape)`` forward samples plus
    one symmetric eigenproblem of size ``min(in_dim, out_dim)``, so keep it to a few thousand.
    ``device`` is where the basis is built (that of ``fn``'s weights); the SVD runs on CPU.
    """
    return _largest_singular_value(dense_matrix(fn, input_shape, device=device)) * (1.0 + FLOAT64_SLACK)


def jacobian_spectral_norm(fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Spectral norm of the Jacobian of ``fn`` at the single sample ``x`` (no batch dimension).

    ``fn`` maps a batch ``(B, *x.shape)`` to ``(B, ...)``. The value is computed in float64 and is
    the local Lipschitz constant of ``fn`` at ``x`` where ``fn`` is differentiable: a lower bound
    of its global Lipschitz constant, never an upper bound.
    """
    point = x.detach().to(dtype=torch.float64)

    def single(z: Tensor) -> Tensor:
        return fn(z.unsqueeze(0)).reshape(-1)

    jac = torch.autograd.functional.jacobian(single, point)
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1).cpu(), ord=2).item())
