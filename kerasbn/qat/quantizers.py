"""The fake-quant math QAT trains with: `kerasbn.ops.fake_quant`, under the name the QAT half uses.

The math and the lowering switch live in ``ops/`` so that the exporters in
``deploy/`` can use them without importing ``qat/``; see that module for the
grids, the nudging, the lowerings and the protocol of quantization-aware layers.
"""

from kerasbn.ops.fake_quant import (
    LOWERINGS,
    current_lowering,
    fake_quant_activation,
    fake_quant_weight,
    is_activation_quantizer,
    is_quantization_aware,
    is_weight_quantized,
    lowering,
    nudged_range,
    weight_grid,
    weight_levels,
    weight_scale,
    zero_point,
)

__all__ = [
    "LOWERINGS",
    "current_lowering",
    "fake_quant_activation",
    "fake_quant_weight",
    "is_activation_quantizer",
    "is_quantization_aware",
    "is_weight_quantized",
    "lowering",
    "nudged_range",
    "weight_grid",
    "weight_levels",
    "weight_scale",
    "zero_point",
]
