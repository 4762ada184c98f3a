"""Export a Keras model to ONNX, folded first and checked with ONNX Runtime.

The conversion goes through `tf2onnx.convert.from_function` on a
`tf.function` whose input signature has a dynamic batch dimension, the path
Keras's own ``model.export(format="onnx")`` takes; ``from_keras`` is
unreliable on Keras 3. While it traces, grouped convolutions are written as
the plain TensorFlow op (`_graph_mode_grouped_conv`) and ``Erfc`` gets a
conversion (`_erfc`), so keras-hub's depthwise-as-grouped convolutions and
exact GELU convert. The passes of `kerasbn.deploy.onnx_passes` then fuse
what a ``Conv``, ``ConvTranspose`` or ``Gemm`` can carry, each checked by
ONNX Runtime against the graph before it. The written file is run by ONNX
Runtime at two batch sizes and compared with the original Keras model by
`kerasbn.deploy.verify.compare`, so a bad fold, conversion or pass never
reaches the output path.

tf2onnx and ONNX Runtime are imported inside the functions: they cost
seconds, which `import kerasbn` should not pay.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerasbn.deploy.files import atomic_output
from kerasbn.deploy.verify import VerifyResult
from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError
from kerasbn.report import export_table, op_table


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and how it checked it.

    Attributes:
        path: the ONNX file (written only when every check passed).
        opset: the ONNX opset of the graph.
        op_counts: op type → count in the written graph.
        op_counts_unfolded: the same for the model converted without folding
            (None with ``fold=False``): the "before" column of the table.
        fold_report: the fold engine's report, or None with ``fold=False``.
        checks: one `VerifyResult` per batch size (empty with ``verify=False``).
        size: bytes of the written file.
        size_unfolded: bytes of the unfolded model's ONNX (None with ``fold=False``).
        passes: the `kerasbn.deploy.onnx_passes` passes that changed the graph, in order.
    """

    path: Path
    opset: int
    op_counts: dict[str, int]
    op_counts_unfolded: dict[str, int] | None = None
    fold_report: Any = None
    checks: tuple[VerifyResult, ...] = field(default_factory=tuple)
    size: int = 0
    size_unfolded: int | None = None
    passes: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def op_table(self) -> list[tuple[str, int | None, int]]:
        """Rows (op type, count before fold or None, count after), onnx-simplifier style."""
        return op_table(self.op_counts, self.op_counts_unfolded)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kerasbn export --format json``)."""
        return {
            "path": str(self.path),
            "opset": self.opset,
            "op_counts": dict(self.op_counts),
            "op_counts_unfolded": None if self.op_counts_unfolded is None else dict(self.op_counts_unfolded),
            "fold": None if self.fold_report is None else self.fold_report.to_dict(),
            "verified": self.verified,
            "checks": [c.to_dict() for c in self.checks],
            "size": self.size,
            "size_unfolded": self.size_unfolded,
            "passes": list(self.passes),
        }

    def __rich__(self) -> Any:
        return export_table(
            f"ONNX graph of {self.path.name} (opset {self.opset})",
            self.op_counts,
            self.op_counts_unfolded,
            self.size,
            self.size_unfolded,
        )


class ExportVerificationError(VerificationError):
    """ONNX Runtime disagrees with Keras; `result` holds the numbers (nothing was written)."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    fold: bool = True,
    optimize: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    batch_sizes: Sequence[int] = (1, 8),
    inputs: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Fold BatchNormalization away, convert to ONNX and check it with ONNX Runtime.

    Args:
        model: a functional or Sequential `keras.Model` (TensorFlow backend).
        path: the `.onnx` file to write (atomically).
        opset: ONNX opset; tf2onnx's default when None.
        fold: run `kerasbn.fold` first so no BatchNormalization, and no
            per-channel Mul/Add left over from one, reaches the graph.
        optimize: run the graph passes of `kerasbn.deploy.onnx_passes` (each
            checked by ONNX Runtime against the graph before it when `verify`).
        verify: compare ONNX Runtime with the original Keras model at every
            batch size in `batch_sizes` before the file is put in place.
        overwrite: replace an existing `path`.
        batch_sizes: batch sizes of the random verification inputs; two
            different ones show the batch dimension is really dynamic.
        inputs: verification inputs in the structure the model takes (as
            `kerasbn.deploy.files.load_inputs` returns them) instead of random ones;
            checked whole and as their first row.
        atol, rtol: give either for the element-wise check ``|onnx − keras| ≤ atol + rtol·|keras|``;
            by default the check is scale-aware and calibrated to the model's own float32
            noise (`kerasbn.deploy.verify.compare`).
        seed: seed of the random inputs.
        on_step: called with a short description before each long step.

    Returns:
        An `ExportResult`.

    Raises:
        ExportVerificationError: ONNX Runtime disagrees with Keras; no file is written.
        UnsupportedModelError: the model cannot be traced or converted.
        KerasbnError: the output path is not writable or exists.
    """
    import keras

    _require_tensorflow_backend()
    step = on_step or (lambda _message: None)
    path = Path(path)
    if verify and not batch_sizes and inputs is None:
        raise KerasbnError("export_onnx: verification needs at least one batch size")
    fold_report = None
    before = size_before = None
    target = model
    if fold:
        from kerasbn.folding.fold import fold as fold_model

        step("Folding BatchNormalization")
        folded = fold_model(model)
        target, fold_report = folded.model, folded.report
        step("Converting the unfolded model (for the op table)")
        unfolded = to_onnx(model, opset=opset)
        before, size_before = op_counts(unfolded), unfolded.ByteSize()
    step("Converting to ONNX")
    proto = to_onnx(target, opset=opset)
    passes: tuple[str, ...] = ()
    if optimize:
        from kerasbn.deploy.onnx_passes import run_passes

        step("Fusing what Conv, ConvTranspose and Gemm can carry")
        feed = None
        if verify:
            feed = keras.tree.flatten(inputs) if inputs is not None else _random_arrays(model, max(batch_sizes), seed)
        proto, passes = run_passes(proto, feed, atol=atol, rtol=rtol)
    after = op_counts(proto)
    opset_used = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        checks: tuple[VerifyResult, ...] = ()
        if verify:
            step("Checking with ONNX Runtime")
            checks = _check_with_onnxruntime(tmp, model, batch_sizes, inputs, atol, rtol, seed)
        result = ExportResult(
            path, opset_used, after, before, fold_report, checks, proto.ByteSize(), size_before, passes
        )
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.max_abs_error)
            raise ExportVerificationError(
                f"ONNX Runtime disagrees with Keras at batch size {worst.batch_size}: max |error| "
                f"{worst.max_abs_error:.3g} exceeds {worst.tolerance}; nothing written",
                result,
            )
    return result


def to_onnx(model: Any, *, opset: int | None = None) -> Any:
    """Convert `model` to an `onnx.ModelProto` with a dynamic batch dimension: tf2onnx's graph, no passes.

    Inputs keep the model's input names; outputs are the model's outputs in
    `keras.tree.flatten` order.
    """
    import keras
    import tensorflow as tf

    _require_tensorflow_backend()
    try:
        tensors = list(model.inputs)
    except (AttributeError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot export {type(model).__name__}: the model has no input signature") from exc
    specs = [tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=_onnx_name(t.name, i)) for i, t in enumerate(tensors)]
    structure = model.input

    def forward(*args):
        outputs = model(keras.tree.pack_sequence_as(structure, list(args)), training=False)
        return tuple(keras.tree.flatten(outputs))

    function = tf.function(forward, input_signature=specs, autograph=False)
    with _tf2onnx() as tf2onnx, _graph_mode_grouped_conv():
        try:
            try:
                with _optimizer_without_copies():
                    proto, _ = tf2onnx.convert.from_function(
                        function, input_signature=specs, opset=opset, custom_op_handlers={"Erfc": (_erfc, [])}
                    )
            except Exception:  # noqa: BLE001 (an optimizer tf2onnx would have skipped: convert its own way)
                gc.collect()
                proto, _ = tf2onnx.convert.from_function(
                    function, input_signature=specs, opset=opset, custom_op_handlers={"Erfc": (_erfc, [])}
                )
        except Exception as exc:  # tf2onnx raises bare Exceptions for unsupported ops
            raise UnsupportedModelError(f"tf2onnx cannot convert the model: {_first_line(exc)}") from exc
        finally:
            del function
            # tf2onnx's graphs hold reference cycles; unreleased, they stay resident
            # through the passes and the checks (gigabytes for ResNet50).
            gc.collect()
    return proto


@contextlib.contextmanager
def _optimizer_without_copies() -> Iterator[None]:
    """tf2onnx's ONNX optimizers run on its graph in place, and write the graph's protos once, at the end.

    By default tf2onnx deep-copies the whole graph, weights included, before
    each of its optimizers (a dozen, repeated until nothing changes) so that
    one that raises can be skipped; its ``TF2ONNX_CATCH_ERRORS`` switch (read
    as "set", whatever its value) turns that off. After each optimizer it
    also rewrites every node's protobuf from its Python attributes: with
    protobuf's upb backend the replaced attributes stay in the node's arena,
    so every rewrite keeps one more copy of the weights. The optimizers read
    the Python attributes only, and ``make_graph`` rewrites the protos before
    the model is built, so here each optimizer skips that rewrite (and its
    logging-only node statistics). For ResNet50 the two cost over 7 GB and
    most of the conversion's time. `to_onnx` converts again tf2onnx's default
    way if an optimizer then raises; ONNX Runtime checks the result either way.
    """
    from tf2onnx import constants
    from tf2onnx.optimizer.optimizer_base import GraphOptimizerBase

    def optimize(self: Any, graph: Any, iteration: int) -> Any:
        self.opt_iteration = iteration
        graph = self._optimize(graph)
        graph.delete_unused_nodes(graph.outputs)
        return graph

    name = constants.ENV_TF2ONNX_CATCH_ERRORS
    saved, original = os.environ.get(name), GraphOptimizerBase.optimize
    os.environ[name] = "FALSE"
    GraphOptimizerBase.optimize = optimize
    try:
        yield
    finally:
        GraphOptimizerBase.optimize = original
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def _require_tensorflow_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"ONNX export goes through tf2onnx and needs the TensorFlow backend, not {keras.backend.backend()}; "
            "run with KERAS_BACKEND=tensorflow"
        )


def op_counts(proto: Any) -> dict[str, int]:
    """Op type → number of nodes, subgraphs (If, Loop, Scan bodies) included."""
    counts: Counter[str] = Counter()

    def visit(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(proto.graph)
    return dict(sorted(counts.items()))


def _check_with_onnxruntime(
    file: Path, model: Any, batch_sizes: Sequence[int], inputs: Any, atol: float | None, rtol: float | None, seed: int
) -> tuple[VerifyResult, ...]:
    from kerasbn.deploy.runtime import onnx_runner
    from kerasbn.deploy.verify import check_runtime

    return check_runtime(model, onnx_runner(file), batch_sizes, inputs, atol=atol, rtol=rtol, seed=seed)


def _random_arrays(model: Any, batch_size: int, seed: int) -> list[Any]:
    import keras

    from kerasbn.deploy.verify import random_inputs

    return keras.tree.flatten(random_inputs(model, batch_size, seed))


@contextlib.contextmanager
def _graph_mode_grouped_conv() -> Iterator[None]:
    """While tracing, Keras's TensorFlow ``conv`` always emits the plain convolution op, grouped kernels too.

    Keras runs a grouped convolution (input channels ≠ the kernel's) and a
    channels_first Conv3D inside a ``tf.function(jit_compile=True)`` because
    TensorFlow's CPU *kernels* lack them; tf2onnx cannot convert that call
    ("No Op registered for StatefulPartitionedCall"). The graph op itself
    accepts a grouped kernel, and tf2onnx sets the ONNX ``Conv``'s ``group``
    from the kernel's shape, so the traced graph only needs the plain op (the
    one Keras emits for every other convolution). It is never run by
    TensorFlow here: ONNX Runtime checks the result. The module attribute is
    restored afterwards (Keras looks it up at call time); tracing another
    model in another thread meanwhile would see the patch too.
    """
    import tensorflow as tf
    from keras.src import backend
    from keras.src.backend.tensorflow import nn

    original = nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = backend.standardize_data_format(data_format)
        tf_format = nn._convert_data_format(data_format, len(inputs.shape))
        return tf.nn.convolution(
            inputs, kernel, strides, padding.upper(), data_format=tf_format, dilations=dilation_rate
        )

    nn.conv = conv
    try:
        yield
    finally:
        nn.conv = original


def _erfc(ctx: Any, node: Any, name: str, args: list) -> None:
    """tf2onnx handler for ``Erfc`` (exact GELU: ``0.5·x·erfc(−x/√2)``), which ONNX lacks: ``1 − Erf(x)``.

    Near erfc's small values (GELU of x < −3) the subtraction loses relative
    precision, but not absolute: the error stays below float32's spacing at 1.
    """
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=name)
    shapes, dtypes, output = node.output_shapes, node.output_dtypes, node.output[0]
    ctx.remove_node(node.name)
    ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[output], name=name, shapes=shapes, dtypes=dtypes)


@contextlib.contextmanager
def _tf2onnx() -> Iterator[Any]:
    """tf2onnx, patched for NumPy 2 the way Keras does it, its INFO/WARNING logging held back meanwhile."""
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    logger = logging.getLogger("tf2onnx")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            import tf2onnx

            patch_tf2onnx()
            yield tf2onnx
        finally:
            logger.setLevel(level)


def _onnx_name(name: str, index: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name or "")
    return cleaned or f"input_{index}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."
