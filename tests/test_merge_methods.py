"""TIES / DARE / task arithmetic on hand-made tensors, with the arithmetic written out."""

from __future__ import annotations

import pytest
import torch

from delta_trl.merging.methods import (
    MergeMethod,
    combine,
    combine_with_method,
    low_rank_factors,
    sign_consensus,
    sparsify,
)


D1 = torch.tensor([1.0, -3.0, 2.0, -0.5])
D2 = torch.tensor([-2.0, 1.0, 4.0, 0.25])


def test_magnitude_sparsify_keeps_largest():
    """density 0.5 of 4 entries keeps k=2: |-3| and |2|."""
    torch.testing.assert_close(sparsify(D1, 0.5, "magnitude"), torch.tensor([0.0, -3.0, 2.0, 0.0]))
    torch.testing.assert_close(sparsify(D1, 1.0, "magnitude"), D1)


def test_random_sparsify_rescales_survivors():
    """Entry i survives iff the generator's i-th uniform draw is < density; survivors are δ/density, the rest 0."""
    delta = torch.arange(1.0, 1001.0)
    out = sparsify(delta, 0.25, "random", generator=torch.Generator().manual_seed(0))
    keep = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.25
    torch.testing.assert_close(out, torch.where(keep, delta * 4.0, torch.zeros_like(delta)))
    assert int(keep.sum()) == int((out != 0).sum())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_raises(density):
    with pytest.raises(ValueError, match="density"):
        sparsify(D1, density, "magnitude")


def test_sign_consensus_sum_and_count():
    """sum: D1+D2 = [-1, -2, 6, -0.25] → [-1, -1, 1, -1]; count: Σ sign = [0, 0, 2, 0] → ties elect +1."""
    stacked = torch.stack([D1, D2])
    torch.testing.assert_close(sign_consensus(stacked, "sum"), torch.tensor([-1.0, -1.0, 1.0, -1.0]))
    torch.testing.assert_close(sign_consensus(stacked, "count"), torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_task_arithmetic_is_weighted_sum():
    """0.5·D1 − 2·D2 = [0.5+4, −1.5−2, 1−8, −0.25−0.5]."""
    out = combine_with_method([D1, D2], [0.5, -2.0], MergeMethod.TASK_ARITHMETIC)
    torch.testing.assert_close(out, torch.tensor([4.5, -3.5, -7.0, -0.75]))


def test_ties_by_hand():
    """TIES with density 0.5, weights 1:
    trim: D1 → [0, -3, 2, 0], D2 → [-2, 0, 4, 0];
    elect (sum): [-2, -3, 6, 0] → [-1, -1, 1, +1 (tie)];
    disjoint mean: entry 0: only D2's -2 agrees → -2; entry 1: -3; entry 2: (2+4)/2 = 3; entry 3: nobody → 0.
    """
    out = combine_with_method([D1, D2], [1.0, 1.0], MergeMethod.TIES, density=0.5)
    torch.testing.assert_close(out, torch.tensor([-2.0, -3.0, 3.0, 0.0]))


def test_ties_negative_weight_flips_before_election():
    """Weights apply before the election: −1·D2 trimmed = [2, 0, −4, 0]; with D1 trimmed [0, −3, 2, 0]:
    sum = [2, −3, −2, 0] → [+, −, −, +]; entry 2: D1's +2 disagrees, −4 kept → mean −4.
    """
    out = combine_with_method([D1, D2], [1.0, -1.0], MergeMethod.TIES, density=0.5)
    torch.testing.assert_close(out, torch.tensor([2.0, -3.0, -4.0, 0.0]))


def test_dare_full_density_is_task_arithmetic():
    out = combine_with_method([D1, D2], [0.3, 0.7], MergeMethod.DARE, density=1.0)
    torch.testing.assert_close(out, 0.3 * D1 + 0.7 * D2)


def test_combine_count_consensus_and_lambda():
    """No sparsification, count consensus (every entry elects +1, see above), so only positive values survive:
    [1 (D1), 1 (D2), 2 + 4, 0.25 (D2)], times λ = 2 → [2, 2, 12, 0.5].
    """
    out = combine([D1, D2], [1.0, 1.0], consensus="count", lam=2.0)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 12.0, 0.5]))


def test_combine_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        combine([D1, torch.zeros(3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        combine([D1], [1.0, 2.0])


def test_low_rank_factors_exact_and_truncated():
    """diag(3, 2, 1): rank 3 is exact; rank 1 keeps 3, error = √(2²+1²)/√(3²+2²+1²) = √5/√14."""
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    b, a, err = low_rank_factors(delta, 3)
    torch.testing.assert_close(b @ a, delta)
    assert err == pytest.approx(0.0, abs=1e-6)
    b, a, err = low_rank_factors(delta, 1)
    assert b.shape == (3, 1)
    assert a.shape == (1, 3)
    assert err == pytest.approx((5 / 14) ** 0.5)
    b, a, err = low_rank_factors(delta[:2], 5)  # more rank than min(out, in): padded with zeros
    assert b.shape == (2, 5)
    assert a.shape == (5, 3)
    assert err == pytest.approx(0.0, abs=1e-6)
