"""`kerasbn.calibrate`: population statistics the paper's way (Algorithm 2).

After training, Ioffe & Szegedy do not use a moving average: they run
mini-batches of training data through the trained network and store
``E[x] = E_B[μ_B]`` and ``Var[x] = m/(m−1)·E_B[σ²_B]`` for every BN. Two modes
decide which network produces each BN's inputs:

``paper``
    Algorithm 2 as written: in each pass every BN normalizes with its
    mini-batch's statistics (training-mode normalization for BN layers only;
    dropout and the rest stay in inference), and all BNs accumulate at once.
    One pass over the data.

``sequential`` (default)
    BNs are calibrated in the order the forward pass calls them, each with
    every earlier BN already frozen at its new population statistics, so each
    layer's statistics describe exactly the inputs it sees at inference. One
    pass per BN layer (L passes for L layers); on TensorFlow each pass
    computes only the network up to that layer (the compiled function returns
    only its statistics, and the graph optimizer prunes the rest), on other
    backends an eager pass stops after it, so the total is about L/2 full
    forward passes.

In both modes a last, smaller mini-batch counts in proportion to its size
(see `kerasbn.statistics.collect.Moments`), and the layer's own
``momentum``/``unbiased`` settings do not change what is stored. A kerasbn
layer with ``momentum=None`` also gets its batch counter set to the number of
mini-batches, so further training continues the same cumulative average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kerasbn.errors import KerasbnError
from kerasbn.folding.rewrite import rebuild
from kerasbn.statistics.collect import BATCH, INFERENCE, call_order, find_batch_norms, observe, population
from kerasbn.statistics.data import Batches, open_batches
from kerasbn.statistics.reports import CalibrationReport
from kerasbn.statistics.staleness import compare_statistics, stored_statistics

MODES = ("sequential", "paper")


@dataclass
class CalibrationResult:
    """The output of `kerasbn.calibrate`.

    Attributes:
        model: The calibrated model (a new model; the input is not modified).
        report: A `CalibrationReport`: per BN, how far the old statistics were from the new.
    """

    model: keras.Model
    report: CalibrationReport


def calibrate(
    model: keras.Model,
    data: Any,
    *,
    mode: str = "sequential",
    batch_size: int = 32,
    image_size: Sequence[int] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Recompute the population statistics of every BN of ``model`` from ``data``.

    Args:
        model: A Functional or Sequential Keras model; BN layers at any depth
            (nested models, custom layers) are calibrated, Keras's and kerasbn's.
        data: A ``.npy``/``.npz`` file, a folder of images, or arrays: one
            array, a list in input order or a dict by input name.
        mode: ``"sequential"`` (default) or ``"paper"``; see the module docstring.
        batch_size: Samples per mini-batch (Algorithm 2's ``m`` is this times
            the spatial positions).
        image_size: ``(height, width)`` for a folder of images; default: the model's.
        on_batch: Called as ``on_batch(done, total)`` after each mini-batch of each pass.

    Returns:
        A `CalibrationResult` with the new model and the report.

    Raises:
        kerasbn.errors.KerasbnError: unknown mode, data that does not fit the
            model, or too few samples for ``m/(m−1)``.

    Examples:
        >>> import keras, numpy as np, kerasbn
        >>> x = keras.Input((3,))
        >>> model = keras.Model(x, keras.layers.BatchNormalization()(x))
        >>> data = np.arange(12.0).reshape(4, 3)
        >>> new = kerasbn.calibrate(model, data, batch_size=2).model
        >>> np.asarray(new.layers[-1].moving_mean).tolist()
        [4.5, 5.5, 6.5]
    """
    if mode not in MODES:
        raise KerasbnError(f"unknown calibration mode '{mode}'; choose one of {', '.join(MODES)}")
    batches = (
        data if isinstance(data, Batches) else open_batches(data, model, batch_size=batch_size, image_size=image_size)
    )
    new = rebuild(model)
    sites = find_batch_norms(new)
    order = call_order(new, sites, batches.first(2))
    passes = 1 if mode == "paper" else len(order)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_batch is not None:
            on_batch(done, passes * batches.batches)

    before = {i: stored_statistics(sites[i].layer) for i in order}
    moments = {}
    if mode == "paper":
        moments = observe(new, sites, batches, behaviour=BATCH, record=order, on_batch=tick)
        stats = {i: population(moments[i], sites[i]) for i in order}
        for i in order:
            _assign(sites[i].layer, *stats[i], moments[i].batches)
    else:
        stats = {}
        for i in order:
            moments[i] = observe(new, sites, batches, behaviour=INFERENCE, record=[i], on_batch=tick)[i]
            stats[i] = population(moments[i], sites[i])
            _assign(sites[i].layer, *stats[i], moments[i].batches)
    records = [compare_statistics(sites[i], before[i], stats[i], moments[i].values) for i in order]
    called = set(order)
    missing = [s.path for i, s in enumerate(sites) if i not in called]
    report = CalibrationReport(
        model=model.name,
        mode=mode,
        data=batches.description,
        samples=batches.samples,
        batch_size=batches.batch_size,
        passes=passes,
        batch_norms=records,
        not_calibrated=missing,
    )
    return CalibrationResult(new, report)


def _assign(layer: keras.layers.Layer, mean: np.ndarray, variance: np.ndarray, batches: int) -> None:
    """Store the population statistics (cast once, from float64, to each variable's dtype)."""
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    count = getattr(layer, "moving_count", None)
    if count is not None:
        count.assign(np.full(tuple(count.shape), batches, count.dtype))
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        # kerasbn's renorm derives the inference variance from the tracked stddev.
        layer.moving_stddev.assign(np.sqrt(variance + layer.epsilon).astype(layer.moving_stddev.dtype))
