"""The stale-statistics audit: stored BN statistics against the population statistics of data.

A BN's moving averages lag after fast training, weight averaging or pruning,
and do not describe a new data distribution at all; the model then does well
in training and badly in inference. `audit_statistics` makes one inference
pass over the data, observes the inputs each BN really receives, and reports
per BN how far its stored mean is (in units of the data's σ) and how far off
its stored variance is (as a ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from kerasbn.statistics.collect import INFERENCE, BNSite, call_order, find_batch_norms, observe, population
from kerasbn.statistics.data import Batches, open_batches
from kerasbn.statistics.reports import BNStaleness, StalenessReport

MAX_SHIFT = 0.25  # σ: a systematic shift of a quarter standard deviation changes what every unit after it sees
MAX_RATIO = 1.5  # the normalized output's scale off by more than √1.5 ≈ 1.22


def stored_statistics(layer: keras.layers.Layer) -> tuple[np.ndarray, np.ndarray]:
    """A BN's moving mean and variance as float64 arrays."""
    mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
    variance = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
    return mean, variance


def compare_statistics(
    site: BNSite,
    stored: tuple[np.ndarray, np.ndarray],
    population: tuple[np.ndarray, np.ndarray],
    values: int,
    *,
    max_shift: float = MAX_SHIFT,
    max_ratio: float = MAX_RATIO,
) -> BNStaleness:
    """How far ``stored`` (mean, variance) is from ``population`` for one BN."""
    eps = float(site.layer.epsilon)
    sigma = np.sqrt(population[1] + eps)
    shift = np.ravel((stored[0] - population[0]) / sigma)
    log_ratio = np.ravel(np.log((stored[1] + eps) / (population[1] + eps)))
    mean_shift = float(np.sqrt(np.mean(np.square(shift))))
    ratio = float(np.exp(np.mean(log_ratio)))
    stale = bool(mean_shift > max_shift or not 1.0 / max_ratio <= ratio <= max_ratio) or not math.isfinite(mean_shift)
    return BNStaleness(
        layer=site.layer.name,
        path=site.path,
        values=int(values),
        mean_shift=mean_shift,
        mean_shift_max=float(np.max(np.abs(shift))),
        variance_ratio=ratio,
        variance_ratio_min=float(np.exp(np.min(log_ratio))),
        variance_ratio_max=float(np.exp(np.max(log_ratio))),
        stale=stale,
    )


def audit_statistics(
    model: keras.Model,
    data: Any,
    *,
    batch_size: int = 32,
    image_size: Sequence[int] | None = None,
    max_shift: float = MAX_SHIFT,
    max_ratio: float = MAX_RATIO,
    on_batch: Callable[[int, int], None] | None = None,
) -> StalenessReport:
    """Compare every BN's stored statistics with the population statistics of ``data``.

    Args:
        model: A Functional or Sequential Keras model; BNs at any depth are checked.
        data: A ``.npy``/``.npz`` file, a folder of images, or arrays (see
            `kerasbn.statistics.data.open_batches`).
        batch_size: Samples per mini-batch.
        image_size: ``(height, width)`` for a folder of images; default: the model's.
        max_shift: Flag a BN whose mean shift (RMS over features, in σ) exceeds this.
        max_ratio: Flag a BN whose variance ratio (geometric mean over features)
            is above this or below its inverse.
        on_batch: Called as ``on_batch(done, total)`` after each mini-batch.

    Returns:
        A `StalenessReport`; ``report.verdict`` is the one-line summary.
        ``model`` is not modified.

    Raises:
        kerasbn.errors.KerasbnError: the data does not fit the model, or has too few samples.
    """
    batches = (
        data if isinstance(data, Batches) else open_batches(data, model, batch_size=batch_size, image_size=image_size)
    )
    sites = find_batch_norms(model)
    order = call_order(model, sites, batches.first(2))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_batch is not None:
            on_batch(done, batches.batches)

    moments = observe(model, sites, batches, behaviour=INFERENCE, record=order, on_batch=tick)
    records = [
        compare_statistics(
            sites[i],
            stored_statistics(sites[i].layer),
            population(moments[i], sites[i]),
            moments[i].values,
            max_shift=max_shift,
            max_ratio=max_ratio,
        )
        for i in order
    ]
    return StalenessReport(
        model=model.name,
        data=batches.description,
        samples=batches.samples,
        batch_size=batches.batch_size,
        max_shift=max_shift,
        max_ratio=max_ratio,
        batch_norms=records,
    )
