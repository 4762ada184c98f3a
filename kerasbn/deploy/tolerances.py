"""The numbers of the verification rule, in one place, with the measurements behind them.

The rule itself is explained once, in `kerasbn.deploy.criteria`; every check
takes its defaults from here, and the command line passes a tolerance only
when the user gives one.
"""

# Unit roundoff u = 2^-p of each float type (p: significand bits, the hidden bit included):
# one correctly rounded operation has a relative error of at most u.
ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

# By the exact answer (`kerasbn.deploy.criteria.judge`): EXACT_FACTOR times the
# original's own error, plus ROUNDING_FLOOR unit roundoffs. A correct rewrite
# reorders the roundings; the factor covers how far the worst element of a few
# thousand moves when they are reordered.
# The floor covers another runtime's kernels on a shallow network, whose own
# error is a few u: LiteRT's XNNPACK and ONNX Runtime's MLAS block their
# reductions (and pick convolution algorithms) differently from Keras, which
# on a 3-layer CNN put a correct float32 file at 0.66 of a 4 u floor over 8
# seeds, and past it in a random test order. 16 u (1e-6 of max|y| in float32)
# is still three orders below a 0.1 % wrong fold.
EXACT_FACTOR = 4.0
ROUNDING_FLOOR = 16.0
# An allowance of max|y64| itself would accept any output of the right scale:
# where the original's own error makes the allowance reach it (a random-weight
# 477-layer EfficientNet with arbitrary BN statistics is 62 % from its float64
# outputs in float32), the check cannot fail, so it refuses instead.
EXACT_CEILING = 1.0

# Without a float64 twin (`kerasbn.deploy.criteria.compare`): NOISE_FACTOR times the
# model's own float32 noise (`kerasbn.deploy.verify.noise`), never below
# RELATIVE_FLOOR, about 17 float32 ulps of the output's scale. Measured on
# keras-hub backbones and keras.applications (trained-like BN statistics), a
# correct fold's error is 0.5-2.1 times that noise, and
# 1.5e-7-2e-6 of max|y|. Where the noise was not measured (an ONNX
# Runtime comparison, a caller without the model) the floor is the looser
# UNCALIBRATED_FLOOR (84 ulps).
NOISE_FACTOR = 4.0
RELATIVE_FLOOR = 2e-6
UNCALIBRATED_FLOOR = 1e-5
# Past this the model's float32 outputs are not reproducible at all (a
# random-weight 477-layer EfficientNet moves by 80 % between two valid
# evaluation orders): no comparison can tell a fold from a wrong one there,
# so the default check fails rather than accept anything. Give --rtol/--atol
# to accept such a model knowingly.
RELATIVE_CEILING = 1e-2

# Explicit element-wise |Δ| ≤ ATOL + RTOL·|y| (the tolerances tf2onnx and
# onnx-simplifier test with): used when a caller gives atol or rtol, and as
# the value of the one of the two it leaves out.
ATOL = 1e-5
RTOL = 1e-4
