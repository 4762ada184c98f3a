"""The default verification tolerances, in one place.

Its own module, free of heavy imports, so that the command line can show
the defaults in ``--help`` without loading Keras.
"""

# The default check is scale-aware: for each output, max|Δ| / max|y| must stay
# within NOISE_FACTOR times the model's own float32 noise (how far its outputs
# move when it is evaluated in another valid order, `kerasbn.deploy.verify.noise`),
# and never below RELATIVE_FLOOR. The floor is about 84 float32 ulps of the
# output's scale: a correct fold of a shallow model stays well under it, a
# fold along the wrong axis or with a wrong bias lands far above it.
NOISE_FACTOR = 4.0
RELATIVE_FLOOR = 1e-5

# Explicit element-wise |Δ| ≤ ATOL + RTOL·|y| (the tolerances tf2onnx and
# onnx-simplifier test with): used when a caller gives atol or rtol, and as
# the value of the one of the two it leaves out.
ATOL = 1e-5
RTOL = 1e-4
