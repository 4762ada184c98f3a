"""`make demo`: train a small CNN with kerasbn, then audit, fold and export it.

scikit-learn's bundled 8×8 handwritten digits (1,797 images) stand in for
MNIST, which cannot be downloaded here. The model trains with XLA
(`jit_compile=True`) and is saved to build/demo/digits_cnn.keras. The demo
then runs the real command line on the saved file, as a user would:

    kerasbn audit  build/demo/digits_cnn.keras
    kerasbn fold   build/demo/digits_cnn.keras -o build/demo/digits_cnn.folded.keras
    kerasbn export build/demo/digits_cnn.keras -o build/demo/digits_cnn.onnx

and finally scores the original, folded and ONNX models (the ONNX one in ONNX
Runtime) on the held-out digits: the same accuracy, and the latencies.
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

from kerasbn_cli.quiet import import_frameworks  # noqa: E402

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


def score(x_test, y_test, original_path: Path, folded_path: Path, onnx_path: Path) -> None:
    """Accuracy and latency of the three models on the same held-out digits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    runners = {}
    for label, path in (("original (Keras)", original_path), ("folded (Keras)", folded_path)):
        model = kerasbn.load_model(path)
        runners[label] = (model.predict_on_batch, kerasbn.audit(model).bn_layers)
    runners["folded (ONNX Runtime)"] = (lambda x: session.run(None, {input_name: x})[0], 0)

    print(f"\nscoring on {len(x_test)} held-out digits (latency: median of 30 calls)")
    header = f"{'model':<22} {'BN layers':>9} {'test accuracy':>14} {'1 image':>10} {f'{len(x_test)} images':>12}"
    print(header)
    print("-" * len(header))
    predictions = {}
    for label, (run, bn_layers) in runners.items():
        predictions[label] = np.argmax(np.asarray(run(x_test)), axis=1)
        accuracy = float(np.mean(predictions[label] == y_test))
        one, batch = median_ms(lambda run=run: run(x_test[:1])), median_ms(lambda run=run: run(x_test))
        print(f"{label:<22} {bn_layers:>9} {accuracy:>14.4f} {one:>8.2f}ms {batch:>10.2f}ms")
    reference = predictions["original (Keras)"]
    same = all(np.array_equal(reference, p) for p in predictions.values())
    print(f"predicted classes identical across the three models: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("the folded or exported model disagrees with the original")


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
    print(f"trained {model.name} with kerasbn.BatchNormalization (XLA) in {seconds:.1f} s")
    print(f"test accuracy: {accuracy:.4f} on {len(x_test)} held-out digits")
    print(f"saved {path}")

    folded, onnx_file = OUT / "digits_cnn.folded.keras", OUT / "digits_cnn.onnx"
    cli("audit", str(path))
    cli("fold", str(path), "-o", str(folded), "--inputs", str(OUT / "digits_test.npz"), "--force")
    cli("export", str(path), "-o", str(onnx_file), "--force")
    score(x_test, y_test, path, folded, onnx_file)
    print(f"\ndemo finished in {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
