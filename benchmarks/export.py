"""What `kerasbn export` costs next to Keras's own ``model.export``: wall time and peak memory.

Each variant runs as users run it, in a fresh process on a saved ``.keras``
file: ``kerasbn export MODEL -o OUT`` (the installed script's code, run by this Python) (ONNX, LiteRT, int8
ONNX, int8 LiteRT; every check on, as by default) with ``PYTHONPATH`` set to
the tree measured (``--tree``), and a script that loads the same file and
calls ``model.export(OUT, format="onnx" | "litert")``. Time is the process's
wall time (imports, load, conversion, checks, write); memory its peak
resident set (``ru_maxrss`` of that child, from ``os.wait4``). The variants
run alternately, one process each, ``--runs`` rounds; the table gives the
medians and the ratios kerasbn ÷ Keras (int8 against Keras's float export of
the same format, Keras having no int8 export).

Models: keras.applications ResNet50 and MobileNetV2 at 224×224,
``weights=None``, BatchNormalization statistics set from a training-mode pass
on generated data (momentum 0 for that pass, so the statistics are the
batch's); for the growth of peak memory with the model's size, MobileNetV2 at
widths (alpha) 0.5, 1.0 and 1.4, ONNX export of both. A plain ``kerasbn
export`` converts once; "--compare-unfolded" adds the optional conversion of
the unfolded model for the op table's "Before fold" column. The int8 exports get
32 generated calibration rows and ``--min-agreement 0`` (a network with
random weights on random inputs is no test of int8 accuracy; the cost is).

Run: ``python benchmarks/export.py [--runs 3] [--quick] [--only ResNet50] [--tree PATH]``
(``--quick``: one round, ResNet50 only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("ResNet50", "MobileNetV2")
WIDTHS = ("MobileNetV2_0.5", "MobileNetV2_1.0", "MobileNetV2_1.4")
VARIANTS = (
    "kerasbn onnx",
    "keras onnx",
    "kerasbn litert",
    "keras litert",
    "kerasbn int8 onnx",
    "kerasbn int8 litert",
    "kerasbn onnx, --compare-unfolded",
    "kerasbn litert, --compare-unfolded",
)
WIDTH_VARIANTS = ("kerasbn onnx", "keras onnx")
# The Keras export each kerasbn variant is compared with.
REFERENCE = {
    "kerasbn onnx": "keras onnx",
    "kerasbn litert": "keras litert",
    "kerasbn int8 onnx": "keras onnx",
    "kerasbn int8 litert": "keras litert",
    "kerasbn onnx, --compare-unfolded": "keras onnx",
    "kerasbn litert, --compare-unfolded": "keras litert",
}
CALIBRATION_ROWS = 32

MAKE = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np

    name, out, calibration = sys.argv[1:4]
    if name == "ResNet50":
        model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    else:
        alpha = float(name.partition("_")[2] or 1.0)
        model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), alpha=alpha)
    rng = np.random.default_rng(0)
    layers = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    momenta = [l.momentum for l in layers]
    for layer in layers:
        layer.momentum = 0.0  # the moving statistics become this batch's
    model(rng.standard_normal((16, 224, 224, 3)).astype("float32"), training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.save(out)
    np.savez(calibration, rng.standard_normal((ROWS, 224, 224, 3)).astype("float32"))
    """
).replace("ROWS", str(CALIBRATION_ROWS))

CLI = "import sys; from kerasbn_cli.main import main; sys.exit(main())"

