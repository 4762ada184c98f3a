"""A model's signature, worked out once: every input's name, shape and dtype, and the output structure.

Every reader of a model's inputs goes through `signature`: the exporters
(each target's graph inputs), the random verification inputs (`Signature.random`,
the one place they are drawn), the ``.npz`` matching of ``--inputs`` and
``--calibration`` (`kerasbn.deploy.files.load_inputs`), and the traced view of
the fold engine (`kerasbn.folding.dataflow.trace`).

It reads what each kind of model keeps, the way Keras's own
``keras.src.export.export_utils.get_input_signature`` does:

- a functional model, and a Sequential one (with or without ``keras.Input``,
  built by ``build`` or by ``fit``, in memory or loaded from a ``.keras``
  file), has a functional graph whose input tensors give names, shapes,
  dtypes and the input structure (a dict of inputs stays a dict). A loaded
  Sequential has no ``model.input`` ("has never been called"), which is why
  nothing here reads it;
- a subclassed model is known by the shapes it was first called or built
  with (``_build_shapes_dict``) and its ``input_dtype``.

The batch axis is always dynamic (``None``). This module (with `functional_of`,
the functional graph behind a model) and `kerasbn.folding.graph` are the only
readers of those private attributes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras.src.models.functional import Functional

from kerasbn.errors import UnsupportedModelError


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        key: The input's Keras name (a functional model's input tensor name, a
            dict input's key); ``.npz`` arrays are matched to inputs by it.
        name: The name exported graphs give the input: ``key`` with every
            character outside ``[A-Za-z0-9_]`` replaced by ``_``, starting with
            a letter (else ``input_N``), unique among the inputs.
        shape: The shape, batch axis first and ``None``.
        dtype: The dtype name (``"float32"``, ``"int32"``...).
    """

    key: str
    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of a model.

    Attributes:
        inputs: The inputs in `keras.tree.flatten` order of the structure the model takes.
        structure: That structure with `InputSpec` leaves (one spec, a list, a dict...).
        output_names: The names exported graphs give the outputs, in `keras.tree.flatten` order: a dict
            output's key, else the output layer's name, by the rule of `InputSpec.name` (``output``,
            ``output_N`` for a name Keras made up); ``None`` for a subclassed model, whose outputs are
            known only once called.
    """

    inputs: tuple[InputSpec, ...]
    structure: Any
    output_names: tuple[str, ...] | None = None

    @property
    def names(self) -> list[str]:
        """The exported graphs' input names, in order."""
        return [spec.name for spec in self.inputs]

    @property
    def keys(self) -> list[str]:
        """The inputs' Keras names, in order."""
        return [spec.key for spec in self.inputs]

    def pack(self, arrays: Sequence[Any]) -> Any:
        """Flat arrays (in `inputs` order) → the structure the model takes."""
        if len(arrays) != len(self.inputs):
            raise ValueError(f"{len(arrays)} array(s) for a model with {len(self.inputs)} input(s)")
        return keras.tree.pack_sequence_as(self.structure, list(arrays))

    def flatten(self, inputs: Any) -> list[Any]:
        """Inputs in the structure the model takes → flat arrays in `inputs` order."""
        return keras.tree.flatten(inputs)

    def random(self, batch_size: int = 8, seed: int = 0) -> list[np.ndarray]:
        """Random arrays for every input, flat: the verification inputs of every check.

        Unknown dimensions are ``batch_size`` on the batch axis and 8
        elsewhere. Floating inputs are standard normal; integer inputs are 0 or
        1 (valid indices for any embedding). One generator draws all inputs
        in order, so a seed gives the same arrays everywhere.
        """
        rng = np.random.default_rng(seed)
        arrays = []
        for spec in self.inputs:
            shape = [batch_size if i == 0 else (8 if d is None else d) for i, d in enumerate(spec.shape)]
            dtype = np.dtype(spec.dtype)
            if np.issubdtype(dtype, np.floating):
                arrays.append(rng.standard_normal(shape).astype(dtype))
            else:
                arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        return arrays

    def conform(self, data: Any, what: str) -> list[np.ndarray]:
        """``data`` (in the model's input structure) as flat arrays of the inputs' dtypes.

        Raises:
            kerasbn.errors.KerasbnError: the arrays do not match the inputs (count,
                ranks, known sizes, one row count), hold no rows, or hold NaN or
                infinite values.
        """
        from kerasbn.errors import KerasbnError

        arrays = [np.asarray(a) for a in keras.tree.flatten(data)]
        if len(arrays) != len(self.inputs):
            raise KerasbnError(f"{what}: {len(arrays)} array(s) for a model with {len(self.inputs)} input(s)")
        rows = {a.shape[0] if a.ndim else None for a in arrays}
        if len(rows) != 1 or None in rows:
            raise KerasbnError(f"{what}: the arrays need the same number of rows along the first axis")
        if rows == {0}:
            raise KerasbnError(f"{what}: holds no rows")
        out = []
        for array, spec in zip(arrays, self.inputs):
            expected = spec.shape[1:]
            if array.ndim != len(expected) + 1 or any(
                e is not None and e != g for e, g in zip(expected, array.shape[1:])
            ):
                raise KerasbnError(
                    f"{what}: input '{spec.key}' has shape {array.shape}, the model expects (batch, *{tuple(expected)})"
                )
            dtype = np.dtype(spec.dtype)
            if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(array)):
                raise KerasbnError(f"{what}: holds NaN or infinite values")
            out.append(array.astype(dtype, copy=False))
        return out

    def forward(self, model: keras.Model) -> Any:
        """``model``'s inference call on flat arguments in `inputs` order, returning its outputs flat.

        The function every exporter traces: positional tensors in, a tuple out.
        """

        def forward(*args: Any) -> tuple:
            return tuple(keras.tree.flatten(model(self.pack(list(args)), training=False)))

        return forward

    def tf_specs(self) -> list[Any]:
        """`tf.TensorSpec` of every input, flat, dynamic batch, named as the exported graphs name them."""
        import tensorflow as tf

        return [tf.TensorSpec(spec.shape, spec.dtype, name=spec.name) for spec in self.inputs]

    def tf_structure(self) -> Any:
        """The input structure with unnamed `tf.TensorSpec` leaves (a trace of ``model(inputs)``)."""
        import tensorflow as tf

        return keras.tree.map_structure(lambda spec: tf.TensorSpec(spec.shape, spec.dtype), self.structure)


