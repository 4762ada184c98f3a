"""Moving statistics that lag behind fast training, fixed by `kerasbn calibrate --mode paper`.

Keras's BN keeps exponential moving averages (momentum 0.99: an average over
the last ~100 steps). With a large learning rate the weights before each BN
move faster than that average follows, so at the end of training the stored
statistics describe a network of many steps ago, and the model is good in
training mode and bad in inference: the most reported BN problem in Keras's
issue tracker. Algorithm 2 of the paper does not use a moving average: it
runs mini-batches of training data through the *final* network and stores
E[x] = E_B[μ_B], Var[x] = m/(m−1)·E_B[σ²_B], which is what

    kerasbn calibrate digits_fast.keras --data train.npy --mode paper -o fixed.keras

does. Digits from scikit-learn; a few seconds of training.

    python examples/lagging_statistics.py [--out build/lagging_statistics]
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


def model() -> keras.Model:
    inputs = keras.Input((64,), name="digit")
    x = inputs
    for width in (128, 128, 64):
        x = keras.layers.Dense(width, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)  # Keras's default: momentum 0.99
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x), name="digits_fast")


def accuracy(net: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(net.predict(x, batch_size=256, verbose=0), axis=1) == y))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/lagging_statistics"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=0)
    net = model()
    net.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9), loss="sparse_categorical_crossentropy"
    )
    net.fit(x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0)
    path, data, fixed = args.out / "digits_fast.keras", args.out / "train.npy", args.out / "digits_fast.fixed.keras"
    net.save(path)
    np.save(data, x_train)

    def cli(*more: str) -> str:
        return subprocess.run([str(KERASBN), *more], capture_output=True, text=True, check=True).stdout

    audit = json.loads(cli("audit", str(path), "--data", str(data), "--format", "json"))["statistics"]
    print(audit["verdict"])
    cli("calibrate", str(path), "--data", str(data), "--mode", "paper", "-o", str(fixed), "--force", "-q")

    train_mode = float(np.mean(np.argmax(np.asarray(net(x_test, training=True)), axis=1) == y_test))
    results = {
        "moving_statistics": accuracy(net, x_test, y_test),
        "batch_statistics": train_mode,
        "calibrated": accuracy(kerasbn.load_model(fixed), x_test, y_test),
        "stale_layers": audit["totals"]["stale"],
    }
    print(f"test accuracy with the moving statistics (Keras inference): {results['moving_statistics']:.1%}")
    print(f"test accuracy with batch statistics (training mode):        {results['batch_statistics']:.1%}")
    print(f"test accuracy after kerasbn calibrate --mode paper:         {results['calibrated']:.1%}")
    return results


if __name__ == "__main__":
    main()
