"""The rule that passes or fails a candidate's outputs: one rule for every check of the package.

A rewritten Keras model (`kerasbn.verify`), a reloaded file and an exported
graph are all judged here, from output arrays alone (this module runs no
model: `kerasbn.deploy.verify` computes the answers), and reported as a
`VerifyResult`. `verdict` picks the criterion:

- **By the exact answer** (the default, `judge`), where the original model
  has a float64 twin (`kerasbn.deploy.twins`): per output, the candidate's
  ``max|Δ| / max|y64|`` against the original evaluated in float64 must stay
  within `allowed_error` of the original's own such error in the float type
  the candidate computes in: `~kerasbn.deploy.tolerances.EXACT_FACTOR` × that
  error + `~kerasbn.deploy.tolerances.ROUNDING_FLOOR` unit roundoffs of the
  type. A correct rewrite moves the rounding error around but does not make it
  larger. A Keras candidate (a folded model) is also evaluated in float64
  itself, where its only error left is rounding its weights to their float
  type: within the same bound taken in that type, so a wrong fold shows even
  in a bfloat16 model whose own rounding hides it. An original so far from
  the exact answer that the bound reaches
  `~kerasbn.deploy.tolerances.EXACT_CEILING` cannot be judged (any output
  would pass) and fails, unless the candidate's outputs are the original's own
  bit for bit (a reloaded file).
- **By the model's noise** (`compare`), where no float64 twin exists (a
  layer that does not re-create from its config...): per output,
  ``max|Δ| / max|y|`` against the original's own outputs within
  `~kerasbn.deploy.tolerances.NOISE_FACTOR` × its noise between two valid
  float32 evaluation orders, at least `~kerasbn.deploy.tolerances.RELATIVE_FLOOR`
  (without a noise measurement `~kerasbn.deploy.tolerances.UNCALIBRATED_FLOOR`),
  at most `~kerasbn.deploy.tolerances.RELATIVE_CEILING`; the result says why
  the exact answer was not used.
- **Element-wise** (`compare`), when the caller gives ``atol`` or ``rtol``:
  ``|Δ| ≤ atol + rtol·|y|`` for every element against the original's outputs.
- **A discontinuous model** (`judge_discontinuous`): an output computed from a
  selection (top-k, arg-max, NMS) jumps when a rounding reorders the
  candidates, so no whole-model comparison can judge it. Its outputs computed
  before any selection are judged by the exact answer; a Keras candidate's
  folded layers are each judged by the same rule on the inputs they receive
  (`kerasbn.deploy.layerwise`), and every other layer must hold the
  original's weights exactly. An exported file with no output before the
  selection fails.

Everywhere a NaN counts as an infinite error, and a count or shape mismatch
fails. ``margin`` (error ÷ allowed, at most 1 passes) is reported for the
output that came closest to failing. The numbers, and the measurements behind
them, are in `kerasbn.deploy.tolerances`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kerasbn.deploy.tolerances import (
    ATOL,
    EXACT_CEILING,
    EXACT_FACTOR,
    NOISE_FACTOR,
    RELATIVE_CEILING,
    RELATIVE_FLOOR,
    ROUNDING_FLOOR,
    ROUNDOFF,
    RTOL,
    UNCALIBRATED_FLOOR,
)
from kerasbn.printable import Printable, Table


@dataclass(frozen=True)
class LayerCheck(Printable):
    """One folded layer of a discontinuous model judged on its own inputs (`kerasbn.deploy.layerwise`).

    Attributes:
        layer: The partner layer (``outer/…/name``).
        bns: The BN layers folded into it.
        passed: The folded layer is within ``allowed`` (and so is its float64 evaluation).
        error: Its ``max|Δ| / max|y64|`` in ``dtype`` against the original chain in float64.
        own_error: The original chain's own such error in ``dtype``.
        float64_error: The folded layer's error evaluated in float64 (rounding its weights only).
        allowed: The largest error accepted for the evaluation closest to failing.
        margin: error ÷ allowed for that evaluation (at most 1 passes).
        dtype: The float type the layer computes in.
    """

    layer: str
    bns: tuple[str, ...]
    passed: bool
    error: float
    own_error: float
    float64_error: float | None
    allowed: float | None
    margin: float
    dtype: str

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (an infinite margin or error as the string ``"inf"``)."""
        return _json_ready(asdict(self))

    def view(self) -> list[Table | str]:
        """One line: the layer, its error against the allowed one, the verdict."""
        verdict = "passed" if self.passed else "FAILED"
        return [
            f"layer {self.layer} ({', '.join(self.bns)} folded) {verdict}: max|Δ|/max|y| = {self.error:.3g} in "
            f"{self.dtype}, the original's {self.own_error:.3g}, margin {self.margin:.3g}"
        ]


