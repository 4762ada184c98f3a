"""The check of a quantization-aware model's int8 file against the model, before it is written.

`check_file` judges the file's bytes in three steps:

1. Weights: every quantized kernel's integers and scales are in the file,
   equal to its ``weight_grid()`` (the integers exactly, the scales to float32
   rounding). A converter that moves a kernel to another grid (LiteRT
   stores 3-bit weights on a 4-bit grid) fails here.
2. Ranges: every activation quantizer's nudged scale and zero point is a
   quantization parameter of the file.
3. Outputs: on the check inputs, the file's outputs against the model's own
   simulated (fake-quantized) outputs: at most `MAX_LSB` steps of the output
   quantizer per element, and the same top-1 class on every decisive row
   (`OutputCheck.decisive_top1`: a row whose top two classes lie within
   ``2·MAX_LSB`` steps may swap them within the allowed error; the top-1
   agreement over all rows is reported beside it).
4. Layer by layer, where the outputs are further off: each activation
   quantizer of the model fed the file's own integers for every tensor before
   it (the file's quantized tensors made outputs of the file too, which
   leaves the kernels that compute them as they are) must give the file's
   integers within `MAX_LAYER_LSB` step. Through a deep network the outputs
   alone cannot judge the file: the file sums integers exactly and the
   simulation sums float32, so 0.1–0.3 % of a layer's elements, those within
   float32 error of a half step, round one step apart, and each such step
   moves the next layers' sums. On keras-hub's CSPNet (13 convolutions) that
   reaches 7 output steps while no layer is more than one step from the
   simulated layer fed the file's inputs. A wrong bias or kernel is off by
   several steps at its own layer.

Rounding: the weights reach the file as integers already (the ``qdq``
lowering hands tf2onnx the grid itself, whose quotient by the scale is an
integer up to float32 rounding), so neither ``QuantizeLinear``'s round half
to even nor TensorFlow's round half up decides one of them. Activations are
rounded at run time by the runtime's rule; where a value falls exactly
halfway (an integer pixel on a grid of 255/16 steps), ONNX Runtime and the
simulation can differ by one step there, which the output budget covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kerasbn.errors import UnsupportedModelError

# Output steps (of the output's activation quantizer) a runtime may differ from
# the simulation per element: integer requantization after every layer against
# one float rounding in the simulation measured 1 step on CNNs and 2 on an
# 8-layer depthwise-separable net.
MAX_LSB = 2.0
# Steps one layer of the file may differ from the simulated layer fed the file's inputs: both round the same sum
# once, the file's exact and the simulation's float32 (module docstring, step 4).
MAX_LAYER_LSB = 1.0
# The outputs are float32 multiples of the step: |Δ| / step of an exact 2 steps reads 2 ± a few 1e-6.
LSB_SLACK = 1e-3
# Scales are float32 computed by different code (TensorFlow, the converter, NumPy):
# they agree to a few units of float32 rounding, and one step of a learned range
# moves a scale by 1/255 of itself.
SCALE_RTOL = 1e-5


@dataclass(frozen=True)
class OutputCheck:
    """One input case: the file's outputs against the simulated model's.

    Attributes:
        case: What the inputs were (``"batch 8"``, ``"inputs"``, ``"inputs, first row"``).
        batch_size: Rows in the case.
        max_lsb: Max over outputs and elements of ``|Δ|`` in steps of the output's quantizer.
        top1: The fraction of rows whose top-1 class agrees, over the
            classification outputs (None without one).
        decisive_top1: The same over the decisive rows: those whose simulated
            top two classes lie more than ``2·MAX_LSB`` steps apart, the only
            ones whose class an error within `MAX_LSB` cannot swap (None
            without a classification output; 1.0 when no row is decisive).
        layer_lsb: Where `max_lsb` exceeds `MAX_LSB`: the max over the
            judged layers of ``|Δ|`` in steps of the layer's quantizer, each
            fed the file's own inputs (module docstring, step 4); None when not
            judged so.
        worst_layer: The layer (activation quantizer or output) of `layer_lsb`.
        layers: How many layers were judged so (activation quantizers and outputs).
    """

    case: str
    batch_size: int
    max_lsb: float
    top1: float | None
    decisive_top1: float | None = None
    layer_lsb: float | None = None
    worst_layer: str = ""
    layers: int = 0

    @property
    def within(self) -> bool:
        """The outputs within `MAX_LSB` steps, or every judged layer within `MAX_LAYER_LSB`."""
        if self.max_lsb <= MAX_LSB + LSB_SLACK:
            return True
        return self.layer_lsb is not None and self.layer_lsb <= MAX_LAYER_LSB + LSB_SLACK

    @property
    def passed(self) -> bool:
        return self.within and self.decisive_top1 in (None, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "batch_size": self.batch_size,
            "max_lsb": self.max_lsb,
            "top1": self.top1,
            "decisive_top1": self.decisive_top1,
            "layer_lsb": self.layer_lsb,
            "worst_layer": self.worst_layer,
            "layers": self.layers,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class IntegerCheck:
    """The file against the quantization-aware model (`check_file`).

    Attributes:
        weights: The quantized kernels whose grid the file holds (layer path, kernel name).
        activations: How many activation ranges the file's parameters matched.
        outputs: One `OutputCheck` per input case.
        problems: What did not match, one line each.
    """

    weights: tuple[str, ...] = ()
    activations: int = 0
    outputs: tuple[OutputCheck, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs)

    def failure(self) -> str:
        """The first thing that failed, as one line ('' when the check passed)."""
        if self.problems:
            return self.problems[0]
        for o in self.outputs:
            if not o.passed:
                if not o.within:
                    where = (
                        ""
                        if o.layer_lsb is None
                        else f", and {o.worst_layer} fed the file's own inputs by {o.layer_lsb:.3g} "
                        f"(max {MAX_LAYER_LSB:g})"
                    )
                    return (
                        f"{o.case}: an output differs from the simulated model by {o.max_lsb:.3g} steps "
                        f"(max {MAX_LSB:g}){where}"
                    )
                return (
                    f"{o.case}: top-1 agrees with the simulated model on {100 * o.decisive_top1:.2f} % of the "
                    "decisive rows (needs 100 %)"
                )
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "activations": self.activations,
            "outputs": [o.to_dict() for o in self.outputs],
            "problems": list(self.problems),
            "passed": self.passed,
        }


def check_file(
    model: Any, to: str, content: bytes, sig: Any, checks: Any, steps: Sequence[float] | None = None
) -> IntegerCheck:
    """The int8 file ``content`` judged against the quantization-aware ``model`` (see the module docstring).

    Args:
        model: The quantization-aware model.
        to: ``"litert"`` or ``"onnx"``.
        content: The file's bytes.
        sig: The model's `kerasbn.model_signature.Signature`.
        checks: `kerasbn.deploy.verify.Checks`: its input cases.
        steps: The output quantizers' steps (`output_steps`); worked out when None.
    """
    from kerasbn.deploy.target import targets
    from kerasbn.deploy.verify import keras_outputs

    target = targets()[to]
    problems = []
    if to == "litert":
        from kerasbn.deploy.int8_file import litert_activations, litert_weights

        found, ranges = litert_weights(content), litert_activations(content)
    else:
        from kerasbn.deploy.int8_file import onnx_activations, onnx_weights

        graph = target.load(content)
        found, ranges = onnx_weights(graph), onnx_activations(graph)
    matched = []
    for label, bits, grid in _grids(model):
        if any(_same_grid(grid, tensor) for tensor in found):
            matched.append(label)
        else:
            problems.append(f"the {bits}-bit integer weights of {label} are not in the file on their trained grid")
    activations = 0
    for quantizer in activation_quantizers(model):
        scale, zero = _nudged(quantizer)
        if any(_same_range(quantizer, tensor) for tensor in ranges):
            activations += 1
        else:
            problems.append(
                f"the range of activation quantizer '{quantizer.name}' (step {scale:.6g}, zero point {zero}) "
                "is not in the file"
            )
    steps = steps if steps is not None else output_steps(model)
    run = target.runner(content, sig)
    layer_by_layer = None  # built where an output is off by more than MAX_LSB: a second session of the runtime
    outputs = []
    for label, arrays in _cases(checks, sig):
        expected = keras_outputs(model, sig.pack(list(arrays)))
        got = [np.asarray(y, np.float64) for y in run(arrays)]
        worst = max(float(np.max(np.abs(z - y), initial=0.0)) / s for y, z, s in zip(expected, got, steps))
        top1, decisive = [], []
        for y, z, s in zip(expected, got, steps):
            if y.ndim != 2 or y.shape[-1] < 2:
                continue
            same = np.argmax(y, axis=-1) == np.argmax(z, axis=-1)
            top_two = np.sort(y, axis=-1)[:, -2:]
            clear = top_two[:, 1] - top_two[:, 0] > 2 * MAX_LSB * s
            top1.append(float(np.mean(same)))
            decisive.append(float(np.mean(same[clear])) if clear.any() else 1.0)
        layers = (0.0, "", 0)
        if worst > MAX_LSB + LSB_SLACK:
            layer_by_layer = layer_by_layer or _LayerByLayer(model, target, content, ranges, sig, steps)
            layers = layer_by_layer.judge(arrays)
        outputs.append(
            OutputCheck(
                case=label,
                batch_size=int(arrays[0].shape[0]),
                max_lsb=worst,
                top1=min(top1) if top1 else None,
                decisive_top1=min(decisive) if decisive else None,
                layer_lsb=layers[0] if layers[2] else None,
                worst_layer=layers[1],
                layers=layers[2],
            )
        )
    return IntegerCheck(
        weights=tuple(matched), activations=activations, outputs=tuple(outputs), problems=tuple(problems)
    )


class _LayerByLayer:
    """Step 4 of the module docstring: each layer of the model fed the file's own inputs."""

    def __init__(
        self, model: Any, target: Any, content: bytes, activations: Sequence[Any], sig: Any, steps: Sequence[float]
    ) -> None:
        self.model, self.sig, self.steps = model, sig, list(steps)
        self.quantizers = {id(q): q for q in activation_quantizers(model)}
        self.tensors = _quantized_tensors(self.quantizers.values(), activations)
        probed = target.probed(content, [tensor.tensor for tensor in self.tensors.values()])
        self.run = target.runner(probed, sig)

    def judge(self, arrays: Sequence[np.ndarray]) -> tuple[float, str, int]:
        """(max steps, the layer, layers judged) of the model run with the file's tensors in place of its own."""
        import keras
        import tensorflow as tf

        from kerasbn.deploy.layerwise import hooked_calls, traced_once

        values = self.run(list(arrays))
        ends, inner = values[: len(self.steps)], values[len(self.steps) :]
        files = {key: tensor.dequantize(q) for (key, tensor), q in zip(self.tensors.items(), inner)}
        quantizers = list(self.quantizers.values())

        def forced(x: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
            # Each quantizer's own output, and the file's tensor it returns in its place.
            own, taken = {}, {}

            def hook(index: int, call: Any) -> Any:
                def replaced(inputs, *args, **kwargs):
                    y = call(inputs, *args, **kwargs)
                    key = id(quantizers[index])
                    value = _layouts(files[key], y) if key in files else None
                    if value is None:
                        return y
                    own[str(key)], taken[str(key)] = y, value
                    return value

                return replaced

            with hooked_calls(quantizers, hook):
                return self.model(x, training=False), own, taken

        # Traced, as the model runs: TensorFlow has no eager channels-first convolution on every CPU.
        made, own, taken = traced_once(tf.function(forced, autograph=False))(self.sig.pack(list(arrays)))
        # (steps off, what) per judged quantizer, then per output; the first of the largest is reported.
        errors = [
            (
                _steps(taken[key], value, _nudged(self.quantizers[int(key)])[0]),
                f"layer '{self.quantizers[int(key)].name}'",
            )
            for key, value in own.items()
        ]
        errors += [
            (_steps(z, y, step), f"output {i}")
            for i, (y, z, step) in enumerate(zip(keras.tree.flatten(made), ends, self.steps))
        ]
        worst, where = max(errors, key=lambda error: error[0])
        return worst, where, len(errors)


def _steps(a: Any, b: Any, step: float) -> float:
    """max |a − b| in steps of ``step``."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0)) / step


def _same_range(quantizer: Any, tensor: Any) -> bool:
    """Whether the file's `IntegerActivation` ``tensor`` has the quantizer's nudged step and zero point."""
    step, zero = _nudged(quantizer)
    return tensor.unsigned_zero == zero and abs(tensor.scale - step) <= SCALE_RTOL * step


def _quantized_tensors(quantizers: Iterable[Any], activations: Sequence[Any]) -> dict[int, Any]:
    """``id(quantizer)`` → the file's `IntegerActivation` that is its output.

    The converters name a tensor after the TensorFlow op that makes it, inside
    its layer's name scope (``.../<name>_1/FakeQuant...``): the quantizer's own
    (ONNX's ``QuantizeLinear``, LiteRT's input ``QUANTIZE``) or, where LiteRT
    fused the quantizer into the kernel before it, that layer's
    (``.../<name>_1/Relu``). A quantizer with no such tensor of its range, or
    several, is not judged.
    """
    import re

    found = {}
    for quantizer in quantizers:
        names = [quantizer.name] + [layer.name for layer in _inbound_layers(quantizer)]
        scopes = [re.compile(rf"(?:^|/){re.escape(name)}(?:_\d+)?/") for name in names]
        matches = [t for t in activations if _same_range(quantizer, t) and any(p.search(t.name) for p in scopes)]
        if len(matches) == 1:
            found[id(quantizer)] = matches[0]
    return found


def _inbound_layers(layer: Any) -> list[Any]:
    """The layers whose outputs ``layer`` is called on."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    return [t._keras_history.operation for node in nodes for t in node.input_tensors if hasattr(t, "_keras_history")]


def _layouts(value: np.ndarray, like: Any) -> Any:
    """The file's ``value`` in Keras's channels-last layout, as a tensor; None where no layout has ``like``'s shape.

    tf2onnx computes convolutions channels first. Where both layouts have the
    same shape (8×8 pixels of 8 channels) the one closer to ``like`` is it, chosen
    in the graph: the other is off by the range of the values.
    """
    import keras

    shape = tuple(like.shape)
    fitting = [v for v in (value, np.moveaxis(value, 1, -1) if value.ndim > 2 else None) if v is not None]
    fitting = [keras.ops.convert_to_tensor(v.astype(np.float32)) for v in fitting if v.shape == shape]
    if len(fitting) < 2:
        return fitting[0] if fitting else None
    first, second = fitting
    closer = keras.ops.max(keras.ops.abs(first - like)) <= keras.ops.max(keras.ops.abs(second - like))
    return keras.ops.where(closer, first, second)


def _cases(checks: Any, sig: Any) -> list[tuple[str, list[np.ndarray]]]:
    if checks.inputs is not None:
        arrays = sig.flatten(checks.inputs)
        return [("inputs", arrays), ("inputs, first row", [a[:1] for a in arrays])]
    return [(f"batch {b}", sig.random(b, checks.seed + k)) for k, b in enumerate(checks.batch_sizes)]


def weight_quantized(model: Any) -> list[Any]:
    """Every layer of the weight fake-quant protocol (`kerasbn.ops.fake_quant.is_weight_quantized`), at any depth."""
    from kerasbn.ops.fake_quant import is_weight_quantized

    return [layer for layer in model._flatten_layers(include_self=False, recursive=True) if is_weight_quantized(layer)]


def activation_quantizers(model: Any) -> list[Any]:
    """Every activation quantizer (`kerasbn.ops.fake_quant.is_activation_quantizer`), at any depth."""
    from kerasbn.ops.fake_quant import is_activation_quantizer

    return [
        layer for layer in model._flatten_layers(include_self=False, recursive=True) if is_activation_quantizer(layer)
    ]


def _grids(model: Any) -> list[tuple[str, int, tuple[np.ndarray, np.ndarray, int | None]]]:
    """(label, bits, grid) of every integer kernel, a separable layer's depthwise stage too."""
    out = []
    for layer in weight_quantized(model):
        out.append((f"'{layer.name}'", layer.weight_bits, layer.weight_grid()))
        if getattr(layer, "activation_quantizer", None) is not None:  # separable: its depthwise stage too
            out.append((f"'{layer.name}' (depthwise stage)", layer.weight_bits, layer.weight_grid("depthwise_kernel")))
    return out


def _nudged(quantizer: Any) -> tuple[float, int]:
    """(step, unsigned zero point) of an activation quantizer, its range nudged as TensorFlow's FakeQuant does."""
    low, _, step = (np.float64(np.asarray(v)) for v in quantizer.nudged_range())
    return float(step), int(np.rint(-low / step))


def _same_grid(grid: tuple[np.ndarray, np.ndarray, int | None], tensor: Any) -> bool:
    """Whether the file's integer tensor is the grid ``(q, scale, axis)`` in one of the layouts a runtime uses.

    The grid's channel axis is last; a file puts it first (LiteRT's
    ``(out, kh, kw, in)``, ONNX's ``(out, in, kh, kw)``, a depthwise
    ``(in·mult, 1, kh, kw)``), or keeps the Keras layout (a MatMul weight,
    LiteRT's depthwise ``(1, kh, kw, in·mult)``).
    """
    q, scale, axis = grid
    if tensor.values.size != q.size:
        return False
    if (axis is None) != (tensor.axis is None) or scale.size != tensor.scale.size:
        return False
    if not np.allclose(tensor.scale, scale, rtol=SCALE_RTOL, atol=0):
        return False
    layouts = [q, np.moveaxis(q, -1, 0)]
    if q.ndim >= 2:
        layouts.append(np.transpose(q, (q.ndim - 1, q.ndim - 2, *range(q.ndim - 2))))
    for layout in layouts:
        if np.array_equal(layout.reshape(tensor.values.shape), tensor.values):
            return True
    return False


def output_steps(model: Any) -> list[float]:
    """The step of the activation quantizer that makes each output (in `keras.tree.flatten` order).

    The file's outputs are that quantizer's integers dequantized, so its step
    is the unit the comparison counts in.

    Raises:
        UnsupportedModelError: An output is not made by an activation quantizer.
    """
    import keras

    from kerasbn.ops.fake_quant import is_activation_quantizer

    steps = []
    for tensor in keras.tree.flatten(model.outputs):
        layer = _producer(tensor)
        if layer is None or not is_activation_quantizer(layer):
            made_by = "nothing" if layer is None else f"'{layer.name}' ({type(layer).__name__})"
            raise UnsupportedModelError(
                f"output '{tensor.name}' of '{model.name}' is made by {made_by}, not an activation quantizer: "
                "its int8 step is not known; prepare the model with kerasbn.qat.prepare"
            )
        steps.append(_nudged(layer)[0])
    return steps


# Layers that move elements without changing them: an output behind them keeps its quantizer's step.
_LAYOUT_LAYERS = ("Reshape", "Flatten", "Permute", "Identity", "Cropping1D", "Cropping2D", "Cropping3D")


def _producer(tensor: Any) -> Any:
    """The layer whose output ``tensor`` is, looking through nested models and layout-only layers."""
    import keras

    history = getattr(tensor, "_keras_history", None)
    while history is not None:
        layer, node_index, tensor_index = history
        if hasattr(layer, "outputs") and hasattr(layer, "layers") and layer.outputs:
            history = getattr(keras.tree.flatten(layer.outputs)[tensor_index], "_keras_history", None)
            continue
        if type(layer).__name__ in _LAYOUT_LAYERS:
            inputs = keras.tree.flatten(layer._inbound_nodes[node_index].input_tensors) if layer._inbound_nodes else []
            history = getattr(inputs[0], "_keras_history", None) if len(inputs) == 1 else None
            continue
        return layer
    return None
