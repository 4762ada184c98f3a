"""The traced-graph view: what a model really computes, custom layers included.

The Keras functional graph stops at a layer's boundary: a custom layer (a
keras-hub block, say) or a subclassed model is one opaque call. Tracing the
model's inference function to a TensorFlow graph shows every operation, which
variable it reads and who consumes its output. This module turns that trace
into the same `kerasbn.folding.graph.Graph` the planner already reads:

- every call of a layer that the fold engine knows (a BN or a layer of a
  `kerasbn.folding.families` family) is one `Call`: the operations under the
  layer's name scope (Keras opens one per layer call), found through the ops
  that read the layer's variables;
- every other operation (an activation inside a custom ``call``, an ``Add``,
  a reshape) is a `Call` of its own whose ``layer`` is an `Op`, which no
  family claims, so the planner treats it as a nonlinear neighbour.

A layer called twice has two name scopes and so two calls (a shared layer);
a layer whose variables are read outside its own name scope cannot be tied to
its computation and gets no call at all (the planner reports it as untraced).

This is the only module that reads TensorFlow's graph internals (captured
variable handles, op names); Keras calls it with the TensorFlow backend only.
"""

from __future__ import annotations

import re
from typing import Any

import keras

from kerasbn.errors import UnsupportedModelError
from kerasbn.folding.families import family_of, is_bn
from kerasbn.folding.graph import Call, Graph, Op
from kerasbn.model_signature import signature


def _known(layer: keras.layers.Layer) -> bool:
    return bool(layer.weights) and (is_bn(layer) or family_of(layer) is not None)


def trace(model: keras.Model) -> Any:
    """The TensorFlow graph of ``model(x, training=False)`` for the model's input specs."""
    if keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"Tracing a model needs the TensorFlow backend, not '{keras.backend.backend()}' (set KERAS_BACKEND=tensorflow)."
        )
    import tensorflow as tf

    specs = signature(model).tf_structure()

    @tf.function(autograph=False)
    def infer(inputs):
        return model(inputs, training=False)

    try:
        return infer.get_concrete_function(specs).graph
    except Exception as exc:  # noqa: BLE001 (any failure means: no trace)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UnsupportedModelError(f"Model '{model.name}' cannot be traced: {first}") from exc


def _scope_of(op_name: str, layer_name: str) -> str | None:
    """The name-scope prefix of ``layer_name``'s call that ``op_name`` lies in, or ``None``."""
    parts = op_name.split("/")
    # TensorFlow makes a re-entered scope unique with a ``_N`` suffix.
    pattern = re.compile(re.escape(layer_name) + r"(_\d+)?")
    for i in range(len(parts) - 2, -1, -1):
        if pattern.fullmatch(parts[i]):
            return "/".join(parts[: i + 1]) + "/"
    return None


def build_traced_graph(model: keras.Model) -> Graph:
    """The `Graph` of ``model``'s traced inference computation (see the module docstring).

    Raises:
        kerasbn.errors.UnsupportedModelError: The model cannot be traced.
    """
    tf_graph = trace(model)
    readers: dict[int, list] = {}
    for external, internal in tf_graph.captures:
        readers[id(external)] = list(internal.consumers())

    # Name scope → layer, for every call of a known layer.
    owner_of_scope: dict[str, keras.layers.Layer] = {}
    scopes_of: dict[int, set[str]] = {}
    unscoped: set[int] = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not _known(layer) or id(layer) in scopes_of:
            continue
        scopes: set[str] = set()
        traced = True
        for v in layer.weights:
            ops = readers.get(id(_handle(v)), [])
            for op in ops:
                scope = _scope_of(op.name, layer.name)
                if scope is None:
                    traced = False
                else:
                    scopes.add(scope)
        if traced and scopes:
            scopes_of[id(layer)] = scopes
            for scope in scopes:
                owner_of_scope[scope] = layer
        elif not traced:
            unscoped.add(id(layer))

    outputs = set()
    skipped = set()
    for t in tf_graph.outputs:
        if t.op.type == "Identity":
            skipped.add(t.op.name)
            outputs.add(t.op.inputs[0].name)
        else:
            outputs.add(t.name)

    # Group the ops: one group per known layer call, one per other op.
    groups: dict[str, list] = {}
    for op in tf_graph.get_operations():
        if op.name in skipped or op.type in ("NoOp", "Const", "Placeholder"):
            continue
        parts = op.name.split("/")
        key = op.name
        for i in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:i]) + "/"
            if prefix in owner_of_scope:
                key = prefix
                break
        groups.setdefault(key, []).append(op)

    graph = Graph()
    ids: dict[str, int] = {}

    def tensor_id(t) -> int:
        tid = ids.get(t.name)
        if tid is None:
            tid = len(ids)
            ids[t.name] = tid
            graph.shapes[tid] = tuple(t.shape.as_list()) if t.shape.rank is not None else ()
        return tid

    def carries_data(t) -> bool:
        return t.dtype.name != "resource" and t.op.type not in ("Const", "ReadVariableOp") and t.op.name not in skipped

    for key, ops in groups.items():
        members = {op.name for op in ops}
        inputs, outs = {}, []
        for op in ops:
            for t in op.inputs:
                if t.op.name not in members and carries_data(t):
                    inputs.setdefault(t.name, t)
            for t in op.outputs:
                if t.name in outputs or any(c.name not in members for c in t.consumers()):
                    outs.append(t)
        if not outs:
            continue
        layer = owner_of_scope.get(key) or Op(key, ops[0].type)
        scope = _path(layer)
        call = Call(
            index=len(graph.calls),
            layer=layer,
            scope=scope,
            inputs=tuple(tensor_id(t) for t in inputs.values()),
            outputs=tuple(tensor_id(t) for t in outs),
        )
        graph.calls.append(call)
        graph._calls_by_layer.setdefault(id(layer), []).append(call)
        for tid in call.outputs:
            graph.producer[tid] = call
        for tid in dict.fromkeys(call.inputs):
            graph.consumers.setdefault(tid, []).append(call)
    graph.outputs = {ids[name] for name in outputs if name in ids}
    graph.scope_outputs = set(graph.outputs)
    graph.unscoped = unscoped
    return graph


