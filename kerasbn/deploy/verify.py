"""`kerasbn.verify`: does a rewritten model, or an exported file, compute what the original does?

The orchestration of every check: which inputs (`Checks`), the original's
answers on them, evaluated once (`Reference`: its own outputs, the exact
answer from its float64 twin, or its float32 noise where it has no twin),
the candidate's outputs (a Keras model, `verify`; a file in its runtime,
`check_runtime`), and whether the model's outputs follow a selection
(`discontinuity`). The rule that then passes or fails them is
`kerasbn.deploy.criteria`, explained there once.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kerasbn.deploy import twins
from kerasbn.deploy.budget import CheckBatch, check_batch
from kerasbn.deploy.criteria import Discontinuity, ExactReference, VerifyResult, compare, judge, relative_error, verdict
from kerasbn.deploy.outputs import batch_size_of, keras_outputs, outputs_on_random, random_inputs
from kerasbn.errors import UnsupportedModelError
from kerasbn.model_signature import Signature, signature

# Importable from here as before the rule had its own module.
__all__ = [
    "Checks",
    "ExactReference",
    "Reference",
    "VerifyResult",
    "check_runtime",
    "compare",
    "discontinuity",
    "exact_reference",
    "judge",
    "keras_outputs",
    "noise",
    "random_inputs",
    "verify",
]


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
        atol, rtol: Give either for the element-wise criterion; by default
            the check knows the exact answer (`kerasbn.deploy.criteria`).
        seed: Seed of the random inputs (batch size ``k`` of the list gets ``seed + k``).
            A batch size the model's activations do not allow within the
            check's memory budget is reduced (`kerasbn.deploy.budget`; the
            results say so).
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

    def cases(self, sig: Signature, most: int | None = None) -> list[list[np.ndarray]]:
        """The flat input arrays of every check: the given inputs whole and as one row, else random ones
        (at most ``most`` samples each, one check per distinct batch size)."""
        if self.inputs is not None:
            arrays = sig.flatten(self.inputs)
            return [arrays, [a[:1] for a in arrays]]
        sizes = dict.fromkeys(b if most is None else min(b, most) for b in self.batch_sizes)
        return [sig.random(b, self.seed + k) for k, b in enumerate(sizes)]


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
    truth = twins.evaluate(model, inputs, "float64")
    own_dtype = twins.compute_dtype(model)
    own, computed = {}, {}
    for dtype in dict.fromkeys(dtypes):
        if dtype == own_dtype:
            got = list(outputs) if outputs is not None else keras_outputs(model, inputs)
        else:
            got = twins.evaluate(model, inputs, dtype)
        own[dtype] = [relative_error(y, z) for y, z in zip(truth, got)]
        computed[dtype] = [np.asarray(z) for z in got]
    return ExactReference(outputs=truth, own=own, computed=computed)


@dataclass
class Reference:
    """The original model's answers on the check inputs, evaluated once and judged against many times.

    An export judges every graph it makes (the written file; each graph pass
    when one is to blame) against the same answers: the model's own outputs
    and, for the default check, the exact answer with the model's own
    distance to it in ``dtype`` (`exact_reference`), or, without a float64
    twin, the model's noise between two evaluation orders (`noise`).

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
    discontinuity: Discontinuity | None = field(init=False, default=None)
    batch: CheckBatch | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sig = signature(self.model)
        if self.checks.inputs is None and self.checks.batch_sizes:
            self.batch = check_batch(self.model, max(self.checks.batch_sizes))
        self.cases = self.checks.cases(self.sig, self.batch.batch if self.batch else None)
        if not self.checks.elementwise:
            self.dtype = self.dtype or twins.compute_dtype(self.model)
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
                    self.note = _no_twin(self.model, exc)
            if self.note is not None:
                measured = noise(self.model, structured, outputs)
            self.answers.append(answer)
            self.noises.append(measured)
        if any(a is not None for a in self.answers):
            self.discontinuity = discontinuity(self.model, len(self.expected[0]))

    def judge(self, run: Callable[[list[np.ndarray]], Sequence[np.ndarray]]) -> tuple[VerifyResult, ...]:
        """``run`` (flat input arrays in Keras order → outputs) on every case, each judged once.

        An exported graph has no layers to check one by one: for a
        discontinuous model its outputs before the selection are judged.
        """
        return tuple(
            _noted(
                verdict(
                    expected,
                    [np.asarray(y) for y in run(list(arrays))],
                    batch_size=batch_size_of(arrays),
                    atol=self.checks.atol,
                    rtol=self.checks.rtol,
                    answer=answer,
                    noise=measured,
                    note=self.note,
                    dtype=self.dtype,
                    discontinuity=self.discontinuity,
                ),
                self.batch,
            )
            for arrays, expected, answer, measured in zip(self.cases, self.expected, self.answers, self.noises)
        )


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
    their first row (`Checks.cases`), judged by `Reference.judge`; ``dtype``
    is the float type the file computes in (default: the model's own compute
    dtype; ``"float32"`` for a float32 export of a mixed-precision model).
    """
    checks = Checks(batch_sizes=tuple(batch_sizes), inputs=inputs, atol=atol, rtol=rtol, seed=seed)
    return Reference(model, checks, dtype).judge(run)


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
    """Compare ``candidate``'s inference outputs with ``reference``'s, by the rule of `kerasbn.deploy.criteria`.

    ``candidate`` is judged in its own compute dtype and, evaluated in float64
    too, in its weights' float type; where its outputs follow a selection, its
    folded layers are judged one by one.

    Args:
        reference: The original model.
        candidate: The rewritten model (same input and output structure).
        inputs: Inputs in the structure the models take; random ones from
            `random_inputs` when ``None``.
        batch_size: Batch size of random inputs, reduced (down to 1) where the model's
            activations take more than the check's memory budget (`kerasbn.deploy.budget`;
            the result's ``batch_note`` says so).
        atol: Give it or ``rtol`` for the element-wise criterion
            ``|Δ| ≤ atol + rtol·|y_ref|``; by default ``candidate`` is judged by
            the exact answer (``reference`` evaluated in float64).
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
    chosen = None
    if inputs is None:
        chosen = check_batch(reference, batch_size)
        inputs = random_inputs(reference, chosen.batch, seed)
        ref = outputs_on_random(reference, inputs)
    else:
        ref = keras_outputs(reference, inputs)
    return _noted(_verify(reference, candidate, inputs, ref, atol=atol, rtol=rtol), chosen)