KERAS_EXPORT = textwrap.dedent(
    """
    import sys
    import keras

    model = keras.saving.load_model(sys.argv[1])
    # A model loaded from a file has not been called: Keras's export then
    # wants the signature (the inputs' shapes, the batch dynamic).
    model.export(sys.argv[2], format=sys.argv[3], verbose=False, input_signature=model.inputs)
    """
)


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tree), KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def make_model(name: str, work: Path, tree: Path) -> tuple[Path, Path]:
    model, calibration = work / f"{name}.keras", work / f"{name}-calibration.npz"
    if not model.exists() or not calibration.exists():
        subprocess.run(
            [sys.executable, "-c", MAKE, name, str(model), str(calibration)],
            env=environment(tree),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return model, calibration


def command(variant: str, model: Path, calibration: Path, out: Path) -> list[str]:
    fmt = "litert" if "litert" in variant else "onnx"
    suffix = ".tflite" if fmt == "litert" else ".onnx"
    target = out / f"{model.stem}-{variant.replace(' ', '-').replace(',', '')}{suffix}"
    if variant.startswith("keras "):
        return [sys.executable, "-c", KERAS_EXPORT, str(model), str(target), fmt]
    # What the installed `kerasbn` script runs.
    line = [sys.executable, "-c", CLI, "export", str(model), "-o", str(target), "--force", "-q"]
    if "--compare-unfolded" in variant:
        # The optional second conversion, of the unfolded model, for the op table's "Before fold" column.
        line.append("--compare-unfolded")
    if "int8" in variant:
        line += ["--int8", "--calibration", str(calibration), "--min-agreement", "0"]
    return line


def measure(line: list[str], env: dict[str, str]) -> tuple[float, float] | None:
    """(wall seconds, peak RSS in GB) of one child process; None (its output's tail printed) when it fails."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(line, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
            print(f"  {' '.join(line[3:6])} ... exited {child.returncode}:\n    " + "\n    ".join(tail), flush=True)
            return None
    return seconds, usage.ru_maxrss / 1024**2  # kB → GB


def run(cases: list[tuple[str, str]], runs: int, work: Path, tree: Path) -> dict[tuple[str, str], list]:
    """Every (model, variant) in `cases`, alternated, `runs` rounds: {(model, variant): [(s, GB), ...]}."""
    files = {model: make_model(model, work, tree) for model in dict.fromkeys(m for m, _ in cases)}
    env = environment(tree)
    results: dict[tuple[str, str], list] = {case: [] for case in cases}
    out = work / "out"
    out.mkdir(exist_ok=True)
    for round_ in range(runs):
        for model, variant in cases:
            measured = measure(command(variant, *files[model], out), env)
            if measured is None:
                continue
            results[model, variant].append(measured)
            print(
                f"  round {round_ + 1}: {model:<16} {variant:<20} {measured[0]:6.1f} s {measured[1]:6.2f} GB",
                flush=True,
            )
    return results


def table(results: dict[tuple[str, str], list], work: Path) -> str:
    medians = {
        case: (statistics.median(s for s, _ in rows), statistics.median(g for _, g in rows))
        for case, rows in results.items()
        if rows
    }
    lines = [
        "| model (.keras MB) | export | time (s) | peak memory (GB) | time ÷ Keras | memory ÷ Keras |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (model, variant), (seconds, peak) in medians.items():
        reference = medians.get((model, REFERENCE.get(variant, "")))
        ratios = ("–", "–") if reference is None else (f"{seconds / reference[0]:.2f}", f"{peak / reference[1]:.2f}")
        size = (work / f"{model}.keras").stat().st_size / 1e6
        lines.append(f"| {model} ({size:.0f}) | {variant} | {seconds:.1f} | {peak:.2f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of alternated runs (medians over them)")
    parser.add_argument("--quick", action="store_true", help="one round, ResNet50 only, no widths")
    parser.add_argument("--only", nargs="+", help="models and/or variants to run (e.g. ResNet50 'kerasbn onnx')")
    parser.add_argument("--no-widths", action="store_true", help="skip the MobileNetV2 widths")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the kerasbn tree to measure (PYTHONPATH)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kerasbn-export-bench")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    models = ("ResNet50",) if args.quick else MODELS
    only = set(args.only or ())
    known = {*MODELS, *WIDTHS, *VARIANTS}
    if only - known:
        parser.error(f"unknown --only {sorted(only - known)}; choose from {sorted(known)}")

    def wanted(model: str, variant: str) -> bool:
        return (not only & {*MODELS, *WIDTHS} or model in only) and (not only & set(VARIANTS) or variant in only)

    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"tree: {args.tree.resolve()}")
    cases = [(m, v) for m in models for v in VARIANTS if wanted(m, v)]
    if cases:
        print("\n" + table(run(cases, runs, args.work, args.tree.resolve()), args.work) + "\n")
    if not args.quick and not args.no_widths:
        cases = [(m, v) for m in WIDTHS for v in WIDTH_VARIANTS if wanted(m, v)]
        if cases:
            print("Peak memory against the model's size (MobileNetV2 widths):\n")
            print(table(run(cases, runs, args.work, args.tree.resolve()), args.work) + "\n")


if __name__ == "__main__":
    main()
