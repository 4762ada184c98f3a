"""Run an exported file the way a deployment would: ONNX Runtime or the LiteRT interpreter.

Both runners take and return flat lists of arrays in the order of the Keras
model's `keras.tree.flatten`-ed inputs and outputs, so `kerasbn.deploy.verify.Reference`
judges them against Keras directly, and `median_latency` times them the same way.

The LiteRT interpreter is `ai-edge-litert`'s; TensorFlow's ``tf.lite.Interpreter``
(deprecated, the same engine) is the fallback where ai-edge-litert is not installed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def onnx_runner(path: str | os.PathLike | bytes) -> Runner:
    """A function running the ONNX file at `path` (or these bytes of one) in ONNX Runtime (CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, {n: np.asarray(a) for n, a in zip(names, arrays)}))

    return run


def litert_interpreter(content: bytes) -> Any:
    """A LiteRT `Interpreter` for a flatbuffer (ai-edge-litert's, else TensorFlow's)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow still ships the same interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter(model_content=content)


def litert_runner(path: str | os.PathLike | bytes, input_names: Sequence[str]) -> Runner:
    """A function running the LiteRT file at `path` (or these bytes of one) through its one signature.

    `input_names` are the signature's input names in the model's input order
    (`kerasbn.model_signature.Signature.names`; the signature lists them sorted);
    the outputs are ``output_0``, ``output_1``, ... in the model's order. The
    signature runner resizes the batch dimension on each call.
    """
    interpreter = litert_interpreter(path if isinstance(path, bytes) else Path(path).read_bytes())
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise ValueError(f"{_label(path)}: expected one signature, found {sorted(signatures)}")
    key, spec = next(iter(signatures.items()))
    runner = interpreter.get_signature_runner(key)
    inputs = list(input_names)
    if sorted(inputs) != sorted(spec["inputs"]):
        raise ValueError(f"{_label(path)}: the signature's inputs are {spec['inputs']}, not {inputs}")
    outputs = sorted(spec["outputs"], key=lambda name: int(name.rsplit("_", 1)[-1]))

    # The interpreter refuses, rather than casts, an array of another dtype (float64 from an .npz).
    dtypes = {name: detail["dtype"] for name, detail in runner.get_input_details().items()}

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = runner(**{n: np.asarray(a, dtypes[n]) for n, a in zip(inputs, arrays)})
        return [np.array(result[n]) for n in outputs]

    return run


def median_latency(run: Runner, arrays: Sequence[np.ndarray], *, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``run(arrays)`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run(arrays)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(arrays)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _label(path: str | os.PathLike | bytes) -> str:
    return "the LiteRT model" if isinstance(path, bytes) else str(path)
