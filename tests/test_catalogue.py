"""``lipnet catalogue --quick``: every available method trained, certified and tabulated."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from certify.bounds import lipschitz_bound
from lipnet import catalogue
from lipnet.cli import main


def test_quick_catalogue_writes_a_sound_table(lipnet_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat"
    assert main(["catalogue", "--quick", "--quiet", "--out", str(out), "--threads", "1"]) == 0
    with open(out / "catalogue.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {("baseline", "classification"), ("baseline", "attributes")}
    assert expected <= {(r["method"], r["task"]) for r in rows}
    assert len({r["method"] for r in rows}) == min(2, len(catalogue.available_methods()))
    for r in rows:
        clean = float(r["clean_accuracy"])
        certs = [float(r[k]) for k in r if k.startswith("certified@")]
        assert len(certs) == 3 and certs == sorted(certs, reverse=True) and certs[0] <= clean
        # Certified accuracy is a lower bound of robust accuracy; PGD gives an upper bound of it.
        assert float(r["robust_accuracy"]) >= certs[0] - 1 / 16
        assert 0 < float(r["lipschitz"]) <= 1.0 + 1e-6
        assert int(r["params"]) > 0
    md = (out / "catalogue.md").read_text()
    assert "lipnet catalogue --quick" in md and "| baseline | attributes | mA |" in md


def test_raw_bound_switches_normalisation_off_and_restores_it() -> None:
    if "SqueezeExcitation" not in catalogue.available_methods():
        pytest.skip("lipnet.attention does not export SqueezeExcitation yet")
    torch.manual_seed(0)
    net = catalogue.build_network("SqueezeExcitation", 10, width=4)
    module = net[3]
    normalised = lipschitz_bound(net, catalogue.INPUT_SHAPE)
    module.normalize = False
    expected = lipschitz_bound(net, catalogue.INPUT_SHAPE)
    module.normalize = True
    assert catalogue._raw_bound(net) == pytest.approx(expected, rel=1e-12)
    assert module.normalize is True
    assert lipschitz_bound(net, catalogue.INPUT_SHAPE) == pytest.approx(normalised, rel=1e-12)


def test_unknown_method_and_bad_eps_raise() -> None:
    with pytest.raises(ValueError, match="not available"):
        catalogue.run_catalogue(["NoSuchAttention"], n_train=8, n_test=8, epochs=1)
    with pytest.raises(ValueError, match="eps"):
        catalogue.run_catalogue([catalogue.BASELINE], n_train=8, n_test=8, epochs=1, eps=[])
    with pytest.raises(ValueError, match="unknown or unavailable"):
        catalogue.build_network("NoSuchAttention", 10)
    assert catalogue.available_methods()[0] == catalogue.BASELINE
