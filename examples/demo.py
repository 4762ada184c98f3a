"""`make demo`: train a small CNN with kerasbn, then audit, fold and export it.

scikit-learn's bundled 8×8 handwritten digits (1,797 images) stand in for
MNIST, which cannot be downloaded here. The model trains with XLA
(`jit_compile=True`) and is saved to build/demo/digits_cnn.keras. The demo
then runs the real command line on the saved file, as a user would:

    kerasbn audit  build/demo/digits_cnn.keras --quantization
    kerasbn fold   build/demo/digits_cnn.keras -o build/demo/digits_cnn.folded.keras
    kerasbn export build/demo/digits_cnn.keras -o build/demo/digits_cnn.onnx
    kerasbn export build/demo/digits_cnn.keras -o build/demo/digits_cnn.int8.onnx \
        --int8 --calibration build/demo/digits_calibration.npz --inputs build/demo/digits_heldout.npz
    kerasbn export build/demo/digits_cnn.keras -o build/demo/digits_cnn.tflite
    kerasbn export build/demo/digits_cnn.keras -o build/demo/digits_cnn.int8.tflite \
        --int8 --calibration build/demo/digits_calibration.npz --inputs build/demo/digits_heldout.npz

and finally scores the six models (the exported ones in ONNX Runtime and the
LiteRT interpreter) on the held-out digits: accuracy, agreement with the
original's classes, file size and latency. The float ones predict the same
classes; the int8 ones agree on at least 99 % of the digits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from timing import median_ms  # noqa: E402

from kerasbn_cli.quiet import import_frameworks, quiet_stderr  # noqa: E402

import_frameworks()  # TensorFlow's start-up noise held back, real errors kept
import kerasbn  # noqa: E402

OUT = Path("build/demo")
# The installed console script beside this interpreter: the demo shows the real CLI.
KERASBN = Path(sys.executable).with_name("kerasbn")


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


def cli(*args: str) -> None:
    """Run ``kerasbn ARGS`` as a user would, its output going straight to the terminal."""
    if not KERASBN.exists():
        raise SystemExit(f"{KERASBN} not found: install the package first (make install)")
    print(f"\n$ kerasbn {' '.join(args)}", flush=True)
    subprocess.run([str(KERASBN), *args], check=True)


def score(x_test, y_test, files: dict[str, Path]) -> None:
    """Accuracy, agreement with the original, size and latency of every model on the same held-out digits."""
    from kerasbn.deploy.runtime import litert_runner, onnx_runner

    runners = {}
    for label in ("original (Keras)", "folded (Keras)"):
        model = kerasbn.load_model(files[label])
        runners[label] = model.predict_on_batch
    names = kerasbn.signature(model).names
    for label, path in files.items():
        if path.suffix == ".onnx":
            run = onnx_runner(path)
        elif path.suffix == ".tflite":
            run = litert_runner(path, names)
        else:
            continue
        runners[label] = lambda x, run=run: run([x])[0]

    print(f"\nscoring on {len(x_test)} held-out digits (latency: median of 30 calls)")
    header = (
        f"{'model':<18} {'test accuracy':>13} {'same class':>10} {'file size':>10} {'1 image':>9} "
        f"{f'{len(x_test)} images':>11}"
    )
    print(header)
    print("-" * len(header))
    reference = None
    agreements = {}
    for label, run in runners.items():
        with quiet_stderr(keep_python=True):  # the LiteRT interpreter's "XNNPACK delegate" notice
            run(x_test[:1])
        predicted = np.argmax(np.asarray(run(x_test)), axis=1)
        reference = predicted if reference is None else reference
        agreements[label] = float(np.mean(predicted == reference))
        accuracy = float(np.mean(predicted == y_test))
        one, batch = median_ms(lambda run=run: run(x_test[:1])), median_ms(lambda run=run: run(x_test))
        size = files[label].stat().st_size / 1024
        print(
            f"{label:<18} {accuracy:>13.4f} {100 * agreements[label]:>9.1f}% {size:>7.1f} KiB "
            f"{one:>7.3f}ms {batch:>9.3f}ms"
        )
    floats = [label for label in runners if "int8" not in label]
    same = all(agreements[label] == 1.0 for label in floats)
    print(f"predicted classes identical across the float models: {'yes' if same else 'NO'}")
    if not same or min(agreements.values()) < 0.99:
        raise SystemExit("a folded or exported model disagrees with the original")


def main() -> None:
    begin = time.perf_counter()
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
    np.savez(OUT / "digits_heldout.npz", image=x_test)
    np.savez(OUT / "digits_calibration.npz", image=x_train[:256])  # calibration rows come from training data
    print(f"trained {model.name} with kerasbn.BatchNormalization (XLA) in {seconds:.1f} s")
    print(f"test accuracy: {accuracy:.4f} on {len(x_test)} held-out digits")
    print(f"saved {path}")

    files = {
        "original (Keras)": path,
        "folded (Keras)": OUT / "digits_cnn.folded.keras",
        "ONNX fp32": OUT / "digits_cnn.onnx",
        "ONNX int8": OUT / "digits_cnn.int8.onnx",
        "LiteRT fp32": OUT / "digits_cnn.tflite",
        "LiteRT int8": OUT / "digits_cnn.int8.tflite",
    }
    calibration = ("--calibration", str(OUT / "digits_calibration.npz"), "--inputs", str(OUT / "digits_heldout.npz"))
    cli("audit", str(path), "--quantization")
    cli("fold", str(path), "-o", str(files["folded (Keras)"]), "--inputs", str(OUT / "digits_test.npz"), "--force")
    for label, output in files.items():
        if output.suffix in (".onnx", ".tflite"):
            int8 = ("--int8", *calibration) if "int8" in label else ()
            cli("export", str(path), "-o", str(output), "--force", *int8)
    score(x_test, y_test, files)
    print(f"\ndemo finished in {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
