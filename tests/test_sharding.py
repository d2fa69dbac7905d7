"""tr_jax.sharding and tr_jax.affinity.sharded: sharded results equal single-device ones.

The multi-device checks need JAX to start with 8 CPU devices (or as several processes), which
a pytest worker whose backend already runs on one device cannot do: they run in subprocesses
(tests/helpers/), all started at once by one module fixture, and the assertions are made here
on the arrays they write. The rest runs in-process on one device.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tr_jax import models, sharding, train

# One worker runs the whole module, so the module fixture starts its subprocesses once.
pytestmark = pytest.mark.xdist_group("sharding")

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).parents[1]
MESHES = ("8x1", "4x2", "2x4", "1x8")
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(script: str, *args, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    # Of XLA_FLAGS only the tests' optimization level (tests/conftest.py) is passed on.
    opt_level = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if f.startswith("--xla_backend_optimization_level")]
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                "XLA_FLAGS": " ".join(opt_level), **(env_extra or {})})
    return subprocess.Popen([sys.executable, str(HELPERS / script), *map(str, args)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, name: str) -> None:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{out[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the 8-device cases, a 2-process run and its 1-process reference together."""
    tmp = tmp_path_factory.mktemp("sharding")
    dist, ref = tmp / "dist", tmp / "ref"
    dist.mkdir(), ref.mkdir()
    coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
                   "JAX_NUM_PROCESSES": "2"}
    procs = {
        "8-device cases": _start("sharding_cases.py", tmp / "cases.npz"),
        "process 0": _start("distributed_worker.py", dist, 2,
                            env_extra={**coordinator, "JAX_PROCESS_ID": "0"}),
        "process 1": _start("distributed_worker.py", dist, 2,
                            env_extra={**coordinator, "JAX_PROCESS_ID": "1"}),
        "1-process reference": _start("distributed_worker.py", ref, 1),
    }
    try:
        for name, proc in procs.items():
            _finish(proc, name)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    cases = dict(np.load(tmp / "cases.npz"))
    return {"cases": cases, "meta": json.loads(str(cases["meta"])),
            "dist": dict(np.load(dist / "result.npz")), "ref": dict(np.load(ref / "result.npz")),
            "dist_dir": dist}


# ------------------------------------------------------------------ multi-device (subprocess)