def signature(model: keras.Model) -> Signature:
    """The `Signature` of ``model``, any kind (see the module docstring).

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` is not a Keras model, or
            a subclassed model that was never called or built.
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Expected a Keras model, got {type(model).__name__}.")
    fn = functional_of(model)
    if fn is not None:
        structure = fn._inputs_struct
        tensors = keras.tree.flatten(structure)
        # The input layer's name, which the file keeps: an unnamed keras.Input's tensor is named by a counter
        # (keras_tensor_138) in the process that built it, by its layer (input_layer) once reloaded.
        keys = _keys(structure, [_layer_name(t) for t in tensors])
        shapes = [tuple(t.shape) for t in tensors]
        dtypes = [_fed(keras.backend.standardize_dtype(t.dtype), model) for t in tensors]
        produced = keras.tree.flatten(fn._outputs_struct)
        outputs = tuple(_export_names(_keys(fn._outputs_struct, [_layer_name(t) for t in produced]), "output"))
    else:
        recorded = getattr(model, "_build_shapes_dict", None) or {}
        if len(recorded) != 1:
            raise UnsupportedModelError(
                f"Model '{model.name}' ({type(model).__name__}) has no known input shape; "
                "call it once on data (or build it) first."
            )
        argument, structure = next(iter(recorded.items()))
        structure = _plain(structure)
        shapes = [tuple(s) for _, s in _shape_paths(structure)] if structure else []
        if not shapes:
            raise UnsupportedModelError(f"Model '{model.name}' ({type(model).__name__}) has no input shape.")
        argument = argument.removesuffix("_shape") or "input"
        positional = [argument] if len(shapes) == 1 else [f"{argument}_{i}" for i in range(len(shapes))]
        keys = _keys(structure, positional, shapes=True)
        dtype = _fed(keras.backend.standardize_dtype(getattr(model, "input_dtype", None) or "float32"), model)
        dtypes = [dtype] * len(shapes)
        outputs = None
    names = _export_names(keys)
    flat = [InputSpec(k, n, (None, *s[1:]), d) for k, n, s, d in zip(keys, names, shapes, dtypes)]
    if fn is not None:
        packed = keras.tree.pack_sequence_as(structure, flat)
    else:
        packed = _pack_shapes(structure, iter(flat))
    return Signature(tuple(flat), packed, outputs)


def _fed(dtype: str, model: keras.Model) -> str:
    """The dtype an input is fed in: float32 where Keras made a mixed-precision model's input half precision.

    A Sequential built without ``keras.Input`` gets an input layer in its first
    layer's compute dtype (float16 under ``mixed_float16``) and casts the
    float32 data it is given, so its files take float32 like every other
    model of the policy.
    """
    if dtype not in ("float16", "bfloat16"):
        return dtype
    policies = [getattr(layer, "dtype_policy", None) for layer in [model, *getattr(model, "layers", [])]]
    mixed = any(
        getattr(p, "compute_dtype", None) == dtype and getattr(p, "variable_dtype", None) == "float32" for p in policies
    )
    return "float32" if mixed else dtype


def _layer_name(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else tensor.name


def functional_of(model: Any) -> Functional | None:
    """The functional graph behind ``model``, or ``None`` if it has none."""
    if isinstance(model, keras.Sequential):
        return model._functional
    if isinstance(model, Functional):
        return model
    return None


def _keys(structure: Any, default: list[str], shapes: bool = False) -> list[str]:
    """A dict input's key where it has one, else the default name, per flat input."""
    paths = _shape_paths(structure) if shapes else keras.tree.flatten_with_path(structure)
    keys = []
    for (path, _), fallback in zip(paths, default):
        named = [p for p in path if isinstance(p, str)]
        keys.append(named[-1] if named else fallback)
    return keys


