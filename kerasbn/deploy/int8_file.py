"""The integers an int8 file holds: its quantized weights and its activations' quantization parameters.

An exporter of a quantization-aware model promises that the file computes
with the grids the model trained on. These readers take the promise apart
as a runtime would see it, without running anything:

- `litert_weights` / `onnx_weights`: every integer weight tensor a kernel
  multiplies with (LiteRT's CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED,
  TRANSPOSE_CONV; ONNX's ``DequantizeLinear`` of an int8 constant), with its
  scales and the axis they run along; LiteRT's INT4 tensors unpacked.
- `litert_activations` / `onnx_activations`: every quantized activation
  (LiteRT's int8 non-constant tensors, ONNX's ``QuantizeLinear`` of a
  computed tensor) with its name, scale and zero point, as `IntegerActivation`.

`kerasbn.deploy.qat_int8` compares both with the model's own grids and ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# LiteRT ops whose second input is the weight tensor.
_LITERT_WEIGHT_OPS = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "CONV_3D": 1, "TRANSPOSE_CONV": 1}


@dataclass(frozen=True)
class IntegerWeights:
    """One integer weight tensor of a file.

    Attributes:
        op: The op reading it (``"CONV_2D"``, ``"DequantizeLinear"``).
        name: The tensor's name in the file.
        values: The integers, in the file's layout, as int32.
        scale: One scale per channel along ``axis``, or one value (per tensor).
        axis: The channel axis of ``values`` the scales run along (None per tensor).
        stored_bits: The width the file stores them in (8, or 4 for LiteRT's INT4).
    """

    op: str
    name: str
    values: np.ndarray
    scale: np.ndarray
    axis: int | None
    stored_bits: int = 8


@dataclass(frozen=True)
class IntegerActivation:
    """One quantized activation tensor of a file.

    Attributes:
        name: What names it: the LiteRT tensor's name up to its first ``;``
            (the op that makes it, of the ops the converter fused), the ONNX
            ``QuantizeLinear`` node's name (the TensorFlow op it came from).
        scale: Its one scale.
        zero_point: Its zero point as stored (int8 or uint8).
        unsigned_zero: The zero point as an unsigned 8-bit value (an int8 one + 128).
        tensor: Where it is: LiteRT's (subgraph, tensor index), ONNX's tensor name.
    """

    name: str
    scale: float
    zero_point: int
    unsigned_zero: int
    tensor: tuple[int, int] | str

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """The float64 values the integers ``values`` of this tensor stand for."""
        return (np.asarray(values, np.float64) - self.zero_point) * self.scale


def litert_weights(content: bytes) -> list[IntegerWeights]:
    """The integer weights of the LiteRT flatbuffer ``content`` (see the module docstring)."""
    from kerasbn.deploy.litert import _schema

    schema = _schema()
    model = schema.Model.GetRootAsModel(content, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    found: dict[int, IntegerWeights] = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "")
            if name not in _LITERT_WEIGHT_OPS or op.InputsLength() <= _LITERT_WEIGHT_OPS[name]:
                continue
            index = op.Inputs(_LITERT_WEIGHT_OPS[name])
            tensor = graph.Tensors(index)
            bits = {schema.TensorType.INT8: 8, schema.TensorType.INT4: 4}.get(tensor.Type())
            data = model.Buffers(tensor.Buffer()).DataAsNumpy()
            quantization = tensor.Quantization()
            if bits is None or isinstance(data, int) or quantization is None or not quantization.ScaleLength():
                continue
            shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
            values = _unpack_int4(data, int(np.prod(shape))) if bits == 4 else data.view(np.int8)
            scale = np.asarray(quantization.ScaleAsNumpy(), np.float32)
            found[index] = IntegerWeights(
                op=name,
                name=tensor.Name().decode(),
                values=values.astype(np.int32).reshape(shape),
                scale=scale if scale.size > 1 else scale.reshape(()),
                axis=int(quantization.QuantizedDimension()) if scale.size > 1 else None,
                stored_bits=bits,
            )
    return list(found.values())


def _unpack_int4(data: np.ndarray, count: int) -> np.ndarray:
    """LiteRT's packed INT4: two values a byte, the low nibble first, two's complement."""
    raw = np.asarray(data, np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:count].astype(np.int32)
    return np.where(nibbles > 7, nibbles - 16, nibbles)


def litert_activations(content: bytes) -> list[IntegerActivation]:
    """Every quantized computed tensor of the LiteRT flatbuffer."""
    from kerasbn.deploy.litert import _schema

    schema = _schema()
    model = schema.Model.GetRootAsModel(content, 0)
    found = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            quantization = tensor.Quantization()
            constant = not isinstance(model.Buffers(tensor.Buffer()).DataAsNumpy(), int)
            if tensor.Type() not in (schema.TensorType.INT8, schema.TensorType.UINT8) or constant:
                continue
            if quantization is None or quantization.ScaleLength() != 1:
                continue
            zero = int(quantization.ZeroPoint(0))
            offset = 128 if tensor.Type() == schema.TensorType.INT8 else 0
            name = tensor.Name().decode(errors="replace").split(";")[0]
            found.append(IntegerActivation(name, float(quantization.Scale(0)), zero, zero + offset, (g, t)))
    return found


def onnx_weights(model: Any) -> list[IntegerWeights]:
    """The integer weights of the ONNX ``model``: every ``DequantizeLinear`` of an 8-bit integer constant."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in init or node.input[1] not in init:
            continue
        values = numpy_helper.to_array(init[node.input[0]])
        if values.dtype not in (np.int8, np.uint8):
            continue  # an int32 bias
        scale = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        per_channel = scale.size > 1
        found.append(
            IntegerWeights(
                op=node.op_type,
                name=node.input[0],
                values=values.astype(np.int32),
                scale=scale if per_channel else scale.reshape(()),
                axis=axis % values.ndim if per_channel else None,
            )
        )
    return found


def onnx_activations(model: Any) -> list[IntegerActivation]:
    """Every ``QuantizeLinear`` of a computed tensor in the ONNX ``model`` (its output is the tensor)."""
    from onnx import numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in init or node.input[1] not in init:
            continue
        scale = numpy_helper.to_array(init[node.input[1]])
        has_zero = len(node.input) > 2 and node.input[2] in init
        zero = numpy_helper.to_array(init[node.input[2]]) if has_zero else np.zeros((), np.uint8)
        if scale.size != 1:
            continue
        offset = 128 if zero.dtype == np.int8 else 0
        raw = int(zero.reshape(()))
        found.append(IntegerActivation(node.name, float(scale.reshape(())), raw, raw + offset, node.output[0]))
    return found
