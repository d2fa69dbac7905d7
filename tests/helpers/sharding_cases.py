"""Sharded vs single-device computations on 8 fake CPU devices, for tests/test_sharding.py.

Run as ``python tests/helpers/sharding_cases.py OUT.npz``: JAX must see 8 CPU devices before
its backend starts, which a pytest worker that already ran other tests cannot arrange. Writes
arrays (single-device references and sharded results) and error messages; the test file makes
the assertions.
"""
import json
import sys
import tempfile
import time

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tr_jax import models, sharding, train  # noqa: E402
from tr_jax.affinity.lookahead import lookahead_affinity, optax_lookahead  # noqa: E402
from tr_jax.affinity.per_task import per_task_grads  # noqa: E402
from tr_jax.affinity.sharded import sharded_lookahead_affinity  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
STEPS = 3
B = 16


def batches(num_tasks, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(B, 8, 8, 1)).astype(np.float32),
             "labels": rng.integers(0, 2, (B, num_tasks)).astype(np.int32),
             "label_mask": rng.random((B, num_tasks)) > 0.2,
             "task": rng.integers(0, num_tasks, B).astype(np.int32)} for _ in range(STEPS)]


def flat(tree):
    """All leaves (PRNG keys as their key data) as one float64 vector."""
    def values(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.ravel(np.asarray(a, np.float64))
    return np.concatenate([values(a) for a in jax.tree.leaves(tree)])


def train_case(out):
    """SmallCNN (BN + routing), per_example mode, Adam: 3 steps and an eval, two meshes."""
    model = models.SmallCNN(num_tasks=8, sharing=0.5, widths=(8,))
    tx = optax.adam(1e-2)
    data = batches(8)
    key = jax.random.key(0)
    init = lambda: train.create_train_state(model, tx, key, data[0])  # noqa: E731
    state = init()
    step = train.make_train_step(model, tx, mode="per_example")
    losses = []
    for batch in data:
        state, m = step(state, batch)
        losses.append(m["task_losses"])
    out["ref/params"] = flat(state.params)
    out["ref/batch_stats"] = flat(state.batch_stats)
    out["ref/losses"] = np.stack(losses)
    out["ref/counts"] = flat(train.make_eval_step(model)(state, data[0]))
    for d, t in ((8, 1), (2, 4)):  # the other meshes run in train_affinity_case
        mesh = sharding.make_mesh(d, t)
        name = f"{d}x{t}"
        state = sharding.shard_state(init(), mesh)
        step = sharding.shard_train_step(model, tx, mesh, state, mode="per_example")
        state, metrics = run_steps(step, state, data, mesh, out, name)
        out[f"{name}/params"] = flat(state.params)
        out[f"{name}/batch_stats"] = flat(state.batch_stats)
        out[f"{name}/losses"] = np.stack([m["task_losses"] for m in metrics])
        out[f"{name}/counts"] = flat(sharding.shard_eval_step(model, mesh, state)(state, data[0]))
        out[f"{name}/head_spec"] = np.array(str(state.params["head"]["kernel"].sharding.spec))


def run_steps(step, state, data, mesh, out, name):
    """Steps through ``data`` (placed first) under jax.transfer_guard("disallow"); records
    any error (``{name}/guard``) and the step's trace count (``{name}/traces``)."""
    placed = [sharding.shard_batch(b, mesh) for b in data]
    metrics = []
    try:
        with jax.transfer_guard("disallow"):
            for batch in placed:
                state, m = step(state, batch)
                metrics.append(m)
        out[f"{name}/guard"] = np.array("ok")
    except Exception as e:  # noqa: BLE001 -- reported to the test
        out[f"{name}/guard"] = np.array(f"{type(e).__name__}: {e}")
    out[f"{name}/traces"] = np.array(step.traces)
    return state, metrics


def affinity_case(out):
    """Routed MLP, T = 6 (padded on 4 and 8 task devices): sharded vs unsharded Z."""
    num_tasks = 6
    model = models.MLP(num_tasks=num_tasks, sharing=0.5, hidden=(16, 16))
    tx = optax.sgd(0.1, momentum=0.9)
    batch = {k: v for k, v in batches(num_tasks, seed=1)[0].items() if k != "task"}
    variables = model.init({"params": jax.random.key(1), "routing": jax.random.key(2)},
                           batch["image"], 0)
    params = variables["params"]
    shared, rest = {"encoder": params["encoder"]}, {"head": params["head"]}

    def loss_fn(shared, rest, batch):
        v = {"params": {**shared, **rest}, "routing": variables["routing"]}
        return train.model_losses(model, v, batch, "all_tasks", train=False)[1]

    # one real optimizer step so that momentum is non-zero for the optimizer lookahead
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)

    def run(fn, shared, rest, batch, opt_state, strategy, chunk_size=None, update="sgd",
            given=False, **mesh):
        extra = dict(mesh)
        if update == "opt":
            extra["update_fn"] = optax_lookahead(tx, opt_state, shared, rest)
        if given:
            extra["losses_and_grads"] = per_task_grads(loss_fn, shared, rest, batch)
        return fn(loss_fn, shared, rest, batch, lr=0.1, strategy=strategy,
                  chunk_size=chunk_size, **extra)

    # one mesh per variant keeps the compile count down (train_affinity_case runs every mesh);
    # the strategies agree with each other (tests/test_affinity.py): two references suffice
    variants = {"sgd_chunked": (dict(strategy="chunked", chunk_size=1), ((2, 4),)),
                "sgd_given_grads": (dict(strategy="auto", given=True), ((1, 8),)),
                "opt_unrolled": (dict(strategy="unrolled", update="opt"), ((4, 2),))}
    args = (shared, rest, batch, opt_state)
    for update in ("sgd", "opt"):
        out[f"aff/{update}/ref"] = np.asarray(jax.jit(
            lambda *a, u=update: run(lookahead_affinity, *a, strategy="vmap", update=u))(*args))
    for name, (kw, meshes) in variants.items():
        for d, t in meshes:
            mesh = sharding.make_mesh(d, t)
            z = jax.jit(lambda *a, kw=kw, mesh=mesh: run(sharded_lookahead_affinity, *a,
                                                         mesh=mesh, **kw))(
                shared, rest, sharding.shard_batch(batch, mesh), opt_state)
            out[f"aff/{name}/{d}x{t}"] = np.asarray(z)
            out[f"aff/{name}/{d}x{t}/spec"] = np.array(str(z.sharding.spec))


