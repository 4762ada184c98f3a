"""The default verification tolerances, in one place.

`kerasbn.deploy.verify.compare` and every exporter's check take their
defaults from here; the command line passes a tolerance only when the user
gives one.
"""

# Element-wise |Δ| ≤ ATOL + RTOL·|y|: the tolerances tf2onnx and onnx-simplifier test with.
ATOL = 1e-5
RTOL = 1e-4
