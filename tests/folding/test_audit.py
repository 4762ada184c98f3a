"""kerasbn.audit: each refusal with its reason, redundant biases, the report's forms."""

from __future__ import annotations

import json

import keras
import pytest

import kerasbn

L = keras.layers


def _relu_after(bn_output):
    return L.ReLU(name="after")(bn_output)


def fused_activation():
    x = keras.Input((5,))
    return keras.Model(x, _relu_after(L.BatchNormalization(name="bn")(L.Dense(4, activation="relu", name="p")(x))))


def multiple_consumers():
    x = keras.Input((5,))
    h = L.Dense(4, name="p")(x)
    return keras.Model(x, [_relu_after(L.BatchNormalization(name="bn")(h)), L.ReLU()(h)])


def producer_is_model_output():
    x = keras.Input((5,))
    h = L.Dense(4, name="p")(x)
    return keras.Model(x, [_relu_after(L.BatchNormalization(name="bn")(h)), h])


def shared_layer():
    x = keras.Input((4,))
    dense = L.Dense(4, name="p")
    h = _relu_after(L.BatchNormalization(name="bn")(dense(x)))
    return keras.Model(x, dense(h))


def shared_bn():
    x = keras.Input((4,))
    bn = L.BatchNormalization(name="bn")
    return keras.Model(x, bn(L.ReLU()(bn(L.Dense(4, name="p")(x)))))


def axis_mismatch():
    x = keras.Input((6, 5, 3))
    return keras.Model(x, _relu_after(L.BatchNormalization(axis=1, name="bn")(L.Conv2D(3, 1, name="p")(x))))


def zero_padding():
    x = keras.Input((6, 6, 3))
    return keras.Model(x, L.Conv2D(4, 3, padding="same", name="p")(L.BatchNormalization(name="bn")(x)))


def causal_padding():
    x = keras.Input((6, 3))
    return keras.Model(x, L.Conv1D(4, 2, padding="causal", name="p")(L.BatchNormalization(name="bn")(x)))


def transpose_forward():
    x = keras.Input((4, 4, 3))
    return keras.Model(x, L.Conv2DTranspose(4, 3, name="p")(L.BatchNormalization(name="bn")(x)))


def after_concatenate():
    x = keras.Input((5,))
    h = L.Concatenate(name="concat")([L.Dense(2)(x), L.Dense(3)(x)])
    return keras.Model(x, _relu_after(L.BatchNormalization(name="bn")(h)))


def after_pooling():
    x = keras.Input((6, 6, 3))
    h = L.MaxPooling2D(name="pool")(L.Conv2D(4, 1)(x))
    return keras.Model(x, _relu_after(L.BatchNormalization(name="bn")(h)))


def after_relu():
    x = keras.Input((5,))
    return keras.Model(x, L.ReLU(name="after")(L.BatchNormalization(name="bn")(L.ReLU()(L.Dense(4)(x)))))


def renorm_after_concatenate():
    # A renorm BN is refused for its neighbours, like any BN, never for renorm.
    x = keras.Input((5,))
    h = L.Concatenate(name="concat")([L.Dense(2)(x), L.Dense(3)(x)])
    return keras.Model(x, _relu_after(L.BatchNormalization(renorm=True, name="bn")(h)))


def virtual_batch_fused_activation():
    x = keras.Input((5,))
    bn = kerasbn.BatchNormalization(virtual_batch_size=2, name="bn")
    return keras.Model(x, _relu_after(bn(L.Dense(4, activation="relu", name="p")(x))))


def multi_axis():
    x = keras.Input((3, 5))
    bn = kerasbn.BatchNormalization(axis=[1, 2], name="bn")
    return keras.Model(x, _relu_after(bn(L.Dense(5, name="p")(x))))


def bn_on_input():
    x = keras.Input((5,))
    return keras.Model(x, L.BatchNormalization(name="bn")(x))


def flatten_then_relu():
    x = keras.Input((3, 2))
    return keras.Model(x, L.ReLU()(L.Flatten(name="flat")(L.BatchNormalization(name="bn")(x))))


def flatten_then_shared_dense():
    x = keras.Input((3, 2))
    dense = L.Dense(6, name="p")
    return keras.Model(x, dense(dense(L.Flatten()(L.BatchNormalization(name="bn")(x)))))


