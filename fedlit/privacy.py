"""Client-level differential privacy of the prompt updates: clipping, seeded Gaussian noise and the RDP accountant.

Central DP (default): the server clips each client's update ``Δ_i`` to L2 norm ``clip``, sums the clipped updates,
adds ``N(0, (z clip)²)`` per coordinate, drawn from a stream seeded by (seed, round), and divides by the number of
uploads. Local DP (``privacy.local``): each client clips its own update and adds the same noise from a stream seeded
by (seed, round, client) before it uploads. Epsilon comes from Google's ``dp-accounting`` (RDP accountant), always
recomputed from the round count, so a resumed run reports exactly what a straight run reports.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from fedlit.config import Config, training_pool_size
from fedlit.errors import UserError
from fedlit.federation.sampling import sample_size

CENTRAL_NOISE_STREAM = 67_867_967  # the server's noise of a round
LOCAL_NOISE_STREAM = 86_028_121  # a client's own noise of a round (local DP)
STEP_NOISE_STREAM = 52_706_189  # the noise of one synchronous step (seeded by round and step too)


def _dp_accounting() -> Any:
    """The ``dp_accounting`` package, or a one-line UserError naming the extra that installs it."""
    try:
        import dp_accounting
    except ImportError:
        raise UserError("differential privacy needs dp-accounting: pip install 'fedlit[privacy]'") from None
    return dp_accounting


def round_event(sampling_rate: float, noise_multiplier: float, local: bool = False) -> Any:
    """One round as a ``dp_accounting`` event. Central: a Poisson-sampled Gaussian with sampling probability
    ``q = m / N`` (sampling without replacement of ``m`` clients modelled as Poisson sampling at the same rate, as in
    DP-FedAvg). Local: the server sees who uploads, so no amplification; a replaced client's update moves by up to
    ``2 clip``, hence a Gaussian with noise multiplier ``z / 2``."""
    dp = _dp_accounting()
    if local:
        return dp.GaussianDpEvent(noise_multiplier / 2)
    return dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier))


def epsilon(rounds: int, sampling_rate: float, noise_multiplier: float, delta: float, local: bool = False) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (RDP accountant; 0 before the first round, inf without noise)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dp = _dp_accounting()
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(round_event(sampling_rate, noise_multiplier, local), rounds)
    return float(accountant.get_epsilon(delta))


@functools.cache
def calibrate_noise(target_epsilon: float, rounds: int, sampling_rate: float, delta: float,
                    local: bool = False) -> float:
    """The smallest noise multiplier ``z`` whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``
    (``dp_accounting.calibrate_dp_mechanism``: a bracketed root search over fresh RDP accountants)."""
    dp = _dp_accounting()
    return float(dp.calibrate_dp_mechanism(
        dp.rdp.RdpAccountant, lambda z: dp.SelfComposedDpEvent(round_event(sampling_rate, z, local), rounds),
        target_epsilon, delta))


def sampling_rate(cfg: Config) -> float:
    """``q = m / N``: the share of the clients sampled per round (of those that may train: held-out clients
    never do)."""
    n = training_pool_size(cfg)
    return sample_size(n, cfg.fed.frac) / n


def enabled(cfg: Config) -> bool:
    """Whether updates are clipped (``privacy.clip`` set)."""
    return cfg.privacy.clip is not None


def noise_multiplier(cfg: Config) -> float:
    """``z``: calibrated for ``fed.rounds`` rounds when ``privacy.target_epsilon`` is set, else
    ``privacy.noise_multiplier``."""
    p = cfg.privacy
    if p.target_epsilon is None:
        return float(p.noise_multiplier)
    return calibrate_noise(float(p.target_epsilon), cfg.fed.rounds, sampling_rate(cfg), float(p.delta), p.local)


def privacy_report(cfg: Config, rounds: int) -> dict[str, float]:
    """``{"epsilon": ε, "noise_multiplier": z}`` after ``rounds`` rounds when updates are noised, else ``{}``."""
    if not enabled(cfg):
        return {}
    z = noise_multiplier(cfg)
    if z <= 0:
        return {}
    eps = epsilon(rounds, sampling_rate(cfg), z, float(cfg.privacy.delta), cfg.privacy.local)
    return {"epsilon": eps, "noise_multiplier": z}


def step_noise_multiplier(cfg: Config, steps: int) -> float:
    """``z`` of each step of the synchronous mode, whose rounds take at most ``steps`` steps per client:
    ``privacy.noise_multiplier``, or with ``privacy.target_epsilon`` the round's calibrated ``z`` (see
    :func:`noise_multiplier`) times ``sqrt(steps)`` (``steps`` Gaussian steps of multiplier ``z`` on the same clients
    compose to one Gaussian of multiplier ``z / sqrt(steps)``)."""
    if cfg.privacy.target_epsilon is None:
        return float(cfg.privacy.noise_multiplier)
    return noise_multiplier(cfg) * math.sqrt(steps)


def step_privacy_report(cfg: Config, rounds: int, steps: int) -> dict[str, float]:
    """:func:`privacy_report` of the synchronous mode after ``rounds`` rounds of at most ``steps`` noised steps per
    client: each round is the Gaussian of multiplier ``z / sqrt(steps)`` (``z`` per step), Poisson-sampled at ``q``
    (central) or seen whole (local), composed over ``rounds``."""
    if not enabled(cfg):
        return {}
    z = step_noise_multiplier(cfg, steps)
    if z <= 0:
        return {}
    eps = epsilon(rounds, sampling_rate(cfg), z / math.sqrt(steps), float(cfg.privacy.delta), cfg.privacy.local)
    return {"epsilon": eps, "noise_multiplier": z}


def clip_rows(updates: np.ndarray, clip: float) -> np.ndarray:
    """Each row of ``updates`` ``(n, d)`` scaled by ``min(1, clip / ||row||)``: every row's L2 norm is at most
    ``clip``. Returns a new ``(n, d)`` array."""
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    return updates * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def central_noise(size: int, std: float, seed: int, round_index: int, step: int | None = None) -> np.ndarray:
    """``N(0, std²)`` noise ``(size,)`` (float64) of the server in round ``round_index`` (and synchronous ``step``):
    seeded by (seed, round[, step]) only, so every rank, process layout and resumed run draws the same values."""
    key = [seed, round_index, CENTRAL_NOISE_STREAM] if step is None else [seed, round_index, step, STEP_NOISE_STREAM]
    return np.random.default_rng(key).normal(0.0, std, size)


def local_noise(size: int, std: float, seed: int, round_index: int, client_id: int,
                step: int | None = None) -> np.ndarray:
    """``N(0, std²)`` noise ``(size,)`` (float64) of one client in one round (and synchronous ``step``; local DP),
    seeded by (seed, round[, step], client)."""
    key = ([seed, round_index, client_id, LOCAL_NOISE_STREAM] if step is None
           else [seed, round_index, step, client_id, LOCAL_NOISE_STREAM, STEP_NOISE_STREAM])
    return np.random.default_rng(key).normal(0.0, std, size)


def replace_one_epsilon(cfg: Config, rounds: int) -> float | None:
    """Epsilon at ``privacy.delta`` after ``rounds`` rounds for neighbouring federations that differ in *one
    client's data* (the client takes part in both), the relation of a sample-level membership game; None when
    updates are not noised. For methods that noise each round's aggregate (not the synchronous mode's steps).
    Replacing a client's data moves its clipped update by up to ``2 clip``: central DP is then fedlit's sampling
    without replacement of ``m`` of the ``N`` clients that may train around a Gaussian of multiplier ``z / 2``,
    composed over ``rounds`` (RDP accountant, replace-one relation); local DP's reported epsilon already is this
    relation's (see :func:`round_event`)."""
    report = privacy_report(cfg, rounds)
    if not report:
        return None
    if cfg.privacy.local:
        return report["epsilon"]
    if rounds == 0:
        return 0.0
    dp = _dp_accounting()
    n = training_pool_size(cfg)
    event = dp.SampledWithoutReplacementDpEvent(n, sample_size(n, cfg.fed.frac),
                                                dp.GaussianDpEvent(report["noise_multiplier"] / 2))
    accountant = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(float(cfg.privacy.delta)))
