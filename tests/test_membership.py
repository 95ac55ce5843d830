"""The statistics of the privacy audit (#21): the AUC, Clopper-Pearson bounds, the epsilon lower bound and the
likelihood-ratio scores, against cases small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchmetrics.functional.classification import binary_auroc

from fedlit.membership import (
    auc,
    clopper_pearson,
    cross_fitted_lrt,
    empirical_epsilon,
    epsilon_bound,
    gaussian_lrt,
    roc_points,
)


def test_auc_of_small_exact_cases():
    assert auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auc([5, 5], [True, False]) == 0.5  # a tie counts one half
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75  # 3 of the 4 pairs ordered
    # members {2, 2, 5}, non-members {1, 2, 3}: pairs won 1 + 1 + 1 (vs 1), ties 2 x 1/2 (vs 2), 1 (5 vs 3)
    assert auc([2, 2, 5, 1, 2, 3], [True, True, True, False, False, False]) == (3 + 1 + 2) / 9
    assert math.isnan(auc([1.0, 2.0], [True, True]))


def test_auc_is_the_pair_count_and_the_trapezoidal_roc_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    members = rng.random(200) < 0.4
    wins = (scores[members][:, None] > scores[~members][None, :]).sum()
    ties = (scores[members][:, None] == scores[~members][None, :]).sum()
    assert auc(scores, members) == pytest.approx((wins + ties / 2) / (members.sum() * (~members).sum()), abs=1e-15)
    reference = float(binary_auroc(torch.tensor(scores, dtype=torch.float64), torch.tensor(members, dtype=torch.long)))
    assert auc(scores, members) == pytest.approx(reference, abs=1e-6)  # torchmetrics sums in float32


def test_roc_points_count_every_distinct_threshold():
    thresholds, tp, fp = roc_points([3, 1, 3, 2], [True, False, False, True])
    assert thresholds.tolist() == [3, 2, 1] and tp.tolist() == [1, 2, 2] and fp.tolist() == [1, 1, 2]


def test_clopper_pearson_bounds():
    assert clopper_pearson(0, 10, 0.05) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-14))
    assert clopper_pearson(10, 10, 0.05) == (pytest.approx(0.025 ** (1 / 10), abs=1e-14), 1.0)
    low, high = clopper_pearson(7, 20, 0.05)
    # the exact interval's defining equations: P(X >= 7 | low) = P(X <= 7 | high) = 2.5%
    assert stats.binom.sf(6, 20, low) == pytest.approx(0.025, abs=1e-12)
    assert stats.binom.cdf(7, 20, high) == pytest.approx(0.025, abs=1e-12)
    assert clopper_pearson(0, 0, 0.05) == (0.0, 1.0)


def test_epsilon_bound_by_hand():
    assert epsilon_bound(0.9, 0.1, 0.0) == pytest.approx(math.log(9), abs=1e-15)
    assert epsilon_bound(0.5, 0.1, 0.0) == pytest.approx(math.log(5), abs=1e-15)  # > log(0.9 / 0.5)
    assert epsilon_bound(0.5, 0.1, 0.05) == pytest.approx(math.log(4.5), abs=1e-15)  # (0.5 - 0.05) / 0.1
    assert epsilon_bound(0.3, 0.4, 0.0) == 0.0  # a test worse than chance bounds nothing
    assert epsilon_bound(0.2, 0.0, 0.0) == math.inf
    assert epsilon_bound(0.2, 0.0, 0.3) == 0.0  # TPR below delta: nothing


def test_empirical_epsilon_of_a_perfect_attack_by_hand():
    scores = np.r_[np.ones(40), np.zeros(40)]
    members = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    bound = empirical_epsilon(scores, members, delta=0.0, confidence=0.95)
    # evaluation half: 20 members all above the threshold, 20 non-members all below
    assert (bound.true_positives, bound.members, bound.false_positives, bound.nonmembers) == (20, 20, 0, 20)
    p = 0.025 ** (1 / 20)  # TPR_low; FPR_high = 1 - p
    assert bound.tpr_low == pytest.approx(p, abs=1e-14) and bound.fpr_high == pytest.approx(1 - p, abs=1e-14)
    assert bound.epsilon == pytest.approx(math.log(p / (1 - p)), abs=1e-12)  # about 1.597
    assert bound.threshold == 1.0
    with_delta = empirical_epsilon(scores, members, delta=1e-2)
    assert with_delta.epsilon == pytest.approx(math.log((p - 1e-2) / (1 - p)), abs=1e-12)


def test_empirical_epsilon_of_a_blind_attack_is_zero():
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    members = np.arange(400) % 2 == 0
    assert empirical_epsilon(scores, members, delta=1e-5).epsilon == 0.0


def test_gaussian_lrt_by_hand():
    # class mean 0.5; member residuals {-0.5, 1.5}: N(0.5, 2), non-member residuals {-1.5, 0.5}: N(-0.5, 2);
    # the log ratio of two Gaussians of variance s2 and means +-0.5 is r / s2 = (v - 0.5) / 2
    values = np.array([0.0, 2.0, -1.0, 1.0])
    members = np.array([True, True, False, False])
    out = gaussian_lrt(values, np.zeros(4, int), members, np.array([0.5, 2.5, -1.5]), np.zeros(3, int))
    assert out.tolist() == pytest.approx([0.0, 1.0, -1.0], abs=1e-14)
    # two classes, the second shifted by 10: calibrated by its own mean 10.5; the residuals pooled over both
    # classes have variance 4/3 per side, so the ratio is 3 r / 4
    shifted = gaussian_lrt(np.r_[values, values + 10], np.r_[np.zeros(4, int), np.ones(4, int)],
                           np.r_[members, members], np.array([10.5, 12.5, 0.5]), np.array([1, 1, 0]))
    assert shifted.tolist() == pytest.approx([0.0, 1.5, 0.0], abs=1e-12)
    # a class the fit set lacks is calibrated by the overall mean
    pooled = gaussian_lrt(values, np.zeros(4, int), members, np.array([2.5]), np.array([7]))
    assert pooled.tolist() == pytest.approx([1.0], abs=1e-14)


def test_cross_fitted_scores_never_use_their_own_value():
    rng = np.random.default_rng(1)
    values = rng.normal(size=60)
    classes = rng.integers(0, 3, 60)
    members = np.arange(60) < 30
    base = cross_fitted_lrt(values, classes, members, seed=4)
    changed = values.copy()
    changed[7] += 100.0
    moved = cross_fitted_lrt(changed, classes, members, seed=4)
    same = base == moved
    # sample 7's fold is scored by the other fold's fits: every other score of its fold stays bitwise, its own
    # follows its value, and the other fold's scores all move (its fits include sample 7); each fold holds half of
    # every (class, member or not) cell
    assert not same[7]
    fold = same.copy()
    fold[7] = True
    for c in range(3):
        for side in (members, ~members):
            cell = side & (classes == c)
            assert fold[cell].sum() in (cell.sum() // 2, cell.sum() - cell.sum() // 2)
    assert 25 <= fold.sum() <= 35
