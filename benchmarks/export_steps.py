"""Where `kerasbn export` spends its time and memory, step by step.

Runs one export (the library call the CLI makes) in this process with the
pieces it goes through wrapped: loading, the fold, tracing, freezing,
grappler, tf2onnx's conversion and optimizer, the graph passes, every ONNX
Runtime session, the Keras reference outputs and noise, the LiteRT converter
and interpreter, the int8 quantizer. For each piece the table gives its
calls, wall time, the peak resident memory while it ran and the resident
memory after it. Peaks are exact, not sampled: Linux resets a process's
peak (VmHWM) when ``5`` is written to ``/proc/self/clear_refs``; a piece
resets it on entry (folding the peak so far into the enclosing piece) and
reads it on exit.

Pieces missing from the tree being measured (renamed by a restructure) are
skipped, so the script runs on any tree:

    PYTHONPATH=TREE python benchmarks/export_steps.py MODEL.keras OUT.onnx|OUT.tflite [--int8 CALIB.npz]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

GB = 1024**2  # VmRSS/VmHWM are in kB


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Recorder:
    """Exact per-piece peaks with nesting: entering a piece folds the peak so far into every enclosing one."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.order: list[str] = []
        self.stack: list[list] = []  # [row key, start time, peak kB so far]
        self.calls: dict[str, int] = {}
        self.start = time.perf_counter()

    def enter(self, name: str) -> None:
        if name in SPLIT:  # one row per call, the pieces inside it under it
            self.calls[name] = self.calls.get(name, 0) + 1
            name = f"{name} #{self.calls[name]}"
        name = " / ".join([*(frame[0] for frame in self.stack), name])
        peak = _status("VmHWM")
        for frame in self.stack:
            frame[2] = max(frame[2], peak)
        if name not in self.rows:
            self.rows[name] = {"calls": 0, "seconds": 0.0, "peak": 0, "after": 0, "depth": len(self.stack)}
            self.order.append(name)
        _reset_peak()
        self.stack.append([name, time.perf_counter(), _status("VmRSS")])

    def leave(self) -> None:
        name, start, peak = self.stack.pop()
        peak = max(peak, _status("VmHWM"))
        for frame in self.stack:
            frame[2] = max(frame[2], peak)
        row = self.rows[name]
        row["calls"] += 1
        row["seconds"] += time.perf_counter() - start
        row["peak"] = max(row["peak"], peak)
        row["after"] = _status("VmRSS")

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return wrapper


# Pieces called more than once whose calls differ (the unfolded and the folded model).
SPLIT = {"to_onnx", "to_litert", "run_passes"}

# (label, module, attribute path): every callable the export may go through.
PIECES = [
    ("fold", "kerasbn.folding.fold", "fold"),
    ("to_onnx", "kerasbn.deploy.onnx", "to_onnx"),
    (
        "trace (get_concrete_function)",
        "tensorflow.python.eager.polymorphic_function.polymorphic_function",
        "Function.get_concrete_function",
    ),
    ("freeze (convert_variables_to_constants_v2)", "tf2onnx.tf_loader", "convert_variables_to_constants_v2"),
    (
        "freeze (convert_variables_to_constants_v2)",
        "tensorflow.python.framework.convert_to_constants",
        "convert_variables_to_constants_v2",
    ),
    ("grappler (tf_optimize_grappler)", "tf2onnx.tf_loader", "tf_optimize_grappler"),
    ("tf.import_graph_def", "tensorflow", "import_graph_def"),
    ("tf2onnx process_tf_graph", "tf2onnx.convert", "process_tf_graph"),
    ("tf2onnx optimize_graph", "tf2onnx.optimizer", "optimize_graph"),
    *(
        (f"tf2onnx {cls}", f"tf2onnx.optimizer.{module}", f"{cls}._optimize")
        for module, cls in (
            ("transpose_optimizer", "TransposeOptimizer"),
            ("upsample_optimizer", "UpsampleOptimizer"),
            ("const_fold_optimizer", "ConstFoldOptimizer"),
            ("const_dequantize_optimizer", "ConstDequantizeOptimizer"),
            ("loop_optimizer", "LoopOptimizer"),
            ("merge_duplicated_nodes_optimizer", "MergeDuplicatedNodesOptimizer"),
            ("reshape_optimizer", "ReshapeOptimizer"),
            ("global_pool_optimizer", "GlobalPoolOptimizer"),
            ("q_dq_optimizer", "QDQOptimizer"),
            ("identity_optimizer", "IdentityOptimizer"),
            ("back_to_back_optimizer", "BackToBackOptimizer"),
            ("einsum_optimizer", "EinsumOptimizer"),
        )
    ),
    ("tf2onnx topological_sort", "tf2onnx.graph", "Graph.topological_sort"),
    ("tf2onnx make_model", "tf2onnx.graph", "Graph.make_model"),
    ("run_passes", "kerasbn.deploy.onnx_passes", "run_passes"),
    ("pass: onnxslim", "kerasbn.deploy.onnx_passes", "slim"),
    ("pass: Conv → Squeeze → Mul/Add", "kerasbn.deploy.onnx_passes", "fuse_through_squeeze"),
    ("pass: MatMul + Add → Gemm", "kerasbn.deploy.onnx_passes", "fuse_matmul_add_into_gemm"),
    ("pass: copy of the graph", "kerasbn.deploy.onnx_passes", "_copy"),
    ("pass check: ORT session + run", "kerasbn.deploy.onnx_passes", "_onnxruntime"),
    ("op_counts (ONNX)", "kerasbn.deploy.onnx", "op_counts"),
    ("random_inputs", "kerasbn.deploy.outputs", "random_inputs"),
    ("keras_outputs (predict_on_batch)", "kerasbn.deploy.outputs", "keras_outputs"),
    ("noise (XLA call)", "kerasbn.deploy.verify", "noise"),
    ("ORT session (final check)", "kerasbn.deploy.runtime", "onnx_runner"),
    ("to_litert", "kerasbn.deploy.litert", "to_litert"),
    ("LiteRT converter.convert", "tensorflow.lite.python.lite", "TFLiteConverterV2.convert"),
    ("LiteRT interpreter", "kerasbn.deploy.runtime", "litert_runner"),
    ("quantize_onnx", "kerasbn.deploy.quantize", "quantize_onnx"),
    ("quant_pre_process", "onnxruntime.quantization.shape_inference", "quant_pre_process"),
    ("quantize_static", "onnxruntime.quantization", "quantize_static"),
    ("write + check (atomic_output body)", "kerasbn.deploy.files", "atomic_output"),
]


