"""Acceptance on keras.applications (weights=None, randomized BN statistics, batch 8)."""

from __future__ import annotations

from collections import Counter

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import assert_same_outputs, randomize_bn

# (constructor, smallest input size the architecture accepts, BN folded, BN total)
ZOO = {
    "ResNet50": (keras.applications.ResNet50, 32, 53, 53),
    "MobileNetV2": (keras.applications.MobileNetV2, 32, 52, 52),
    "EfficientNetB0": (keras.applications.EfficientNetB0, 32, 49, 49),
    "Xception": (keras.applications.Xception, 71, 40, 40),
    "InceptionV3": (keras.applications.InceptionV3, 75, 94, 94),
    "MobileNetV3Small": (keras.applications.MobileNetV3Small, 32, 34, 34),
    "DenseNet121": (keras.applications.DenseNet121, 32, 59, 121),
}


def _build(name):
    make, size, _, _ = ZOO[name]
    model = randomize_bn(make(weights=None, input_shape=(size, size, 3)))
    images = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype("float32")
    return model, images


# Xception and InceptionV3 fold as plainly as ResNet50 (every BN after its convolution), and MobileNetV2 is the
# user-path matrix's keras.applications model (tests/paths): test-large.
@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.large) if n in ("Xception", "InceptionV3", "MobileNetV2") else n for n in ZOO],
)
def test_zoo_fold(name, tmp_path):
    model, images = _build(name)
    _, _, folded_count, total = ZOO[name]
    result = kerasbn.fold(model)
    report = result.report
    assert (len(report.folded), len(report.folded) + len(report.not_folded)) == (folded_count, total)
    assert_same_outputs(model, result.model, images)
    input_layers = [t._keras_history.operation.name for t in model.inputs]
    assert [t._keras_history.operation.name for t in result.model.inputs] == input_layers
    assert [t.name for t in result.model.inputs] == [t.name for t in model.inputs]
    assert result.model.output_names == model.output_names
    if name == "DenseNet121":
        # The rest follow a Concatenate, a transition's average pooling or the
        # stem's max pooling, and feed a ReLU.
        assert Counter(f.code for f in report.not_folded) == {"nonlinear": 62}
        reasons = Counter(f.reason.split(" before it")[0].split("(")[-1] for f in report.not_folded)
        assert reasons == {"Concatenate)": 58, "AveragePooling2D)": 3, "MaxPooling2D)": 1}
    if name in ("ResNet50", "MobileNetV3Small"):
        path = tmp_path / f"{name}.keras"
        result.model.save(path)
        assert_same_outputs(model, keras.saving.load_model(path), images)


@pytest.mark.slow
def test_zoo_strip_redundant_biases_resnet50():
    model, images = _build("ResNet50")
    assert len(kerasbn.audit(model).redundant_biases) == 53
    stripped = kerasbn.strip_redundant_biases(model).model
    removed = sum(
        1 for old, new in zip(model.layers, stripped.layers) if getattr(old, "use_bias", False) and not new.use_bias
    )
    assert removed == 53
    assert_same_outputs(model, stripped, images)
    stripped.compile(optimizer="sgd", loss="categorical_crossentropy")
    labels = keras.utils.to_categorical(np.arange(2) % 1000, 1000)
    loss = stripped.train_on_batch(images[:2], labels)
    assert np.isfinite(loss)