def _noted(result: VerifyResult, chosen: CheckBatch | None) -> VerifyResult:
    """``result`` saying why its batch is smaller than asked, where it is (the reduced batch)."""
    if chosen is None or not chosen.reduced or result.batch_size != chosen.batch:
        return result
    return dataclasses.replace(result, batch_note=str(chosen))


def _verify(
    reference: keras.Model,
    candidate: keras.Model,
    inputs: Any,
    ref: list[np.ndarray],
    *,
    atol: float | None,
    rtol: float | None,
) -> VerifyResult:
    """`verify` once the inputs and the reference's outputs on them are known."""
    got = keras_outputs(candidate, inputs)
    if len(ref) != len(got):
        raise ValueError(f"The reference returns {len(ref)} outputs, the candidate {len(got)}.")
    for y, z in zip(ref, got):
        if y.shape != z.shape:
            raise ValueError(f"Output shapes differ: {y.shape} vs {z.shape}.")
    batch = batch_size_of(inputs)
    if atol is not None or rtol is not None:
        return verdict(ref, got, batch_size=batch, atol=atol, rtol=rtol)
    dtype = twins.compute_dtype(candidate)
    weights = twins.weights_dtype(candidate)
    try:
        answer = exact_reference(reference, inputs, [dtype, weights], ref)
    except UnsupportedModelError as exc:
        return verdict(ref, got, batch_size=batch, noise=noise(reference, inputs, ref), note=_no_twin(reference, exc))
    try:
        float64 = twins.evaluate(candidate, inputs, "float64")
    except UnsupportedModelError:
        # The candidate in its own float type is still judged by the exact answer.
        float64 = None
    found = discontinuity(reference, len(ref))
    if found is not None:
        found = _layer_by_layer(found, reference, candidate, inputs)
    result = verdict(
        ref,
        got,
        batch_size=batch,
        answer=answer,
        dtype=dtype,
        float64=float64,
        weights_dtype=weights,
        discontinuity=found,
    )
    if found is None and float64 is None:
        result = dataclasses.replace(result, tolerance=result.tolerance + " (the candidate has no float64 twin)")
    return result


def _layer_by_layer(found: Discontinuity, original: keras.Model, candidate: keras.Model, inputs: Any) -> Discontinuity:
    """``found`` with ``candidate``'s folded layers judged one by one (`kerasbn.deploy.layerwise`)."""
    from kerasbn.deploy import layerwise

    try:
        layers, changed = layerwise.check(original, candidate, inputs)
    except UnsupportedModelError as exc:
        return dataclasses.replace(found, failure=f"the folded layers cannot be checked one by one: {exc}")
    return dataclasses.replace(found, layers=tuple(layers), changed=tuple(changed))


def _no_twin(model: keras.Model, exc: UnsupportedModelError) -> str:
    return f"no float64 evaluation of '{model.name}': {exc}"


_SELECTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def discontinuity(model: keras.Model, outputs: int) -> Discontinuity | None:
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
    return Discontinuity(why=why, keep=tuple(i for i, f in enumerate(flags) if not f))


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
        out.append(relative_error(y, z))
    return out
