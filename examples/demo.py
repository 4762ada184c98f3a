"""`make demo`: train a small CNN with kerasbn.BatchNormalization on digits.

scikit-learn's bundled 8×8 handwritten digits (1,797 images) stand in for
MNIST, which cannot be downloaded here. The model trains with XLA
(`jit_compile=True`) and is saved to build/demo/digits_cnn.keras.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kerasbn  # noqa: E402  (first: it imports TensorFlow without its start-up noise)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

OUT = Path("build/demo")


def digits(seed: int = 0):
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, data.target.astype("int32"), test_size=0.25, random_state=seed, stratify=data.target)


def build_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for i, filters in enumerate((32, 64)):
        x = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = kerasbn.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, name="fc")(x)
    x = kerasbn.BatchNormalization(momentum=0.9, name="bn_fc")(x)
    x = keras.layers.ReLU(name="relu_fc")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def main() -> None:
    keras.utils.set_random_seed(0)
    x_train, x_test, y_train, y_test = digits()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=64, epochs=15, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "digits_cnn.keras"
    model.save(path)
    np.savez(OUT / "digits_test.npz", image=x_test[:64])
    print(f"trained {model.name} with kerasbn.BatchNormalization (XLA) in {seconds:.1f} s")
    print(f"test accuracy: {accuracy:.4f} on {len(x_test)} held-out digits")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