# The names Keras makes up for an unnamed input (``input_layer_29``, ``keras_tensor_138``): their number
# counts the layers created in the process, so the same file loaded twice gets two names.
_AUTOMATIC = re.compile(r"(input_layer|keras_tensor)(_\d+)?")


def _export_names(keys: list[str], kind: str = "input") -> list[str]:
    """One rule for every target: ``[A-Za-z0-9_]``, a leading letter, unique; ``input`` (``input_<i>``) for a
    name Keras made up, so that the file's inputs do not depend on what else the process built (``output``
    for outputs)."""
    names: list[str] = []
    for i, key in enumerate(keys):
        if key and _AUTOMATIC.fullmatch(key):
            key = kind if len(keys) == 1 else f"{kind}_{i}"
        cleaned = re.sub(r"[^A-Za-z0-9_]", "_", key or "")
        name = cleaned if cleaned and cleaned[0].isalpha() else f"{kind}_{i}"
        while name in names:
            name = f"{name}_{i}"
        names.append(name)
    return names


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(d, (int, type(None))) for d in value)


def _plain(structure: Any) -> Any:
    """Keras's tracked wrappers (``TrackedDict``, ``_DictWrapper``) as plain dicts, lists and tuples."""
    if isinstance(structure, dict) or hasattr(structure, "items"):
        return {k: _plain(v) for k, v in structure.items()}
    if _is_shape(structure):
        return tuple(structure)
    if isinstance(structure, (list, tuple)):
        return [_plain(v) for v in structure]
    return structure


def _shape_paths(structure: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, shape) for every shape in a nest of recorded build shapes, in `keras.tree.flatten` order."""
    if _is_shape(structure):
        return [(path, structure)]
    if isinstance(structure, dict):
        return [p for k in sorted(structure) for p in _shape_paths(structure[k], (*path, k))]
    return [p for i, v in enumerate(structure) for p in _shape_paths(v, (*path, i))]


def _pack_shapes(structure: Any, specs: Any) -> Any:
    """The recorded shapes' nest with each shape replaced by the next `InputSpec`."""
    if _is_shape(structure):
        return next(specs)
    if isinstance(structure, dict):
        packed = {k: _pack_shapes(structure[k], specs) for k in sorted(structure)}
        return {k: packed[k] for k in structure}
    return [_pack_shapes(v, specs) for v in structure]
