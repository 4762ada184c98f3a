"""The fold engine: model → dataflow graph → plan → weight arithmetic → rewritten model.

- `graph`: a read-only view of a Keras model as a flat graph of layer calls.
- `dataflow`: the same view of the traced TensorFlow computation, inside custom layers too.
- `families`: one class per layer family (its channel axes, backward and forward fold).
- `plan`: which BN folds into which neighbour, or the `plan.Reason` why not.
- `rewrite`: a new model with some layers changed or removed.
- `audit`, `fold`, `biases`: the public operations built from those steps.
"""
