"""Shared test set-up: TensorFlow's environment, one way to run a layer in each execution mode."""

from __future__ import annotations

import os
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow turns oneDNN on by default only on CPUs with AVX-512; without it
# there is no channels_first convolution on CPU at all. On, so the suite runs
# the same on every x86 machine.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# The execution modes a user can run the layer in on the active backend:
# "compile" is torch.compile, what Keras's jit_compile=True runs on torch.
MODES = {"tensorflow": ("eager", "function", "xla"), "jax": ("eager", "jit"), "torch": ("eager", "compile")}[BACKEND]


def in_mode(fn, mode: str):
    """``fn`` as the active backend runs it in ``mode`` (a tf.function, jax.jit, torch.compile or as is)."""
    if mode == "eager":
        return fn
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=(mode == "xla"))
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    import torch

    # Dynamo caches compilations on the code object, which the lambdas of one call site share: past its recompile
    # limit (8) it ran them eagerly, silently (97 of the suite's compile-mode tests did). Each function gets a code
    # object of its own, and hitting the limit fails the test. Dynamic shapes off, as a fixed batch trains.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(own, dynamic=False)


def tensor(x):
    """A NumPy array (or None) as the active backend's tensor."""
    return None if x is None else keras.ops.convert_to_tensor(x)


def torch_gradients(fn, x, weights, dy):
    """(∂/∂x, [∂/∂w]) of ``Σ fn(x)·dy`` with torch autograd; ``fn`` may be compiled."""
    import torch

    t = torch.as_tensor(x).requires_grad_(True)
    y = fn(t)
    grads = torch.autograd.grad(y, [t] + [w.value for w in weights], torch.as_tensor(dy).to(y.dtype))
    return list(grads)


def run(layer, x, *, training: bool, mode: str, mask=None):
    """Call `layer` on `x` in `mode`, applying its state updates; returns NumPy."""
    if not layer.built:
        layer.build(tuple(x.shape))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        if mode == "eager":
            out = layer(x, training=training, mask=mask)
        else:
            fn = tf.function(lambda t, m: layer(t, training=training, mask=m), jit_compile=(mode == "xla"))
            out = fn(tf.constant(x), mask)
        return keras.ops.convert_to_numpy(out)
    if BACKEND == "torch":
        # One compilation per layer, flag and mode: a test calling a layer again reuses it, as a training loop does.
        calls = layer.__dict__.setdefault("_test_calls", {})  # past Keras's attribute tracking
        if (training, mode) not in calls:
            calls[training, mode] = in_mode(lambda t, m: layer(t, training=training, mask=m), mode)
        return keras.ops.convert_to_numpy(calls[training, mode](tensor(x), tensor(mask)))
    import jax

    if mode == "eager":
        return keras.ops.convert_to_numpy(layer(x, training=training, mask=mask))

    @jax.jit
    def step(trainable, non_trainable, t, m):
        return layer.stateless_call(trainable, non_trainable, t, training=training, mask=m)

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    out, new_state = step(trainable, non_trainable, x, mask)
    for variable, value in zip(layer.non_trainable_variables, new_state, strict=True):
        variable.assign(value)
    return np.asarray(out)


def gradients(layer, x, dy):
    """(dL/dx, {weight name: dL/dw}) for L = Σ y·dy in training mode."""
    if not layer.built:
        layer.build(tuple(x.shape))
    weights = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(tf.cast(layer(xt, training=True), tf.float64) * dy)
        grads = tape.gradient(loss, [xt] + [w.value for w in weights])
    elif BACKEND == "torch":
        grads = torch_gradients(lambda t: layer(t, training=True), x, weights, dy)
    else:
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(t, trainable):
            y, _ = layer.stateless_call(trainable, non_trainable, t, training=True)
            return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

        gx, gw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), [w.value for w in weights])
        grads = [gx] + list(gw)
    grads = [keras.ops.convert_to_numpy(g) for g in grads]
    return grads[0], {w.name: g for w, g in zip(weights, grads[1:], strict=True)}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# `--slice K/N` runs the tests whose id hashes to K mod N (of those the other options select); `--slice commit/N`
# takes K from the checked-out commit, so CI runs a different share of the `large` tests at each commit and every
# test within a few commits. A test's slice depends on its id alone: not on the order, the markers or the machine.


def pytest_addoption(parser):
    parser.addoption(
        "--slice",
        metavar="K/N",
        default=None,
        help="run only slice K of N (0 ≤ K < N) of the selected tests, by a hash of each test's id; "
        "K may be 'commit': the HEAD commit's hash mod N",
    )


SLICE = pytest.StashKey[tuple]()


def pytest_configure(config):
    """Work out ``--slice`` once: (K, N, where K came from), or None."""
    import subprocess

    spec = config.getoption("--slice")
    config.stash[SLICE] = None
    if spec is None:
        return
    try:
        k, n = spec.split("/")
        n = int(n)
        if n < 1:
            raise ValueError("N must be at least 1")
        source = "--slice"
        if k == "commit":
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=config.rootpath
            ).stdout.strip()
            k, source = int(head, 16) % n, f"commit {head[:12]}"
        k = int(k)
    except (ValueError, OSError, subprocess.CalledProcessError) as exc:
        raise pytest.UsageError(f"--slice {spec}: expected K/N, or commit/N in a git checkout ({exc})") from exc
    if not 0 <= k < n:
        raise pytest.UsageError(f"--slice {spec}: K must be in 0..N-1")
    config.stash[SLICE] = (k, n, source)


def slice_of(nodeid: str, n: int) -> int:
    """The slice (of ``n``) a test id falls in: a hash, the same on every machine and in every order."""
    import hashlib

    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "big") % n


def pytest_report_header(config):
    chosen = config.stash[SLICE]
    if chosen is not None:
        k, n, source = chosen
        return f"slice {k} of {n} (K from {source}; the same tests again: --slice {k}/{n})"
    return None


def pytest_collection_modifyitems(config, items):
    chosen = config.stash[SLICE]
    if chosen is None:
        return
    k, n, _ = chosen
    dropped = [item for item in items if slice_of(item.nodeid, n) != k]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if slice_of(item.nodeid, n) == k]