@dataclass(frozen=True)
class VerifyResult(Printable):
    """The verdict on a candidate's outputs (the criteria: `kerasbn.deploy.criteria`).

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
            follow a top-k, arg-max or NMS), or ``None`` when it did; then the
            other fields describe the outputs computed before any selection.
        layers: The per-layer checks of a discontinuous model (empty otherwise).
        batch_note: Why the random check inputs hold fewer samples than asked
            (the model's activations and the check's memory budget,
            `kerasbn.deploy.budget`), or ``None``.
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
    batch_note: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (an infinite margin or error as the string ``"inf"``)."""
        return _json_ready(asdict(self))

    def view(self) -> list[Table | str]:
        """One line: the verdict, the errors and the criterion (it is quoted in error messages)."""
        verdict = "passed" if self.passed else "FAILED"
        return [
            f"verify {verdict}: max|Δ| = {self.max_abs_error:.3g}, max|Δ|/max|y| = {self.max_rel_error:.3g}, "
            f"margin {self.margin:.3g} over {self.outputs} output(s), batch {self.batch_size} ({self.tolerance})"
        ]


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

    def subset(self, keep: Sequence[int]) -> ExactReference:
        """The answer for the outputs at ``keep`` only."""

        def pick(by_dtype: dict) -> dict:
            return {k: [v[i] for i in keep] for k, v in by_dtype.items()}

        return ExactReference(outputs=[self.outputs[i] for i in keep], own=pick(self.own), computed=pick(self.computed))


@dataclass(frozen=True)
class Discontinuity:
    """Why a model's whole outputs cannot be judged, and what can be (the last rule of the module docstring).

    Attributes:
        why: The selection ops the outputs follow, in words.
        keep: The outputs computed before any selection (judged whole).
        layers: The folded layers judged one by one; ``None`` for a candidate
            that is no Keras model (an exported file).
        changed: The layers outside the folds whose weights differ from the original's.
        failure: Why the layers could not be checked one by one, or ``None``.
    """

    why: str
    keep: tuple[int, ...]
    layers: tuple[LayerCheck, ...] | None = None
    changed: tuple[str, ...] = ()
    failure: str | None = None


def relative_error(y: np.ndarray, z: np.ndarray) -> float:
    """``max|z − y| / max|y|``, NaN as infinite, a shape mismatch infinite (0/0 = 0, x/0 = inf)."""
    y = np.asarray(y, np.float64)
    z = np.asarray(z, np.float64)
    if y.shape != z.shape:
        return float("inf")
    if not y.size:
        return 0.0
    err, scale = float(np.max(np.nan_to_num(np.abs(z - y), nan=np.inf))), float(np.max(np.abs(y)))
    return _ratio(err, scale)


def allowed_error(own: float, dtype: str) -> float:
    """The largest ``max|Δ|/max|y64|`` a candidate computing in ``dtype`` may have, where the original has ``own``.

    `~kerasbn.deploy.tolerances.ROUNDING_FLOOR` unit roundoffs cover an
    original whose error is by chance near zero.
    """
    return EXACT_FACTOR * own + ROUNDING_FLOOR * ROUNDOFF[dtype]