def _path(layer: object) -> tuple[str, ...]:
    """The enclosing layers of ``layer`` (outermost first), from its variables' paths."""
    weights = getattr(layer, "weights", None)
    if not weights:
        return ()
    return tuple(weights[0].path.split("/")[:-2])


def _handle(variable: keras.Variable) -> Any:
    """The TensorFlow resource handle behind a Keras variable (what a trace captures)."""
    value = getattr(variable, "_value", None)
    return getattr(value if value is not None else variable.value, "handle", None)


# Ops whose outputs jump when their inputs move by a rounding error: which
# elements a top-k, an arg-max or a non-maximum suppression selects.
SELECTION_OPS = frozenset(
    {
        "TopKV2",
        "TopK",
        "ArgMax",
        "ArgMin",
        "NonMaxSuppression",
        "NonMaxSuppressionV2",
        "NonMaxSuppressionV3",
        "NonMaxSuppressionV4",
        "NonMaxSuppressionV5",
        "NonMaxSuppressionWithOverlaps",
        "CombinedNonMaxSuppression",
    }
)


def selections(model: keras.Model) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The selection ops (`SELECTION_OPS`) in ``model``'s traced inference, and which outputs depend on one.

    Returns the op types found (sorted, each once) and, per output in
    `keras.tree.flatten` order, whether it is computed from a selection: such
    an output is discontinuous, so comparing it across evaluation orders
    says nothing about rounding. Ops inside loop bodies and called functions
    (a ``keras.ops.map``) count for the op that runs them.

    Raises:
        kerasbn.errors.UnsupportedModelError: The model cannot be traced.
    """
    tf_graph = trace(model)
    library = {f.signature.name: f for f in tf_graph.as_graph_def().library.function}
    function_selects: dict[str, str | None] = {}

    def called(attrs: Any) -> list[str]:
        names = []
        for value in attrs.values():
            if value.HasField("func"):
                names.append(value.func.name)
            names.extend(f.name for f in value.list.func)
        return names

    def in_function(name: str) -> str | None:
        if name not in function_selects:
            function_selects[name] = None  # a recursive call adds nothing
            found = None
            for node in getattr(library.get(name), "node_def", ()):
                found = (
                    node.op
                    if node.op in SELECTION_OPS
                    else next(filter(None, map(in_function, called(node.attr))), None)
                )
                if found:
                    break
            function_selects[name] = found
        return function_selects[name]

    def selects(op: Any) -> str | None:
        if op.type in SELECTION_OPS:
            return op.type
        return next(filter(None, map(in_function, called(op.node_def.attr))), None)

    found = {op.name: selects(op) for op in tf_graph.get_operations()}
    downstream: dict[str, bool] = {}

    def depends(op: Any) -> bool:
        # Iterative: a deep network's graph would overflow Python's recursion limit.
        stack = [op]
        while stack:
            top = stack[-1]
            if top.name in downstream:
                stack.pop()
                continue
            pending = [t.op for t in top.inputs if t.op.name not in downstream]
            if pending:
                stack.extend(pending)
                continue
            downstream[top.name] = bool(found[top.name]) or any(downstream[t.op.name] for t in top.inputs)
            stack.pop()
        return downstream[op.name]

    flags = tuple(depends(t.op) for t in tf_graph.outputs)
    return tuple(sorted({kind for kind in found.values() if kind})), flags
