"""A model's twin in another float type, and its evaluation there: float64 gives the exact answer.

A model's *twin* is the same model (same config, same weights) re-created
with its floating dtype policies switched to one float type: in float64 it is
the reference whose rounding error is negligible next to float32's, so any
candidate's error can be measured, not estimated; in float32 it says what a
mixed-precision model's weights compute without half-precision arithmetic.
The twin is created under ``keras.config.set_dtype_policy(dtype)`` (the
global policy is restored afterwards, even on error), since layers that build
their sublayers without an explicit dtype (keras-hub's) follow the global
policy. A twin is cached per model (weakly) and its weights are copied from
the model on every use, so a model trained after the first check is not
judged by stale weights.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np

from kerasbn.deploy.outputs import inference
from kerasbn.deploy.tolerances import ROUNDOFF
from kerasbn.errors import UnsupportedModelError, first_line

_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _float_policy(name: object) -> bool:
    """A dtype policy name that computes in a float type (``float32``, ``mixed_float16``…), not int8/float8 quantized."""
    return isinstance(name, str) and name.removeprefix("mixed_") in ROUNDOFF


def _switch(config: Any, dtype: str) -> Any:
    """``config`` with every floating dtype and dtype policy replaced by ``dtype`` (a new object)."""
    if isinstance(config, list):
        return [_switch(c, dtype) for c in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype":
            if _float_policy(value):
                value = dtype
            elif (
                isinstance(value, dict)
                and value.get("class_name") == "DTypePolicy"
                and _float_policy(value.get("config", {}).get("name"))
            ):
                value = {**value, "config": {**value["config"], "name": dtype}}
            else:
                value = _switch(value, dtype)
        else:
            value = _switch(value, dtype)
        out[key] = value
    return out


def compute_dtype(model: keras.Model) -> str:
    """The narrowest float type any of ``model``'s layers computes in (``"float32"`` for a plain model)."""
    dtypes = {"float32"} if not model.layers else set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        dt = getattr(layer, "compute_dtype", None)
        if dt in ROUNDOFF:
            dtypes.add(dt)
    return max(dtypes or {"float32"}, key=ROUNDOFF.__getitem__)


def weights_dtype(model: keras.Model) -> str:
    """The narrowest float type of ``model``'s floating weights (``"float32"`` for a mixed-precision model)."""
    dtypes = {keras.backend.standardize_dtype(w.dtype) for w in model.weights}
    dtypes = {d for d in dtypes if d in ROUNDOFF} or {"float32"}
    return max(dtypes, key=ROUNDOFF.__getitem__)


def _recreate(obj: Any, dtype: str, what: str) -> Any:
    """``obj`` (a model or layer) re-created from its config with float policies switched to ``dtype``.

    Created under ``dtype`` as the global policy (restored afterwards, even on
    error): layers that build sublayers without an explicit dtype follow it.

    Raises:
        kerasbn.errors.UnsupportedModelError: Its config cannot be written or re-created ("``what`` ...").
    """
    try:
        config = _switch(keras.saving.serialize_keras_object(obj), dtype)
    except Exception as exc:  # noqa: BLE001 (any failure means: no twin)
        raise UnsupportedModelError(f"{what} cannot be written to a config: {first_line(exc)}") from exc
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        return keras.saving.deserialize_keras_object(config)
    except Exception as exc:  # noqa: BLE001 (any failure means: no twin)
        raise UnsupportedModelError(f"{what} cannot be re-created from its config: {first_line(exc)}") from exc
    finally:
        keras.config.set_dtype_policy(previous)


