"""`kerasbn.qat.prepare`: a trainable quantization-aware copy of a model.

The pairing is the fold engine's (`kerasbn.folding.plan`): every BN that
folds *backward* into the Dense/Conv/DepthwiseConv/SeparableConv before it
becomes one fused layer with it (`kerasbn.qat.layers`); the fold engine's
reasons say why any other BN stays float. Every other Dense/Conv gets
weight fake-quant. 8-bit activation quantizers go where an int8 graph
requantizes a tensor:

* each input of the model;
* the output of each quantized linear layer, unless its only reader is a
  ReLU or ReLU6 (then after it: the int8 kernel fuses it; any other
  activation is a kernel of its own that reads an int8 input);
* the output of each activation layer and of each merge (Add, Concatenate…:
  one shared range for the merged tensor); a tensor that only a Concatenate
  reads gets none of its own: it is written on the concatenation's range;
* any other tensor a quantized layer reads that is not yet quantized (after
  a float layer), so every int8 kernel sees a quantized input.

Layers and operations that only move or select values (pooling, Flatten,
Reshape, Dropout, padding, ``keras.ops.split``, slicing…) keep their input's
quantization: one range for all of a split's outputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kerasbn.errors import UnsupportedModelError
from kerasbn.folding import plan
from kerasbn.folding.audit import bn_layers
from kerasbn.folding.graph import Call, Graph, build_graph, input_layers
from kerasbn.folding.rewrite import Patch, read_weights, rebuild
from kerasbn.qat import layers as qlayers

ACTIVATIONS = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Softmax,
)
MERGES = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
)
# Layers an int8 graph runs on the quantized values as they are. Not average
# pooling: an int8 average rounds its result back onto a grid (LiteRT's MEAN
# and AVERAGE_POOL_2D, ONNX Runtime's QLinearGlobalAveragePool), so the
# simulation must round there too (measured: 4 output steps on a digits CNN
# when it did not).
PASS_THROUGH = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Permute,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    keras.layers.Identity,
)

# Keras operations (``keras.ops`` called on a functional model's tensors) that only select or move values.
# Their outputs keep their input's range: LiteRT's SPLIT, for one, requires its outputs on its input's scale
# to the bit, which a quantizer of their own (calibrated on part of the tensor) breaks.
PASS_THROUGH_OPERATIONS = ("Split", "GetItem", "Squeeze", "ExpandDims", "Transpose", "Reshape")


def _fuses(layer: Any) -> bool:
    """An int8 Conv/Dense kernel applies this activation itself (no requantization before it).

    ReLU and ReLU6 only: LiteRT's fused activations, and what ONNX Runtime's
    QDQ fusion drops into the output zero point. Any other (LeakyReLU, ELU,
    a threshold or slope) is a kernel of its own that reads an int8 input,
    so the linear layer's output is quantized before it too (measured:
    LiteRT left a keras-hub CSPNet's convolutions float before LEAKY_RELU).
    """
    if isinstance(layer, keras.layers.ReLU):
        return float(layer.negative_slope) == 0 and float(layer.threshold) == 0 and layer.max_value in (None, 6)
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", "") in ("relu", "relu6")
    return False


@dataclass(frozen=True)
class FloatLayer:
    """A BN or linear layer that stays float in the QAT model.

    Attributes:
        layer: Its path (``nested_model/…/layer``).
        reason: Why, one line.
        code: A `kerasbn.folding.plan.Reason` value, or ``"qat_unsupported"``.
    """

    layer: str
    reason: str
    code: str


@dataclass
class Preparation:
    """What `prepare` decided (kept on the model as ``model.qat_preparation`` until it is saved).

    Attributes:
        fused: ``(linear layer, BN)`` path pairs trained as one fused layer.
        weight_quantized: Paths of other linear layers with weight fake-quant.
        activation_quantizers: Names of the activation quantizers inserted.
        float_layers: What stays float, with the reason.
    """

    fused: list[tuple[str, str]] = field(default_factory=list)
    weight_quantized: list[str] = field(default_factory=list)
    activation_quantizers: list[str] = field(default_factory=list)
    float_layers: list[FloatLayer] = field(default_factory=list)


QAT_UNSUPPORTED = "qat_unsupported"


def _bn_qat_refusal(bn: keras.layers.Layer) -> str | None:
    """Why a BN that folds for inference still cannot be trained fused."""
    if getattr(bn, "renorm", False):
        return f"'{bn.name}' uses batch renormalization, which the fused layer does not train"
    if getattr(bn, "virtual_batch_size", None):
        return f"'{bn.name}' uses virtual (ghost) batches, which the fused layer does not train"
    if getattr(bn, "momentum", 0.99) is None:
        return f"'{bn.name}' keeps a cumulative average (momentum=None); the fused layer needs a momentum"
    return None


def _check_policies(model: keras.Model) -> None:
    for layer in model._flatten_layers(include_self=True, recursive=True):
        name = getattr(getattr(layer, "dtype_policy", None), "name", "float32")
        if name != "float32":
            raise UnsupportedModelError(
                f"Layer '{layer.name}' has dtype policy '{name}'; quantization-aware training needs a float32 model "
                "(the fake-quant grids are float32)."
            )


class _Decider:
    """Works out the fused pairs, wrapped layers and quantizer positions over the flattened graph."""

    def __init__(self, model: keras.Model, graph: Graph):
        self.model = model
        self.graph = graph
        self.prep = Preparation()
        self.fused: dict[int, Call] = {}  # id(partner) → BN call
        self.removed: set[int] = set()
        self.wrapped: set[int] = set()
        self.quantize_after: set[int] = set()  # id(layer) whose outputs get a quantizer
        # The outer model's inputs are the graph's first tensor ids, in input order.
        self.input_dtypes = [str(layer.output.dtype) for layer in input_layers(model)]

    def decide(self) -> None:
        self._pairs()
        self._linear()
        self._activations()

    def _pairs(self) -> None:
        for bn in bn_layers(self.model):
            calls = self.graph.calls_of(bn)
            if not calls:
                self._float(bn.name, "is not in the model's functional graph (inside a custom layer)", QAT_UNSUPPORTED)
                continue
            decision = plan.plan(self.graph, calls[0])
            if isinstance(decision, plan.Refusal):
                self._float(plan.path(calls[0]), decision.reason, decision.code.value)
                continue
            partner = decision.partner.layer
            why = None
            if decision.direction != plan.BACKWARD:
                why = f"folds forward into '{partner.name}'; quantization-aware training fuses a BN with the layer before it"
            elif not qlayers.supports(partner):
                why = f"'{partner.name}' ({type(partner).__name__}) has no fused quantization-aware form"
            else:
                why = _bn_qat_refusal(bn)
            if why is not None:
                self._float(plan.path(calls[0]), why, QAT_UNSUPPORTED)
                continue
            self.fused[id(partner)] = calls[0]
            self.removed.add(id(bn))
            self.prep.fused.append((plan.path(decision.partner), plan.path(calls[0])))

    def _linear(self) -> None:
        seen: set[int] = set()
        for call in self.graph.calls:
            layer = call.layer
            if id(layer) in seen or id(layer) in self.fused or plan.family_of(layer) is None:
                continue
            seen.add(id(layer))
            if not qlayers.supports(layer):
                why = f"'{layer.name}' ({type(layer).__name__}) has no quantization-aware form"
            elif getattr(layer, "quantization_mode", None):
                why = f"'{layer.name}' is already quantized ({layer.quantization_mode})"
            elif getattr(layer, "lora_enabled", False):
                why = f"'{layer.name}' has LoRA enabled"
            else:
                self.wrapped.add(id(layer))
                self.prep.weight_quantized.append(plan.path(call))
                continue
            self._float(plan.path(call), why, QAT_UNSUPPORTED)

    def _quantized_layer(self, layer: keras.layers.Layer) -> bool:
        return id(layer) in self.fused or id(layer) in self.wrapped

    def _output_of(self, call: Call) -> int:
        """The tensor a call's quantizer would see (a fused BN's output for a fused partner)."""
        bn = self.fused.get(id(call.layer))
        return bn.outputs[0] if bn is not None else call.outputs[0]

    def _activations(self) -> None:
        g = self.graph
        quantized: set[int] = set()
        # The model's float inputs get a quantizer after their InputLayer (`prepare`).
        quantized.update(
            t for t, dtype in zip(range(len(g.shapes)), self.input_dtypes) if "float" in dtype and t not in g.producer
        )
        for call in g.calls:
            layer = call.layer
            if id(layer) in self.removed:
                # A fused BN: its output is its partner's, decided there.
                continue
            out = self._output_of(call)
            readers = g.consumers_of(out)
            alone = len(readers) == 1 and out not in g.outputs
            only_activation = alone and _fuses(readers[0].layer)
            # Read by a Concatenate alone, the tensor is written on the concatenation's grid (LiteRT's
            # CONCATENATION keeps one scale for its inputs and output): its quantizer is the merge's.
            only_concatenated = alone and isinstance(readers[0].layer, keras.layers.Concatenate)
            if self._quantized_layer(layer) or isinstance(layer, MERGES):
                # Followed by an activation alone, the int8 kernel fuses it: quantize after that.
                if not (only_activation or only_concatenated):
                    self.quantize_after.add(id(layer))
                    quantized.add(out)
            elif isinstance(layer, ACTIVATIONS):
                if not only_concatenated:
                    self.quantize_after.add(id(layer))
                    quantized.add(out)
            elif isinstance(layer, PASS_THROUGH) or (
                not isinstance(layer, keras.layers.Layer) and type(layer).__name__ in PASS_THROUGH_OPERATIONS
            ):
                if all(t in quantized for t in call.inputs):
                    quantized.update(call.outputs)
        # Every tensor an int8 kernel reads must be quantized.
        for call in g.calls:
            if not self._quantized_layer(call.layer):
                continue
            for t in call.inputs:
                if t in quantized:
                    continue
                producer = g.producer.get(t)
                if producer is not None:
                    self.quantize_after.add(id(self._carrier(producer)))
                    quantized.add(self._output_of(producer))
        # The int8 graph returns its outputs as integers on a grid (a global average pool's too): each
        # float output needs a range, or the file's step is unknown and nothing can be exported.
        for t in g.outputs:
            producer = g.producer.get(t)
            if t not in quantized and producer is not None and isinstance(producer.layer, keras.layers.Layer):
                self.quantize_after.add(id(self._carrier(producer)))
                quantized.add(self._output_of(producer))

    def _carrier(self, call: Call) -> keras.layers.Layer:
        """The layer after which the quantizer for ``call``'s output goes (a fused BN's partner)."""
        for partner_id, bn in self.fused.items():
            if bn is call:
                return next(c.layer for c in self.graph.calls if id(c.layer) == partner_id)
        return call.layer

    def _float(self, path: str, reason: str, code: str) -> None:
        self.prep.float_layers.append(FloatLayer(path, reason, code))


def _input_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The InputLayers of the model's float inputs (integer inputs such as token ids stay as they are)."""
    return [layer for layer in input_layers(model) if "float" in str(layer.output.dtype)]


