"""`kerasbn.verify`: do two models compute the same outputs?

The one comparison of the package: a rewritten Keras model, a reloaded file
and an exported ONNX graph are all judged by `compare` with the same
defaults (`kerasbn.deploy.tolerances`), and reported as a `VerifyResult`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from kerasbn.deploy.tolerances import (
    ATOL,
    NOISE_FACTOR,
    RELATIVE_CEILING,
    RELATIVE_FLOOR,
    RTOL,
    UNCALIBRATED_FLOOR,
)
from kerasbn.model_signature import Signature, signature


@dataclass(frozen=True)
class VerifyResult:
    """The comparison of a candidate's outputs with a reference's.

    Two criteria. The default is scale-aware: for every output,
    ``max|Δ| / max|y_ref|`` must not exceed ``allowed``, the larger of
    `~kerasbn.deploy.tolerances.NOISE_FACTOR` times the reference model's own
    float32 noise and `~kerasbn.deploy.tolerances.RELATIVE_FLOOR` (without a
    noise measurement: `~kerasbn.deploy.tolerances.UNCALIBRATED_FLOOR`), and
    never more than `~kerasbn.deploy.tolerances.RELATIVE_CEILING`. With an
    explicit ``atol``/``rtol`` every element must satisfy
    ``|Δ| ≤ atol + rtol·|y_ref|`` instead.

    Attributes:
        passed: The criterion holds.
        max_abs_error: ``max |Δ|`` over all outputs.
        max_rel_error: ``max |Δ| / max |y_ref|`` (scale-relative, 0 when both are 0).
        max_abs_reference: ``max |y_ref|``.
        atol: Absolute tolerance of the element-wise criterion (``None`` when scale-aware).
        rtol: Relative tolerance of the element-wise criterion (``None`` when scale-aware).
        tolerance: The criterion in words.
        outputs: Number of output tensors compared.
        batch_size: Batch size of the inputs.
        allowed: The largest ``max|Δ|/max|y|`` accepted for the output that came
            closest to failing (``None`` when element-wise).
        margin: error ÷ allowed for the output (or element) closest to failing:
            at most 1 passes; ``inf`` for NaN or mismatched outputs.
        noise: The reference's own float32 noise, relative to each output's
            ``max|y|`` (the largest over outputs; ``None`` when not measured).
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    max_abs_reference: float
    atol: float | None
    rtol: float | None
    tolerance: str
    outputs: int
    batch_size: int
    allowed: float | None = None
    margin: float = 0.0
    noise: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (an infinite margin or error as the string ``"inf"``)."""
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verify {verdict}: max|Δ| = {self.max_abs_error:.3g}, max|Δ|/max|y| = {self.max_rel_error:.3g}, "
            f"margin {self.margin:.3g} over {self.outputs} output(s), batch {self.batch_size} ({self.tolerance})"
        )


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    batch_size: int,
    atol: float | None = None,
    rtol: float | None = None,
    noise: float | Sequence[float] | None = None,
) -> VerifyResult:
    """Judge ``candidate``'s output arrays against ``reference``'s (same order).

    Args:
        reference, candidate: Output arrays, in the same order.
        batch_size: Batch size of the inputs (reported).
        atol, rtol: Give either for the element-wise criterion
            ``|Δ| ≤ atol + rtol·|y_ref|`` (the other defaults to
            `~kerasbn.deploy.tolerances.ATOL` / ``RTOL``); leave both ``None``
            for the scale-aware one.
        noise: The reference's float32 noise relative to each output's
            ``max|y|`` (one number for all outputs, or one per output), as
            `noise` measures it; ``None``: unmeasured, the looser uncalibrated floor applies.

    A NaN in either output is an infinite error, never a pass; a shape or
    count mismatch fails with an infinite error.
    """
    elementwise = atol is not None or rtol is not None
    if elementwise:
        atol = ATOL if atol is None else atol
        rtol = RTOL if rtol is None else rtol
    noises = list(noise) if isinstance(noise, Sequence) else [noise] * len(reference)
    max_abs = max_ref = 0.0
    margin = 0.0
    allowed_at_worst = None
    passed = len(reference) == len(candidate) and len(noises) == len(reference)
    if not passed:
        max_abs = margin = float("inf")
    for y, z, eta in zip(reference, candidate, noises):
        y = np.asarray(y, np.float64)
        z = np.asarray(z, np.float64)
        if y.shape != z.shape:
            passed, max_abs, margin = False, float("inf"), float("inf")
            continue
        if not y.size:
            continue
        diff = np.nan_to_num(np.abs(z - y), nan=np.inf)
        scale = float(np.max(np.abs(y)))
        err = float(np.max(diff))
        if elementwise:
            out_margin = float(np.max(diff / (atol + rtol * np.abs(y)))) if atol + rtol > 0 else _ratio(err, 0.0)
            allowed = None
        else:
            allowed = (
                UNCALIBRATED_FLOOR if eta is None else min(max(NOISE_FACTOR * eta, RELATIVE_FLOOR), RELATIVE_CEILING)
            )
            out_margin = _ratio(_ratio(err, scale), allowed)
        if out_margin >= margin:
            margin, allowed_at_worst = out_margin, allowed
        max_abs = max(max_abs, err)
        max_ref = max(max_ref, scale)
    passed = passed and margin <= 1.0
    rel = _ratio(max_abs, max_ref)
    measured = [eta for eta in noises if eta is not None]
    worst_noise = max(measured) if measured else None
    if elementwise:
        tolerance = f"|Δ| ≤ {atol:g} + {rtol:g}·|y| element-wise"
    else:
        if worst_noise is None:
            tolerance = f"max|Δ|/max|y| per output ≤ {UNCALIBRATED_FLOOR:g} (float32 noise not measured)"
        else:
            tolerance = (
                f"max|Δ|/max|y| per output ≤ {NOISE_FACTOR:g} × float32 noise {worst_noise:.2g}, "
                f"within [{RELATIVE_FLOOR:g}, {RELATIVE_CEILING:g}]"
            )
    return VerifyResult(
        passed,
        max_abs,
        rel,
        max_ref,
        atol,
        rtol,
        tolerance,
        len(reference),
        batch_size,
        allowed_at_worst,
        margin,
        worst_noise,
    )


def _ratio(a: float, b: float) -> float:
    """``a / b`` with ``0/0 = 0`` and ``x/0 = inf``."""
    if b > 0:
        return a / b
    return 0.0 if a == 0 else float("inf")


_XLA_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def noise(model: keras.Model, inputs: Any, outputs: Sequence[np.ndarray] | None = None) -> list[float] | None:
    """How far ``model``'s own outputs move between two valid float32 evaluations, per output.

    The reference evaluation is `keras_outputs` (``predict_on_batch``); the
    other is one XLA-compiled call of the same model, which fuses and orders
    the arithmetic differently. Their difference, relative to each output's
    ``max|y|``, is what float32 rounding alone does to this model on these
    inputs: a deep network amplifies it block by block. Returns ``None`` where
    the model cannot be compiled by XLA (only the floor applies then).
    """
    if outputs is None:
        outputs = keras_outputs(model, inputs)
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    try:
        call = _XLA_CALLS.get(model)
        if call is None:
            # One compiled function per model: a new tf.function per check would
            # retrace every time (and TensorFlow warns about it).
            # The function holds the model weakly, or the cache would keep it alive.
            ref = weakref.ref(model)
            call = _XLA_CALLS[model] = tf.function(lambda x: ref()(x, training=False), jit_compile=True)
        other = [np.asarray(y, np.float64) for y in keras.tree.flatten(call(inputs))]
    except Exception:  # noqa: BLE001 (any failure means: not measurable this way)
        return None
    if len(other) != len(outputs):
        return None
    out = []
    for y, z in zip(outputs, other):
        if y.shape != z.shape or not y.size:
            return None
        out.append(_ratio(float(np.max(np.abs(z - y))), float(np.max(np.abs(y)))))
    return out


def random_inputs(model: keras.Model, batch_size: int = 8, seed: int = 0) -> Any:
    """Random inputs for ``model`` in the structure it takes (`kerasbn.model_signature.Signature.random`)."""
    sig = signature(model)
    return sig.pack(sig.random(batch_size, seed))


def keras_outputs(model: keras.Model, inputs: Any) -> list[np.ndarray]:
    """``model``'s inference outputs, flattened, as float64 arrays."""
    # The compiled predict path, not an eager call: on TensorFlow's CPU
    # kernels an eager channels_first Conv1D/Conv2D adds its bias along the
    # wrong axis when the channel count equals the width.
    outputs = model.predict_on_batch(inputs)
    return [np.asarray(y, np.float64) for y in keras.tree.flatten(outputs)]


