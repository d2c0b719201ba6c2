"""Task datasets built from shapes10 and the task metrics (clean and certified)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from certify.radius import binary_radius
from lipnet.catalogue import data as tasks
from lipnet.catalogue.metrics import (
    attribute_f1,
    bag_accuracy,
    certified_attribute_accuracy,
    certified_per_task_accuracy,
    certified_pixel_fraction,
    instance_auc,
    mean_accuracy,
    mean_iou,
    per_task_accuracy,
)


@pytest.fixture(autouse=True)
def _data(lipnet_data: Path) -> None:
    """Generated shapes10 caches go to the session's temporary data folder."""


def test_attribute_priors_are_controlled_and_deterministic() -> None:
    a = tasks.attribute_task(1000, seed=0)
    assert a.names == list(tasks.ATTRIBUTE_NAMES)
    freq = a.targets.mean(dim=0).double()
    # Binomial standard error at n = 1000 is at most 0.016.
    assert torch.allclose(freq, a.priors, atol=0.05)
    assert freq[0] < 0.05 and freq[-1] > 0.4
    b = tasks.attribute_task(1000, seed=0)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, tasks.attribute_task(1000, seed=0, split="test").images)
    with pytest.raises(ValueError, match="priors"):
        tasks.attribute_task(10, priors=[0.0, 0.5])


def test_mil_bags_labels_follow_the_target_class() -> None:
    bags = tasks.mil_bags(24, seed=1, target=9)
    assert bags.instances.shape[:2] == bags.mask.shape
    assert torch.equal((bags.instance_labels.sum(dim=1) > 0).long(), bags.bag_labels)
    assert bool((bags.instance_labels[~bags.mask] == 0).all())
    assert bool((bags.instances[~bags.mask] == 0).all())
    assert 2 <= int(bags.mask.sum(dim=1).min()) and int(bags.mask.sum(dim=1).max()) <= 10
    assert 0 < int(bags.bag_labels.sum()) < 24
    again = tasks.mil_bags(24, seed=1, target=9)
    assert torch.equal(bags.instances, again.instances)
    with pytest.raises(ValueError, match="target"):
        tasks.mil_bags(4, target=10)


def test_multitask_and_localisation_targets() -> None:
    m = tasks.multitask(64)
    assert m.masks.dtype == torch.bool and m.masks.shape == (64, 32, 32)
    assert int(m.colours.max()) < m.num_colours
    loc = tasks.localisation_task(64)
    assert torch.equal(loc.masks, m.masks) and torch.equal(loc.labels, m.labels)


def test_scale_and_cluttered_tasks_move_the_masks_with_the_objects() -> None:
    s = tasks.scale_task(64, scale_range=(0.25, 1.0))
    assert float(s.scales.min()) >= 0.25 and float(s.scales.max()) <= 1.0
    area = s.masks.flatten(1).float().sum(1)
    small, large = s.scales < 0.4, s.scales > 0.8
    assert area[small].mean() < area[large].mean() / 3
    c = tasks.cluttered_task(64, scale=0.5)
    rows = c.masks.any(dim=2).float().argmax(dim=1)
    assert c.masks.flatten(1).any(dim=1).float().mean() > 0.9
    assert rows.float().std() > 2  # objects land at different heights
    with pytest.raises(ValueError, match="scale_range"):
        tasks.scale_task(4, scale_range=(0.0, 1.0))


# --- metrics ---------------------------------------------------------------------------------------------


def test_mean_accuracy_and_f1_hand_computed() -> None:
    f = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0]])
    t = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 1]])
    # attribute 0: TPR 1/2, TNR 1/2; attribute 1: TPR 2/3, TNR 1.
    assert mean_accuracy(f, t) == pytest.approx(((0.5 + 0.5) / 2 + (2 / 3 + 1) / 2) / 2)
    # P per sample: 1, 1/2, 0 (predicted nothing, truth not empty), 1/1; R: 1, 1, 0, 1/2.
    p, r = (1 + 0.5 + 0 + 1) / 4, (1 + 1 + 0 + 0.5) / 4
    assert attribute_f1(f, t) == pytest.approx(2 * p * r / (p + r))
    assert mean_accuracy(f, (f > 0).long()) == 1.0 and attribute_f1(f, (f > 0).long()) == 1.0


def test_instance_auc_with_ties_and_mask() -> None:
    s = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    y = torch.tensor([[1, 1, 0, 0]])
    # Pairs (pos, neg): (0.9, 0.5) 1, (0.9, 0.1) 1, (0.5, 0.5) 1/2, (0.5, 0.1) 1 -> 3.5 / 4.
    assert instance_auc(s, y) == pytest.approx(3.5 / 4)
    mask = torch.tensor([[True, True, False, True]])
    assert instance_auc(s, y, mask) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        instance_auc(s, torch.ones_like(y))


