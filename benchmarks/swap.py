"""What swapping to kerasbn costs or buys in training: one training step, Keras's BN vs kerasbn's.

For ResNet50 (``weights=None``, 96×96, batch 32, 10 classes) and a keras-hub
ResNet built from config (the small basic-block configuration of keras-hub's
own tests; skipped if keras-hub is not installed), the model with Keras's
BatchNormalization and the same model after ``kerasbn.swap`` (weights equal)
are compiled with SGD and timed on ``train_on_batch`` as users run it:
TensorFlow as a graph, TensorFlow with XLA (``jit_compile=True``), JAX with
Keras's default (``jit_compile="auto"``: the step is jitted), torch eagerly
(Keras's default there) and torch with ``jit_compile=True``
(``torch.compile``). Eager JAX (``jit_compile=False``) is Keras's debugging
mode and is its own row. Each backend runs in a subprocess with its
``KERAS_BACKEND``. In each process the variants run alternately after a
warm-up, so a noisy neighbour hits them alike; the ratio is the median of
the per-step ratios. A third variant, the model with every BN replaced by
an identity layer, gives BN's share of Keras's step, ``1 − t(no BN) ÷
t(Keras BN)``: the most that any BN implementation can save. On JAX the
variant compiled first in a process once ran up to 2× faster, whichever it
was: there two processes run, one each way round, and the geometric means
are reported.

Run: ``.venv/bin/python benchmarks/swap.py [--steps 7] [--only JAX]
[--model ResNet50]`` (writes the ``## Swap: training step`` section of
``docs/benchmarks.md`` when every setup runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Swap: training step, Keras's BN vs kerasbn"
# --quick (passed on to the workers through the environment): 64×64, batch 16.
QUICK = os.environ.get("KERASBN_SWAP_QUICK") == "1"
BATCH = 16 if QUICK else 32
SIZE = 64 if QUICK else 96
WARMUP = 2
MODELS = ("ResNet50", "keras-hub ResNet")


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


def without_bn(model):
    """``model`` with every BatchNormalization replaced by an identity layer (weights of the rest shared)."""
    import keras

    class NoBN(keras.layers.Layer):
        # Takes what a BN call is given (keras-hub passes the mask along).
        def call(self, inputs, training=None, mask=None):
            return inputs

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return NoBN(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy


def worker(model_name: str, jit, steps: int, only: str | None = None) -> dict:
    """Per-step seconds of the variants (``only`` compiled first), in this process's backend."""
    import keras
    import numpy as np

    import kerasbn

    keras.utils.set_random_seed(0)
    original = build(model_name)
    variants = {"keras": original, "kerasbn": kerasbn.swap(original).model, "no BN": without_bn(original)}
    if only is not None:  # the variant compiled and warmed up first
        variants = {only: variants[only], **{k: v for k, v in variants.items() if k != only}}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, size=(BATCH,))
    return time_training_steps(variants, x, y, jit, steps)


def time_training_steps(variants: dict, x, y, jit, steps: int, warmup: int = WARMUP) -> dict[str, list[float]]:
    """Seconds of each ``train_on_batch`` step per variant (compiled with SGD), the variants alternating."""
    for model in variants.values():
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=jit)
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times = {k: [] for k in variants}
    for _ in range(steps):
        for k, model in variants.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[k].append(time.perf_counter() - start)
    return times


# (label, backend, jit_compile): as users run each backend, and eager JAX, Keras's debugging mode.
SETUPS = [
    ("TF graph", "tensorflow", False),
    ("TF-XLA", "tensorflow", True),
    ("JAX", "jax", "auto"),
    ("torch eager", "torch", "auto"),
    ("torch.compile", "torch", True),
    ("JAX eager (debugging mode)", "jax", False),
]


