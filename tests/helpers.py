"""Shared helpers for the fold-engine tests: non-trivial BN statistics and the fold tolerance."""

from __future__ import annotations

import keras
import numpy as np

from kerasbn.deploy import twins
from kerasbn.deploy.target import targets
from kerasbn.deploy.tolerances import EXACT_FACTOR, ROUNDING_FLOOR
from kerasbn.deploy.verify import keras_outputs, random_inputs
from kerasbn.folding import plan
from kerasbn.model_signature import signature

FOLD_RTOL = 1e-5  # max|Δ| ≤ 1e-5·max|y|, the peers' float32 fold tolerance


def randomize_bn(model: keras.Model, seed: int = 0) -> keras.Model:
    """Give every BN (nested ones too) statistics far from the identity, in place.

    γ ~ U(0.5, 1.5), β ~ N(0, 0.2), μ ~ N(0, 0.5), var ~ U(0.5, 2).
    """
    rng = np.random.default_rng(seed)
    draw = {
        "gamma": lambda shape: rng.uniform(0.5, 1.5, shape),
        "beta": lambda shape: rng.normal(0.0, 0.2, shape),
        "moving_mean": lambda shape: rng.normal(0.0, 0.5, shape),
        "moving_variance": lambda shape: rng.uniform(0.5, 2.0, shape),
    }
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if plan.is_bn(layer):
            for w in layer.weights:
                if w.name in draw:
                    w.assign(draw[w.name](tuple(w.shape)).astype(w.dtype))
    return model


def randomize_biases(model: keras.Model, seed: int = 1) -> keras.Model:
    """Give every bias a non-zero value, in place, so that bias handling is tested."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for w in layer.weights:
            if w.name == "bias":
                w.assign(rng.normal(0.0, 0.3, tuple(w.shape)).astype(w.dtype))
    return model


def outputs(model: keras.Model, inputs) -> list[np.ndarray]:
    """Inference outputs as float64 arrays, through Keras's compiled predict path.

    Not an eager call: without oneDNN (CPUs without AVX-512) TensorFlow has no
    eager channels_first convolution on CPU, and with it an eager
    channels_first Conv adds its bias along the wrong axis when channels == width.
    """
    return keras_outputs(model, inputs)


def assert_same_outputs(reference: keras.Model, candidate: keras.Model, inputs=None, batch_size: int = 4) -> float:
    """Assert ``max|Δ| ≤ 1e-5·max|y|`` over all outputs; returns the relative error."""
    if inputs is None:
        inputs = random_inputs(reference, batch_size, seed=0)
    ref = outputs(reference, inputs)
    got = outputs(candidate, inputs)
    assert len(ref) == len(got)
    worst = 0.0
    for y, z in zip(ref, got):
        assert y.shape == z.shape
        scale = max(float(np.max(np.abs(y))), 1e-30)
        err = float(np.max(np.abs(z - y))) / scale
        worst = max(worst, err)
    assert worst <= FOLD_RTOL, f"max|Δ|/max|y| = {worst:.3g} > {FOLD_RTOL:g}"
    return worst


def count_bn(model: keras.Model) -> int:
    """BN layers anywhere in ``model``."""
    return sum(plan.is_bn(layer) for layer in model._flatten_layers(include_self=False, recursive=True))


# The original model evaluated in float64 as the reference, and the bound a candidate computing in a float
# type must meet: 4× the original's own error in that type plus 8 unit roundoffs (relative to max|y|).
ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def relative_error(y: list[np.ndarray], z: list[np.ndarray]) -> float:
    """max over outputs of max|y − z| / max|y|."""
    assert [a.shape for a in y] == [b.shape for b in z]
    return max(float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), 1e-30) for a, b in zip(y, z))


def assert_matches_original(original: keras.Model, candidate: list[np.ndarray], x, dtype: str) -> float:
    """``candidate`` (outputs on ``x`` of something computing in ``dtype``) against ``original`` in float64."""
    exact64 = twins.evaluate(original, x, "float64")
    own = relative_error(exact64, twins.evaluate(original, x, dtype) if dtype != "float64" else exact64)
    err = relative_error(exact64, candidate)
    # The verification rule's numbers: another runtime's kernels (ONNX Runtime's MLAS, LiteRT's XNNPACK) block
    # their reductions otherwise, which on a shallow network is a few u past the original's own error (a 900-position
    # average pool in ONNX Runtime: 1.3e-6 = 22 u against TensorFlow's 1.2e-7, at one random test order).
    bound = EXACT_FACTOR * own + ROUNDING_FLOOR * ROUNDOFF[dtype]
    assert err <= bound, f"max|Δ|/max|y64| = {err:.3g} > {bound:.3g} (the original's own error in {dtype}: {own:.3g})"
    return err


def file_outputs(path, fmt: str, model: keras.Model, x) -> list[np.ndarray]:
    """The written file of format ``fmt`` run in its own runtime on ``x`` (``model``'s input structure), in float64."""
    sig = signature(model)
    return [np.asarray(y, np.float64) for y in targets()[fmt].runner(path, sig)(sig.flatten(x))]