def train_affinity_case(out):
    """make_train_step(affinity="lookahead", lookahead="optimizer") on one device vs
    shard_train_step (task-parallel affinity) on every mesh: the mean affinity and parameters
    after 2 steps. All-tasks affinity losses on two meshes, per-example ones on the others."""
    num_tasks = 8
    model = models.MLP(num_tasks=num_tasks, sharing=0.5, hidden=(16,))
    tx = optax.sgd(0.1, momentum=0.9)
    # every task present and labelled: per-example task losses are then all defined
    data = [{**b, "task": np.random.default_rng(i).permutation(B) % num_tasks,
             "label_mask": np.ones_like(b["label_mask"])}
            for i, b in enumerate(batches(num_tasks, seed=2)[:2])]
    init = lambda: train.create_train_state(model, tx, jax.random.key(4), data[0])  # noqa
    kwargs = dict(mode="per_example", affinity="lookahead", lookahead="optimizer", lr=0.1,
                  strategy="vmap")
    for affinity_mode, meshes in (("all_tasks", ((8, 1), (4, 2))),
                                  ("per_example", ((2, 4), (1, 8)))):
        state = init()
        step = train.make_train_step(model, tx, affinity_mode=affinity_mode, **kwargs)
        for batch in data:
            state, _ = step(state, batch)
        out[f"train_aff/{affinity_mode}/ref"] = np.asarray(train.mean_affinity(state))
        out[f"train_aff/{affinity_mode}/ref_params"] = flat(state.params)
        for d, t in meshes:
            mesh = sharding.make_mesh(d, t)
            state = sharding.shard_state(init(), mesh)
            step = sharding.shard_train_step(model, tx, mesh, state, affinity_mode=affinity_mode,
                                             max_traces=1, **kwargs)
            state, _ = run_steps(step, state, data, mesh, out, f"train_aff/{d}x{t}")
            out[f"train_aff/{affinity_mode}/{d}x{t}"] = np.asarray(train.mean_affinity(state))
            out[f"train_aff/{affinity_mode}/{d}x{t}/params"] = flat(state.params)