@dataclass(frozen=True)
class Checks:
    """How a result is checked against the original model: the options export and the CLI share.

    Attributes:
        verify: Check at all (``False``: nothing is compared).
        batch_sizes: Batch sizes of the random inputs, one check each; two
            different ones show that an exported batch axis is really dynamic.
        inputs: Inputs in the structure the model takes (as
            `kerasbn.deploy.files.load_inputs` returns them) instead of random
            ones; checked whole and as their first row.
        atol, rtol: Give either for the element-wise criterion
            ``|Δ| ≤ atol + rtol·|y_ref|``; by default the check is scale-aware
            and calibrated to the model's own float32 noise (`compare`).
        seed: Seed of the random inputs (batch size ``k`` of the list gets ``seed + k``).
    """

    verify: bool = True
    batch_sizes: tuple[int, ...] = (1, 8)
    inputs: Any = None
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from kerasbn.errors import KerasbnError

        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if self.verify and not self.batch_sizes and self.inputs is None:
            raise KerasbnError("verification needs at least one batch size or inputs")

    @property
    def elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def cases(self, sig: Signature) -> list[list[np.ndarray]]:
        """The flat input arrays of every check: the given inputs whole and as one row, else random ones."""
        if self.inputs is not None:
            arrays = sig.flatten(self.inputs)
            return [arrays, [a[:1] for a in arrays]]
        return [sig.random(b, self.seed + k) for k, b in enumerate(self.batch_sizes)]


