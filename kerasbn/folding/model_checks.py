"""Checks that a loaded model is one kerasbn can compute with, run before any arithmetic.

Two kinds of wrong, each named by its layer:

- `check_runnable`: a model Keras builds but cannot run (an input listed twice,
  a convolution fed integers, booleans or strings, a BN whose dtype policy is
  not a floating-point one, a quantized dtype policy on a layer without a
  quantized kernel). `kerasbn.load_model` refuses these, so
  the failure is one line instead of an error from deep inside a layer's call.
- `weight_problems` / `check_weights`: weights that are NaN or infinite, or a
  BN variance below zero. The audit lists them; `kerasbn.fold` and
  `kerasbn.export` refuse them before the fold's square roots and the
  verification's comparisons turn them into NumPy warnings and an error
  "max|Δ| = inf" the user cannot act on.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kerasbn.errors import KerasbnError, UnsupportedModelError
from kerasbn.folding import families
from kerasbn.folding.graph import build_graph
from kerasbn.folding.plan import is_bn
from kerasbn.folding.reports import WeightProblem
from kerasbn.model_signature import functional_of


def _is_string(dtype: str) -> bool:
    return dtype == "string"


def _is_not_float(dtype: str) -> bool:
    return not keras.backend.is_float_dtype(dtype)


def check_runnable(model: Any) -> None:
    """Raise `UnsupportedModelError` for a model whose layers cannot run on its declared inputs."""
    functional = functional_of(model)
    if functional is not None:
        names = [t.name for t in functional.inputs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UnsupportedModelError(
                f"model '{model.name}' lists the input '{twice[0]}' more than once in its inputs; "
                "each input of a model is one tensor"
            )
        graph = build_graph(model)
        for call in graph.calls:
            family = families.family_of(call.layer)
            if family is None and not is_bn(call.layer):
                continue
            # Dense and BN cast the integers and booleans they read; a convolution computes in its input's dtype.
            refused = _is_string if family is None or family.name == "dense" else _is_not_float
            for tensor in call.inputs:
                dtype = graph.dtypes.get(tensor)
                if dtype is not None and refused(dtype):
                    raise UnsupportedModelError(
                        f"layer '{call.layer.name}' ({type(call.layer).__name__}) reads a tensor of dtype {dtype}, "
                        f"which it cannot compute with: the model cannot run (is an input's or a layer's dtype wrong?)"
                    )
    for layer in model._flatten_layers(include_self=False, recursive=True):
        policy = layer.dtype_policy
        if is_bn(layer) and not all(map(keras.backend.is_float_dtype, (policy.compute_dtype, policy.variable_dtype))):
            # Keras builds such a BN: a boolean one hands the next layer booleans (a ReLU then fails deep in its
            # call), an integer one rounds its statistics and output, which no fold into a float kernel equals.
            raise UnsupportedModelError(
                f"layer '{layer.name}' ({type(layer).__name__}) has the dtype policy '{policy.name}', "
                "but batch normalization computes and holds its statistics in floating point: the model cannot run"
            )
        mode = getattr(policy, "quantization_mode", None)
        if mode is not None and type(layer).quantize is keras.layers.Layer.quantize:
            raise UnsupportedModelError(
                f"layer '{layer.name}' ({type(layer).__name__}) has the quantized dtype policy "
                f"'{layer.dtype_policy.name}', but Keras has no {mode} kernel for this layer: the model cannot run"
            )


def weight_problems(model: Any) -> list[WeightProblem]:
    """Every weight of ``model`` holding NaN or infinite values, and every BN variance below zero."""
    variances = {
        id(layer.moving_variance)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if is_bn(layer) and getattr(layer, "moving_variance", None) is not None
    }
    problems = []
    for variable in model.weights:
        values = np.asarray(variable)
        if not (np.issubdtype(values.dtype, np.floating) or values.dtype.kind == "V"):  # "V": bfloat16
            continue
        if values.dtype.kind == "V":
            values = values.astype(np.float32)  # NumPy's isnan has no bfloat16 loop
        layer, _, name = variable.path.rpartition("/")
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if nan or inf:
            what = " and ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
            problems.append(WeightProblem(layer, name, f"{what} among its {values.size:,} values"))
        elif id(variable) in variances and (values < 0).any():
            negative = int((values < 0).sum())
            problems.append(
                WeightProblem(
                    layer,
                    name,
                    f"{negative:,} negative among its {values.size:,} values (the lowest {values.min():.3g})",
                )
            )
    return problems


def check_weights(model: Any) -> None:
    """Raise `KerasbnError` naming the first weight `weight_problems` finds."""
    problems = weight_problems(model)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more weights)" if len(problems) > 1 else ""
        raise KerasbnError(
            f"layer '{first.layer}': weight '{first.weight}' holds {first.problem}{more}; "
            "a model with such weights cannot be folded or checked (kerasbn audit lists them all)"
        )
