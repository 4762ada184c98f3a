"""`kerasbn.verify`: does a rewritten model, or an exported file, compute what the original does?

The one comparison of the package: a rewritten Keras model, a reloaded file
and an exported graph are all judged here with the same defaults
(`kerasbn.deploy.tolerances`), and reported as a `VerifyResult`.

By default the judge knows the exact answer: the original model evaluated in
float64 (`kerasbn.deploy.exact`). A candidate passes when it is about as close
to that answer as the original itself is in the float type the candidate
computes in (`judge`): a correct rewrite moves the rounding error around but
does not make it larger. A Keras candidate (a folded model) is also evaluated
in float64 itself, where its only error left is rounding its weights to their
float type, so a wrong fold shows even in a bfloat16 model whose own rounding
hides it. Where no float64 twin exists (a layer that does not re-create from
its config...), the check falls back to `compare` calibrated to the model's
own noise between two evaluation orders, and says why.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from kerasbn.deploy import exact
from kerasbn.deploy.layerwise import LayerCheck
from kerasbn.deploy.tolerances import (
    ATOL,
    EXACT_CEILING,
    EXACT_FACTOR,
    NOISE_FACTOR,
    RELATIVE_CEILING,
    RELATIVE_FLOOR,
    ROUNDING_FLOOR,
    RTOL,
    UNCALIBRATED_FLOOR,
)
from kerasbn.errors import UnsupportedModelError, first_line
from kerasbn.model_signature import Signature, signature


@dataclass(frozen=True)
class VerifyResult:
    """The comparison of a candidate's outputs with a reference's.

    Three criteria. The default, where the original model has a float64 twin
    (``reference == "float64"``, `judge`): ``y_ref`` is the original evaluated
    in float64, and for every output ``max|Δ| / max|y_ref|`` must not exceed
    ``allowed`` = `~kerasbn.deploy.tolerances.EXACT_FACTOR` × the original's
    own such error in the candidate's float type ``dtype`` (``own_error``) +
    `~kerasbn.deploy.tolerances.ROUNDING_FLOOR` × that type's unit roundoff;
    a Keras candidate evaluated in float64 too (``float64_error``) must stay
    within the same bound taken in its weights' float type. Without a float64
    twin (``reference == "model"``, `compare`): ``y_ref`` is the original's
    own output, and the bound is `~kerasbn.deploy.tolerances.NOISE_FACTOR`
    times its noise between two evaluation orders, at least
    `~kerasbn.deploy.tolerances.RELATIVE_FLOOR` (without a noise measurement:
    `~kerasbn.deploy.tolerances.UNCALIBRATED_FLOOR`), at most
    `~kerasbn.deploy.tolerances.RELATIVE_CEILING`. With an explicit
    ``atol``/``rtol`` every element must satisfy ``|Δ| ≤ atol + rtol·|y_ref|``
    against the original's own outputs instead.

    Attributes:
        passed: The criterion holds.
        max_abs_error: ``max |Δ|`` over all outputs (the candidate as it computes).
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
        reference: ``"float64"`` (judged against the original evaluated in
            float64) or ``"model"`` (against the original's own outputs).
        dtype: The float type the candidate was judged in (``None`` when element-wise).
        own_error: The original's own ``max|Δ|/max|y_ref|`` in ``dtype``, the
            largest over outputs (``None`` unless ``reference == "float64"``).
        float64_error: The candidate's own ``max|Δ|/max|y_ref|`` evaluated in
            float64 (``None`` when not evaluated: not a Keras model, or no twin).
        discontinuous: Why the whole-model check did not apply (outputs that
            follow a top-k, arg-max or NMS), or ``None`` when it did. Then each
            folded layer is judged on the inputs it receives
            (`kerasbn.deploy.layerwise`, in ``layers``) and only the outputs
            computed before any selection are compared whole (the other fields).
        layers: The per-layer checks of a discontinuous model (empty otherwise).
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
    reference: str = "model"
    dtype: str | None = None
    own_error: float | None = None
    float64_error: float | None = None
    discontinuous: str | None = None
    layers: tuple[LayerCheck, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (an infinite margin or error as the string ``"inf"``)."""
        return _json_ready(asdict(self))

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
    note: str | None = None,
) -> VerifyResult:
    """Judge ``candidate``'s output arrays against ``reference``'s (same order), without the exact answer.

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
        note: Why the exact answer was not used, put before the criterion in ``tolerance``.

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
    if note:
        tolerance = f"{note}; {tolerance}"
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


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _ratio(a: float, b: float) -> float:
    """``a / b`` with ``0/0 = 0`` and ``x/0 = inf``."""
    if b > 0:
        return a / b
    return 0.0 if a == 0 else float("inf")


@dataclass(frozen=True)
class ExactReference:
    """The exact answer on some inputs, and how far the original model is from it.

    Attributes:
        outputs: The original model's outputs computed in float64, flattened.
        own: Float type → the original's own ``max|y − y64| / max|y64|`` per
            output when it computes in that type.
        computed: Float type → the original's outputs computed in that type
            (what ``own`` measures).
    """

    outputs: list[np.ndarray]
    own: dict[str, list[float]]
    computed: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def reproduces(self, candidate: Sequence[np.ndarray], dtype: str) -> bool:
        """Whether ``candidate`` is the original's own answer in ``dtype``, bit for bit."""
        mine = self.computed.get(dtype)
        return (
            mine is not None
            and len(mine) == len(candidate)
            and all(np.shape(a) == np.shape(b) and np.array_equal(a, b) for a, b in zip(mine, candidate))
        )


def exact_reference(
    model: keras.Model, inputs: Any, dtypes: Sequence[str], outputs: Sequence[np.ndarray] | None = None
) -> ExactReference:
    """``model`` evaluated in float64 on ``inputs``, with its own error in each of ``dtypes``.

    In the model's own compute dtype the model itself is evaluated (its
    ``outputs`` when given); in any other float type, its twin in that type
    (a float32 evaluation of a mixed-precision model's weights).

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` has no float64 (or ``dtypes``) twin.
    """
    truth = exact.evaluate(model, inputs, "float64")
    own_dtype = exact.compute_dtype(model)
    own, computed = {}, {}
    for dtype in dict.fromkeys(dtypes):
        if dtype == own_dtype:
            got = list(outputs) if outputs is not None else keras_outputs(model, inputs)
        else:
            got = exact.evaluate(model, inputs, dtype)
        own[dtype] = [exact.relative_error(y, z) for y, z in zip(truth, got)]
        computed[dtype] = [np.asarray(z) for z in got]
    return ExactReference(truth, own, computed)


def allowed_error(own: float, dtype: str) -> float:
    """The largest ``max|Δ|/max|y64|`` a candidate computing in ``dtype`` may have, where the original has ``own``.

    A correct rewrite changes which roundings happen, not how many nor how
    they are amplified: its error is of the original's own size.
    `~kerasbn.deploy.tolerances.ROUNDING_FLOOR` unit roundoffs cover an
    original whose error is by chance near zero.
    """
    return EXACT_FACTOR * own + ROUNDING_FLOOR * exact.ROUNDOFF[dtype]


def judge(
    reference: ExactReference,
    candidate: Sequence[np.ndarray],
    *,
    dtype: str,
    batch_size: int,
    float64: Sequence[np.ndarray] | None = None,
    weights_dtype: str = "float32",
) -> VerifyResult:
    """Judge ``candidate``'s outputs by the exact answer.

    Args:
        reference: `exact_reference` on the same inputs, with the original's
            own error in ``dtype`` (and ``weights_dtype`` when ``float64`` is given).
        candidate: The candidate's outputs as it computes them, flattened.
        dtype: The float type the candidate computes in (float32 for a float32
            export of a mixed-precision model).
        batch_size: Batch size of the inputs (reported).
        float64: The candidate's outputs evaluated in float64 (a Keras
            candidate's twin), or ``None``.
        weights_dtype: The float type of the candidate's weights: evaluated in
            float64, a correct candidate's only error is rounding its weights
            to it, which costs no more than the original computing in it.

    Per output, ``max|Δ|/max|y64|`` must stay within `allowed_error` of the
    original's own error in ``dtype``; the float64 evaluation within that of
    its error in ``weights_dtype``. A NaN, or a count or shape mismatch, fails;
    so does an original too far from the exact answer for the bound to stay
    below `~kerasbn.deploy.tolerances.EXACT_CEILING` (the check could not fail),
    unless the candidate's outputs are the original's own in ``dtype`` bit for
    bit (a reloaded file, a rewrite that changed nothing the inputs reach).
    """
    truth = reference.outputs
    identical = reference.reproduces(candidate, dtype)
    checks = [(list(candidate), dtype)]
    if float64 is not None:
        checks.append((list(float64), weights_dtype))
    passed = True
    margin = 0.0
    allowed_at_worst = None
    hopeless = False
    errors: list[list[float]] = []
    for outputs, kind in checks:
        if len(outputs) != len(truth):
            passed, margin = False, float("inf")
            errors.append([float("inf")])
            continue
        rel = [exact.relative_error(y, z) for y, z in zip(truth, outputs)]
        errors.append(rel)
        for err, own in zip(rel, reference.own[kind]):
            allowed = allowed_error(own, kind)
            # Past the ceiling the check could not fail: an infinite margin says it cannot judge, but
            # for the original's very answer.
            beyond = allowed >= EXACT_CEILING and not (identical and kind == dtype)
            out_margin = _ratio(err, allowed) if not beyond else float("inf")
            hopeless = hopeless or beyond
            if out_margin >= margin:
                margin, allowed_at_worst = out_margin, allowed
    passed = passed and margin <= 1.0
    max_abs = max_ref = 0.0
    for y, z in zip(truth, candidate):
        if np.shape(y) != np.shape(z):
            max_abs = float("inf")
        elif np.size(y):
            max_abs = max(max_abs, float(np.max(np.nan_to_num(np.abs(np.asarray(z, np.float64) - y), nan=np.inf))))
        if np.size(y):
            max_ref = max(max_ref, float(np.max(np.abs(y))))
    own = max(reference.own[dtype], default=0.0)
    tolerance = (
        f"against the model in float64: max|Δ|/max|y| per output ≤ {EXACT_FACTOR:g} × the original's {dtype} "
        f"error {own:.2g} + {ROUNDING_FLOOR:g} u({dtype})"
    )
    if identical:
        tolerance = f"the outputs are the original's own in {dtype}, bit for bit; " + tolerance
    if hopeless:
        tolerance = (
            f"cannot judge: the original's own error allows {EXACT_FACTOR:g} × {own:.2g} ≥ {EXACT_CEILING:g} of max|y|, "
            "so any output would pass; give atol/rtol to accept this model knowingly; " + tolerance
        )
    if float64 is not None:
        tolerance += (
            f", and evaluated in float64 ≤ {EXACT_FACTOR:g} × its {weights_dtype} error "
            f"{max(reference.own[weights_dtype], default=0.0):.2g} + {ROUNDING_FLOOR:g} u({weights_dtype})"
        )
    return VerifyResult(
        passed,
        max_abs,
        _ratio(max_abs, max_ref),
        max_ref,
        None,
        None,
        tolerance,
        len(truth),
        batch_size,
        allowed_at_worst,
        margin,
        None,
        "float64",
        dtype,
        own,
        max(errors[1], default=0.0) if float64 is not None else None,
    )


_SELECTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def judge_exact(
    truth: list[np.ndarray], own: dict[str, list[float]], candidate: Sequence[np.ndarray], **options: Any
) -> VerifyResult:
    """`judge` of ``candidate`` against the exact answer ``truth`` and the original's own errors ``own`` by float type."""
    return judge(ExactReference(truth, own), candidate, **options)


def discontinuity(model: keras.Model, outputs: int) -> tuple[str, list[int]] | None:
    """Why no whole-model comparison can judge ``model``, and its outputs that can still be compared; or ``None``.

    An output computed from a selection (top-k, arg-max, NMS: the ops of
    `kerasbn.folding.dataflow.SELECTION_OPS` in the traced inference) jumps
    when a rounding error reorders the candidates, by as much as the output
    itself. The outputs computed before any selection (D-FINE's encoder
    outputs and class scores, which feed its top-k) stay continuous. Found on
    the TensorFlow backend, by tracing (once per model); elsewhere, or where
    the model cannot be traced, every output is taken as continuous.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    found = _SELECTIONS.get(model)
    if found is None:
        from kerasbn.folding import dataflow

        try:
            found = dataflow.selections(model)
        except UnsupportedModelError:
            found = ((), ())
        _SELECTIONS[model] = found
    ops, flags = found
    if not ops:
        return None
    if len(flags) != outputs:
        flags = (True,) * outputs
    if not any(flags):
        return None
    why = f"whole-model check not applicable: {sum(flags)} of {outputs} outputs follow {', '.join(ops)} (discontinuous)"
    return why, [i for i, f in enumerate(flags) if not f]


def _subset(reference: ExactReference, keep: Sequence[int]) -> ExactReference:
    def pick(by_dtype: dict) -> dict:
        return {k: [v[i] for i in keep] for k, v in by_dtype.items()}

    return ExactReference([reference.outputs[i] for i in keep], pick(reference.own), pick(reference.computed))


def _discontinuous(
    why: str,
    keep: Sequence[int],
    reference: ExactReference,
    got: Sequence[np.ndarray],
    *,
    dtype: str,
    batch_size: int,
    float64: Sequence[np.ndarray] | None = None,
    weights_dtype: str = "float32",
    layers: Sequence[LayerCheck] | None = None,
    changed: Sequence[str] = (),
    failure: str | None = None,
) -> VerifyResult:
    """The verdict on a discontinuous model: its continuous outputs by `judge`, its folded layers one by one.

    ``layers`` is ``None`` for a candidate that is no Keras model (an
    exported file): then only the continuous outputs are compared, and a
    file without any fails. ``failure`` says why the layers could not be checked.
    """
    whole = None
    if keep:
        whole = judge(
            _subset(reference, keep),
            [got[i] for i in keep],
            dtype=dtype,
            batch_size=batch_size,
            float64=None if float64 is None else [float64[i] for i in keep],
            weights_dtype=weights_dtype,
        )
    parts = [why]
    passed = whole is None or whole.passed
    margin = whole.margin if whole is not None else 0.0
    allowed = whole.allowed if whole is not None else None
    if failure is not None:
        passed, margin = False, float("inf")
        parts.append(failure)
    elif layers is None:
        if whole is None:
            passed, margin = False, float("inf")
            parts.append("every output follows a selection: nothing to compare")
    else:
        if layers:
            worst = max(layers, key=lambda c: c.margin)
            parts.append(
                f"{len(layers)} folded layer(s) each judged on the inputs it receives against itself in float64 "
                f"by the same rule (worst '{worst.layer}': max|Δ|/max|y| {worst.error:.2g}, margin {worst.margin:.2g})"
            )
            passed = passed and all(c.passed for c in layers)
            if worst.margin >= margin:
                margin, allowed = worst.margin, worst.allowed
        if changed:
            passed, margin = False, float("inf")
            parts.append(f"weights changed outside the folds: {', '.join(changed[:3])}")
        else:
            parts.append("every other layer holds the original's weights")
    if whole is not None:
        parts.append(f"the {len(keep)} output(s) before the selection {whole.tolerance}")
    return VerifyResult(
        passed,
        whole.max_abs_error if whole is not None else 0.0,
        whole.max_rel_error if whole is not None else 0.0,
        whole.max_abs_reference if whole is not None else 0.0,
        None,
        None,
        "; ".join(parts),
        len(reference.outputs),
        batch_size,
        allowed,
        margin,
        None,
        "float64",
        dtype,
        whole.own_error if whole is not None else None,
        whole.float64_error if whole is not None else None,
        why,
        tuple(layers or ()),
    )


_XLA_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def noise(model: keras.Model, inputs: Any, outputs: Sequence[np.ndarray] | None = None) -> list[float] | None:
    """How far ``model``'s own outputs move between two valid float32 evaluations, per output.

    The reference evaluation is `keras_outputs` (a graph function); the
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
    """``model``'s inference outputs, flattened, as float64 arrays (`kerasbn.deploy.exact.inference`)."""
    outputs = exact.inference(model)(inputs)
    return [np.asarray(y, np.float64) for y in keras.tree.flatten(outputs)]


def outputs_on_random(model: keras.Model, inputs: Any) -> list[np.ndarray]:
    """`keras_outputs` on random ``inputs``; a model that rejects their made-up sizes is a user error.

    An input dimension the model leaves unknown besides the batch (an image
    backbone taking any size) gets 8 in `Signature.random`; a model may need
    more (D-FINE's top-k needs as many positions as it has queries).

    Raises:
        kerasbn.errors.UnsupportedModelError: The model has such a dimension and fails on these inputs.
    """
    sig = signature(model)
    if all(d is not None for spec in sig.inputs for d in spec.shape[1:]):
        return keras_outputs(model, inputs)
    try:
        return keras_outputs(model, inputs)
    except Exception as exc:  # noqa: BLE001 (any failure on made-up sizes: the user gives real ones)
        shapes = ", ".join(str(tuple(a.shape)) for a in keras.tree.flatten(inputs))
        raise UnsupportedModelError(
            f"'{model.name}' fails on random inputs of shape {shapes} (its input sizes are not fixed): "
            f"{first_line(exc)}; give inputs of the size it takes (--inputs FILE.npz)"
        ) from exc


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
    """The original model's answers on the check inputs, evaluated once and judged against many times.

    An export judges every graph it makes (the written file; each graph pass
    when one is to blame) against the same answers: the model's own outputs
    and, for the default check, the exact answer (the model evaluated in
    float64) with the model's own distance to it in ``dtype`` (`exact_reference`),
    or, without a float64 twin, the model's noise between two evaluation orders.

    Attributes:
        model: The original model.
        checks: The inputs and the criterion.
        dtype: The float type the judged files compute in (None: the model's
            own compute dtype; ``"float32"`` for a float32 export of a
            mixed-precision model).
    """

    model: keras.Model
    checks: Checks
    dtype: str | None = None
    sig: Signature = field(init=False)
    cases: list[list[np.ndarray]] = field(init=False)
    expected: list[list[np.ndarray]] = field(init=False)
    answers: list[ExactReference | None] = field(init=False)
    noises: list[list[float] | None] = field(init=False)
    note: str | None = field(init=False, default=None)
    discontinuity: tuple[str, list[int]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sig = signature(self.model)
        self.cases = self.checks.cases(self.sig)
        if not self.checks.elementwise:
            self.dtype = self.dtype or exact.compute_dtype(self.model)
        self.expected, self.answers, self.noises = [], [], []
        for arrays in self.cases:
            structured = self.sig.pack(arrays)
            if self.checks.inputs is None:
                outputs = outputs_on_random(self.model, structured)
            else:
                outputs = keras_outputs(self.model, structured)
            self.expected.append(outputs)
            answer = measured = None
            if not self.checks.elementwise and self.note is None:
                try:
                    answer = exact_reference(self.model, structured, [self.dtype], outputs)
                except UnsupportedModelError as exc:
                    self.note = f"no float64 evaluation of '{self.model.name}': {exc}"
            if self.note is not None:
                measured = noise(self.model, structured, outputs)
            self.answers.append(answer)
            self.noises.append(measured)
        if any(a is not None for a in self.answers):
            self.discontinuity = discontinuity(self.model, len(self.expected[0]))

    def judge(self, run: Callable[[list[np.ndarray]], Sequence[np.ndarray]]) -> tuple[VerifyResult, ...]:
        """``run`` (flat input arrays in Keras order → outputs) on every case, each judged once."""
        results = []
        for arrays, expected, answer, measured in zip(self.cases, self.expected, self.answers, self.noises):
            got = [np.asarray(y) for y in run(list(arrays))]
            batch = batch_size_of(arrays)
            if self.checks.elementwise:
                result = compare(expected, got, batch_size=batch, atol=self.checks.atol, rtol=self.checks.rtol)
            elif answer is None:
                result = compare(expected, got, batch_size=batch, noise=measured, note=self.note)
            elif self.discontinuity is not None:
                # An exported graph has no layers to check one by one: its outputs before the selection are judged.
                result = _discontinuous(*self.discontinuity, answer, got, dtype=self.dtype, batch_size=batch)
            else:
                result = judge(answer, got, dtype=self.dtype, batch_size=batch, weights_dtype=self.dtype)
            results.append(result)
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
    dtype: str | None = None,
) -> tuple[VerifyResult, ...]:
    """An exported file, run by ``run`` (flat input arrays in Keras order → outputs), against ``model``.

    Random inputs at each of ``batch_sizes``, or ``inputs`` whole and as
    their first row (`Checks.cases`). By default judged by the exact answer
    (`judge`): the file's outputs against ``model`` evaluated in float64, as
    close as ``model`` itself is when it computes in ``dtype``, the float type
    the file computes in (default: the model's own compute dtype;
    ``"float32"`` for a float32 export of a mixed-precision model). Without a
    float64 twin, `compare` calibrated to ``model``'s own noise; element-wise
    when ``atol`` or ``rtol`` is given (`Reference.judge`).
    """
    checks = Checks(True, tuple(batch_sizes), inputs, atol, rtol, seed)
    return Reference(model, checks, dtype).judge(run)


def _judged(
    model: keras.Model,
    inputs: Any,
    expected: Sequence[np.ndarray],
    got: Sequence[np.ndarray],
    *,
    atol: float | None,
    rtol: float | None,
    dtype: str | None,
    candidate: keras.Model | None = None,
) -> VerifyResult:
    """``got`` (from ``candidate``, if a Keras model) against ``model``, whose own outputs are ``expected``."""
    batch = batch_size_of(inputs)
    if atol is not None or rtol is not None:
        return compare(expected, got, batch_size=batch, atol=atol, rtol=rtol)
    dtype = dtype or exact.compute_dtype(candidate if candidate is not None else model)
    weights = exact.weights_dtype(candidate) if candidate is not None else dtype
    try:
        reference = exact_reference(model, inputs, [dtype, weights], expected)
    except UnsupportedModelError as exc:
        note = f"no float64 evaluation of '{model.name}': {exc}"
        return compare(expected, got, batch_size=batch, noise=noise(model, inputs, expected), note=note)
    float64 = None
    if candidate is not None:
        try:
            float64 = exact.evaluate(candidate, inputs, "float64")
        except UnsupportedModelError:
            # The candidate in its own float type is still judged by the exact answer.
            float64 = None
    found = discontinuity(model, len(expected))
    if found is not None:
        from kerasbn.deploy import layerwise

        layers, changed, failure = None, (), None
        if candidate is not None:
            try:
                layers, changed = layerwise.check(model, candidate, inputs, judge_exact)
            except UnsupportedModelError as exc:
                failure = f"the folded layers cannot be checked one by one: {exc}"
        return _discontinuous(
            *found,
            reference,
            got,
            dtype=dtype,
            batch_size=batch,
            float64=float64,
            weights_dtype=weights,
            layers=layers,
            changed=changed,
            failure=failure,
        )
    result = judge(reference, got, dtype=dtype, batch_size=batch, float64=float64, weights_dtype=weights)
    if candidate is not None and float64 is None:
        result = dataclasses.replace(result, tolerance=result.tolerance + " (the candidate has no float64 twin)")
    return result


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
            ``|Δ| ≤ atol + rtol·|y_ref|``; by default ``candidate`` is judged by
            the exact answer, ``reference`` evaluated in float64 (`judge`): in
            its own compute dtype as close to it as ``reference`` is, and
            evaluated in float64 as close as ``reference`` is in the weights'
            float type. Without a float64 twin of ``reference``: calibrated to
            its noise between two evaluation orders (`compare`, `noise`).
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
        ref = outputs_on_random(reference, inputs)
    else:
        ref = keras_outputs(reference, inputs)
    got = keras_outputs(candidate, inputs)
    if len(ref) != len(got):
        raise ValueError(f"The reference returns {len(ref)} outputs, the candidate {len(got)}.")
    for y, z in zip(ref, got):
        if y.shape != z.shape:
            raise ValueError(f"Output shapes differ: {y.shape} vs {z.shape}.")
    return _judged(reference, inputs, ref, got, atol=atol, rtol=rtol, dtype=None, candidate=candidate)
