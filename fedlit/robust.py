"""Byzantine robustness of the prompt updates: byzfl's aggregators and pre-aggregators on the flattened updates
``(n, d)`` (float64 numpy, one row per uploading client in client-id order), and the server-visible attacks.

Mapping to byzfl (``robust.aggregator``): ``mean`` Average, ``median`` Median (coordinate-wise), ``trimmed_mean``
TrMean(f), ``krum`` Krum(f), ``multikrum`` MultiKrum(f), ``geometric_median`` GeometricMedian(nu, T) (Weiszfeld),
``centered_clipping`` CenteredClipping(L, tau) centred at 0 (the current global prompt: rows are updates), ``monna``
NNM(f) followed by Average (MoNNA's rule for a server that trusts no row; byzfl's ``MoNNA`` class centres on one
trusted row, ``idx``). ``robust.pre``: ``nnm`` NNM(f), ``bucketing`` Bucketing(s) (its permutation seeded by (seed,
round)), ``clipping`` Clipping(c). ``f`` is clamped to ``(n - 1) // 2`` of the vectors at hand (byzfl refuses
``2 f >= n``). pFedMoAP's expert pool has its own defences before the expert selection (:func:`defend_pool`): a
distance filter around the pool's coordinate-wise median (``robust.pool_filter``) and ``robust.pool_pre``.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

from fedlit.config import UPLOAD_ATTACKS, AttackConfig, RobustConfig
from fedlit.errors import UserError

BUCKETING_STREAM = 122_949_829  # bucketing's permutation of a round
ATTACK_NOISE_STREAM = 141_650_939  # a gaussian attacker's update of a round


def _byzfl() -> Any:
    """The ``byzfl`` package, or a one-line UserError naming the extra that installs it."""
    try:
        import byzfl
    except ImportError:
        raise UserError("robust aggregation and attacks need byzfl: pip install 'fedlit[robust]'") from None
    return byzfl


def tolerated(f: int, n: int) -> int:
    """``f`` clamped so that ``2 f < n``."""
    return max(0, min(f, (n - 1) // 2))


def pre_aggregate(vectors: np.ndarray, cfg: RobustConfig, seed: int, round_index: int) -> np.ndarray:
    """``robust.pre`` applied to ``vectors`` ``(n, d)``; returns ``(n', d)`` (bucketing: ``ceil(n / s)`` rows)."""
    if cfg.pre == "none":
        return vectors
    byzfl = _byzfl()
    if cfg.pre == "nnm":
        return byzfl.NNM(f=min(cfg.f, len(vectors) - 1))(vectors)
    if cfg.pre == "clipping":
        return byzfl.Clipping(c=float(cfg.pre_clip))(vectors.copy())
    state = np.random.get_state()  # byzfl's Bucketing permutes with numpy's global generator
    try:
        np.random.seed(int(np.random.SeedSequence([seed, round_index, BUCKETING_STREAM]).generate_state(1)[0]))
        return byzfl.Bucketing(s=int(cfg.bucket_size))(vectors)
    finally:
        np.random.set_state(state)


def aggregate(vectors: np.ndarray, cfg: RobustConfig) -> np.ndarray:
    """``robust.aggregator`` of ``vectors`` ``(n, d)``: one ``(d,)`` float64 vector."""
    byzfl = _byzfl()
    f = tolerated(cfg.f, len(vectors))
    rules = {
        "mean": lambda: byzfl.Average(),
        "median": lambda: byzfl.Median(),
        "trimmed_mean": lambda: byzfl.TrMean(f=f),
        "krum": lambda: byzfl.Krum(f=f),
        "multikrum": lambda: byzfl.MultiKrum(f=f),
        "geometric_median": lambda: byzfl.GeometricMedian(nu=float(cfg.gm_nu), T=int(cfg.gm_iters)),
        "centered_clipping": lambda: byzfl.CenteredClipping(L=int(cfg.cc_iters), tau=float(cfg.cc_tau)),
    }
    if cfg.aggregator == "monna":
        return np.asarray(byzfl.Average()(byzfl.NNM(f=f)(vectors)), dtype=np.float64)
    return np.asarray(rules[cfg.aggregator]()(vectors), dtype=np.float64)


def robust_update(vectors: np.ndarray, cfg: RobustConfig, seed: int, round_index: int) -> np.ndarray:
    """Pre-aggregation then aggregation of the updates ``(n, d)``: the ``(d,)`` update of the global prompt."""
    return aggregate(pre_aggregate(vectors, cfg, seed, round_index), cfg)


def alie_z(n: int, f: int) -> float:
    """ALIE's ``z_max`` (Baruch et al. 2019): ``s = floor(n / 2 + 1) - f`` and ``z = Φ⁻¹((n - s) / n)`` (0 when
    that is not positive)."""
    s = n // 2 + 1 - f
    ratio = (n - s) / n
    return max(0.0, NormalDist().inv_cdf(ratio)) if 0 < ratio < 1 else 0.0


def attack_updates(updates: np.ndarray, ids: list[int], attacked: set[int], cfg: AttackConfig, seed: int,
                   round_index: int) -> np.ndarray:
    """``updates`` ``(n, d)`` (rows in the order of ``ids``) with the attacked clients' rows replaced: ``sign_flip``
    ``-scale Δ_i``; ``scaled`` ``scale Δ_i``; ``gaussian`` ``N(0, sigma²)`` from the stream (seed, round, client);
    ``zero`` 0 (the client sends the global prompt back); ``alie`` byzfl's ALittleIsEnough: the honest rows' mean
    plus ``z`` times their std (coordinate-wise, ddof 1), the same row for every attacker; ``mislead``
    :func:`mislead_rows`. Returns a new array."""
    out = updates.copy()
    rows = [i for i, c in enumerate(ids) if c in attacked]
    if not rows or cfg.kind not in UPLOAD_ATTACKS:
        return out
    honest = updates[[i for i, c in enumerate(ids) if c not in attacked]]
    for i in rows:
        if cfg.kind == "sign_flip":
            out[i] = -cfg.scale * updates[i]
        elif cfg.kind == "scaled":
            out[i] = cfg.scale * updates[i]
        elif cfg.kind == "zero":
            out[i] = 0.0
        elif cfg.kind == "gaussian":
            out[i] = np.random.default_rng([seed, round_index, ids[i], ATTACK_NOISE_STREAM]).normal(
                0.0, cfg.sigma, updates.shape[1])
    if cfg.kind == "alie":
        z = cfg.alie_z if cfg.alie_z is not None else alie_z(len(ids), len(rows))
        if len(honest) >= 2:
            row = np.asarray(_byzfl().ALittleIsEnough(tau=float(z))(honest), dtype=np.float64)
        else:  # no spread to exploit: the honest mean (0 without honest clients)
            row = honest.mean(axis=0) if len(honest) else np.zeros(updates.shape[1])
        out[rows] = row
    if cfg.kind == "mislead":
        out[rows] = mislead_rows(updates[rows], honest, cfg.radius)
    return out


def mislead_rows(attackers: np.ndarray, honest: np.ndarray, radius: float) -> np.ndarray:
    """The ``mislead`` attack (float64): each attacker's update ``Δ_a`` (rows of ``attackers`` ``(a, d)``; its
    prompt trained on flipped labels) moved to ``m + ρ (Δ_a - m) / ‖Δ_a - m‖₂``, with ``m`` the mean of the
    ``honest`` rows ``(h, d)`` and ``ρ = radius · median_j ‖Δ_j - m‖₂`` over them: its direction from the honest
    centroid is the flipped training's, its distance that of a typical honest update (``radius < 1``: nearer), so a
    nearest-neighbour selection picks it. An attacker exactly at ``m``, or a round without honest rows, keeps ``m``
    (no honest rows: its own update)."""
    if len(honest) == 0:
        return attackers.copy()
    centre = honest.mean(axis=0)
    rho = radius * float(np.median(np.linalg.norm(honest - centre, axis=1)))
    away = attackers - centre
    norms = np.linalg.norm(away, axis=1, keepdims=True)
    return centre + np.divide(rho * away, norms, out=np.zeros_like(away), where=norms > 0)


def pool_filter(vectors: np.ndarray, tau: float) -> np.ndarray:
    """Which rows of ``vectors`` ``(P, d)`` (flattened pool prompts) the distance filter keeps, a boolean ``(P,)``:
    ``‖v_i - med‖₂ <= tau · median_j ‖v_j - med‖₂`` with ``med`` the coordinate-wise median of the rows (numpy's:
    for even P the mean of the two middle values)."""
    distances = np.linalg.norm(vectors - np.median(vectors, axis=0), axis=1)
    return distances <= tau * float(np.median(distances))


def defend_pool(vectors: np.ndarray, centre: np.ndarray, cfg: RobustConfig) -> tuple[np.ndarray, np.ndarray]:
    """pFedMoAP's pool defences on ``vectors`` ``(P, d)`` (float64 flattened pool prompts, one row per pool entry):
    the rows :func:`pool_filter` keeps (``robust.pool_filter``; all when None), then ``robust.pool_pre`` on the kept
    rows as updates from ``centre`` ``(d,)`` (the current global prompt): ``centre + pre(v - centre)``. Returns the
    kept mask ``(P,)`` and the defended kept rows ``(P', d)``."""
    keep = np.ones(len(vectors), dtype=bool) if cfg.pool_filter is None else pool_filter(vectors, cfg.pool_filter)
    kept = vectors[keep]
    if cfg.pool_pre != "none" and len(kept):
        pre = RobustConfig(pre=cfg.pool_pre, f=cfg.f, pre_clip=cfg.pre_clip)
        kept = centre + pre_aggregate(kept - centre, pre, 0, 0)
    return keep, kept
