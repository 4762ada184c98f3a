"""Freezing the BN statistics of fused layers: now (`freeze`) or after N steps (`FreezeBatchNorm`).

Krishnamoorthi 2018 (batch normalization in quantization-aware training): after some training, the fused layers stop
using batch statistics (no more σ_B/σ correction) and their moving statistics
stop changing, so the last steps train exactly the folded layer that is
deployed. PyTorch's ``freeze_bn_stats`` is the same switch.
"""

from __future__ import annotations

import keras
import numpy as np

from kerasbn.qat import layers


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

    Examples:
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