def verdict(
    expected: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    batch_size: int,
    atol: float | None = None,
    rtol: float | None = None,
    answer: ExactReference | None = None,
    noise: Sequence[float] | None = None,
    note: str | None = None,
    dtype: str | None = None,
    float64: Sequence[np.ndarray] | None = None,
    weights_dtype: str | None = None,
    discontinuity: Discontinuity | None = None,
) -> VerifyResult:
    """``candidate``'s outputs judged by the criterion that applies (module docstring): the one choice among the rules.

    Args:
        expected: The original model's own outputs on the same inputs.
        candidate: The candidate's outputs as it computes them, flattened.
        batch_size: Batch size of the inputs (reported).
        atol, rtol: Either one selects the element-wise criterion.
        answer: The exact answer, or ``None`` where the original has no float64 twin.
        noise: The original's float32 noise per output (without ``answer``; ``None``: not measured).
        note: Why there is no ``answer``.
        dtype: The float type the candidate computes in (with ``answer``).
        float64: A Keras candidate's outputs evaluated in float64, or ``None``.
        weights_dtype: The float type of the candidate's weights (default: ``dtype``).
        discontinuity: Set for a model whose outputs follow a selection.
    """
    if atol is not None or rtol is not None:
        return compare(expected, candidate, batch_size=batch_size, atol=atol, rtol=rtol)
    if answer is None:
        return compare(expected, candidate, batch_size=batch_size, noise=noise, note=note)
    exact = {"dtype": dtype, "batch_size": batch_size, "float64": float64, "weights_dtype": weights_dtype or dtype}
    if discontinuity is not None:
        return judge_discontinuous(discontinuity, answer, candidate, **exact)
    return judge(answer, candidate, **exact)


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
    """Judge ``candidate``'s output arrays against ``reference``'s, without the exact answer (module docstring).

    Args:
        reference, candidate: Output arrays, in the same order.
        batch_size: Batch size of the inputs (reported).
        atol, rtol: Give either for the element-wise criterion (the other
            defaults to `~kerasbn.deploy.tolerances.ATOL` / ``RTOL``); leave
            both ``None`` for the noise-calibrated one.
        noise: The reference's float32 noise relative to each output's
            ``max|y|`` (one number for all outputs, or one per output), as
            `kerasbn.deploy.verify.noise` measures it; ``None``: not measured.
        note: Why the exact answer was not used, put before the criterion in ``tolerance``.
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
    measured = [eta for eta in noises if eta is not None]
    worst_noise = max(measured) if measured else None
    if elementwise:
        tolerance = f"|Δ| ≤ {atol:g} + {rtol:g}·|y| element-wise"
    elif worst_noise is None:
        tolerance = f"max|Δ|/max|y| per output ≤ {UNCALIBRATED_FLOOR:g} (float32 noise not measured)"
    else:
        tolerance = (
            f"max|Δ|/max|y| per output ≤ {NOISE_FACTOR:g} × float32 noise {worst_noise:.2g}, "
            f"within [{RELATIVE_FLOOR:g}, {RELATIVE_CEILING:g}]"
        )
    if note:
        tolerance = f"{note}; {tolerance}"
    return VerifyResult(
        passed=passed,
        max_abs_error=max_abs,
        max_rel_error=_ratio(max_abs, max_ref),
        max_abs_reference=max_ref,
        atol=atol,
        rtol=rtol,
        tolerance=tolerance,
        outputs=len(reference),
        batch_size=batch_size,
        allowed=allowed_at_worst,
        margin=margin,
        noise=worst_noise,
    )


def judge(
    reference: ExactReference,
    candidate: Sequence[np.ndarray],
    *,
    dtype: str,
    batch_size: int,
    float64: Sequence[np.ndarray] | None = None,
    weights_dtype: str = "float32",
) -> VerifyResult:
    """Judge ``candidate``'s outputs by the exact answer (module docstring).

    Args:
        reference: The exact answer on the same inputs, with the original's
            own error in ``dtype`` (and ``weights_dtype`` when ``float64`` is given).
        candidate: The candidate's outputs as it computes them, flattened.
        dtype: The float type the candidate computes in (float32 for a float32
            export of a mixed-precision model).
        batch_size: Batch size of the inputs (reported).
        float64: The candidate's outputs evaluated in float64 (a Keras
            candidate's twin), or ``None``.
        weights_dtype: The float type of the candidate's weights, by which its
            float64 evaluation is judged.
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
        rel = [relative_error(y, z) for y, z in zip(truth, outputs)]
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
        passed=passed,
        max_abs_error=max_abs,
        max_rel_error=_ratio(max_abs, max_ref),
        max_abs_reference=max_ref,
        atol=None,
        rtol=None,
        tolerance=tolerance,
        outputs=len(truth),
        batch_size=batch_size,
        allowed=allowed_at_worst,
        margin=margin,
        reference="float64",
        dtype=dtype,
        own_error=own,
        float64_error=max(errors[1], default=0.0) if float64 is not None else None,
    )


def judge_discontinuous(
    found: Discontinuity,
    reference: ExactReference,
    got: Sequence[np.ndarray],
    *,
    dtype: str,
    batch_size: int,
    float64: Sequence[np.ndarray] | None = None,
    weights_dtype: str = "float32",
) -> VerifyResult:
    """The verdict on a discontinuous model: its continuous outputs by `judge`, its folded layers one by one.

    Arguments as for `judge`; ``found`` says which outputs are continuous and
    holds the per-layer checks (module docstring).
    """
    keep = found.keep
    whole = None
    if keep:
        whole = judge(
            reference.subset(keep),
            [got[i] for i in keep],
            dtype=dtype,
            batch_size=batch_size,
            float64=None if float64 is None else [float64[i] for i in keep],
            weights_dtype=weights_dtype,
        )
    parts = [found.why]
    passed = whole is None or whole.passed
    margin = whole.margin if whole is not None else 0.0
    allowed = whole.allowed if whole is not None else None
    layers = found.layers
    if found.failure is not None:
        passed, margin = False, float("inf")
        parts.append(found.failure)
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
        if found.changed:
            passed, margin = False, float("inf")
            parts.append(f"weights changed outside the folds: {', '.join(found.changed[:3])}")
        else:
            parts.append("every other layer holds the original's weights")
    if whole is not None:
        parts.append(f"the {len(keep)} output(s) before the selection {whole.tolerance}")
    return VerifyResult(
        passed=passed,
        max_abs_error=whole.max_abs_error if whole is not None else 0.0,
        max_rel_error=whole.max_rel_error if whole is not None else 0.0,
        max_abs_reference=whole.max_abs_reference if whole is not None else 0.0,
        atol=None,
        rtol=None,
        tolerance="; ".join(parts),
        outputs=len(reference.outputs),
        batch_size=batch_size,
        allowed=allowed,
        margin=margin,
        reference="float64",
        dtype=dtype,
        own_error=whole.own_error if whole is not None else None,
        float64_error=whole.float64_error if whole is not None else None,
        discontinuous=found.why,
        layers=tuple(layers or ()),
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
