"""Shared fixtures: one torch thread per test, a private data folder for generated datasets, and a tiny
training config.

Two environment variables rerun the suite under other float conditions, to find tolerances that
hold only for one reduction order or one treatment of subnormals: ``LIPNET_TEST_THREADS=n`` (torch
threads per test process, default 1) and ``LIPNET_TEST_FLUSH_DENORMAL=1``
(``torch.set_flush_denormal(True)``: subnormal floats read and computed as zero).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lipnet.training.config import Config, dump_config, load_config


def _test_threads() -> int:
    value = os.environ.get("LIPNET_TEST_THREADS", "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"LIPNET_TEST_THREADS must be an integer >= 1, got {value!r}")
    return int(value)


def _flush_denormal_requested() -> bool:
    value = os.environ.get("LIPNET_TEST_FLUSH_DENORMAL", "").strip() or "0"
    if value not in ("0", "1"):
        raise pytest.UsageError(f"LIPNET_TEST_FLUSH_DENORMAL must be 0 or 1, got {value!r}")
    return value == "1"


#: Read once at collection, so that a bad value is one error rather than one per test.
_THREADS = _test_threads()
_FLUSH_DENORMAL = _flush_denormal_requested()


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    # pytest -n 2 on two shared cores: a second OpenMP thread per worker only adds spin-waits on
    # every small BLAS/LAPACK call (about ten times slower on the tests' tiny tensors). Session
    # scope, so that module-scoped fixtures run with the same thread count as the tests that
    # compare against them (float reductions depend on it). LIPNET_TEST_THREADS overrides the
    # count, to check that no tolerance depends on the reduction order of one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _flush_denormal() -> Iterator[None]:
    # LIPNET_TEST_FLUSH_DENORMAL=1: subnormals read and computed as zero (FTZ/DAZ, a per-thread CPU
    # flag, so on the thread that runs the test: one torch thread), as on machines or builds that
    # set it, to check that no tolerance relies on gradual underflow
    if not _FLUSH_DENORMAL:
        yield
        return
    if not torch.set_flush_denormal(True):
        raise pytest.UsageError("LIPNET_TEST_FLUSH_DENORMAL=1 but this CPU cannot flush denormals")
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def _gradual_underflow_for_hypothesis(request: pytest.FixtureRequest) -> Iterator[None]:
    # hypothesis refuses to draw floats while subnormals flush (FloatingPointError: it cannot
    # represent them), so its tests run with gradual underflow even under LIPNET_TEST_FLUSH_DENORMAL
    if not (_FLUSH_DENORMAL and getattr(request.function, "is_hypothesis_test", False)):
        yield
        return
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def lipnet_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$LIPNET_DATA`` pointed at a temporary folder for the session, so shapes10 caches land there."""
    path = tmp_path_factory.mktemp("lipnet-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIPNET_DATA", str(path))
        yield path


#: The smallest useful run: 64 shapes10 images, 2 steps per epoch, a 4-channel small_cnn, CPU.
TINY_OVERRIDES: tuple[str, ...] = (
    "model.name=small_cnn",
    "model.width=4",
    "data.name=shapes10",
    "data.n_train=64",
    "data.n_test=32",
    "data.augment=true",
    "loss.name=tau_ce",
    "loss.tau=10",
    "optim.lr=1e-2",
    "optim.epochs=2",
    "optim.batch_size=32",
    "certify.eps=[36/255, 72/255]",
    "certify.batch_size=32",
    "sweep.attack=pgd",
    "sweep.attack_n=8",
    "sweep.attack_steps=5",
    "device=cpu",
)


@pytest.fixture(scope="session")
def tiny_config(lipnet_data: Path) -> Callable[..., Config]:
    """Factory of tiny configs: ``tiny_config(out, "optim.epochs=1", ...)`` (extra overrides last)."""

    def make(out: str | Path, *overrides: str) -> Config:
        cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
        cfg.out = str(out)
        return cfg

    return make


@pytest.fixture
def tiny_yaml(tiny_config: Callable[..., Config], tmp_path: Path) -> Path:
    """The tiny config as a YAML file without ``out`` (for CLI tests)."""
    cfg = tiny_config(tmp_path / "unused")
    cfg.out = None
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path