@dataclass
class Reference:
    """The original model's outputs on the check inputs, evaluated once and judged against many times.

    An export compares every graph it makes (after each graph pass, the
    written file) with the same Keras outputs; evaluating the model, and
    measuring its float32 noise, once per input case keeps that cheap.
    """

    model: keras.Model
    checks: Checks
    sig: Signature = field(init=False)
    cases: list[list[np.ndarray]] = field(init=False)
    expected: list[list[np.ndarray]] = field(init=False)
    noises: list[list[float] | None] = field(init=False)

    def __post_init__(self) -> None:
        self.sig = signature(self.model)
        self.cases = self.checks.cases(self.sig)
        self.expected, self.noises = [], []
        for arrays in self.cases:
            structured = self.sig.pack(arrays)
            outputs = keras_outputs(self.model, structured)
            self.expected.append(outputs)
            self.noises.append(None if self.checks.elementwise else noise(self.model, structured, outputs))

    def judge(self, run: Callable[[list[np.ndarray]], Sequence[np.ndarray]]) -> tuple[VerifyResult, ...]:
        """``run`` (flat input arrays in Keras order → outputs) on every case, judged by `compare`."""
        results = []
        for arrays, expected, measured in zip(self.cases, self.expected, self.noises):
            got = [np.asarray(y) for y in run(list(arrays))]
            results.append(
                compare(
                    expected,
                    got,
                    batch_size=batch_size_of(arrays),
                    atol=self.checks.atol,
                    rtol=self.checks.rtol,
                    noise=measured,
                )
            )
        return tuple(results)


def check_runtime(
    model: keras.Model,
    run: Callable[[list[np.ndarray]], Sequence[np.ndarray]],
    batch_sizes: Sequence[int],
    inputs: Any = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> tuple[VerifyResult, ...]:
    """An exported file, run by ``run`` (flat input arrays in Keras order → outputs), against ``model``.

    Random inputs at each of ``batch_sizes``, or ``inputs`` whole and as
    their first row (`Checks.cases`), judged by `compare` (`Reference.judge`).
    """
    return Reference(model, Checks(True, tuple(batch_sizes), inputs, atol, rtol, seed)).judge(run)


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of the first input array."""
    return int(keras.tree.flatten(inputs)[0].shape[0])


def verify(
    reference: keras.Model,
    candidate: keras.Model,
    inputs: Any = None,
    *,
    batch_size: int = 8,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> VerifyResult:
    """Compare ``candidate``'s inference outputs with ``reference``'s.

    Args:
        reference: The original model.
        candidate: The rewritten model (same input and output structure).
        inputs: Inputs in the structure the models take; random ones from
            `random_inputs` when ``None``.
        batch_size: Batch size of random inputs.
        atol: Give it or ``rtol`` for the element-wise criterion
            ``|Δ| ≤ atol + rtol·|y_ref|``; by default the check is scale-aware
            and calibrated to ``reference``'s float32 noise (`compare`, `noise`).
        rtol: The relative tolerance of the element-wise criterion.
        seed: Seed of random inputs.

    Returns:
        A `VerifyResult` (it does not raise when the outputs differ).

    Raises:
        kerasbn.errors.UnsupportedModelError: ``reference``'s input shape is
            unknown (a subclassed model never called) and no ``inputs`` were given.
        ValueError: The two models return different numbers or shapes of outputs.

    Examples:
        >>> import keras, kerasbn
        >>> x = keras.Input((4,))
        >>> model = keras.Model(x, keras.layers.BatchNormalization()(keras.layers.Dense(3)(x)))
        >>> kerasbn.verify(model, kerasbn.fold(model).model).passed
        True
    """
    if inputs is None:
        inputs = random_inputs(reference, batch_size, seed)
    ref = keras_outputs(reference, inputs)
    got = keras_outputs(candidate, inputs)
    if len(ref) != len(got):
        raise ValueError(f"The reference returns {len(ref)} outputs, the candidate {len(got)}.")
    for y, z in zip(ref, got):
        if y.shape != z.shape:
            raise ValueError(f"Output shapes differ: {y.shape} vs {z.shape}.")
    measured = noise(reference, inputs, ref) if atol is None and rtol is None else None
    return compare(ref, got, batch_size=batch_size_of(inputs), atol=atol, rtol=rtol, noise=measured)