def _closure_affinity(w, masks, mesh):
    """A loss_fn that indexes a mesh-sharded array it closes over (not allowed)."""
    def loss_fn(shared, rest, batch):
        return ((batch @ shared) * masks[jnp.arange(8) % 8]).sum(1)

    return sharded_lookahead_affinity(loss_fn, w, {}, jnp.ones((8, 3)), lr=0.1,
                                      mesh=mesh)


def error_case():
    """Messages of the errors for bad shapes (and for a forbidden closure)."""
    errors = {}
    mesh24 = sharding.make_mesh(2, 4)
    attempts = {
        "mesh_product": lambda: sharding.make_mesh(2, 2),
        "mesh_task": lambda: sharding.make_mesh(task=3),
        "mesh_open": lambda: sharding.make_mesh(0, 0),
        "batch": lambda: sharding.shard_batch({"image": np.zeros((10, 2))},
                                              sharding.make_mesh(4, 2)),
        "heads": lambda: sharding.tree_shardings(
            {"params": {"head": {"kernel": jax.ShapeDtypeStruct((5, 6, 2), jnp.float32)}}},
            mesh24),
        "closure": lambda: jax.jit(lambda w, m: _closure_affinity(w, m, mesh24))(
            jnp.eye(3), jax.device_put(jnp.ones((8, 3)), jax.NamedSharding(mesh24, jax.P("task")))),
    }
    for name, fn in attempts.items():
        try:
            fn()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


def experiment_case(out, workdir):
    """tr_jax.experiment.train_and_evaluate on digits (4 tasks, per-example routing, lookahead
    affinity every 5 steps, checkpoints) without a mesh and on a (data 4, task 2) mesh; the
    eval batches of 100 leave a last one of 50 rows, not a multiple of 4 (padded)."""
    from tr_jax import cli, experiment

    config = cli.load_config(str(cli.DEFAULT_CONFIG), [
        "--config.tasks=('even', 'prime', 'ge_5', 'square')", "--config.num_epochs=1",
        "--config.progress=False", "--config.affinity=lookahead", "--config.affinity_every=5",
        "--config.eval_batch_size=100", "--config.checkpoint_every_steps=10"])
    for name, mesh in (("ref", None), ("4x2", {"data": 4, "task": 2})):
        with config.unlocked():
            config.mesh = mesh
        result = experiment.train_and_evaluate(config, f"{workdir}/{name}")
        out[f"exp/{name}/accuracy"] = np.asarray(result["accuracy"])
        out[f"exp/{name}/affinity"] = np.asarray(result["affinity"])
        out[f"exp/{name}/steps"] = np.asarray(result["steps"])


def main(path):
    out = {}
    experiment_case(out, tempfile.mkdtemp())
    t0 = time.process_time()
    train_case(out)
    t1 = time.process_time()
    affinity_case(out)
    t2 = time.process_time()
    train_affinity_case(out)
    print(f"train case {t1 - t0:.1f} s, affinity case {t2 - t1:.1f} s, train with affinity "
          f"{time.process_time() - t2:.1f} s")
    out["meta"] = np.array(json.dumps({"errors": error_case(),
                                       "devices": jax.device_count()}))
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