def install(recorder: Recorder) -> None:
    wrapped_funcs: dict[int, object] = {}
    for label, module_name, attribute in PIECES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = module
        *path, last = attribute.split(".")
        try:
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, last)
        except AttributeError:
            continue
        if label.startswith("write"):
            continue  # a context manager: its body is measured by the steps inside it
        wrapper = wrapped_funcs.get(id(original)) or recorder.wrap(label, original)
        wrapped_funcs[id(original)] = wrapper
        setattr(owner, last, wrapper)
    # Names imported by value elsewhere (the pass table, the exporters' own imports).
    try:
        passes = importlib.import_module("kerasbn.deploy.onnx_passes")
        if hasattr(passes, "PASSES"):
            passes.PASSES = tuple(
                (n, wrapped_funcs.get(id(f), getattr(passes, f.__name__, f))) for n, f in passes.PASSES
            )
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--int8", metavar="CALIB.npz")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-fold", action="store_true")
    args = parser.parse_args()

    recorder = Recorder()
    recorder.enter("total")
    recorder.enter("imports (keras, tf, kerasbn, tf2onnx)")
    import keras
    import tensorflow  # noqa: F401

    import kerasbn  # noqa: F401

    if args.output.endswith(".onnx"):
        import tf2onnx  # noqa: F401
    recorder.leave()
    install(recorder)
    recorder.enter("load .keras")
    model = keras.saving.load_model(args.model)
    recorder.leave()
    common = {"fold": not args.no_fold, "batch_sizes": sorted({1, args.batch}), "overwrite": True}
    if args.int8:
        from kerasbn.deploy.files import load_inputs
        from kerasbn.deploy.quantize import export_int8

        rows = load_inputs(args.int8, model)
        recorder.enter("export_int8")
        export_int8(model, args.output, rows, **common)
    elif args.output.endswith(".tflite"):
        from kerasbn.deploy.litert import export_litert

        recorder.enter("export_litert")
        export_litert(model, args.output, **common)
    else:
        from kerasbn.deploy.onnx import export_onnx

        recorder.enter("export_onnx")
        export_onnx(model, args.output, **common)
    recorder.leave()
    recorder.leave()
    print(f"{'step':<48} {'calls':>5} {'s':>7} {'peak GB':>8} {'RSS after GB':>12}")
    for name in recorder.order:
        row = recorder.rows[name]
        indent = "  " * row["depth"]
        print(
            f"{indent + name.rpartition(' / ')[2]:<48} {row['calls']:>5} {row['seconds']:>7.2f} {row['peak'] / GB:>8.2f} "
            f"{row['after'] / GB:>12.2f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
