"""The model kinds of the user-path matrix: tiny builders, trained, saved as a user saves them.

Importable on any backend: ``python -m tests.paths.models FOLDER KIND POLICY...``
builds, fits (one step) and saves each model under the backend of the
process (``KERAS_BACKEND=jax`` for the JAX-saved files of the matrix).
Every model has non-trivial BN statistics (seeded) and a few hundred to a
few thousand parameters, so one command runs in about a second.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

L = keras.layers
IMAGE = (8, 8, 3)


@keras.saving.register_keras_serializable(package="kerasbn_paths")
class ConvNet(keras.Model):
    """A registered subclassed model, known by the input it was first called with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 3, use_bias=False)
        self.bn = L.BatchNormalization()
        self.pool = L.GlobalAveragePooling2D()
        self.dense = L.Dense(3)

    def call(self, x, training=False):
        return self.dense(self.pool(keras.activations.relu(self.bn(self.conv(x), training=training))))


def _layers() -> list[L.Layer]:
    return [
        L.Conv2D(4, 3, name="conv"),
        L.BatchNormalization(name="bn_conv"),
        L.ReLU(name="relu"),
        L.Flatten(name="flatten"),
        L.Dense(3, name="dense"),
        L.BatchNormalization(name="bn_dense"),
    ]


def sequential_input() -> keras.Model:
    return keras.Sequential([keras.Input(IMAGE), *_layers()], name="sequential_input")


def sequential_fit() -> keras.Model:
    """No keras.Input: the model is built by its first `fit` (in `build`)."""
    return keras.Sequential(_layers(), name="sequential_fit")


def functional() -> keras.Model:
    x = keras.Input(IMAGE, name="image")
    y = x
    for layer in _layers():
        y = layer(y)
    return keras.Model(x, y, name="functional")


def nested() -> keras.Model:
    inner = keras.Sequential(
        [keras.Input(IMAGE), L.Conv2D(4, 3, use_bias=False), L.BatchNormalization(), L.ReLU()], name="inner"
    )
    x = keras.Input(IMAGE, name="image")
    y = L.Dense(3)(L.Flatten()(inner(x)))
    return keras.Model(x, L.BatchNormalization()(y), name="nested")


def dict_io() -> keras.Model:
    image = keras.Input(IMAGE, name="image")
    meta = keras.Input((5,), name="meta")
    a = L.Flatten()(L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3)(image))))
    b = L.BatchNormalization()(L.Dense(4)(meta))
    merged = L.Concatenate()([a, b])
    return keras.Model(
        {"image": image, "meta": meta},
        {"score": L.Dense(3, name="score")(merged), "embedding": L.Dense(2, name="embedding")(b)},
        name="dict_io",
    )


def subclassed() -> keras.Model:
    return ConvNet(name="subclassed")


def application() -> keras.Model:
    """keras.applications' MobileNetV2 at its smallest (alpha 0.35, 32×32), random weights."""
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4, classifier_activation=None
    )


def keras_hub(activation: str = "leaky_relu") -> keras.Model:
    """A keras-hub CSPNet backbone from config (its own test config, narrower), 16×16."""
    import keras_hub

    return keras_hub.models.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_strides=2,
        stackwise_depth=[1, 1],
        stackwise_num_filters=[8, 16],
        image_shape=(16, 16, 3),
        down_growth=True,
        bottle_ratio=(0.5, 1.0),
        block_ratio=(1.0, 0.5),
        expand_ratio=(2.0, 1.0),
        block_type="dark_block",
        stage_type="csp",
        stem_padding="same",
        activation=activation,
    )


BUILDERS: dict[str, Callable[[], keras.Model]] = {
    "sequential_input": sequential_input,
    "sequential_fit": sequential_fit,
    "functional": functional,
    "nested": nested,
    "dict_io": dict_io,
    "subclassed": subclassed,
    "application": application,
    "keras_hub": keras_hub,
}
KINDS = tuple(BUILDERS)
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def input_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Each input's name and shape without the batch axis."""
    if kind == "dict_io":
        return {"image": IMAGE, "meta": (5,)}
    return {"image": {"application": (32, 32, 3), "keras_hub": (16, 16, 3)}.get(kind, IMAGE)}


def data(kind: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal rows for every input, by input name."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((rows, *shape)).astype("float32") for name, shape in input_shapes(kind).items()}


def as_model_input(kind: str, arrays: dict[str, np.ndarray]):
    """The arrays in the structure the model takes."""
    return arrays if kind == "dict_io" else arrays["image"]


def _targets(model: keras.Model, x) -> object:
    outputs = model(x) if not isinstance(model, keras.Sequential) or model.built else None
    if outputs is None:  # an unbuilt Sequential: its output has 3 features
        return np.zeros((len(x), 3), "float32")
    return keras.tree.map_structure(lambda y: np.zeros(tuple(y.shape), "float32"), outputs)


def build(kind: str, policy: str, seed: int = 0) -> keras.Model:
    """The model of ``kind`` under ``policy``, fit for one step, with seeded trained-like BN statistics."""
    from tests.helpers import randomize_bn
    from tests.keras_hub_models import trained_like

    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        model = BUILDERS[kind]()
        x = as_model_input(kind, data(kind, 4, seed))
        if kind == "subclassed":
            model(x)  # called once: what makes a subclassed model known
        loss = {"score": "mse", "embedding": "mse"} if kind == "dict_io" else "mse"
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=loss)
        model.fit(x, _targets(model, x), batch_size=4, epochs=1, verbose=0)
        # Deep random-weight networks stay well conditioned with mild statistics; the small ones get wide ones.
        (trained_like if kind in ("application", "keras_hub") else randomize_bn)(model, seed)
    finally:
        keras.config.set_dtype_policy(previous)
    return model


def save(kind: str, policy: str, folder: Path) -> Path:
    path = Path(folder) / f"{kind}-{policy}-{keras.backend.backend()}.keras"
    build(kind, policy).save(path)
    return path


if __name__ == "__main__":  # python -m tests.paths.models FOLDER KIND:POLICY...
    out = Path(sys.argv[1])
    for cell in sys.argv[2:]:
        print(save(*cell.split(":"), out))
