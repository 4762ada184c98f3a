"""A Keras model's inference outputs, as the checks compare them: flattened float64 NumPy arrays.

Every check runs the model the same way (`inference`, one compiled call per
model) on inputs in the structure it takes (`random_inputs`, or the user's).
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np

from kerasbn.errors import UnsupportedModelError, first_line
from kerasbn.model_signature import signature

_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference(model: keras.Model) -> Any:
    """A compiled inference call of ``model`` (structured inputs → outputs as NumPy arrays), one per model.

    On TensorFlow a graph function like ``predict_on_batch``'s (not eager,
    not XLA: both add a channels_first Conv's bias along the wrong axis when
    the channel count equals the width), but kerasbn's own, traced once for
    every batch size (the signature's dynamic batch axis): a check at two
    batch sizes would otherwise trace a large model twice, and TensorFlow
    would count the traces against Keras's predict function and warn about
    retracing on stderr.
    """
    if keras.backend.backend() != "tensorflow":
        return model.predict_on_batch
    call = _CALLS.get(model)
    if call is None:
        import tensorflow as tf

        # The function holds the model weakly, or the cache would keep it alive.
        ref = weakref.ref(model)
        try:
            specs = [signature(model).tf_structure()]
        except UnsupportedModelError:
            specs = None
        call = tf.function(lambda x: ref()(x, training=False), input_signature=specs, autograph=False)
        # One trace per model is by design; TensorFlow reads this flag (private, absent in other versions: harmless).
        call._omit_frequent_tracing_warning = True
        _CALLS[model] = call
    return lambda x: keras.tree.map_structure(np.asarray, call(x))


def keras_outputs(model: keras.Model, inputs: Any) -> list[np.ndarray]:
    """``model``'s inference outputs, flattened, as float64 arrays (`inference`)."""
    outputs = inference(model)(inputs)
    return [np.asarray(y, np.float64) for y in keras.tree.flatten(outputs)]


def random_inputs(model: keras.Model, batch_size: int = 8, seed: int = 0) -> Any:
    """Random inputs for ``model`` in the structure it takes (`kerasbn.model_signature.Signature.random`)."""
    sig = signature(model)
    return sig.pack(sig.random(batch_size, seed))


def outputs_on_random(model: keras.Model, inputs: Any) -> list[np.ndarray]:
    """`keras_outputs` on random ``inputs``; a model that rejects their made-up sizes is a user error.

    An input dimension the model leaves unknown besides the batch (an image
    backbone taking any size) gets 8 in `Signature.random`; a model may need
    more (D-FINE's top-k needs as many positions as it has queries).

    Raises:
        kerasbn.errors.UnsupportedModelError: The model has such a dimension and fails on these inputs.
    """
    sig = signature(model)
    if all(d is not None for spec in sig.inputs for d in spec.shape[1:]):
        return keras_outputs(model, inputs)
    try:
        return keras_outputs(model, inputs)
    except Exception as exc:  # noqa: BLE001 (any failure on made-up sizes: the user gives real ones)
        shapes = ", ".join(str(tuple(a.shape)) for a in keras.tree.flatten(inputs))
        raise UnsupportedModelError(
            f"'{model.name}' fails on random inputs of shape {shapes} (its input sizes are not fixed): "
            f"{first_line(exc)}; give inputs of the size it takes (--inputs FILE.npz)"
        ) from exc


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of the first input array."""
    return int(keras.tree.flatten(inputs)[0].shape[0])
