"""Tests of certify.rules.conv_gram: the banded-Gram norm of a convolution is certified and exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import certify.rules.conv_gram as conv_gram
from certify.contract import FLOAT64_SLACK
from certify.exact import dense_matrix
from certify.rules.conv_gram import banded_gram_norm, gram_work

MODES = ("zeros", "reflect", "replicate", "circular")
Pads = tuple[tuple[int, int], ...]


def _layer(weight: Tensor, stride: tuple[int, ...], dilation: tuple[int, ...], pads: Pads, mode: str):
    conv = F.conv1d if weight.ndim == 3 else F.conv2d
    flat = [p for pair in reversed(pads) for p in pair]

    def apply(x: Tensor) -> Tensor:
        x = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
        return conv(x, weight, None, stride, 0, dilation)

    return apply


def _exact(weight: Tensor, stride, dilation, pads: Pads, mode: str, shape: tuple[int, ...]) -> float:
    """sigma_max of the layer's dense float64 matrix, by SVD."""
    matrix = dense_matrix(_layer(weight, stride, dilation, pads, mode), shape)
    return torch.linalg.matrix_norm(matrix, ord=2).item()


def _norm(weight: Tensor, stride, dilation, pads: Pads, mode: str, shape: tuple[int, ...]) -> float | None:
    return banded_gram_norm(
        weight, stride=stride, dilation=dilation, pads=pads, mode=mode, input_shape=shape, max_work=1 << 40
    )


@st.composite
def layers(draw: st.DrawFn):
    nd = draw(st.sampled_from([1, 2]))
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(nd))
    mode = draw(st.sampled_from(MODES))
    sizes = tuple(draw(st.integers(2, 10)) for _ in range(nd))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn((c_out, c_in, *kernel), generator=gen, dtype=torch.float64)
    shape = (c_in, *sizes)
    try:
        out = _layer(weight, stride, dilation, pads, mode)(torch.zeros((1, *shape), dtype=torch.float64))
    except RuntimeError:  # padding larger than torch allows, or a window larger than the input
        assume(False)
    assume(out.numel() > 0)
    return weight, stride, dilation, pads, mode, shape


@settings(max_examples=120, deadline=None)
@given(case=layers())
def test_the_certified_norm_is_within_1e_8_of_the_exact_norm(case) -> None:
    weight, stride, dilation, pads, mode, shape = case
    exact = _exact(*case)
    got = _norm(*case)
    assert got is not None
    # The certificate adds nu - theta (1e-9 theta + the Lanczos residual) and rounding terms far below it.
    assert exact <= got <= exact * (1 + 1e-8) + 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_a_larger_input_is_exact_against_the_dense_matrix(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn((4, 3, 3, 3), generator=gen, dtype=torch.float64)
    case = (weight, (1, 1), (1, 1), ((1, 2), (2, 1)), mode, (3, 20, 17))
    exact = _exact(*case)
    assert exact <= _norm(*case) <= exact * (1 + 1e-8)


def test_the_output_side_is_used_when_it_is_smaller() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn((1, 6, 3, 3), generator=gen, dtype=torch.float64)
    args = ((2, 2), (1, 1), ((1, 1), (1, 1)), "reflect")
    inputs, outputs, _, _ = conv_gram._sides(weight, *args, (16, 16))
    assert outputs.work < inputs.work and gram_work(weight, *args, (16, 16)) == outputs.work
    exact = _exact(weight, *args, (6, 16, 16))
    assert exact <= _norm(weight, *args, (6, 16, 16)) <= exact * (1 + 1e-8)


def test_an_estimate_below_the_top_eigenvalue_never_yields_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn((3, 2, 3, 3), generator=gen, dtype=torch.float64)
    case = (weight, (1, 1), (1, 1), ((1, 1), (1, 1)), "reflect", (2, 9, 9))
    exact = _exact(*case)
    estimate = conv_gram._lanczos

    # 2% low: every margin (at most 1e-3) leaves nu below lambda_max and the factorisation fails.
    monkeypatch.setattr(conv_gram, "_lanczos", lambda apply, dim: (0.98 * estimate(apply, dim)[0], 0.0))
    assert _norm(*case) is None
    # Too high: still a bound, as loose as the estimate.
    monkeypatch.setattr(conv_gram, "_lanczos", lambda apply, dim: (1.5 * estimate(apply, dim)[0], 0.0))
    got = _norm(*case)
    # nu = 1.5 theta (1 + 1e-9), then the root times 1 + FLOAT64_SLACK; the rounding terms are ~1e-12.
    assert got == pytest.approx(exact * math.sqrt(1.5 * (1 + 1e-9)) * (1 + FLOAT64_SLACK), rel=1e-10)


def test_the_work_limit_and_a_zero_kernel() -> None:
    weight = torch.ones((2, 2, 3, 3), dtype=torch.float64)
    args = ((1, 1), (1, 1), ((1, 1), (1, 1)), "reflect")
    work = gram_work(weight, *args, (12, 12))
    # blocks of 2 rows: 6 blocks of 2 * 12 * 2 unknowns
    assert work == 6 * ((2 * 12 * 2) ** 3 + conv_gram._BLOCK_OVERHEAD)
    kw = {"stride": (1, 1), "dilation": (1, 1), "pads": ((1, 1), (1, 1)), "mode": "reflect"}
    assert banded_gram_norm(weight, input_shape=(2, 12, 12), max_work=work - 1, **kw) is None
    assert banded_gram_norm(weight, input_shape=(2, 12, 12), max_work=work, **kw) is not None
    assert banded_gram_norm(torch.zeros_like(weight), input_shape=(2, 12, 12), max_work=0, **kw) == 0.0


def test_inputs_past_the_size_limits_are_left_to_the_other_bounds() -> None:
    weight = torch.ones((1, 1, 3), dtype=torch.float64)
    long = conv_gram._MAX_AXIS  # with the padding, one more than an axis may hold
    assert gram_work(weight, (1,), (1,), ((1, 1),), "reflect", (long,)) == math.inf
    kw = {"stride": (1,), "dilation": (1,), "pads": ((1, 1),), "mode": "reflect"}
    assert banded_gram_norm(weight, input_shape=(1, long), max_work=math.inf, **kw) is None
    wide = torch.ones((300, 300, 3, 3), dtype=torch.float64)  # 300 * 16 * 16 > _MAX_DIM on both sides
    assert gram_work(wide, (1, 1), (1, 1), ((1, 1), (1, 1)), "reflect", (16, 16)) == math.inf
    assert gram_work(wide[:16, :16], (1, 1), (1, 1), ((1, 1), (1, 1)), "reflect", (16, 16)) < math.inf
