"""AdaBN on the bundled digits: a brightness/contrast shift fixed by `kerasbn calibrate`, no labels needed.

A small CNN is trained on scikit-learn's 8×8 digits. The held-out digits
are then shown with lower contrast, raised brightness and a little noise
(``0.5·x + 0.4 + N(0, 0.05²)``): the first BN's stored statistics no longer
describe what the convolution produces and accuracy drops. The real command
line then

    kerasbn audit     digits.keras --data shifted_unlabeled.npy   (flags the stale BN layers)
    kerasbn calibrate digits.keras --data shifted_unlabeled.npy -o adapted.keras

recomputes every BN's statistics on unlabeled shifted digits (the training
images, shifted: no test image and no label is used), which is AdaBN (Li et
al., 2016), and the adapted model is scored again.

    python examples/domain_shift.py [--out build/domain_shift]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from kerasbn_cli.quiet import import_frameworks  # noqa: E402

import_frameworks()
import keras  # noqa: E402

import kerasbn  # noqa: E402

KERASBN = Path(sys.executable).with_name("kerasbn")


def shift(x: np.ndarray, seed: int) -> np.ndarray:
    """Lower contrast, brighter, a little sensor noise."""
    noise = np.random.default_rng(seed).normal(0.0, 0.05, x.shape)
    return (0.5 * x + 0.4 + noise).astype("float32")


def model() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="digit")
    x = keras.layers.Conv2D(16, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(32, 3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x), name="digits")


def accuracy(net: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(net.predict(x, batch_size=256, verbose=0), axis=1) == y))


def cli(*args: str) -> str:
    done = subprocess.run([str(KERASBN), *args], capture_output=True, text=True, check=True)
    return done.stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/domain_shift"))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=0)
    net = model()
    net.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    net.fit(x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0)
    path = args.out / "digits.keras"
    net.save(path)

    unlabeled = args.out / "shifted_unlabeled.npy"
    np.save(unlabeled, shift(x_train, seed=1))  # the training images, shifted; no labels
    x_shifted = shift(x_test, seed=2)
    adapted_path = args.out / "digits.adapted.keras"

    audit = json.loads(cli("audit", str(path), "--data", str(unlabeled), "--format", "json"))["statistics"]
    print(audit["verdict"])
    for bn in audit["batch_norms"]:
        print(f"  {bn['path']}: mean shift {bn['mean_shift']:.2f} σ, variance ratio {bn['variance_ratio']:.2f}")
    cli("calibrate", str(path), "--data", str(unlabeled), "-o", str(adapted_path), "--force", "-q")
    adapted = kerasbn.load_model(adapted_path)

    results = {
        "clean": accuracy(net, x_test, y_test),
        "shifted": accuracy(net, x_shifted, y_test),
        "shifted_after_calibrate": accuracy(adapted, x_shifted, y_test),
        "stale_layers": audit["totals"]["stale"],
        "bn_layers": audit["totals"]["bn_layers"],
    }
    print(f"accuracy on the held-out digits:            {results['clean']:.1%}")
    print(f"accuracy on the shifted digits:             {results['shifted']:.1%}")
    print(f"accuracy on the shifted digits, calibrated: {results['shifted_after_calibrate']:.1%}")
    return results


if __name__ == "__main__":
    main()