def prepare(
    model: keras.Model,
    *,
    weight_bits: int = 8,
    per_channel: bool = True,
    calibration: Any = None,
    freeze_after: int | None = None,
) -> keras.Model:
    """A trainable quantization-aware copy of ``model``.

    Args:
        model: A built Functional or Sequential float32 model (nested models
            allowed). It is not changed.
        weight_bits: Bits of the weight grids (2 to 8).
        per_channel: One weight scale per output channel (Conv kinds; Dense
            kernels are per tensor, see `kerasbn.qat.layers`).
        calibration: Data to initialize the activation ranges from (any source
            `kerasbn.calibrate` takes: arrays, a ``.npz``/``.npy`` file, an image
            folder), so training starts from the post-training-quantized
            model. Without it each range is set by the first training batch.
        freeze_after: Freeze the BN statistics after this many training steps
            (`kerasbn.qat.freeze`); ``None`` leaves them running until
            `kerasbn.qat.freeze` or `kerasbn.qat.FreezeBatchNorm`.

    Returns:
        The QAT model (compile and ``fit`` it as any Keras model); what was
        decided (fused pairs, weight-quantized layers, activation quantizers,
        what stays float and why) is in ``qat_model.qat_preparation`` (a
        `Preparation`; not saved with the model).

    Raises:
        kerasbn.errors.UnsupportedModelError: a subclassed or unbuilt model, a
            dtype policy other than float32, or the PyTorch backend.

    Examples:
        >>> import keras, kerasbn
        >>> x = keras.Input((8, 8, 3))
        >>> y = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x)))
        >>> qat = kerasbn.qat.prepare(keras.Model(x, y))
        >>> [type(layer).__name__ for layer in qat.layers]
        ['InputLayer', 'ActivationQuantizer', 'ConvBatchNorm', 'ReLU', 'ActivationQuantizer']
    """
    if keras.backend.backend() == "torch":
        raise UnsupportedModelError(
            "Quantization-aware training runs on the TensorFlow and JAX backends; "
            "set KERAS_BACKEND=tensorflow or jax (the PyTorch backend has no fake-quant lowering here)."
        )
    if not 2 <= int(weight_bits) <= 8:
        raise UnsupportedModelError(f"weight_bits must be between 2 and 8, got {weight_bits}.")
    graph = build_graph(model)
    if not graph.calls:
        raise UnsupportedModelError(
            f"Model '{model.name}' ({type(model).__name__}) is subclassed and has no functional graph; "
            "quantization-aware training rebuilds the model layer by layer."
        )
    _check_policies(model)
    decider = _Decider(model, graph)
    decider.decide()
    names = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}

    def quantizer(layer: keras.layers.Layer) -> keras.layers.Layer:
        # One per call of ``layer`` (a shared layer's calls get their own ranges).
        name = next(n for i in itertools.count() if (n := f"{layer.name}_quant" + (f"_{i}" if i else "")) not in names)
        names.add(name)
        decider.prep.activation_quantizers.append(name)
        return qlayers.ActivationQuantizer(name=name)

    patches: dict[int, Patch] = {}
    replace: dict[int, Any] = {}
    by_id = {id(c.layer): c.layer for c in graph.calls}
    for partner_id, bn_call in decider.fused.items():
        bn = bn_call.layer
        weights = read_weights(bn)
        patches[partner_id] = Patch(weights={k: v for k, v in weights.items() if k in _BN_WEIGHTS})
        replace[partner_id] = _fuser(by_id[partner_id], bn, weight_bits, per_channel, freeze_after)
    for layer_id in decider.wrapped:
        replace[layer_id] = _wrapper(by_id[layer_id], weight_bits, per_channel)
    after = {layer_id: quantizer for layer_id in decider.quantize_after}
    for layer in _input_layers(model):
        after[id(layer)] = quantizer
    qat = rebuild(model, patches, decider.removed, replace, after=after)
    qat.qat_preparation = decider.prep
    if calibration is not None:
        calibrate_ranges(qat, calibration)
    return qat


_BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def _fuser(partner: keras.layers.Layer, bn: keras.layers.Layer, bits: int, per_channel: bool, freeze_after: int | None):
    cls = qlayers.fused_class(partner)
    unbiased = bool(getattr(bn, "unbiased", False))

    def make(config: dict) -> keras.layers.Layer:
        inner = type(partner).from_config(config)
        return cls(
            inner,
            epsilon=bn.epsilon,
            momentum=bn.momentum,
            center=bn.center,
            scale=bn.scale,
            unbiased=unbiased,
            freeze_at=-1 if freeze_after is None else int(freeze_after),
            weight_bits=bits,
            per_channel=per_channel,
            name=partner.name,
        )

    return make


def _wrapper(layer: keras.layers.Layer, bits: int, per_channel: bool):
    def make(config: dict) -> keras.layers.Layer:
        return qlayers.QuantizedWeights(
            type(layer).from_config(config), weight_bits=bits, per_channel=per_channel, name=layer.name
        )

    return make


def calibrate_ranges(model: keras.Model, data: Any, *, batch_size: int = 32) -> int:
    """Set every activation range of a QAT model to the min/max over ``data`` (post-training calibration).

    The model runs in inference (moving BN statistics, the weights on their
    grids), eagerly, once over the data; ranges are those of the
    post-training-quantized model. Returns the number of samples seen.
    """
    from kerasbn.statistics.data import Batches, open_batches

    batches = data if isinstance(data, Batches) else open_batches(data, model, batch_size=batch_size)
    quantizers = qlayers.activation_quantizers(model)
    for q in quantizers:
        q.initialized.assign(np.zeros((), np.float32))
        q.calibrating = True
    seen = 0
    try:
        for batch in batches:
            model(batch, training=False)
            seen += int(keras.tree.flatten(batch)[0].shape[0])
    finally:
        for q in quantizers:
            q.calibrating = False
    return seen
