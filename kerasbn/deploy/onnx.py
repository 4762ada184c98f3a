"""The ONNX target: tf2onnx with a dynamic batch, graph passes, ONNX Runtime, int8 by ONNX Runtime's quantizer.

The conversion goes through `tf2onnx.convert.from_function` on a
`tf.function` whose input signature has a dynamic batch dimension, the path
Keras's own ``model.export(format="onnx")`` takes; ``from_keras`` is
unreliable on Keras 3. While it traces, grouped convolutions are written as
the plain TensorFlow op (`_graph_mode_grouped_conv`), ``keras.ops.map`` as a
vectorized map (`_vectorized_map`) and ``Erfc`` gets a conversion (`_erfc`),
so keras-hub's depthwise-as-grouped convolutions, D-FINE's per-sample query
gathers and exact GELU convert. The passes of `kerasbn.deploy.onnx_passes` then fuse
what a ``Conv``, ``ConvTranspose`` or ``Gemm`` can carry. The pipeline
(`kerasbn.deploy.export`) runs the file in ONNX Runtime and judges it.

tf2onnx and ONNX Runtime are imported inside the functions: they cost
seconds, which `import kerasbn` should not pay.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerasbn.deploy.runtime import Runner
from kerasbn.deploy.target import Target, require_tensorflow
from kerasbn.errors import UnsupportedModelError, first_line


class OnnxTarget(Target):
    """ONNX files, run by ONNX Runtime (CPU)."""

    name = "onnx"
    title = "ONNX"
    runtime = "ONNX Runtime"
    suffix = ".onnx"
    options = frozenset({"opset"})

    def convert(self, model: Any, sig: Any, *, dtype: str = "float32", opset: int | None = None) -> Any:
        graph = to_onnx(model, sig, opset=opset)
        if dtype == "float16":
            # ONNX Runtime's converter: float16 weights and arithmetic, float32 inputs and outputs
            # (a drop-in for the float32 file); ops without float16 kernels stay float32 behind Casts.
            from onnxruntime.transformers.float16 import convert_float_to_float16

            graph = convert_float_to_float16(graph, keep_io_types=True)
        return graph

    def check_backend(self) -> None:
        require_tensorflow("ONNX export goes through tf2onnx")

    def passes(self) -> Sequence[tuple[str, Callable[[Any], Any]]]:
        from kerasbn.deploy.onnx_passes import PASSES

        return PASSES

    def serialize(self, graph: Any) -> bytes:
        return graph.SerializeToString()

    def load(self, content: bytes) -> Any:
        import onnx

        return onnx.load_model_from_string(content)

    def runner(self, source: Path | bytes, sig: Any) -> Runner:
        from kerasbn.deploy.runtime import onnx_runner

        return onnx_runner(source)

    def probed(self, content: bytes, tensors: Sequence[Any]) -> bytes:
        # A tensor made by a QuantizeLinear stays in ONNX Runtime's optimized graph as the output of the fused
        # kernel (QLinearConv...): as a graph output it is read without changing what runs.
        import onnx

        graph = self.load(content)
        for name in tensors:
            graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        return graph.SerializeToString()

    def op_counts(self, graph: Any) -> dict[str, int]:
        return op_counts(graph)

    def version(self, graph: Any) -> int:
        return max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0)

    def describe(self, filename: str, version: int) -> str:
        return f"ONNX graph of {filename} (opset {version})"

    def quantize(self, model: Any, sig: Any, float_path: Path, rows: Sequence[np.ndarray]) -> Any:
        import onnx

        with tempfile.TemporaryDirectory(prefix="kerasbn-int8-") as folder:
            destination = Path(folder) / "int8.onnx"
            quantize_onnx(float_path, destination, rows)
            return onnx.load(str(destination))


TARGET = OnnxTarget()


def to_onnx(model: Any, sig: Any = None, *, opset: int | None = None) -> Any:
    """Convert `model` to an `onnx.ModelProto` with a dynamic batch dimension: tf2onnx's graph, no passes.

    Inputs and outputs are named as `kerasbn.model_signature.Signature` names them
    (``sig``, the model's own when None; a subclassed model's outputs ``output``,
    ``output_1``, ...), outputs in `keras.tree.flatten` order. Constants the trace
    captured are initializers (`_captures_as_initializers`).
    """
    import tensorflow as tf

    from kerasbn.model_signature import signature

    require_tensorflow("ONNX export goes through tf2onnx")
    sig = sig or signature(model)
    specs = sig.tf_specs()
    forward = sig.forward(model)

    function = tf.function(forward, input_signature=specs, autograph=False)
    with _tf2onnx() as tf2onnx, _graph_mode_grouped_conv(), _vectorized_map():
        # Traced here, under the patches; tf2onnx converts the same (cached) trace.
        captured = _captured_constants(function.get_concrete_function(*specs))
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
            raise UnsupportedModelError(f"tf2onnx cannot convert the model: {first_line(exc)}") from exc
        finally:
            del function
            # tf2onnx's graphs hold reference cycles; unreleased, they stay resident
            # through the passes and the checks (gigabytes for ResNet50).
            gc.collect()
    _captures_as_initializers(proto, captured)
    _name_outputs(proto, sig.output_names)
    return proto


def _captured_constants(concrete: Any) -> dict[str, np.ndarray]:
    """The tensors (not variables) a traced function captured, by the name of the placeholder standing for each.

    A layer holding a constant as a plain tensor (``keras.layers.Normalization``
    given ``mean`` and ``variance``: ConvNeXt's first layer) is traced as a
    placeholder fed with the captured value. tf2onnx freezes captured
    variables but leaves such a placeholder a graph input, which ONNX Runtime
    then asks the caller for (Keras's own ``model.export(format="onnx")`` writes
    the same graph).
    """
    import tensorflow as tf

    placeholders = concrete.graph.inputs[len(concrete.graph.inputs) - len(concrete.captured_inputs) :]
    return {
        placeholder.name: value.numpy()
        for value, placeholder in zip(concrete.captured_inputs, placeholders)
        if value.dtype != tf.resource and hasattr(value, "numpy")
    }


def _captures_as_initializers(proto: Any, captured: dict[str, np.ndarray]) -> None:
    """The graph inputs that stand for captured constants become initializers holding their values."""
    from onnx import numpy_helper

    constants = [i for i in proto.graph.input if i.name in captured]
    for graph_input in constants:
        proto.graph.initializer.append(numpy_helper.from_array(captured[graph_input.name], graph_input.name))
        proto.graph.input.remove(graph_input)


def _name_outputs(proto: Any, names: Sequence[str] | None) -> None:
    """The graph's outputs renamed to the model's output names (tf2onnx's are ``Identity:0``, ``Identity_1:0``...).

    ``names`` is `Signature.output_names`; ``None`` (a subclassed model) names them
    ``output``, ``output_1``, ... A name another tensor of the graph already has
    (an input's) gets a ``_<i>`` suffix.
    """
    outputs = list(proto.graph.output)
    if names is None or len(names) != len(outputs):
        names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    taken = inputs | {i.name for i in graph.initializer} | {name for node in graph.node for name in node.output}
    renames = {}
    for i, (output, name) in enumerate(zip(outputs, names)):
        if output.name in inputs:  # an input passed straight through keeps the input's name
            renames[output.name] = output.name
            continue
        while name in taken and name != output.name:
            name = f"{name}_{i}"
        taken.add(name)
        renames[output.name] = name
    for node in graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]
    for output in outputs:
        output.name = renames[output.name]


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


def quantize_onnx(source: str | os.PathLike, destination: str | os.PathLike, calibration: Sequence[np.ndarray]) -> None:
    """Static int8 quantization of an ONNX file with ONNX Runtime: QDQ, int8 activations, per-channel 7-bit weights.

    `calibration` is the list of input arrays in the graph's input order.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = ort.SessionOptions()
    options.log_severity_level = 3
    names = [i.name for i in ort.InferenceSession(str(source), options).get_inputs()]

    class Reader(CalibrationDataReader):
        """The calibration rows in batches (the graph's batch dimension is dynamic)."""

        def __init__(self) -> None:
            n = calibration[0].shape[0]
            self._batches = iter({name: a[i : i + 64] for name, a in zip(names, calibration)} for i in range(0, n, 64))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    prepared = Path(destination).with_name(f"prepared-{Path(destination).name}")
    try:
        # ONNX Runtime's recommended pre-processing: graph optimization and shape
        # inference, so the quantizer sees every tensor's shape. Symbolic shape
        # inference (it needs sympy) is not needed: only the batch is dynamic.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(destination),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI (AVX2 ones) multiply int8
            # pairs with a saturating 16-bit add, which flipped up to 1 % of
            # the digits demo's classes; ONNX Runtime recommends this there.
            reduce_range=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    except Exception as exc:  # the quantizer raises many exception types for graphs it cannot handle
        raise UnsupportedModelError(f"ONNX Runtime cannot quantize the model: {first_line(exc)}") from exc
    finally:
        prepared.unlink(missing_ok=True)


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


@contextlib.contextmanager
def _vectorized_map() -> Iterator[None]:
    """While tracing, ``keras.ops.map`` is TensorFlow's ``vectorized_map``: batched ops instead of a loop.

    Keras traces ``keras.ops.map`` as a ``tf.map_fn``, a while loop over the
    batch that tf2onnx writes as an ONNX ``Loop`` of per-sample slices.
    ``vectorized_map`` computes the same values with the batched form of each
    op (a per-sample gather becomes one ``GatherV2`` with ``batch_dims``: D-FINE's
    query selection), and falls back to the loop for ops it cannot batch.
    The batch stays dynamic. Restored afterwards, like `_graph_mode_grouped_conv`.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import core

    original = core.map

    def vectorized(f, xs):
        # vectorized_map converts xs (a nest of arrays) itself, as Keras's map does.
        return tf.vectorized_map(f, xs, fallback_to_while_loop=True)

    core.map = vectorized
    try:
        yield
    finally:
        core.map = original


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
