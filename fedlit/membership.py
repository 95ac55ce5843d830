"""The statistics of a membership-inference audit: the attack's AUC, a shadow-free likelihood-ratio score, and an
empirical epsilon lower bound from a threshold's true and false positive rates (Clopper-Pearson bounds).

Every function takes scores oriented so that *larger means more member-like* and a boolean ``members`` mask of
the same length; nothing here knows about models or runs (:mod:`fedlit.audit` computes the scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def _split(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    if scores.shape != members.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and members {members.shape} must be 1-D of one length")
    return scores, members


def auc(scores: np.ndarray, members: np.ndarray) -> float:
    """Area under the ROC curve of the test "member when score >= t" over every threshold ``t``: the
    Mann-Whitney probability ``P(s_member > s_nonmember) + P(s_member = s_nonmember) / 2`` over all
    member/non-member pairs, computed exactly from average ranks (ties count one half). ``scores (n,)``,
    ``members (n,)`` bool; NaN when either side is empty."""
    scores, members = _split(scores, members)
    n1, n0 = int(members.sum()), int((~members).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = stats.rankdata(scores, method="average")
    return float((ranks[members].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_points(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds (T,), true positives (T,), false positives (T,))`` of "member when score >= t" at every
    distinct score ``t`` (descending), as integer counts."""
    scores, members = _split(scores, members)
    order = np.argsort(-scores, kind="stable")
    ranked, hit = scores[order], members[order]
    tp, fp = np.cumsum(hit), np.cumsum(~hit)
    last = np.r_[ranked[1:] != ranked[:-1], True]  # the last position of each distinct score
    return ranked[last], tp[last], fp[last]


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided ``1 - alpha`` confidence interval ``(low, high)`` of a binomial
    proportion: each end is a one-sided ``1 - alpha / 2`` bound (Beta quantiles; 0 and 1 at the extremes)."""
    if trials <= 0:
        return 0.0, 1.0
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def epsilon_bound(tpr_low: float, fpr_high: float, delta: float) -> float:
    """The epsilon that an ``(ε, δ)``-DP mechanism must have for a test with true positive rate at least
    ``tpr_low`` and false positive rate at most ``fpr_high``: DP's hypothesis-testing constraints
    ``TPR <= e^ε FPR + δ`` and ``1 - FPR <= e^ε (1 - TPR) + δ`` give
    ``ε >= max(log((TPR - δ) / FPR), log((1 - FPR - δ) / (1 - TPR)), 0)`` (inf when a denominator is 0 and its
    numerator positive)."""

    def ratio(numerator: float, denominator: float) -> float:
        if numerator <= 0:
            return 0.0
        return math.inf if denominator <= 0 else max(0.0, math.log(numerator / denominator))

    return max(ratio(tpr_low - delta, fpr_high), ratio(1.0 - fpr_high - delta, 1.0 - tpr_low))


@dataclass
class EpsilonAudit:
    """An empirical epsilon lower bound: the threshold chosen on the selection half, the evaluation half's
    counts at it, their Clopper-Pearson bounds at ``confidence`` and the bound ``epsilon`` they imply."""

    epsilon: float
    threshold: float
    true_positives: int
    members: int
    false_positives: int
    nonmembers: int
    tpr_low: float
    fpr_high: float
    confidence: float

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (``epsilon`` inf as the string ``"inf"``)."""
        out = dict(self.__dict__)
        out["epsilon"] = "inf" if math.isinf(self.epsilon) else self.epsilon
        return out


def _threshold_bound(scores: np.ndarray, members: np.ndarray, threshold: float, delta: float,
                     alpha: float) -> tuple[float, int, int, float, float]:
    tp = int((scores[members] >= threshold).sum())
    fp = int((scores[~members] >= threshold).sum())
    tpr_low = clopper_pearson(tp, int(members.sum()), alpha)[0]
    fpr_high = clopper_pearson(fp, int((~members).sum()), alpha)[1]
    return epsilon_bound(tpr_low, fpr_high, delta), tp, fp, tpr_low, fpr_high


