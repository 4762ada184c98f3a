"""Quantization-aware training with Batch Normalization folded in: prepare → train → convert.

``prepare`` turns a float model into a trainable quantization-aware copy
(`kerasbn.qat.prepare`), which trains with ``fit`` and saves as ``.keras``;
``freeze`` / `FreezeBatchNorm` stop the BN statistics (Krishnamoorthi 2018,
section 3.2); ``convert`` gives the folded float model; the int8 exporters
read the learned grids and ranges (`kerasbn.qat.layers`,
`kerasbn.qat.quantizers`). The math is in ``docs/qat.md``.
"""

from __future__ import annotations

import keras
import numpy as np

from kerasbn.folding.rewrite import Patch, rebuild
from kerasbn.ops.fake_quant import is_quantization_aware
from kerasbn.qat import layers
from kerasbn.qat.prepare import FloatLayer, Preparation, calibrate_ranges, prepare
from kerasbn.qat.quantizers import lowering, weight_grid

__all__ = [
    "FloatLayer",
    "FreezeBatchNorm",
    "Preparation",
    "calibrate_ranges",
    "convert",
    "freeze",
    "is_qat",
    "layers",
    "lowering",
    "prepare",
    "weight_grid",
]


def is_qat(model: keras.Model) -> bool:
    """True if ``model`` has any quantization-aware layer (weight or activation fake-quant).

    A duck-typed test (`kerasbn.ops.fake_quant.is_quantization_aware`), which
    the exporters run without importing this package.
    """
    return is_quantization_aware(model)


def freeze(model: keras.Model) -> int:
    """Freeze the BN statistics of every fused layer now; returns how many were frozen.

    From the next training step on, a fused layer computes exactly its
    inference form (moving statistics folded into the quantized kernel, no
    batch-statistics correction) and its moving statistics stop changing, as
    PyTorch's ``freeze_bn_stats``. Freezing is stored in the layer's
    ``freeze_at`` weight, so it survives saving.
    """
    fused = layers.fused(model)
    for layer in fused:
        if not bool(keras.ops.convert_to_numpy(layer.frozen())):
            layer.freeze_at.assign(np.asarray(keras.ops.convert_to_numpy(layer.steps), np.int32))
    return len(fused)


class FreezeBatchNorm(keras.callbacks.Callback):
    """Freeze the BN statistics of a QAT model after ``after_steps`` more training steps.

    The step is counted inside the fused layers (their ``steps`` weight), so
    it holds under XLA and on JAX, whose ``fit`` keeps the weights out of the
    model between steps. Layers already frozen stay frozen.

    Args:
        after_steps: Training steps (batches) from the start of ``fit``.

    Example:
        >>> import kerasbn
        >>> callback = kerasbn.qat.FreezeBatchNorm(after_steps=100)
    """

    def __init__(self, after_steps: int):
        super().__init__()
        if int(after_steps) < 0:
            raise ValueError(f"after_steps must be >= 0, got {after_steps}.")
        self.after_steps = int(after_steps)

    def on_train_begin(self, logs=None):
        for layer in layers.fused(self.model):
            if bool(keras.ops.convert_to_numpy(layer.frozen())):
                continue
            steps = int(keras.ops.convert_to_numpy(layer.steps))
            layer.freeze_at.assign(np.asarray(steps + self.after_steps, np.int32))


def convert(model: keras.Model) -> keras.Model:
    """The folded float model of a QAT model: its inference without fake quantization.

    Each fused layer becomes its linear layer with the BN folded in with the
    moving statistics (kernel ``W·s``, bias ``(b − μ)·s + β``); wrapped layers
    get their float kernels back; activation quantizers go. The result is a
    plain Keras model for float deployment (`kerasbn.export` without int8).
    """
    patches: dict[int, Patch] = {}
    replace = {}
    for layer in layers.weight_quantized(model):
        inner = layer.layer
        config = inner.get_config()
        weights = {}
        if isinstance(layer, layers.FusedBatchNorm):
            config["use_bias"] = True
            main = layer.kernels.main
            kernel = layer.kernels.scale_outputs(layer.kernels.variable(main), layer.fold_scale())
            weights = {
                main: keras.ops.convert_to_numpy(kernel),
                "bias": keras.ops.convert_to_numpy(layer.folded_bias()),
            }
        patches[id(layer)] = Patch(weights=weights)
        replace[id(layer)] = _plain(type(inner), config)
    removed = {id(q) for q in layers.activation_quantizers(model) if not _inside_wrapper(q, model)}
    return rebuild(model, patches, removed, replace)


def _plain(cls, config):
    def make(_config: dict) -> keras.layers.Layer:
        return cls.from_config(config)

    return make


def _inside_wrapper(quantizer: layers.ActivationQuantizer, model: keras.Model) -> bool:
    return any(layer.activation_quantizer is quantizer for layer in layers.weight_quantized(model))