def run_workers(script: str, backend: str, args: list[str], first: tuple[str, str]) -> list[dict]:
    """Per-step seconds by variant from ``script --worker ARGS`` in a process of ``backend`` (JSON, last line).

    On JAX the variant compiled first in a process once ran up to 2x faster, whichever it was: there
    one process per way round (``--variant`` names the one compiled first, of the two in ``first``).
    """
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    runs = [["--variant", v] for v in first] if backend == "jax" else [[]]
    results = []
    for extra in runs:
        done = subprocess.run(
            [sys.executable, script, "--worker", *args, *extra], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{backend} {args}: {done.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def geometric_mean(values) -> float:
    values = list(values)
    return math.prod(values) ** (1 / len(values))


def median_seconds(results: list[dict]) -> dict[str, float]:
    """Each variant's median step, the geometric mean over the processes."""
    return {k: geometric_mean(statistics.median(r[k]) for r in results) for k in results[0]}


def median_ratio(results: list[dict], variant: str, baseline: str) -> float:
    """The median of the per-step ratios ``variant ÷ baseline``, the geometric mean over the processes."""
    return geometric_mean(statistics.median(a / b for a, b in zip(r[variant], r[baseline])) for r in results)


def run_worker(backend: str, model_name: str, jit, steps: int) -> dict:
    args = [model_name, "--steps", str(steps), "--jit", json.dumps(jit)]
    results = run_workers(__file__, backend, args, ("keras", "kerasbn"))
    shares = [1 - statistics.median(a / b for a, b in zip(r["no BN"], r["keras"])) for r in results]
    return {
        **median_seconds(results),
        "ratio": median_ratio(results, "kerasbn", "keras"),
        "bn_share": sum(shares) / len(shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--jit", default="false", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["keras", "kerasbn"], help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    labels = [label for label, _, _ in SETUPS]
    parser.add_argument("--only", action="append", choices=labels, help="Run this setup (repeatable; print only).")
    parser.add_argument("--model", choices=MODELS, help="Only this model (print only).")
    parser.add_argument("--quick", action="store_true", help="64×64 inputs, batch 16 (print only).")
    args = parser.parse_args()
    if args.quick:
        os.environ["KERASBN_SWAP_QUICK"] = "1"
        args.no_write = True
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.jit), args.steps, args.variant)))
        return
    models = list(MODELS)
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        print("keras-hub is not installed: its ResNet is skipped")
        models.remove("keras-hub ResNet")
    setups = SETUPS
    if args.only or args.model:
        setups = [s for s in SETUPS if not args.only or s[0] in args.only]
        models = [m for m in models if not args.model or m == args.model]
        args.no_write = True
    rows = []
    for model_name in models:
        for label, backend, jit in setups:
            r = run_worker(backend, model_name, jit, args.steps)
            rows.append((model_name, label, r["keras"] * 1e3, r["kerasbn"] * 1e3, r["ratio"], r["bn_share"]))
            print(
                f"{model_name:18} {label:28} Keras BN {rows[-1][2]:8.1f} ms  kerasbn {rows[-1][3]:8.1f} ms  "
                f"×{r['ratio']:.2f}  BN share of Keras's step {r['bn_share']:.0%}",
                flush=True,
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
        f"training behaviour). {steps} steps of each variant after {WARMUP} warm-up steps, the variants "
        "alternating in one process per backend; the ratio is the median of the per-step ratios. "
        "BN's share = 1 − (the model with every BN replaced by an identity) ÷ (Keras's BN), per step: the most "
        'any BN can save. JAX runs with Keras\'s default `jit_compile="auto"` (jitted), torch eagerly '
        "(Keras's default there) and with `jit_compile=True` (`torch.compile`); eager JAX "
        "(`jit_compile=False`) is Keras's debugging mode. "
        f"`benchmarks/swap.py`, {os.cpu_count()} shared CPU cores ({platform.machine()}), CPU builds of "
        "TensorFlow, JAX and torch. keras-hub ResNet: `ResNetBackbone` from config "
        "(64 filters, basic blocks 2-2-2) + pooling + Dense.",
        "",
        "| model | backend | Keras BN (ms) | kerasbn (ms) | kerasbn ÷ Keras | target | BN's share of Keras's step |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for m, b, k, n, r, share in rows:
        target = "–" if "debugging" in b else f"≤ 1.0: {'met' if r <= 1.0 else 'missed'}"
        lines.append(f"| {m} | {b} | {k:.0f} | {n:.0f} | {r:.2f} | {target} | {share:.0%} |")
    write_section(lines)


def write_section(lines: list[str]) -> None:
    """Replace the section that ``lines`` begins (its ``## `` title) in docs/benchmarks.md, or append it."""
    text = DOCS.read_text()
    section = "\n".join(lines) + "\n"
    pattern = re.compile(rf"^{re.escape(lines[0])}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
