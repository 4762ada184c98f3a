"""The default verification tolerances, in one place.

Its own module, free of heavy imports, so that the command line can show
the defaults in ``--help`` without loading Keras.
"""

# Element-wise |Δ| ≤ ATOL + RTOL·|y|: the tolerances tf2onnx and onnx-simplifier test with.
ATOL = 1e-5
RTOL = 1e-4