REFUSALS = [
    (fused_activation, "fused_activation", "activation 'relu' is fused into 'p'"),
    (multiple_consumers, "multiple_consumers", "feeds 2 consumers"),
    (producer_is_model_output, "multiple_consumers", "one is a model output"),
    (shared_layer, "shared_layer", "shared layer called 2 times"),
    (shared_bn, "shared_bn", "shared BN called 2 times"),
    (axis_mismatch, "axis_mismatch", "BN axis 1 is not the channel axis 3"),
    (zero_padding, "zero_padding", "zero padding ('same')"),
    (causal_padding, "zero_padding", "zero padding ('causal')"),
    (transpose_forward, "zero_padding", "fewer taps at the borders"),
    (after_concatenate, "nonlinear", "'concat' (Concatenate) before it"),
    (after_pooling, "nonlinear", "'pool' (MaxPooling2D) before it"),
    (after_relu, "nonlinear", "'after' (ReLU) after it"),
    (renorm_after_concatenate, "nonlinear", "'concat' (Concatenate) before it"),
    (virtual_batch_fused_activation, "fused_activation", "activation 'relu' is fused into 'p'"),
    (multi_axis, "multi_axis", "several axes [1, 2]"),
    (bn_on_input, "model_input", "reads a model input"),
    (flatten_then_relu, "model_input", "not followed by a single Dense"),
    (flatten_then_shared_dense, "shared_layer", "consumer 'p' (Dense) is a shared layer called 2 times"),
]


@pytest.mark.parametrize("build,code,text", REFUSALS, ids=[r[0].__name__ for r in REFUSALS])
def test_refusal_reason(build, code, text):
    model = build()
    report = kerasbn.audit(model)
    finding = next(f for f in report.batch_norms if f.layer == "bn")
    assert not finding.foldable and finding.direction is None
    assert finding.code == code
    assert text in finding.reason
    assert "\n" not in finding.reason
    # fold agrees with the audit and leaves the BN in place.
    result = kerasbn.fold(model)
    assert [f.layer for f in result.report.not_folded] == [f.layer for f in report.batch_norms if not f.foldable]


def test_refused_bn_stays_in_folded_model():
    model = zero_padding()
    folded = kerasbn.fold(model).model
    assert "bn" in [layer.name for layer in folded.layers]


def test_redundant_biases_and_totals():
    x = keras.Input((8, 8, 3))
    h = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c1")(x))
    h = L.BatchNormalization(name="bn2")(L.Conv2D(5, 3, use_bias=False, name="c2")(L.ReLU()(h)))
    h = L.Dense(6, name="d")(L.GlobalAveragePooling2D()(L.ReLU()(h)))
    y = L.BatchNormalization(name="bn3")(h)
    report = kerasbn.audit(keras.Model(x, y, name="net"))
    assert [(b.layer, b.bn, b.parameters) for b in report.redundant_biases] == [("c1", "bn1", 4), ("d", "bn3", 6)]
    assert report.bn_layers == 3 and report.foldable == 3
    # 4 weights per BN channel; c2 gains a 5-wide bias.
    assert report.parameters_saved == 4 * (4 + 5 + 6) - 5
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["totals"] == {
        "bn_layers": 3,
        "foldable": 3,
        "not_foldable": 0,
        "parameters": report.parameters,
        "parameters_saved": report.parameters_saved,
        "redundant_biases": 2,
        "bias_parameters": 10,
    }
    assert data["batch_norms"][0] == {
        "layer": "bn1",
        "path": "bn1",
        "partner": "c1",
        "direction": "backward",
        "foldable": True,
        "reason": None,
        "code": None,
        "parameters": 16,
        "how": "removed",
    }
    text = str(report)
    assert "bn2" in text and "c2" in text and "3/3 BN layers fold" in text


def test_fold_report_forms():
    result = kerasbn.fold(after_concatenate())
    data = result.report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["totals"]["folded"] == 0 and data["totals"]["not_folded"] == 1
    assert "Concatenate" in str(result.report)


def test_fold_engine_page_lists_every_reason_code():
    import re
    from pathlib import Path

    from kerasbn.folding.plan import Reason

    page = (Path(__file__).resolve().parents[2] / "docs" / "fold-engine.md").read_text()
    section = page.split("\n## When a BN stays\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert sorted(documented) == sorted(r.value for r in Reason)
    assert len(documented) == len(set(documented))