def empirical_epsilon(scores: np.ndarray, members: np.ndarray, delta: float, confidence: float = 0.95,
                      seed: int = 0) -> EpsilonAudit:
    """A lower bound on epsilon from the test "member when score >= t": the samples are split at random (seeded,
    within members and within non-members) into a selection half, on which ``t`` is the distinct score whose
    :func:`epsilon_bound` is largest, and an evaluation half, whose true and false positive counts at ``t`` give
    Clopper-Pearson bounds ``TPR_low``, ``FPR_high`` (together at ``confidence``: each one-sided at
    ``(1 - confidence) / 2``) and ``ε >= max(log((TPR_low - δ) / FPR_high), log((1 - FPR_high - δ) /
    (1 - TPR_low)))``. Choosing ``t`` on data the bound does not use keeps the bound's confidence honest."""
    scores, members = _split(scores, members)
    alpha = 1.0 - confidence
    rng = np.random.default_rng(seed)
    select = np.zeros(len(scores), dtype=bool)
    for side in (members, ~members):
        index = np.flatnonzero(side)
        select[rng.permutation(index)[: len(index) // 2]] = True
    pick_scores, pick_members = scores[select], members[select]
    best, threshold = -1.0, math.inf
    for t in roc_points(pick_scores, pick_members)[0] if len(pick_scores) else []:
        bound = _threshold_bound(pick_scores, pick_members, t, delta, alpha)[0]
        if bound > best:
            best, threshold = bound, float(t)
    held_scores, held_members = scores[~select], members[~select]
    eps, tp, fp, tpr_low, fpr_high = _threshold_bound(held_scores, held_members, threshold, delta, alpha)
    return EpsilonAudit(eps, threshold, tp, int(held_members.sum()), fp, int((~held_members).sum()), tpr_low,
                        fpr_high, confidence)


def class_means(values: np.ndarray, classes: np.ndarray) -> tuple[dict[int, float], float]:
    """``({class: mean of its values}, mean of all values)`` (0 for no values)."""
    means = {int(c): float(values[classes == c].mean()) for c in np.unique(classes)}
    return means, (float(values.mean()) if len(values) else 0.0)


def _fit(residuals: np.ndarray) -> tuple[float, float]:
    """``(mean, variance)`` of ``residuals`` (``ddof=1``; 1 for fewer than 2 values, floored at 1e-12)."""
    mean = float(residuals.mean()) if len(residuals) else 0.0
    var = float(residuals.var(ddof=1)) if len(residuals) > 1 else 1.0
    return mean, max(var, 1e-12)


def _log_density(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return -0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def gaussian_lrt(fit_values: np.ndarray, fit_classes: np.ndarray, fit_members: np.ndarray, values: np.ndarray,
                 classes: np.ndarray) -> np.ndarray:
    """A class-calibrated likelihood-ratio score of each of ``values (n,)`` of class ``classes (n,)``, fitted on
    ``fit_values``, ``fit_classes``, ``fit_members`` (all ``(m,)``): each value minus its class's mean in the fit
    set, ``r = v - μ_c`` (a class the fit set lacks: its overall mean), scored by ``log N(r; m_in, s²_in) -
    log N(r; m_out, s²_out)`` with the Gaussians fitted to the members' and the non-members' residuals of the fit
    set, pooled over classes. The class mean calibrates each class's difficulty; the membership shift and the two
    spreads are shared by the classes (a few samples per class cannot fit their own). Returns ``(n,)`` float64."""
    fit_values = np.asarray(fit_values, dtype=np.float64)
    fit_members = np.asarray(fit_members, dtype=bool)
    values = np.asarray(values, dtype=np.float64)
    fit_classes, classes = np.asarray(fit_classes), np.asarray(classes)
    means, overall = class_means(fit_values, fit_classes)

    def residual(v: np.ndarray, c: np.ndarray) -> np.ndarray:
        return v - np.array([means.get(int(k), overall) for k in c])

    fitted = residual(fit_values, fit_classes)
    r = residual(values, classes)
    return _log_density(r, *_fit(fitted[fit_members])) - _log_density(r, *_fit(fitted[~fit_members]))


def cross_fitted_lrt(values: np.ndarray, classes: np.ndarray, members: np.ndarray, seed: int = 0) -> np.ndarray:
    """:func:`gaussian_lrt` scores ``(n,)`` of every sample from fits on the *other* half: the samples are split at
    random (seeded) into two folds, half of each (class, member or not) cell in each, and each fold is scored by
    the Gaussians of the other, so no sample's score uses its own value or its own membership. Splitting every
    cell in half keeps a class's share of members the same in both folds: with folds drawn within members and
    non-members only, a class with few members in one fold has a noisy fit there and many members in the other
    fold, which it scores low, biasing the AUC below 0.5 under no leakage at all."""
    values, members = _split(values, members)
    classes = np.asarray(classes)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(values), dtype=bool)
    for c in np.unique(classes):
        for side in (members, ~members):
            index = np.flatnonzero(side & (classes == c))
            fold[rng.permutation(index)[: len(index) // 2]] = True
    out = np.empty(len(values), dtype=np.float64)
    for part in (fold, ~fold):
        out[part] = gaussian_lrt(values[~part], classes[~part], members[~part], values[part], classes[part])
    return out
