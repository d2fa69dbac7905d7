"""One process of a multi-host run on localhost CPU, for tests/test_sharding.py.

``python tests/helpers/distributed_worker.py WORKDIR LOCAL_DEVICES`` with the multi-host
settings in ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (none of
them: a single-process reference run). Every process iterates the same global batches and
feeds its own rows; the train step runs on a (data, task) = (processes, devices) mesh, the
affinity on a (1, all devices) mesh so that its task axis spans the processes. Process 0
writes ``WORKDIR/result.npz`` and metrics.
"""
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from tr_jax import models, sharding, train  # noqa: E402
from tr_jax.affinity.sharded import sharded_lookahead_affinity  # noqa: E402
from tr_jax.metrics import MetricWriter  # noqa: E402

T, B, STEPS = 4, 8, 3


def global_batches():
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(B, 6)).astype(np.float32),
             "labels": rng.integers(0, 2, (B, T)).astype(np.int32),
             "task": rng.integers(0, T, B).astype(np.int32)} for _ in range(STEPS)]


def main(workdir):
    distributed = sharding.initialize_distributed()
    assert distributed == (jax.process_count() > 1)
    model = models.MLP(num_tasks=T, sharing=0.5, hidden=(16,))
    tx = optax.sgd(0.1, momentum=0.9)
    data = global_batches()
    mesh = sharding.make_mesh(jax.process_count(), jax.local_device_count())
    state = sharding.create_sharded_train_state(model, tx, jax.random.key(0), data[0], mesh)
    step = sharding.shard_train_step(model, tx, mesh, state, mode="per_example")
    writer = MetricWriter(workdir, tensorboard=False)
    losses = []
    for batch in data:
        state, metrics = step(state, sharding.host_local_batch(batch, mesh))
        writer.write(int(state.step), {"loss": metrics["loss"]})
        losses.append(np.asarray(metrics["task_losses"]))
    writer.close()
    eval_batch = {k: v for k, v in data[0].items() if k != "task"}
    counts = sharding.shard_eval_step(model, mesh, state)(
        state, sharding.host_local_batch(eval_batch, mesh))

    task_mesh = sharding.make_mesh(1, jax.device_count())

    def loss_fn(shared, rest, batch):
        v = {"params": {"encoder": shared, "head": rest["head"]}, "routing": rest["routing"]}
        return train.model_losses(model, v, batch, "all_tasks", train=False)[1]

    z = jax.jit(lambda s, r, b: sharded_lookahead_affinity(loss_fn, s, r, b, lr=0.1,
                                                           mesh=task_mesh))(
        state.params["encoder"], {"head": state.params["head"], "routing": state.routing},
        sharding.shard_batch(sharding.host_local_batch(eval_batch, task_mesh), task_mesh))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)])
        np.savez(f"{workdir}/result.npz", params=flat, losses=np.stack(losses),
                 counts=np.stack([np.asarray(counts[k]) for k in sorted(counts)]),
                 affinity=np.asarray(z), processes=jax.process_count(),
                 devices=jax.device_count())


if __name__ == "__main__":
    main(sys.argv[1])
