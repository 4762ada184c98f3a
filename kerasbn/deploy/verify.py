"""`kerasbn.verify`: do two models compute the same outputs?

The one comparison of the package: a rewritten Keras model, a reloaded file
and an exported ONNX graph are all judged by `compare` with the same
defaults (`kerasbn.deploy.tolerances`), and reported as a `VerifyResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from kerasbn.deploy.tolerances import ATOL, RTOL
from kerasbn.folding.graph import check_model


@dataclass(frozen=True)
class VerifyResult:
    """The comparison of a candidate's outputs with a reference's.

    Attributes:
        passed: Every output element satisfies ``|Δ| ≤ atol + rtol·|y_ref|``.
        max_abs_error: ``max |Δ|`` over all outputs.
        max_rel_error: ``max |Δ| / max |y_ref|`` (scale-relative, 0 when both are 0).
        max_abs_reference: ``max |y_ref|``.
        atol: Absolute tolerance used.
        rtol: Relative tolerance used.
        tolerance: The criterion in words.
        outputs: Number of output tensors compared.
        batch_size: Batch size of the inputs.
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    max_abs_reference: float
    atol: float
    rtol: float
    tolerance: str
    outputs: int
    batch_size: int

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return asdict(self)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verify {verdict}: max|Δ| = {self.max_abs_error:.3g}, max|Δ|/max|y| = {self.max_rel_error:.3g} "
            f"over {self.outputs} output(s), batch {self.batch_size} ({self.tolerance})"
        )


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    batch_size: int,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> VerifyResult:
    """Judge ``candidate``'s output arrays against ``reference``'s (same order).

    A NaN in either output is an infinite error, never a pass; a shape or
    count mismatch fails with an infinite error.
    """
    max_abs = max_ref = 0.0
    passed = len(reference) == len(candidate)
    if not passed:
        max_abs = float("inf")
    for y, z in zip(reference, candidate):
        y = np.asarray(y, np.float64)
        z = np.asarray(z, np.float64)
        if y.shape != z.shape:
            passed, max_abs = False, float("inf")
            continue
        if not y.size:
            continue
        diff = np.nan_to_num(np.abs(z - y), nan=np.inf)
        passed = passed and bool(np.all(diff <= atol + rtol * np.abs(y)))
        max_abs = max(max_abs, float(np.max(diff)))
        max_ref = max(max_ref, float(np.max(np.abs(y))))
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    tolerance = f"|Δ| ≤ {atol:g} + {rtol:g}·|y| element-wise"
    return VerifyResult(passed, max_abs, rel, max_ref, atol, rtol, tolerance, len(reference), batch_size)


def random_inputs(model: keras.Model, batch_size: int = 8, seed: int = 0) -> Any:
    """Random inputs shaped like ``model``'s (unknown dims: ``batch_size`` for the batch, 8 elsewhere).

    Floating inputs are standard normal; integer inputs are 0 or 1 (valid
    indices for any embedding).
    """
    fn = check_model(model)
    rng = np.random.default_rng(seed)
    arrays = []
    for kt in fn.inputs:
        shape = [batch_size if d is None and i == 0 else (8 if d is None else d) for i, d in enumerate(kt.shape)]
        dtype = np.dtype(keras.backend.standardize_dtype(kt.dtype))
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
    return keras.tree.pack_sequence_as(fn._inputs_struct, arrays)


def keras_outputs(model: keras.Model, inputs: Any) -> list[np.ndarray]:
    """``model``'s inference outputs, flattened, as float64 arrays."""
    # The compiled predict path, not an eager call: on TensorFlow's CPU
    # kernels an eager channels_first Conv1D/Conv2D adds its bias along the
    # wrong axis when the channel count equals the width.
    outputs = model.predict_on_batch(inputs)
    return [np.asarray(y, np.float64) for y in keras.tree.flatten(outputs)]


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of the first input array."""
    return int(keras.tree.flatten(inputs)[0].shape[0])


def verify(
    reference: keras.Model,
    candidate: keras.Model,
    inputs: Any = None,
    *,
    batch_size: int = 8,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
) -> VerifyResult:
    """Compare ``candidate``'s inference outputs with ``reference``'s.

    Args:
        reference: The original model.
        candidate: The rewritten model (same input and output structure).
        inputs: Inputs in the structure the models take; random ones from
            `random_inputs` when ``None``.
        batch_size: Batch size of random inputs.
        atol, rtol: Element-wise tolerance ``|Δ| ≤ atol + rtol·|y_ref|``.
        seed: Seed of random inputs.

    Returns:
        A `VerifyResult` (it does not raise when the outputs differ).

    Raises:
        kerasbn.errors.UnsupportedModelError: ``reference`` has no functional
            graph and no ``inputs`` were given.
        ValueError: The two models return different numbers or shapes of outputs.

    Example:

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
    return compare(ref, got, batch_size=batch_size_of(inputs), atol=atol, rtol=rtol)
