"""``AttentionVariance`` records one history entry per occurrence of a sample in a batch."""

from __future__ import annotations

import torch

from lipnet.losses import AttentionVariance

D = torch.float64


def _sequential(loss: AttentionVariance, logits: torch.Tensor, index: torch.Tensor) -> None:
    """The reference: the same rows recorded one at a time, in batch order."""
    for i in range(index.shape[0]):
        j = int(index[i])
        slot = int(loss.seen[j]) % loss.window
        loss.history[j, slot] = torch.sigmoid(loss.tau * logits[i]).to(loss.history.dtype)
        loss.seen[j] += 1


def test_a_sample_twice_in_a_batch_is_recorded_twice() -> None:
    loss = AttentionVariance([0.1, 0.2], num_samples=3, window=3, tau=2.0)
    logits = torch.tensor([[0.5, -1.0], [-0.25, 2.0]], dtype=D)
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    loss(logits, target, torch.tensor([1, 1]))
    assert int(loss.seen[1]) == 2
    expected = torch.sigmoid(2.0 * logits).to(loss.history.dtype)
    torch.testing.assert_close(loss.history[1, :2], expected)
    # Both visits count: the deviation is that of the two recorded probabilities (population sd).
    sd = (expected[0] - expected[1]).abs() / 2
    torch.testing.assert_close(loss.deviations(torch.tensor([1]))[0], sd)


def test_duplicates_match_sequential_recording_including_window_overflow() -> None:
    g = torch.Generator().manual_seed(0)
    batched = AttentionVariance([0.3, 0.1], num_samples=4, window=3, tau=1.5)
    reference = AttentionVariance([0.3, 0.1], num_samples=4, window=3, tau=1.5)
    for index in ([2, 2, 2, 2, 2], [0, 1, 0, 3, 0, 1], [3, 3], [1, 2, 0, 2, 2, 2, 2]):
        idx = torch.tensor(index)
        logits = torch.randn(len(index), 2, dtype=D, generator=g)
        target = (torch.rand(len(index), 2, generator=g) < 0.5).to(D)
        batched(logits, target, idx)
        _sequential(reference, logits, idx)
        torch.testing.assert_close(batched.seen, reference.seen)
        torch.testing.assert_close(batched.history, reference.history)


def test_eval_mode_records_nothing_even_with_duplicates() -> None:
    loss = AttentionVariance([0.5], num_samples=2, window=2).eval()
    loss(torch.zeros(2, 1, dtype=D), torch.ones(2, 1, dtype=D), torch.tensor([0, 0]))
    assert int(loss.seen.sum()) == 0 and float(loss.history.abs().sum()) == 0.0
