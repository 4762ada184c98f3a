"""What quantization-aware training costs: one training step of the QAT model vs the float model with Keras's BN.

keras.applications' MobileNetV2 (``weights=None``, 96×96, batch 16, 10
classes; 52 BN, each after a Conv or DepthwiseConv) with Keras's
BatchNormalization is the float model; ``kerasbn.qat.prepare`` of it (8-bit
per-channel weights, 8-bit activations, ranges calibrated on a batch) is the
QAT model, in two states: its BN statistics running (every fused layer
computes the batch statistics, the σ_B/σ correction and the folded,
fake-quantized kernel) and frozen (``kerasbn.qat.freeze``: the inference form,
moving statistics folded in). Each is compiled with SGD and timed on
``train_on_batch`` as users run it: TensorFlow with XLA (``jit_compile=True``),
JAX with Keras's default (``jit_compile="auto"``: jitted), and TensorFlow as a
graph (``jit_compile=False``; Keras's default on a machine without a GPU,
where ``"auto"`` turns XLA off). Each backend runs in its own process with its
``KERAS_BACKEND``; in it the variants alternate after a warm-up, and the ratio
is the median of the per-step ratios. On JAX two processes run, one each way
round (`benchmarks/swap.py` says why), and the geometric means are reported.
PyTorch's own QAT (``torch.ao`` ``ConvBn2d``) costs about 1.5–2× its float
step; the target here is ≤ 1.5× on TF-XLA and JAX.

Run: ``.venv/bin/python benchmarks/qat.py [--steps 7] [--only JAX] [--quick]``
(writes the ``## QAT: training step`` section of ``docs/benchmarks.md`` when
every setup runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from swap import median_ratio, median_seconds, run_workers, time_training_steps, write_section

SECTION = "## QAT: training step, kerasbn.qat vs the float model with Keras's BN"
# --quick (passed on to the workers through the environment): 48×48, batch 8.
QUICK = os.environ.get("KERASBN_QAT_QUICK") == "1"
BATCH = 8 if QUICK else 16
SIZE = 48 if QUICK else 96
VARIANTS = ("float", "QAT", "QAT frozen")
# (label, backend, jit_compile): as users run each backend. On a machine without a GPU, Keras's default
# (jit_compile="auto") is the TensorFlow graph, not XLA (Trainer._resolve_auto_jit_compile).
SETUPS = [("TF-XLA", "tensorflow", True), ("JAX", "jax", "auto"), ("TF graph", "tensorflow", False)]
TARGET = 1.5


def worker(jit, steps: int, first: str | None = None) -> dict:
    """Per-step seconds of the variants (``first`` compiled first), in this process's backend."""
    import keras
    import numpy as np

    import kerasbn

    keras.utils.set_random_seed(0)
    float_model = keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3), classes=10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, size=(BATCH,))
    frozen = kerasbn.qat.prepare(float_model, calibration=x)
    kerasbn.qat.freeze(frozen)
    variants = {"float": float_model, "QAT": kerasbn.qat.prepare(float_model, calibration=x), "QAT frozen": frozen}
    if first is not None:
        variants = {first: variants[first], **{k: v for k, v in variants.items() if k != first}}
    return time_training_steps(variants, x, y, jit, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", default="false", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS[:2], help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    labels = [label for label, _, _ in SETUPS]
    parser.add_argument("--only", action="append", choices=labels, help="Run this setup (repeatable; print only).")
    parser.add_argument("--quick", action="store_true", help="48×48 inputs, batch 8 (print only).")
    args = parser.parse_args()
    if args.quick:
        os.environ["KERASBN_QAT_QUICK"] = "1"
        args.no_write = True
    if args.worker:
        print(json.dumps(worker(json.loads(args.jit), args.steps, args.variant)))
        return
    setups = [s for s in SETUPS if not args.only or s[0] in args.only]
    args.no_write |= bool(args.only)
    rows = []
    for label, backend, jit in setups:
        results = run_workers(__file__, backend, ["--steps", str(args.steps), "--jit", json.dumps(jit)], VARIANTS[:2])
        ms = {k: 1e3 * v for k, v in median_seconds(results).items()}
        ratios = {k: median_ratio(results, k, "float") for k in VARIANTS[1:]}
        rows.append((label, ms, ratios))
        print(
            f"{label:9} float {ms['float']:8.1f} ms  QAT {ms['QAT']:8.1f} ms (×{ratios['QAT']:.2f})  "
            f"QAT frozen {ms['QAT frozen']:8.1f} ms (×{ratios['QAT frozen']:.2f})",
            flush=True,
        )
    if not args.no_write:
        write(rows, args.steps)


def write(rows: list[tuple], steps: int) -> None:
    load = os.getloadavg()[0]
    lines = [
        SECTION,
        "",
        f"One `train_on_batch` step (SGD, batch {BATCH}, {SIZE}×{SIZE}×3, 10 classes) of keras.applications' "
        "MobileNetV2 (`weights=None`; 52 BN after Conv/DepthwiseConv): the float model with Keras's "
        "BatchNormalization, and `kerasbn.qat.prepare` of it (8-bit per-channel weights, 8-bit activations) "
        "with its BN statistics running (batch statistics, σ_B/σ correction) and frozen (`kerasbn.qat.freeze`). "
        f"{steps} steps of each variant after 2 warm-up steps, the variants alternating in one process per "
        "backend (two on JAX, one each way round); the ratio is the median of the per-step ratios. "
        f"`benchmarks/qat.py`, {os.cpu_count()} shared CPU cores ({platform.machine()}), load average "
        f"{load:.1f} when written, CPU builds of TensorFlow and JAX. The TF graph is Keras's default on a "
        'machine without a GPU (`jit_compile="auto"` turns XLA off there). PyTorch\'s QAT (`ConvBn2d`) costs '
        "about 1.5–2× its float step.",
        "",
        "| backend | float (ms) | QAT (ms) | QAT ÷ float | QAT frozen (ms) | frozen ÷ float | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, ms, ratios in rows:
        worst = max(ratios.values())
        target = f"≤ {TARGET}: {'met' if worst <= TARGET else 'missed'}"
        lines.append(
            f"| {label} | {ms['float']:.0f} | {ms['QAT']:.0f} | {ratios['QAT']:.2f} | {ms['QAT frozen']:.0f} | "
            f"{ratios['QAT frozen']:.2f} | {target} |"
        )
    write_section(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