@pytest.mark.parametrize("mesh", ("8x1", "2x4"))
def test_sharded_train_step_equals_single_device(runs, mesh):
    # SmallCNN with BatchNorm (batch statistics over the data-split batch), Adam, 3 steps.
    # The other two meshes are checked by test_train_step_affinity_equals_single_device.
    c = runs["cases"]
    assert runs["meta"]["devices"] == 8
    assert str(c[f"{mesh}/guard"]) == "ok"
    for key in ("params", "batch_stats", "losses"):
        np.testing.assert_allclose(c[f"{mesh}/{key}"], c[f"ref/{key}"], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{mesh} {key}")
    np.testing.assert_array_equal(c[f"{mesh}/counts"], c["ref/counts"])
    assert str(c[f"{mesh}/head_spec"]) == "P(None, 'task', None)"


@pytest.mark.parametrize("mesh", MESHES)
def test_train_step_traces_once_without_implicit_transfers(runs, mesh):
    # The train step with affinity, 2 steps under jax.transfer_guard("disallow") with
    # max_traces=1 (the helper records any error of either kind instead of "ok").
    c = runs["cases"]
    assert str(c[f"train_aff/{mesh}/guard"]) == "ok"
    assert int(c[f"train_aff/{mesh}/traces"]) == 1


@pytest.mark.parametrize("affinity_mode,mesh", [("all_tasks", "8x1"), ("all_tasks", "4x2"),
                                                ("per_example", "2x4"),
                                                ("per_example", "1x8")])
def test_train_step_affinity_equals_single_device(runs, affinity_mode, mesh):
    # make_train_step(affinity="lookahead", lookahead="optimizer") on one device vs
    # shard_train_step (task-parallel affinity): mean affinity and parameters after 2 steps.
    c = runs["cases"]
    ref = c[f"train_aff/{affinity_mode}/ref"]
    assert ref.shape == (8, 8) and np.all(np.isfinite(ref)) and np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(c[f"train_aff/{affinity_mode}/{mesh}"], ref, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(c[f"train_aff/{affinity_mode}/{mesh}/params"],
                               c[f"train_aff/{affinity_mode}/ref_params"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,mesh", [
    ("sgd_chunked", "2x4"), ("sgd_given_grads", "1x8"), ("opt_unrolled", "4x2")])
def test_task_parallel_affinity_equals_unsharded(runs, variant, mesh):
    # T = 6 tasks: the 4- and 8-device task axes get padded blocks.
    c = runs["cases"]
    ref = c["aff/opt/ref"] if variant.startswith("opt") else c["aff/sgd/ref"]
    assert ref.shape == (6, 6) and np.all(np.isfinite(ref)) and np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(c[f"aff/{variant}/{mesh}"], ref, rtol=1e-4, atol=1e-5)
    assert str(c[f"aff/{variant}/{mesh}/spec"]) == "P()"  # gathered


def test_experiment_on_a_mesh_equals_single_device(runs):
    # train_and_evaluate with config.mesh = {"data": 4, "task": 2}: sharded state and steps,
    # task-parallel affinity, eval batches padded with masked rows, Orbax checkpoints.
    c = runs["cases"]
    assert int(c["exp/4x2/steps"]) == int(c["exp/ref/steps"]) == 21
    ref = c["exp/ref/affinity"]
    assert ref.shape == (4, 4) and np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(c["exp/4x2/affinity"], ref, rtol=1e-3, atol=1e-4)
    # Float reordering may flip a borderline prediction: at most one of the 450 test images.
    np.testing.assert_allclose(c["exp/4x2/accuracy"], c["exp/ref/accuracy"], atol=1.5 / 450)


def test_pad_batch_masks_the_added_rows():
    batch = {"image": np.arange(5.0)[:, None], "labels": np.ones((5, 2), np.int32)}
    padded = sharding.pad_batch(batch, 4)
    assert padded["image"].shape == (8, 1) and padded["labels"].shape == (8, 2)
    np.testing.assert_array_equal(padded["label_mask"].sum(1), [2, 2, 2, 2, 2, 0, 0, 0])
    assert sharding.pad_batch(batch, 5)["label_mask"].all()
    with pytest.raises(ValueError, match="disagree on the batch size"):
        sharding.pad_batch({**batch, "labels": np.ones((4, 2))}, 4)


def test_bad_shapes_raise_errors_naming_the_sizes(runs):
    errors = runs["meta"]["errors"]
    assert "(data=2, task=2) needs 4 devices, but there are 8" in errors["mesh_product"]
    assert "task axis size 3" in errors["mesh_task"] and "8 devices" in errors["mesh_task"]
    assert "at most one left open" in errors["mesh_open"]
    assert "global batch 10" in errors["batch"] and "data axis size 4" in errors["batch"]
    assert "size 6" in errors["heads"] and "'task' axis size 4" in errors["heads"]
    assert "through `rest`" in errors["closure"]


def test_two_processes_equal_one_process(runs):
    dist, ref = runs["dist"], runs["ref"]
    assert int(dist["processes"]) == 2 and int(dist["devices"]) == 4
    assert int(ref["processes"]) == 1 and int(ref["devices"]) == 1
    np.testing.assert_allclose(dist["params"], ref["params"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dist["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dist["counts"], ref["counts"])
    np.testing.assert_allclose(dist["affinity"], ref["affinity"], rtol=1e-4, atol=1e-5)


def test_only_process_zero_writes_metrics(runs):
    lines = (runs["dist_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


# ---------------------------------------------------------------------- in-process (1 device)

def test_initialize_distributed_single_process_and_partial_settings(monkeypatch):
    for name in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed(cpu_collectives=None) is False
    monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"\['coordinator_address', 'process_id'\] missing"):
        sharding.initialize_distributed(cpu_collectives=None)
    with pytest.raises(ValueError, match=r"process_id=5 must lie in \[0, num_processes=2\)"):
        sharding.initialize_distributed("localhost:1", process_id=5, cpu_collectives=None)
    monkeypatch.setenv(sharding.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' must be an integer"):
        sharding.initialize_distributed(cpu_collectives=None)


def test_rules_split_heads_masks_and_their_optimizer_moments():
    mesh = sharding.make_mesh(1, 1)
    model = models.MLP(num_tasks=4, sharing=0.5, hidden=(8,))
    state = jax.eval_shape(lambda: train.create_train_state(
        model, optax.adam(1e-3), jax.random.key(0), {"image": jnp.zeros((1, 3))}))
    specs = {sharding.leaf_path(p): s.spec for p, s in
             jax.tree_util.tree_leaves_with_path(sharding.tree_shardings(state, mesh))}
    assert specs["params/head/kernel"] == jax.P(None, "task", None)
    assert specs["params/head/bias"] == jax.P("task", None)
    assert specs["opt_state/0/mu/head/kernel"] == jax.P(None, "task", None)
    assert specs["routing/encoder/TaskRouting_0/masks"] == jax.P("task", None)
    assert specs["params/encoder/Dense_0/kernel"] == jax.P()
    assert specs["affinity_sum"] == jax.P()
    with pytest.raises(ValueError, match="rule .* is for rank 1, but x has shape"):
        sharding.spec_for("x", (2, 2), mesh, [("x", jax.P("task"))])


def test_mesh_and_batch_helpers_on_one_device():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "task": 1}
    assert dict(sharding.mesh_from_config({"mesh": {"data": 1, "task": 0}}).shape) == {
        "data": 1, "task": 1}
    with pytest.raises(ValueError, match=r"data axis size 2 does not divide the 1 devices"):
        sharding.make_mesh(2)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_from_config({"mesh": {"model": 2}})
    assert sharding.process_rows(mesh, 6) == slice(0, 6)
    batch = {"image": np.arange(12.0).reshape(6, 2), "task": np.int32(3)}
    assert sharding.host_local_batch(batch, mesh)["image"].shape == (6, 2)
    placed = sharding.shard_batch(batch, mesh)
    assert placed["task"].sharding.spec == jax.P()
    assert placed["image"].sharding.spec == jax.P("data")
    assert sharding.shard_batch(placed, mesh)["image"] is placed["image"]  # no re-placement


def test_sharded_init_equals_host_init():
    model = models.MLP(num_tasks=4, sharing=0.5, hidden=(4,))
    tx = optax.sgd(0.1, momentum=0.9)
    sample = {"image": np.zeros((2, 3), np.float32)}
    host = train.create_train_state(model, tx, jax.random.key(3), sample)
    direct = sharding.create_sharded_train_state(model, tx, jax.random.key(3), sample,
                                                 sharding.make_mesh())
    chex.assert_trees_all_equal(host.replace(rng=jax.random.key_data(host.rng)),
                                direct.replace(rng=jax.random.key_data(direct.rng)))


def test_bfloat16_compute_keeps_float32_params_through_the_sharded_step():
    model = models.MLP(num_tasks=3, sharing=0.5, hidden=(8,), dtype=jnp.bfloat16)
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 5)).astype(np.float32),
             "labels": rng.integers(0, 2, (8, 3)).astype(np.int32),
             "task": rng.integers(0, 3, 8).astype(np.int32)}
    mesh = sharding.make_mesh()
    state = sharding.create_sharded_train_state(model, tx, jax.random.key(0), batch, mesh)
    logits = model.apply(state.variables, batch["image"], batch["task"])
    assert logits.dtype == jnp.bfloat16
    step = sharding.shard_train_step(model, tx, mesh, state, mode="per_example", max_traces=1)
    first = None
    for _ in range(5):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert bool(metrics["finite"]) and float(metrics["loss"]) < first
    with pytest.raises(RuntimeError, match="traced 2 times"):
        step(state, {**batch, "image": batch["image"][:4], "labels": batch["labels"][:4],
                     "task": batch["task"][:4]})
