"""`synchronized=True`: a global batch split over 2 replicas equals one device.

Each backend fixes its devices when it starts, so every check runs in a fresh
subprocess: TensorFlow with 2 logical CPU devices under MirroredStrategy, JAX
with 2 host devices under `keras.distribution.DataParallel`, torch as two
processes in a gloo process group over the loopback interface (one process
per replica, as DistributedDataParallel runs). The worker prints
the per-replica results joined into global ones (outputs and ∂/∂x
concatenated, ∂/∂γ and ∂/∂β summed over replicas as the optimizer's
all-reduce does) next to the same step on one device over the whole batch;
the data carry an offset of 1e5, and the moving variance's m/(m−1) must use
the global m.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BACKEND

# The replica tests run their own subprocess on one backend, whatever the session's: each runs once per
# suite, in the session of its own backend (make test runs tests/ops under all three).
ONCE = "runs its own subprocess; once per suite, in the session of its backend"

ROOT = Path(__file__).resolve().parents[2]

COMMON = """
import json, os, sys
import numpy as np
rng = np.random.default_rng(0)
x = (rng.normal(size=(16, 5, 3)) * 2 + 1e5).astype("float32")
dy = rng.normal(size=x.shape).astype("float32")
NAMES = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
def report(got, ref):
    print(json.dumps({"got": [np.asarray(a, np.float64).tolist() for a in got],
                      "ref": [np.asarray(a, np.float64).tolist() for a in ref]}))
"""

TENSORFLOW = (
    COMMON
    + """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import kerasbn

def step(layer):
    def fn(xr, dyr):
        with tf.GradientTape() as tape:
            tape.watch(xr)
            y = layer(xr, training=True)
        return [y] + tape.gradient(y, [xr, layer.gamma.value, layer.beta.value], output_gradients=dyr)
    return tf.function(fn)

single = kerasbn.BatchNormalization(synchronized=True, momentum=0.5)
single.build(x.shape)
ref = step(single)(tf.constant(x), tf.constant(dy)) + [single.moving_mean, single.moving_variance]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    layer = kerasbn.BatchNormalization(synchronized=True, momentum=0.5)
    layer.build((8, 5, 3))

def shard(a):
    return strategy.experimental_distribute_values_from_function(
        lambda c: tf.constant(a[8 * c.replica_id_in_sync_group : 8 * (c.replica_id_in_sync_group + 1)]))

replica_step = step(layer)
out = tf.function(lambda a, b: strategy.run(replica_step, args=(a, b)))(shard(x), shard(dy))
local = [[np.asarray(t) for t in strategy.experimental_local_results(o)] for o in out]
got = [np.concatenate(local[0]), np.concatenate(local[1]), sum(local[2]), sum(local[3]),
       layer.moving_mean, layer.moving_variance]
report(got, ref)
"""
)

JAX = (
    COMMON
    + """
import jax, keras, kerasbn
from jax.sharding import NamedSharding, PartitionSpec

def run(layer, xa, dya):
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(tv, ntv, t, g):
        y, vjp, new = jax.vjp(lambda t, tv: layer.stateless_call(tv, ntv, t, training=True), t, tv, has_aux=True)
        gx, gw = vjp(g)
        return y, gx, gw, new

    y, gx, gw, new = step(tv, ntv, xa, dya)
    names = [v.name for v in layer.non_trainable_variables]
    return [y, gx] + list(gw) + [new[names.index("moving_mean")], new[names.index("moving_variance")]]

single = kerasbn.BatchNormalization(momentum=0.5)
single.build(x.shape)
ref = run(single, x, dy)
assert len(jax.devices()) == 2
distribution = keras.distribution.DataParallel(devices=jax.devices())
keras.distribution.set_distribution(distribution)
layer = kerasbn.BatchNormalization(synchronized=True, momentum=0.5)
layer.build(x.shape)
sharding = NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec(distribution.batch_dim_name))
xs, dys = jax.device_put(x, sharding), jax.device_put(dy, sharding)
assert len(xs.addressable_shards) == 2
report(run(layer, xs, dys), ref)
"""
)


TORCH = (
    COMMON
    + """
import datetime, torch, torch.distributed as dist, keras, kerasbn
rank = int(os.environ["RANK"])

def run(layer, xa, dya):
    t = torch.tensor(xa, requires_grad=True)
    y = layer(t, training=True)
    gx, gg, gb = torch.autograd.grad(y, [t, layer.gamma.value, layer.beta.value], torch.tensor(dya))
    return [y, gx, gg, gb, layer.moving_mean, layer.moving_variance]

numpy = lambda out: [keras.ops.convert_to_numpy(a) for a in out]
dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
layer = kerasbn.BatchNormalization(synchronized=True, momentum=0.5)
layer.build((8, 5, 3))
got = numpy(run(layer, x[8 * rank : 8 * (rank + 1)], dy[8 * rank : 8 * (rank + 1)]))
dist.destroy_process_group()
single = kerasbn.BatchNormalization(momentum=0.5)
single.build(x.shape)
report(got, numpy(run(single, x, dy)))
"""
)


def run_worker(backend: str, code: str, env: dict | None = None) -> tuple[list, list]:
    environment = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return [np.asarray(a) for a in result["got"]], [np.asarray(a) for a in result["ref"]]


def check(got, ref):
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, g, r in zip(names, got, ref, strict=True):
        assert g.shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max())) if name in ("dgamma", "dbeta", "moving_mean") else 1.0
        assert np.abs(g - r).max() <= 1e-5 * scale, name


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason=ONCE)
def test_tensorflow_mirrored_strategy_matches_one_device():
    check(*run_worker("tensorflow", TENSORFLOW))


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason=ONCE)
def test_jax_data_parallel_matches_one_device():
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    check(*run_worker("jax", JAX, {"XLA_FLAGS": flags}))


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "torch", reason=ONCE)
def test_torch_gloo_process_group_matches_one_process():
    """Two processes, 8 samples each, against one process over all 16."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "KERAS_BACKEND": "torch", "INIT": f"tcp://127.0.0.1:{port}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TORCH],
            cwd=ROOT,
            env={**environment, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    local = [[np.asarray(a) for a in r["got"]] for r in results]
    got = [
        np.concatenate([local[0][0], local[1][0]]),
        np.concatenate([local[0][1], local[1][1]]),
        local[0][2] + local[1][2],
        local[0][3] + local[1][3],
    ]
    # Both processes hold the same global moving statistics.
    for i in (4, 5):
        np.testing.assert_array_equal(local[0][i], local[1][i])
    check(got + local[0][4:], [np.asarray(a) for a in results[0]["ref"]])


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed process groups exist only on the torch backend")
def test_torch_synchronized_without_a_process_group_is_refused():
    import kerasbn

    layer = kerasbn.BatchNormalization(synchronized=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        layer(np.ones((4, 3), "float32"), training=True)
