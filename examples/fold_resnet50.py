"""Fold the 53 BatchNormalization layers out of ResNet50 and export it to ONNX.

Builds `keras.applications.ResNet50` (``weights=None``: nothing is downloaded)
on 96×96 inputs to keep the run short, and calibrates its BN statistics with
training-mode passes over synthetic images, so the moving statistics are real
batch statistics rather than the initial (0, 1), which would make the fold
trivially an identity. Then, through the Python API:

    kerasbn.save_model / kerasbn.load_model   the calibrated model on disk
    kerasbn.audit                             which BN layers fold, which biases are redundant
    kerasbn.strip_redundant_biases            the training-side clean-up (BN stays)
    kerasbn.fold                              BN merged into the convolutions
    kerasbn.verify                            outputs unchanged
    kerasbn.export                            ONNX, checked in ONNX Runtime

and prints original vs stripped vs folded: parameters, BN layers, Keras and
ONNX Runtime latency at batch 1, and the largest output difference. Writes
under ``--out`` (default ``build/fold_resnet50``); `examples/cli.sh` runs the
command line on the same files. Takes a few minutes on two CPU cores, most of
it in the ONNX conversions.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from timing import median_ms  # noqa: E402

from kerasbn_cli.quiet import import_frameworks  # noqa: E402

import_frameworks()  # TensorFlow's start-up noise held back, real errors kept
import kerasbn  # noqa: E402

console = Console()


def perturb_biases(model: keras.Model, rng: np.random.Generator) -> None:
    """Give the convolution biases nonzero values, as training would.

    ``weights=None`` leaves them at zero, and stripping a zero bias proves
    nothing; the calibration that follows absorbs them into the BN statistics.
    """
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape).astype("float32"))


def calibrate(model: keras.Model, images: np.ndarray, batch: int) -> None:
    """Set every BN's moving statistics to the exact average over ``images``' batches.

    With momentum ``k/(k+1)`` on the k-th batch (counting from 0), Keras's
    exponential update ``new = m·old + (1−m)·batch`` becomes the cumulative
    mean: the paper's E_B over the calibration batches.
    """
    bns = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    for k, start in enumerate(range(0, len(images), batch)):
        for bn in bns:
            bn.momentum = k / (k + 1)
        model(images[start : start + batch], training=True)
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum


def onnx_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def parameters(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="input height and width")
    parser.add_argument("--calibration", type=int, default=64, help="synthetic images for the BN statistics")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per latency")
    parser.add_argument("--out", type=Path, default=Path("build/fold_resnet50"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    shape = (args.size, args.size, 3)

    with console.status("Building ResNet50 and calibrating its BN statistics"):
        model = keras.applications.ResNet50(weights=None, input_shape=shape)
        # Images in ResNet50's preprocessed range (caffe style: BGR minus the ImageNet mean).
        images = (rng.uniform(0.0, 255.0, (args.calibration, *shape)) - 120.0).astype("float32")
        perturb_biases(model, rng)
        calibrate(model, images, batch=16)
    # Verification inputs unlike the calibration images: another seed.
    inputs = (np.random.default_rng(args.seed + 1).uniform(0.0, 255.0, (8, *shape)) - 120.0).astype("float32")
    np.savez(args.out / "inputs.npz", inputs)
    path = kerasbn.save_model(model, args.out / "resnet50.keras", overwrite=True)
    console.print(f"saved the calibrated model to {path}")

    # From here on, what a user does with a trained model file.
    original = kerasbn.load_model(path)
    report = kerasbn.audit(original)
    console.print(
        f"audit: {report.foldable}/{report.bn_layers} BN layers fold, saving {report.parameters_saved:,} "
        f"parameters; {len(report.redundant_biases)} redundant biases ({report.bias_parameters:,} parameters)"
    )
    for finding in report.batch_norms:
        if not finding.foldable:
            console.print(f"  {finding.path} stays: {finding.reason}")

    stripped = kerasbn.strip_redundant_biases(original).model
    result = kerasbn.fold(original)
    folded = result.model
    kerasbn.save_model(stripped, args.out / "resnet50.nobias.keras", overwrite=True)
    kerasbn.save_model(folded, args.out / "resnet50.folded.keras", overwrite=True)

    checks = {
        "stripped": kerasbn.verify(original, stripped, inputs),
        "folded": kerasbn.verify(original, folded, inputs),
    }

    onnx = {}
    with console.status("Exporting to ONNX (unfolded, for comparison)"):
        onnx["original"] = kerasbn.export(
            # tf2onnx's graph as it comes: the graph passes would fuse the BN arithmetic too.
            original,
            args.out / "resnet50.unfolded.onnx",
            fold=False,
            optimize=False,
            overwrite=True,
            checks=kerasbn.Checks(inputs=inputs),
        )
    with console.status("Exporting to ONNX (folded)") as status:
        onnx["folded"] = kerasbn.export(
            original,
            args.out / "resnet50.onnx",
            overwrite=True,
            checks=kerasbn.Checks(inputs=inputs),
            on_step=lambda step: status.update(step),
        )

    one = inputs[:1]
    with console.status("Timing"):
        keras_ms = {
            name: median_ms(lambda m=m: m.predict_on_batch(one), args.repeats)
            for name, m in (("original", original), ("stripped", stripped), ("folded", folded))
        }
        runners = {name: onnx_runner(e.path) for name, e in onnx.items()}
        onnx_ms = {name: median_ms(lambda r=r: r(one), args.repeats) for name, r in runners.items()}

    def onnx_error(name: str) -> str:
        worst = max(c.max_abs_error for c in onnx[name].checks)
        return f"{worst:.2e}"

    def bn_count(m: keras.Model) -> int:
        return kerasbn.audit(m).bn_layers

    table = Table(title=f"ResNet50 at {args.size}×{args.size}, batch 1 (median of {args.repeats} calls)")
    table.add_column("")
    for column in ("original", "biases stripped", "folded"):
        table.add_column(column, justify="right")
    table.add_row("parameters", *(f"{parameters(m):,}" for m in (original, stripped, folded)))
    table.add_row("BN layers", *(str(bn_count(m)) for m in (original, stripped, folded)))
    table.add_row(
        "ONNX BatchNormalization ops",
        str(onnx["original"].op_counts.get("BatchNormalization", 0)),
        "—",
        str(onnx["folded"].op_counts.get("BatchNormalization", 0)),
    )
    table.add_row(
        "ONNX ops in all",
        str(sum(onnx["original"].op_counts.values())),
        "—",
        str(sum(onnx["folded"].op_counts.values())),
    )
    table.add_row("Keras latency", *(f"{keras_ms[n]:.1f} ms" for n in ("original", "stripped", "folded")))
    table.add_row("ONNX Runtime latency", f"{onnx_ms['original']:.1f} ms", "—", f"{onnx_ms['folded']:.1f} ms")
    table.add_row(
        "max |Δ| vs original (Keras)",
        "0",
        f"{checks['stripped'].max_abs_error:.2e}",
        f"{checks['folded'].max_abs_error:.2e}",
    )
    table.add_row("max |Δ| ONNX Runtime vs Keras", onnx_error("original"), "—", onnx_error("folded"))
    table.caption = (
        f"max |y| = {checks['folded'].max_abs_reference:.3g}; softmax over 1,000 classes; "
        f"{time.perf_counter() - begin:.0f} s in all"
    )
    console.print(table)
    if not all(c.passed for c in checks.values()):
        console.print("[red]a rewritten model differs from the original beyond the tolerance[/red]")
        return 1
    console.print(f"files in {args.out}: resnet50.keras, resnet50.nobias.keras, resnet50.folded.keras, resnet50.onnx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
