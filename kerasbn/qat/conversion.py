"""`kerasbn.qat.convert`: the folded float model of a QAT model, for float deployment."""

from __future__ import annotations

import keras

from kerasbn.folding.rewrite import Patch, rebuild
from kerasbn.qat import layers


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
