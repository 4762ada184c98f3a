"""What swapping to kerasbn costs or buys in training: one training step, Keras's BN vs kerasbn's.

For ResNet50 (``weights=None``, 96×96, batch 32, 10 classes) and a keras-hub
ResNet built from config (the small basic-block configuration of keras-hub's
own tests; skipped if keras-hub is not installed), the model with Keras's
BatchNormalization and the same model after ``kerasbn.swap`` (weights equal)
are compiled with SGD and timed on ``train_on_batch``, on TensorFlow as a
graph, TensorFlow with XLA (``jit_compile=True``) and JAX (a subprocess
with ``KERAS_BACKEND=jax``). In each process the two variants run
alternately after a warm-up, so a noisy neighbour hits both alike, and the
medians are reported with their ratio. On JAX the variant compiled second in
a process ran up to 2× slower, whichever it was: there two processes run,
one each way round, and the geometric means are reported.

Run: ``.venv/bin/python benchmarks/swap.py [--steps 7]`` (writes the
``## Swap: training step`` section of ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Swap: training step, Keras's BN vs kerasbn"
BATCH = 32
SIZE = 96
WARMUP = 2


def build(name: str):
    import keras

    if name == "ResNet50":
        return keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classes=10)
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[2, 2, 2],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        image_shape=(SIZE, SIZE, 3),
    )
    x = keras.layers.GlobalAveragePooling2D()(backbone.output)
    return keras.Model(backbone.input, keras.layers.Dense(10, activation="softmax")(x), name="keras_hub_resnet")


def worker(model_name: str, xla: bool, steps: int, only: str | None = None) -> dict:
    """Median seconds per training step of both variants (or ``only`` one), in this process's backend."""
    import keras
    import numpy as np

    import kerasbn

    keras.utils.set_random_seed(0)
    original = build(model_name)
    variants = {"keras": original, "kerasbn": kerasbn.swap(original).model}
    if only is not None:  # the variant compiled and warmed up first
        variants = {only: variants[only], **{k: v for k, v in variants.items() if k != only}}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, size=(BATCH,))
    for model in variants.values():
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=xla)
        for _ in range(WARMUP):
            model.train_on_batch(x, y)
    times = {k: [] for k in variants}
    for _ in range(steps):
        for k, model in variants.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def run_worker(backend: str, model_name: str, xla: bool, steps: int) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    args = [sys.executable, __file__, "--worker", model_name, "--steps", str(steps)] + (["--xla"] if xla else [])
    # On JAX the variant compiled second in a process ran up to 2x slower, whichever it was;
    # one process per way round there, and the geometric mean of the two.
    runs = [["--variant", "keras"], ["--variant", "kerasbn"]] if backend == "jax" else [[]]
    results = []
    for extra in runs:
        done = subprocess.run(args + extra, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{backend} {model_name}: {done.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if extra:
            print(f"  {model_name}, {extra[1]} compiled first: {results[-1]}")
    return {k: math.prod(r[k] for r in results) ** (1 / len(results)) for k in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--xla", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["keras", "kerasbn"], help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    parser.add_argument("--only", choices=["TF graph", "TF-XLA", "JAX"], help="Run one backend setup (print only).")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.xla, args.steps, args.variant)))
        return
    models = ["ResNet50"]
    try:
        import keras_hub  # noqa: F401

        models.append("keras-hub ResNet")
    except ImportError:
        print("keras-hub is not installed: its ResNet is skipped")
    setups = [("TF graph", "tensorflow", False), ("TF-XLA", "tensorflow", True), ("JAX", "jax", False)]
    if args.only:
        setups = [s for s in setups if s[0] == args.only]
        args.no_write = True
    rows = []
    for model_name in models:
        for label, backend, xla in setups:
            result = run_worker(backend, model_name, xla, args.steps)
            ratio = result["kerasbn"] / result["keras"]
            rows.append((model_name, label, result["keras"] * 1e3, result["kerasbn"] * 1e3, ratio))
            print(
                f"{model_name:18} {label:9} Keras BN {rows[-1][2]:8.1f} ms  kerasbn {rows[-1][3]:8.1f} ms  ×{ratio:.2f}"
            )
    if not args.no_write:
        write(rows, args.steps)


def write(rows: list[tuple], steps: int) -> None:
    import platform

    lines = [
        SECTION,
        "",
        f"One `train_on_batch` step (SGD, batch {BATCH}, {SIZE}×{SIZE}×3, 10 classes), the model with Keras's "
        "BatchNormalization vs the same model after `kerasbn.swap` (same weights; `unbiased=False`, Keras's "
        f"training behaviour). Median of {steps} steps after {WARMUP} warm-up steps, the two variants "
        f"alternating in one process per backend; `benchmarks/swap.py`, {os.cpu_count()} shared CPU cores "
        f"({platform.machine()}), TensorFlow CPU and JAX CPU. keras-hub ResNet: `ResNetBackbone` from config "
        "(64 filters, basic blocks 2-2-2) + pooling + Dense.",
        "",
        "| model | backend | Keras BN (ms) | kerasbn (ms) | kerasbn / Keras |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {b} | {k:.0f} | {n:.0f} | {r:.2f} |" for m, b, k, n, r in rows]
    text = DOCS.read_text()
    section = "\n".join(lines) + "\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