def _create(model: keras.Model, dtype: str) -> keras.Model:
    if dtype == "float64" and keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            # JAX would truncate every float64 array to float32, with a warning each time.
            raise UnsupportedModelError("JAX computes in float64 only with jax_enable_x64 (JAX_ENABLE_X64=1)")
    twin = _recreate(model, dtype, "it")
    if not twin.built:
        shapes = getattr(model, "_build_shapes_dict", None)
        if not shapes:
            raise UnsupportedModelError("its re-created copy is not built")
        twin.build(next(iter(shapes.values())))
    mine = model.weights
    theirs = twin.weights
    if len(mine) != len(theirs) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(mine, theirs)):
        raise UnsupportedModelError("its re-created copy has different weights")
    for layer in twin._flatten_layers(include_self=False, recursive=True):
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and _float_policy(policy.name) and layer.compute_dtype != dtype:
            raise UnsupportedModelError(f"layer '{layer.name}' ({type(layer).__name__}) keeps {layer.compute_dtype}")
    for a, b in zip(mine, theirs):
        own = keras.backend.standardize_dtype(a.dtype)
        if own in ROUNDOFF and keras.backend.standardize_dtype(b.dtype) not in ROUNDOFF:
            raise UnsupportedModelError(f"weight '{b.path}' is not a float in the copy")
    return twin


def twin(model: keras.Model, dtype: str = "float64") -> keras.Model:
    """``model`` re-created to compute in ``dtype``, with ``model``'s current weights (cast).

    Raises:
        kerasbn.errors.UnsupportedModelError: No such twin: a layer does not
            round-trip its config, keeps another float type, or the copy's
            weights differ. The message says which (one line, no trailing period).
    """
    cache = _TWINS.setdefault(model, {})
    entry = cache.get(dtype)
    if entry is None:
        try:
            entry = _create(model, dtype)
        except UnsupportedModelError as exc:
            entry = exc
        cache[dtype] = entry
    if isinstance(entry, UnsupportedModelError):
        raise UnsupportedModelError(str(entry))
    for src, dst in zip(model.weights, entry.weights):
        value = np.asarray(keras.ops.convert_to_numpy(src.value))
        dst.assign(value.astype(keras.backend.standardize_dtype(dst.dtype)))
    return entry


def layer_twin(layer: keras.layers.Layer, dtype: str) -> keras.layers.Layer:
    """``layer`` alone re-created to compute in ``dtype`` (built as ``layer`` was), with its weights (cast).

    The per-layer counterpart of `twin`, for the layer-wise check of
    `kerasbn.deploy.layerwise`; not cached (a check makes a few small layers).

    Raises:
        kerasbn.errors.UnsupportedModelError: The layer does not re-create
            from its config, is not built by it, or gets other weights.
    """
    copy = _recreate(layer, dtype, f"layer '{layer.name}'")
    mine, theirs = layer.weights, copy.weights
    if not copy.built or [tuple(w.shape) for w in mine] != [tuple(w.shape) for w in theirs]:
        raise UnsupportedModelError(f"layer '{layer.name}' is re-created with other weights")
    for src, dst in zip(mine, theirs):
        dst.assign(np.asarray(keras.ops.convert_to_numpy(src.value)).astype(keras.backend.standardize_dtype(dst.dtype)))
    return copy


def evaluate(model: keras.Model, inputs: Any, dtype: str = "float64") -> list[np.ndarray]:
    """``model``'s inference outputs computed in ``dtype`` by its twin, flattened, as float64 arrays.

    Floating inputs are cast to ``dtype``; integer inputs pass as they are.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` has no twin in ``dtype``,
            or the twin returns another float type.
    """
    copy = twin(model, dtype)

    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    try:
        outputs = inference(copy)(keras.tree.map_structure(cast, inputs))
    except Exception as exc:  # noqa: BLE001 (any failure means: no float64 evaluation)
        raise UnsupportedModelError(f"its evaluation in {dtype} fails: {first_line(exc)}") from exc
    outputs = keras.tree.flatten(outputs)
    for y in outputs:
        got = keras.backend.standardize_dtype(y.dtype)
        if got in ROUNDOFF and got != dtype:
            raise UnsupportedModelError(f"its copy in {dtype} returns {got}")
    return [np.asarray(y, np.float64) for y in outputs]
