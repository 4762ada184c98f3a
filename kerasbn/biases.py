"""`kerasbn.strip_redundant_biases`: the training-time rewrite.

For ``z = BN(W·u + b)`` the bias ``b`` is absorbed by the BN's mean
subtraction (Ioffe & Szegedy, 2015, §3.2), so the layer can drop it. In
training the batch mean absorbs it; in inference moving the bias into the
moving mean, ``μ ← μ − b``, keeps ``(W·u + b − μ)·s + β = (W·u − (μ − b))·s + β``.
"""

from __future__ import annotations

import keras
import numpy as np

from kerasbn import kernels
from kerasbn.audit import redundant_biases
from kerasbn.graph import build_graph
from kerasbn.rewrite import Patch, read_weights, rebuild


def strip_redundant_biases(model: keras.Model) -> keras.Model:
    """A new model without the biases that a following BN makes redundant.

    Each Dense/Conv layer (no activation, called once) whose only reader is a
    plain BN over its channel axis gets ``use_bias=False``; its bias moves into
    the BN's moving mean. Inference outputs are unchanged and the model stays
    trainable. ``kerasbn.audit(model).redundant_biases`` lists the layers.

    Args:
        model: A Functional or Sequential Keras model (nested models included).

    Returns:
        The new model; ``model`` is untouched.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` has no functional graph.
    """
    graph = build_graph(model)
    patches: dict[int, Patch] = {}
    for call, bn in redundant_biases(graph):
        weights = read_weights(call.layer)
        bias = weights.pop("bias")
        patches[id(call.layer)] = Patch({"use_bias": False}, weights)
        bn_weights = read_weights(bn.layer)
        patches[id(bn.layer)] = Patch({}, kernels.bias_into_mean(bn_weights, np.asarray(bias)))
    return rebuild(model, patches)
