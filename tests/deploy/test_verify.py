"""kerasbn.verify: random inputs for any input structure, tolerance verdicts."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy import twins
from kerasbn.deploy import verify as verify_module
from kerasbn.deploy.tolerances import EXACT_FACTOR, RELATIVE_CEILING, ROUNDING_FLOOR, ROUNDOFF
from kerasbn.deploy.verify import compare, random_inputs
from kerasbn.errors import UnsupportedModelError
from tests.helpers import randomize_biases, randomize_bn

L = keras.layers


def _two_in_two_out(scale=1.0):
    a = keras.Input((3,), name="a")
    b = keras.Input((2, 4), name="b")
    ya = L.Dense(2, name="ya", kernel_initializer="ones")(a)
    yb = L.Rescaling(scale, name="yb")(b)
    return keras.Model({"a": a, "b": b}, [ya, yb])


def test_identical_models_pass_with_random_inputs():
    model = _two_in_two_out()
    result = kerasbn.verify(model, model, batch_size=3)
    assert result.passed and result.outputs == 2 and result.batch_size == 3
    # Judged against the float64 evaluation, the model is exactly as far from it as itself.
    assert result.reference == "float64" and result.float64_error == 0
    assert 0 < result.max_rel_error <= result.own_error
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    assert "passed" in str(result)


def test_difference_is_measured_and_fails():
    result = kerasbn.verify(_two_in_two_out(), _two_in_two_out(1.01), seed=3)
    assert not result.passed
    assert 0 < result.max_rel_error < 0.02
    assert result.max_abs_error == result.max_rel_error * result.max_abs_reference


def test_given_inputs_and_tolerance():
    model = _two_in_two_out()
    inputs = {"a": np.ones((2, 3), "float32"), "b": np.ones((2, 2, 4), "float32")}
    assert kerasbn.verify(model, _two_in_two_out(1.001), inputs, rtol=1e-2).passed


def test_random_inputs_follow_dtypes_and_structure():
    x = keras.Input((None,), dtype="int32", name="ids")
    y = keras.Input((2,), name="y")
    model = keras.Model([x, y], L.Add()([L.Embedding(2, 2)(x)[:, 0], y]))
    ids, values = random_inputs(model, batch_size=5)
    assert ids.shape == (5, 8) and ids.dtype == np.int32 and set(np.unique(ids)) <= {0, 1}
    assert values.shape == (5, 2) and values.dtype == np.float32


def test_nan_output_fails():
    x = keras.Input((2,))
    model = keras.Model(x, L.Rescaling(1.0)(x))
    nan_model = keras.Model(x, L.Rescaling(float("nan"))(x))
    result = kerasbn.verify(model, nan_model)
    assert not result.passed and result.max_abs_error == float("inf")


def test_channels_first_conv_with_channels_equal_to_width():
    # Eager TF CPU kernels add this bias along the wrong axis; verify uses the
    # compiled path, so a correct fold passes.
    x = keras.Input((3, 6, 6))
    y = L.BatchNormalization(axis=1)(L.Conv2D(4, 3, data_format="channels_first")(x))
    model = randomize_bn(keras.Model(x, y))
    result = kerasbn.verify(model, kerasbn.fold(model).model)
    assert result.passed and result.max_rel_error < 1e-5


# The default check: against the model evaluated in float64.

DELTA = 1e-3  # a "slight" corruption: 0.1 % per channel
POLICIES = ["float32", "mixed_float16", "mixed_bfloat16"]
BN_CLASSES = {"keras": L.BatchNormalization, "kerasbn": kerasbn.BatchNormalization}


def _conv_chain(blocks: int, policy: str = "float32", bn: type = L.BatchNormalization) -> keras.Model:
    """``blocks`` × (Conv 3×3 → BN → ReLU) with residual sums: deep enough to amplify rounding."""
    keras.utils.set_random_seed(blocks)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        x = keras.Input((12, 12, 8))
        h = x
        for i in range(blocks):
            y = L.ReLU()(bn(name=f"bn{i}")(L.Conv2D(8, 3, padding="same", name=f"conv{i}")(h)))
            h = L.Add()([h, y]) if i % 2 else y
        model = keras.Model(x, L.Dense(5, name="head")(L.GlobalAveragePooling2D()(h)))
    finally:
        keras.config.set_dtype_policy(previous)
    return randomize_biases(randomize_bn(model, seed=blocks))


def _corrupt(model: keras.Model, layer: str, what: str) -> keras.Model:
    """A copy of ``model`` with one folded weight off by DELTA: kernel along the wrong (input) axis, or bias."""
    bad = keras.models.clone_model(model)
    bad.set_weights(model.get_weights())
    target = bad.get_layer(layer)
    rng = np.random.default_rng(7)
    if what == "wrong_axis":
        k = np.asarray(target.kernel)
        target.kernel.assign(k * (1 + DELTA * rng.uniform(-1, 1, (k.shape[-2], 1))))
    elif what == "wrong_scale":
        target.kernel.assign(np.asarray(target.kernel) * (1 + DELTA))
    else:
        b = np.asarray(target.bias)
        target.bias.assign(b * (1 + DELTA))
    return bad


# Depth and BN class together: a deep fold's rounding is the same whichever class was folded, so make test
# keeps both classes shallow and kerasbn's deep; Keras's deep folds run in test-large.
DEPTHS = [
    pytest.param(2, "keras", id="small-keras"),
    pytest.param(2, "kerasbn", id="small-kerasbn"),
    pytest.param(24, "keras", marks=[pytest.mark.slow, pytest.mark.large], id="deep-keras"),
    pytest.param(24, "kerasbn", marks=pytest.mark.slow, id="deep-kerasbn"),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("blocks,bn", DEPTHS)
def test_default_check_accepts_the_fold_and_rejects_a_slightly_wrong_one(blocks, bn, policy):
    model = _conv_chain(blocks, policy, BN_CLASSES[bn])
    folded = kerasbn.fold(model).model
    assert {layer.dtype_policy.name for layer in folded.layers[1:]} == {policy}
    good = kerasbn.verify(model, folded, seed=1)
    assert good.passed and good.margin <= 1 and good.reference == "float64"
    dtype = twins.compute_dtype(model)
    assert good.dtype == dtype and good.own_error > 0 and good.float64_error is not None
    assert good.allowed >= ROUNDING_FLOOR * ROUNDOFF["float32"] and "margin" in str(good)
    for what in ("wrong_axis", "wrong_scale", "wrong_bias"):
        bad = kerasbn.verify(model, _corrupt(folded, f"conv{blocks // 2}", what), seed=1)
        assert not bad.passed and bad.margin > 1, what


def _dense_bn_dense(policy: str, bn: type) -> keras.Model:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        x = keras.Input((6,))
        h = bn(epsilon=1e-2, name="bn")(L.Dense(5, name="d1")(x))
        model = keras.Model(x, L.Activation("linear", dtype="float32")(L.Dense(3, name="d2")(L.ReLU()(h))))
    finally:
        keras.config.set_dtype_policy(previous)
    return randomize_biases(randomize_bn(model))


def _numpy_forward(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """The model's inference in float64 NumPy: Dense → BN (Ioffe & Szegedy, moving statistics) → ReLU → Dense."""
    w = {layer.name: {v.name: np.asarray(v.numpy(), np.float64) for v in layer.weights} for layer in model.layers}
    h = x @ w["d1"]["kernel"] + w["d1"]["bias"]
    bn = w["bn"]
    eps = model.get_layer("bn").epsilon
    h = bn["gamma"] * (h - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + eps) + bn["beta"]
    return np.maximum(h, 0) @ w["d2"]["kernel"] + w["d2"]["bias"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bn", BN_CLASSES, ids=list(BN_CLASSES))
def test_twin_computes_in_float64_and_equals_numpy(bn, policy):
    model = _dense_bn_dense(policy, BN_CLASSES[bn])
    twin = twins.twin(model)
    assert {v.dtype for v in twin.weights} == {"float64"}
    assert {layer.compute_dtype for layer in twin.layers} == {"float64"}
    assert keras.config.dtype_policy().name == "float32"
    x = np.random.default_rng(3).standard_normal((16, 6))
    (got,) = twins.evaluate(model, x)
    assert twin.predict_on_batch(x).dtype == np.float64
    ref = _numpy_forward(model, x)
    # Two dot products of ≤ 6 terms and the BN's few operations, each within
    # u = 2^-53 of its result: 32 u of the largest intermediate bounds them.
    scale = np.max(np.abs(x)) * 8 + 8
    assert np.max(np.abs(got - ref)) <= 32 * ROUNDOFF["float64"] * scale * np.max(np.abs(ref))
    # The original computes in its own policy, not the twin's.
    assert model.get_layer("d1").compute_dtype == twins.compute_dtype(model)


def test_twin_follows_new_weights_and_is_cached():
    model = _dense_bn_dense("float32", L.BatchNormalization)
    twin = twins.twin(model)
    model.get_layer("d2").bias.assign(np.full((3,), 5.0, "float32"))
    assert twins.twin(model) is twin
    x = np.random.default_rng(4).standard_normal((4, 6))
    np.testing.assert_allclose(twins.evaluate(model, x)[0], _numpy_forward(model, x), rtol=0, atol=1e-12 * 8)


@keras.saving.register_keras_serializable(package="kbn_test_verify")
class _Unrebuildable(L.Layer):
    """``factor`` is no config value (an object), so Keras cannot write a config for it."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * 2.0


def test_without_a_float64_twin_the_noise_check_applies_and_says_why():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x = keras.Input((5,))
        model = randomize_bn(keras.Model(x, _Unrebuildable(object())(L.BatchNormalization()(L.Dense(4)(x)))))
        with pytest.raises(UnsupportedModelError, match="cannot be"):
            twins.twin(model)
        # The global policy is restored after the failure.
        assert keras.config.dtype_policy().name == "mixed_float16"
    finally:
        keras.config.set_dtype_policy(previous)
    result = kerasbn.verify(model, model)
    assert result.reference == "model" and result.own_error is None
    assert "no float64 evaluation" in result.tolerance and "cannot be" in result.tolerance


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_check_runtime_judges_a_float32_file_of_a_mixed_model(policy):
    model = _conv_chain(2, policy)

    def float32_file(arrays):
        return twins.evaluate(model, arrays[0], "float32")

    def wrong_file(arrays):
        return [y * (1 + DELTA) for y in float32_file(arrays)]

    (good, good_1) = verify_module.check_runtime(model, float32_file, [4, 1], dtype="float32")
    assert good.passed and good_1.passed and good.dtype == "float32" and good.reference == "float64"
    # In float32 a 0.1 % error is far beyond the model's own float32 error...
    assert not verify_module.check_runtime(model, wrong_file, [4], dtype="float32")[0].passed
    # ...which its own half-precision error would hide.
    assert verify_module.check_runtime(model, wrong_file, [4])[0].passed


def test_judge_by_the_exact_answer_scales_with_the_original_error():
    truth = [np.array([1.0, -2.0, 4.0])]
    reference = verify_module.ExactReference(truth, {"float16": [1e-3], "float32": [1e-7]})
    near = [truth[0] * (1 + 3e-3)]
    result = verify_module.judge(reference, near, dtype="float16", batch_size=1)
    # EXACT_FACTOR × 1e-3 + ROUNDING_FLOOR u(float16): a 0.3 % error is within the original's own float16 error.
    assert result.passed and result.allowed == pytest.approx(EXACT_FACTOR * 1e-3 + ROUNDING_FLOOR * 2.0**-11)
    assert result.margin == pytest.approx(3e-3 / result.allowed)
    # The same candidate evaluated in float64 must be as close as float32 weights allow.
    assert not verify_module.judge(reference, near, dtype="float16", batch_size=1, float64=near).passed
    # An original whose own error lets anything pass cannot judge anything.
    hopeless = verify_module.ExactReference(truth, {"float32": [0.3]})
    result = verify_module.judge(hopeless, truth, dtype="float32", batch_size=1)
    assert not result.passed and result.margin == float("inf") and "cannot judge" in result.tolerance
    # ...but for the original's very answer (a reloaded file), bit for bit; one ulp off is judged again.
    answer = [truth[0] * 1.3]
    own = verify_module.ExactReference(truth, {"float32": [0.3]}, {"float32": answer})
    assert own.reproduces(answer, "float32")
    same = verify_module.judge(own, answer, dtype="float32", batch_size=1)
    assert same.passed and same.margin <= 1 and "bit for bit" in same.tolerance
    off = [np.nextafter(answer[0], np.inf)]
    assert not verify_module.judge(own, off, dtype="float32", batch_size=1).passed


def test_noise_is_measured_relative_to_each_output():
    model = _conv_chain(6)
    inputs = random_inputs(model, 4, seed=2)
    (eta,) = verify_module.noise(model, inputs)
    # Another valid evaluation order moves the outputs by a few float32 ulps of their scale at most.
    assert 0 <= eta < 1e-4


def test_scale_aware_check_ignores_near_zero_elements_that_element_wise_trips_on():
    y = np.array([[1000.0, 1e-9, -3.0]])
    z = y + np.array([[1e-3, 1e-6, 1e-6]])
    default = compare([y], [z], batch_size=1)
    assert default.passed and default.max_rel_error == pytest.approx(1e-6) and default.atol is None
    assert not compare([y], [z], batch_size=1, atol=1e-9, rtol=1e-9).passed
    # Each output is judged against its own scale.
    assert not compare([y, np.array([1.0])], [y, np.array([1.001])], batch_size=1).passed


def test_noise_widens_the_allowance():
    y, z = np.array([1.0, 2.0]), np.array([1.0, 2.0002])
    assert not compare([y], [z], batch_size=2).passed
    assert not compare([y], [z], batch_size=2, noise=[0.0]).passed
    result = compare([y], [z], batch_size=2, noise=[5e-5])
    assert result.passed and result.allowed == pytest.approx(2e-4) and result.noise == 5e-5
    assert result.margin == pytest.approx(1e-4 / 2e-4)


def test_a_model_too_noisy_to_check_fails():
    y, z = np.array([1.0, 2.0]), np.array([1.0, 2.2])
    result = compare([y], [z], batch_size=2, noise=[0.5])
    assert not result.passed and result.allowed == RELATIVE_CEILING


# Discontinuous models: a top-k or arg-max after the network; each folded layer is judged on its own inputs.

SELECTIONS = {"argmax": lambda y: keras.ops.argmax(y, -1), "top_k": lambda y: keras.ops.top_k(y, 2)[1]}


def _selecting(policy: str, selection: str) -> keras.Model:
    """Conv → BN → ReLU → pooling → BN → Dense: the logits, and the classes a selection picks from them."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        x = keras.Input((8, 8, 3))
        h = L.ReLU()(L.BatchNormalization(name="bn0")(L.Conv2D(6, 3, name="conv")(x)))
        logits = L.Dense(5, name="head")(L.BatchNormalization(name="bn1")(L.GlobalAveragePooling2D()(h)))
        model = keras.Model(x, {"logits": logits, "picked": SELECTIONS[selection](logits)})
    finally:
        keras.config.set_dtype_policy(previous)
    return randomize_biases(randomize_bn(model))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_a_discontinuous_model_is_judged_layer_by_layer(selection, policy):
    model = _selecting(policy, selection)
    folded = kerasbn.fold(model).model
    good = kerasbn.verify(model, folded, seed=2)
    op = {"argmax": "ArgMax", "top_k": "TopKV2"}[selection]
    assert good.passed and good.discontinuous is not None and op in good.discontinuous
    assert "not applicable" in good.tolerance and "1 of 2 outputs" in good.discontinuous
    # Both folds checked on their own inputs, each against itself in float64 by the whole-model rule.
    assert {c.layer for c in good.layers} == {"conv", "head"} and all(c.passed for c in good.layers)
    assert all(c.margin <= 1 and c.float64_error is not None and c.error > 0 for c in good.layers)
    assert all(c.dtype == twins.compute_dtype(model) for c in good.layers)
    assert json.loads(json.dumps(good.to_dict())) == good.to_dict()
    for layer in ("conv", "head"):
        for what in ("wrong_axis", "wrong_scale", "wrong_bias"):
            bad = kerasbn.verify(model, _corrupt(folded, layer, what), seed=2)
            failed = [c.layer for c in bad.layers if not c.passed]
            assert not bad.passed and bad.margin > 1 and failed == [layer], (layer, what)


def test_a_discontinuous_model_fails_where_a_layer_outside_the_folds_changed():
    x = keras.Input((8, 8, 3))
    h = L.ReLU()(L.BatchNormalization(name="bn0")(L.Conv2D(6, 3, name="conv")(x)))
    h = L.Dense(4, name="extra")(L.GlobalAveragePooling2D()(h))
    model = randomize_bn(keras.Model(x, {"h": h, "picked": keras.ops.argmax(h, -1)}))
    folded = kerasbn.fold(model).model
    assert kerasbn.verify(model, folded).passed
    extra = folded.get_layer("extra")
    extra.bias.assign(np.asarray(extra.bias) + 1e-6)
    bad = kerasbn.verify(model, folded)
    assert not bad.passed and "weights changed outside the folds: extra" in bad.tolerance


def test_an_exported_graph_of_a_discontinuous_model_is_judged_by_its_outputs_before_the_selection():
    model = _selecting("float32", "top_k")
    sig = kerasbn.signature(model)
    order = sorted(["logits", "picked"])  # keras.tree.flatten's order of a dict

    def run(arrays, shift=0.0, permute=False):
        out = model.predict_on_batch(sig.pack(arrays))
        logits = np.asarray(out["logits"]) * (1 + shift)
        picked = np.asarray(out["picked"])[:, ::-1] if permute else np.asarray(out["picked"])
        return [logits if k == "logits" else picked for k in order]

    (same,) = verify_module.check_runtime(model, run, [4])
    assert same.passed and same.discontinuous is not None and not same.layers
    # Another selection (a rounding error can reorder near-ties) is no failure; the continuous outputs are judged.
    (reordered,) = verify_module.check_runtime(model, lambda a: run(a, permute=True), [4])
    assert reordered.passed
    (wrong,) = verify_module.check_runtime(model, lambda a: run(a, shift=DELTA), [4])
    assert not wrong.passed and wrong.margin > 1