def test_bag_accuracy_miou_and_per_task() -> None:
    f = torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    assert bag_accuracy(f, torch.tensor([0, 0, 1])) == pytest.approx(2 / 3)  # the tie counts as wrong
    p = torch.tensor([[[True, True], [False, False]]])
    t = torch.tensor([[[True, False], [False, False]]])
    assert mean_iou(p, t) == pytest.approx((1 / 2 + 2 / 3) / 2)
    acc = per_task_accuracy({"a": f}, {"a": torch.tensor([0, 1, 1])})
    assert acc == {"a": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="tasks differ"):
        per_task_accuracy({"a": f}, {"b": torch.tensor([0, 1, 1])})


def test_certified_attribute_and_pixel_accuracy() -> None:
    # float64 logits and inputs of norms 1 and 2: the rounding allowance, 1e-12 (max|f| + L_c ||x||) <= 3e-12,
    # moves no radius by more than 1e-11 (relative 1e-9 here) and crosses no eps below
    f = torch.tensor([[0.5, -0.05], [-0.3, 0.2]], dtype=torch.float64)
    t = torch.tensor([[1, 0], [1, 1]])
    norms = torch.tensor([1.0, 2.0])
    r = binary_radius(f, t, [1.0, 0.5], input_norms=norms)
    assert r[1, 0] == 0.0  # wrong sign
    assert r[0, 0].item() == pytest.approx(0.5, rel=1e-9) and r[1, 1].item() == pytest.approx(0.4, rel=1e-9)
    assert certified_attribute_accuracy(f, t, [1.0, 0.5], 0.2, input_norms=norms) == [0.5, 0.5]
    assert certified_attribute_accuracy(f, t, [1.0, 0.5], 0.45, input_norms=norms) == [0.5, 0.0]
    maps = torch.tensor([[[0.5, -0.5], [0.05, -0.01]]], dtype=torch.float64)
    masks = torch.tensor([[[True, False], [True, True]]])
    assert certified_pixel_fraction(maps, masks, 1.0, 0.1, input_norms=1.0) == 0.5
    with pytest.raises(ValueError, match="Lipschitz"):
        binary_radius(f, t, 0.0, input_norms=norms)
    # the input norms are required (the scale of the forward pass's rounding), and they are used: float32
    # logits of 1e-3 from an input of norm 1000 are within their allowance 1e-5 (1e-3 + 1 * 1000)
    with pytest.raises(TypeError, match="input_norms"):
        certified_attribute_accuracy(f, t, [1.0, 0.5], 0.2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="input_norms"):
        certified_pixel_fraction(maps, masks, 1.0, 0.1)  # type: ignore[call-arg]
    small = torch.full((1, 2, 2), 1e-3)
    assert certified_pixel_fraction(small, torch.ones(1, 2, 2), 1.0, 0.0, input_norms=0.0) == 1.0
    assert certified_pixel_fraction(small, torch.ones(1, 2, 2), 1.0, 0.0, input_norms=1000.0) == 0.0
    per_attribute = certified_attribute_accuracy(small[0], torch.ones(2, 2), 1.0, 0.0, input_norms=1000.0)
    assert per_attribute == [0.0, 0.0]


def test_certified_per_task_matches_the_margin_formula() -> None:
    f = torch.tensor([[1.0, 0.0], [0.2, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    # radii: 1 / sqrt(2), 0.2 / sqrt(2) (hand-made logits of no input: input norms 0).
    out = certified_per_task_accuracy({"cls": f}, {"cls": y}, {"cls": 1.0}, 0.5, input_norms=0.0)
    assert out == {"cls": 0.5}
    out = certified_per_task_accuracy({"cls": f}, {"cls": y}, {"cls": 2.0}, 0.5, input_norms=0.0)
    assert out == {"cls": 0.0}
    # without the input norms the forward pass's rounding has no known scale: they are required, and an
    # infinite norm certifies nothing
    with pytest.raises(TypeError, match="input_norms"):
        certified_per_task_accuracy({"cls": f}, {"cls": y}, {"cls": 1.0}, 0.5)  # type: ignore[call-arg]
    out = certified_per_task_accuracy({"cls": f}, {"cls": y}, {"cls": 1.0}, 0.5, input_norms=math.inf)
    assert out == {"cls": 0.0}
    with pytest.raises(ValueError, match="finite"):
        certified_per_task_accuracy({"cls": f}, {"cls": y}, {"cls": math.inf}, 0.5, input_norms=0.0)
