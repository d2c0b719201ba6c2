"""Tests of certify.exact: dense matrices and exact operator norms of small linear maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.contract import FLOAT64_SLACK
from certify.exact import dense_matrix, dense_operator_norm, jacobian_spectral_norm


def _matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((rows, cols), generator=gen, dtype=torch.float64)


def test_dense_matrix_recovers_a_matrix_product_exactly() -> None:
    a = _matrix(7, 12, 0)
    got = dense_matrix(lambda x: x.reshape(x.shape[0], -1) @ a.T, (3, 4))
    assert torch.equal(got, a)


def test_dense_matrix_works_in_chunks_larger_than_one_batch() -> None:
    a = _matrix(5, 1300, 1)
    got = dense_matrix(lambda x: x @ a.T, (1300,))
    assert torch.equal(got, a)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_norm_is_the_top_singular_value_with_the_documented_slack(rows: int, cols: int, seed: int) -> None:
    a = _matrix(rows, cols, seed)
    sigma = torch.linalg.svdvals(a)[0].item()
    got = dense_operator_norm(lambda x: x @ a.T, (cols,))
    assert got >= sigma
    assert got == pytest.approx(sigma * (1 + FLOAT64_SLACK), rel=1e-12)


def test_an_affine_map_has_the_norm_of_its_linear_part() -> None:
    layer = nn.Linear(6, 4).double()
    with torch.no_grad():
        layer.bias.fill_(3.0)
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item()
    assert dense_operator_norm(layer, (6,)) == pytest.approx(sigma * (1 + FLOAT64_SLACK), rel=1e-12)


def test_conv_matrix_agrees_with_the_autograd_jacobian() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect", bias=False).double()
    shape = (2, 5, 6)
    x = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: conv(z.unsqueeze(0)).reshape(-1), x)
    assert torch.allclose(dense_matrix(conv, shape), jac.reshape(jac.shape[0], -1), atol=1e-15)


@pytest.mark.parametrize("fn", [torch.relu, torch.abs, lambda x: x * x])
def test_non_affine_maps_are_refused(fn) -> None:
    with pytest.raises(ValueError, match="not affine"):
        dense_matrix(fn, (5,))


def test_float32_outputs_are_refused() -> None:
    with pytest.raises(ValueError, match="float64"):
        dense_operator_norm(lambda x: 2 * x.float(), (3,))


def test_the_batch_dimension_must_be_kept() -> None:
    with pytest.raises(ValueError, match="batch"):
        dense_operator_norm(lambda x: x.sum(0, keepdim=True), (3,))


@pytest.mark.parametrize("shape", [(), (0, 3), (-1,)])
def test_bad_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        dense_operator_norm(lambda x: x, shape)


def test_jacobian_norm_of_a_linear_map_is_its_operator_norm() -> None:
    a = _matrix(4, 6, 2)
    x = torch.randn(6, dtype=torch.float64)
    sigma = torch.linalg.svdvals(a)[0].item()
    assert jacobian_spectral_norm(lambda z: z @ a.T, x) == pytest.approx(sigma, rel=1e-12)


def test_jacobian_norm_sees_the_active_relu_pattern_and_stays_below_the_global_norm() -> None:
    a = _matrix(5, 5, 3)
    x = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    active = (a @ x > 0).to(torch.float64)
    want = torch.linalg.svdvals(active[:, None] * a)[0].item()
    got = jacobian_spectral_norm(lambda z: F.relu(z @ a.T), x)
    assert got == pytest.approx(want, rel=1e-12)
    assert got <= dense_operator_norm(lambda z: z @ a.T, (5,))
