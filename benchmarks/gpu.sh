#!/usr/bin/env bash
# The layer benchmark on a GPU machine with JAX (CUDA) but no Keras and no
# TensorFlow. Keras and its missing pure-Python dependencies travel as wheels
# in .whl/ (downloaded beforehand with `pip download`, see
# docs/benchmarks.md); results go to $OUT (default: build/).
#
#   bash benchmarks/gpu.sh            # then: python benchmarks/layer.py --render
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu-info.txt"
python3 -c "import jax, keras; print(jax.__version__, keras.__version__, jax.devices())" | tee -a "$OUT/gpu-info.txt"

# Σd and Σd² two ways, to check the per-platform choice in kerasbn/ops/jax.py:
# plain sums (XLA fuses the siblings) against one variadic reduction over
# leading blocks (the CPU path).
python3 - <<'EOF' 2>&1 | tee "$OUT/sums.txt"
import time
import jax
import jax.numpy as jnp
from jax import lax

x = jax.random.normal(jax.random.key(0), (32, 56, 56, 64), jnp.float32) + 1e5


def plain(x):
    d = x - x[:1, :1, :1]
    return jnp.sum(d, (0, 1, 2)), jnp.sum(d * d, (0, 1, 2))


def variadic(x):
    d = x - x[:1, :1, :1]
    a, b = lax.reduce((d, d * d), (0.0, 0.0), lambda p, q: (p[0] + q[0], p[1] + q[1]), (0,))
    return jnp.sum(a, (0, 1)), jnp.sum(b, (0, 1))


def looped(fn):
    # 64 evaluations in one program, each on a different input, so that
    # neither launch overhead nor loop-invariant hoisting hides the work.
    def body(i, carry):
        t, acc = carry
        a, b = fn(t)
        return t + a[0] * 0.0, acc + a + b

    return jax.jit(lambda t: lax.fori_loop(0, 64, body, (t, jnp.zeros(t.shape[-1], t.dtype))))


copy = jax.jit(lambda t: lax.fori_loop(0, 64, lambda i, u: u + 1.0, t))
for name, fn in (("plain", looped(plain)), ("variadic", looped(variadic)), ("copy", copy)):
    jax.block_until_ready(fn(x))
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        runs.append((time.perf_counter() - start) / 64)
    print(f"{name:9s} {sorted(runs)[3] * 1e6:8.1f} us per evaluation")
EOF

python3 benchmarks/layer.py --backend jax --json "$OUT/layer-gpu.json" --no-markdown 2>&1 | tee "$OUT/layer-gpu.log"
