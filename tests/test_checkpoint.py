"""Tests for tr_jax.checkpoint: exact round trips, fingerprint mismatches, damaged steps, and
stopped-and-resumed training runs (in-process and a SIGTERM'd subprocess) against an
uninterrupted run of the same config."""
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from tr_jax import checkpoint, cli, experiment, models, train
from tr_jax.metrics import MetricWriter

# One worker under `pytest -n 2 --dist loadgroup`: the module-scoped runs are made once.
pytestmark = pytest.mark.xdist_group("checkpoint")
REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments" / "configs" / "digits.py")
EPOCHS, STOP_AT = 3, 13  # the loop tests: 3 epochs of 10 steps, stopped mid-epoch 2


@pytest.fixture(scope="module", autouse=True)
def fast_prng_compiles():
    """The non-partitionable threefry: XLA:CPU compiles each random draw of the default
    (partitionable) one in ~2 s, ~8x slower, and model inits draw one per kernel shape. What
    these tests check does not depend on which random stream is used."""
    with jax.threefry_partitionable(False):
        yield


def tiny_batch(num_tasks=3, b=8):
    x = np.random.default_rng(0).normal(size=(b, 8, 8, 1)).astype(np.float32)
    return {"image": x, "labels": (x[:, :num_tasks, 0, 0] > 0).astype(np.int32),
            "task": np.arange(b, dtype=np.int32) % num_tasks}


def make_run(num_tasks=3, sharing=0.5, seed=0):
    model = models.SmallCNN(num_tasks=num_tasks, sharing=sharing, widths=(4, 8))
    opt = optax.sgd(0.1, momentum=0.9)
    state = train.create_train_state(model, opt, jax.random.key(seed), tiny_batch(num_tasks))
    fp = checkpoint.fingerprint(model, state, tuple(f"t{i}" for i in range(num_tasks)))
    return model, opt, state, fp


def as_numpy(state):
    """Host copy of every leaf (keys as key data), keyed by path."""
    tree = checkpoint._to_saveable(state)
    return {jax.tree_util.keystr(p): np.array(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_bitwise_equal(a, b):
    a, b = as_numpy(a), as_numpy(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A directory with steps 1 and 2 of a tiny run, and the states saved at each."""
    _, opt, state, fp = make_run()
    step = train.make_train_step(models.SmallCNN(num_tasks=3, sharing=0.5, widths=(4, 8)), opt,
                                 mode="per_example")
    directory = tmp_path_factory.mktemp("ckpt") / "two_steps"
    saved = {}
    with checkpoint.Checkpointer(directory, fp, every_steps=1) as ckpt:
        for i in range(2):
            state, _ = step(state, tiny_batch())
            saved[i + 1] = as_numpy(state)
            ckpt.step_end(state, checkpoint.Position(0, i + 1), {"note": i})
    return directory, saved, fp


def restore_copy(two_steps, tmp_path, damage=None):
    """Copies the two-step directory, applies ``damage(dir)``, restores into a fresh state."""
    src, _, fp = two_steps
    directory = tmp_path / "ckpt"
    shutil.copytree(src, directory)
    if damage is not None:
        damage(directory)
    _, _, target, _ = make_run(seed=1)
    with checkpoint.Checkpointer(directory, fp, every_steps=1) as ckpt:
        return ckpt.restore(target), ckpt.all_steps(), sorted(os.listdir(directory))


def test_round_trip_is_exact_and_keeps_the_routing_masks(two_steps, tmp_path):
    _, saved, _ = two_steps
    restored, steps, _ = restore_copy(two_steps, tmp_path)
    assert steps == [1, 2] and restored.step == 2
    assert restored.position == checkpoint.Position(0, 2) and restored.loop == {"note": 1}
    got = as_numpy(restored.state)
    assert got.keys() == saved[2].keys()
    for key in got:
        assert np.array_equal(got[key], saved[2][key]), key
    # The masks come from the checkpoint, not from the (differently seeded) target.
    _, _, target, _ = make_run(seed=1)
    masks = [k for k in got if k.startswith("['routing']")]
    assert len(masks) == 2
    assert any(not np.array_equal(got[k], as_numpy(target)[k]) for k in masks)
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)


def test_async_save_is_not_affected_by_donating_the_state(tmp_path):
    model, opt, state, fp = make_run()
    step = train.make_train_step(model, opt, mode="per_example")  # donates its state argument
    with checkpoint.Checkpointer(tmp_path / "c", fp, every_steps=1) as ckpt:
        state, _ = step(state, tiny_batch())
        before = as_numpy(state)
        ckpt.save(state, checkpoint.Position(0, 1))
        for _ in range(3):
            state, _ = step(state, tiny_batch())
    with checkpoint.Checkpointer(tmp_path / "c", fp, every_steps=1) as ckpt:
        got = as_numpy(ckpt.restore(make_run(seed=1)[2]).state)
    assert all(np.array_equal(got[k], before[k]) for k in before)


@pytest.mark.parametrize("change, field", [(dict(num_tasks=4), "num_tasks"),
                                           (dict(sharing=0.25), "sharing")])
def test_a_different_model_is_refused_by_name(two_steps, change, field):
    directory, _, _ = two_steps
    _, _, target, fp = make_run(**change)
    with checkpoint.Checkpointer(directory, fp, every_steps=1) as ckpt:
        with pytest.raises(checkpoint.CheckpointMismatchError, match=f"model_fields.{field}"):
            ckpt.restore(target)
        assert ckpt.all_steps() == [1, 2]  # nothing moved aside


def _flip_bytes(directory):
    for path in (directory / "2" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))


def _swap_in_older_arrays(directory):
    """Step 2's metadata with step 1's (intact, readable) arrays: only the checksums see it."""
    shutil.rmtree(directory / "2" / "state")
    shutil.copytree(directory / "1" / "state", directory / "2" / "state")


# Tensorstore may report the failed read once more from a closed event loop: harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [
    _flip_bytes,
    lambda d: (d / "2" / "meta" / "metadata").unlink(),
    lambda d: shutil.rmtree(d / "2" / "state"),
    _swap_in_older_arrays,
], ids=["flipped-bytes", "no-metadata", "no-state", "swapped-arrays"])
def test_a_damaged_newest_step_falls_back_to_the_previous_one(two_steps, tmp_path, damage):
    _, saved, _ = two_steps
    with pytest.warns(UserWarning, match="step 2 .* is damaged"):
        restored, steps, names = restore_copy(two_steps, tmp_path, damage)
    assert restored.step == 1 and steps == [1]
    assert "2.corrupt" in names
    got = as_numpy(restored.state)
    assert all(np.array_equal(got[k], saved[1][k]) for k in got)


def test_an_interrupted_save_is_invisible(two_steps, tmp_path):
    def partial(directory):  # what a save killed before its rename leaves behind
        (directory / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    restored, steps, _ = restore_copy(two_steps, tmp_path, partial)
    assert restored.step == 2 and steps == [1, 2]


def test_no_intact_step_is_an_error(two_steps, tmp_path):
    def wreck(directory):
        for step in ("1", "2"):
            shutil.rmtree(directory / step / "state")
    with pytest.raises(checkpoint.CheckpointCorruptedError, match="no intact checkpoint"):
        restore_copy(two_steps, tmp_path, wreck)


# -- the training loop ---------------------------------------------------------------------

def tiny_digits_config(**changes):
    config = cli.load_config(DIGITS, [])
    with config.unlocked():
        config.update({"num_epochs": EPOCHS, "batch_size": 128, "model_kwargs": {"widths": (4, 8)},
                       "tasks": ("is_0", "is_1", "even", "ge_5"),
                       "checkpoint_every_steps": 4, "keep_checkpoints": 2,
                       "log_every_steps": 1, "progress": False,
                       # TAG affinity every 3rd step: checkpoints land between measurements.
                       "affinity": "lookahead", "affinity_every": 3, "lookahead": "optimizer",
                       **changes})
    return config


@functools.cache
def digits_target(**changes):
    """(initial state, fingerprint) of the tiny digits run, as the loop builds them."""
    config = tiny_digits_config(**changes)
    dataset = experiment.build_dataset(config)
    model = experiment.build_model(config, dataset.num_tasks)
    steps_per_epoch = dataset.steps_per_epoch("train", config.batch_size)
    opt = experiment.build_optimizer(config, steps_per_epoch)
    state = train.create_train_state(model, opt, jax.random.key(config.seed),
                                     next(dataset.batches("train", config.batch_size)))
    return state, checkpoint.fingerprint(model, state, dataset.task_names, seed=config.seed,
                                         batch_size=config.batch_size,
                                         steps_per_epoch=steps_per_epoch,
                                         **experiment.training_settings(config))


def final_state(workdir, **changes):
    """The newest checkpoint of a run in ``workdir`` (config changes as given), restored."""
    state, fp = digits_target(**changes)
    with checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", fp,
                                 every_steps=1) as ckpt:
        return ckpt.restore(state)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: (results, final restored checkpoint)."""
    workdir = tmp_path_factory.mktemp("straight")
    return experiment.train_and_evaluate(tiny_digits_config(), str(workdir)), final_state(workdir)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(straight, tmp_path, monkeypatch):
    original, handler = checkpoint.Checkpointer.step_end, signal.getsignal(signal.SIGTERM)

    def sigterm_at(self, state, position, loop=None):
        if int(state.step) == STOP_AT:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the checkpointer's StopSignal
        return original(self, state, position, loop)

    monkeypatch.setattr(checkpoint.Checkpointer, "step_end", sigterm_at)
    with pytest.raises(checkpoint.Preempted) as stop:
        experiment.train_and_evaluate(tiny_digits_config(), str(tmp_path))
    assert stop.value.step == STOP_AT
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handler was removed
    with pytest.raises(FileExistsError, match="--resume"):
        experiment.train_and_evaluate(tiny_digits_config(), str(tmp_path))

    result = experiment.train_and_evaluate(tiny_digits_config(), str(tmp_path), resume=True)
    want_result, want = straight
    assert result == want_result and np.isfinite(result["affinity"]).all()
    got = final_state(tmp_path)
    assert got.step == want.step == EPOCHS * 10
    assert (got.state.affinity_count == EPOCHS * 10 // 3).all()
    assert got.position == checkpoint.Position(EPOCHS, 0)
    assert_bitwise_equal(got.state, want.state)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [28, 30]  # every 4 steps and the final one; keep_checkpoints=2
    # The saved data position means nothing with another batch size: refused by name.
    with pytest.raises(checkpoint.CheckpointMismatchError, match="run.batch_size"):
        experiment.train_and_evaluate(tiny_digits_config(batch_size=64), str(tmp_path),
                                      resume=True)
    # Nor does a run that would train or measure differently (here: another affinity).
    with pytest.raises(checkpoint.CheckpointMismatchError, match="run.affinity: checkpoint "
                       "lookahead vs this run taylor"):
        experiment.train_and_evaluate(tiny_digits_config(affinity="taylor"), str(tmp_path),
                                      resume=True)


def test_resume_needs_checkpointing_on(tmp_path):
    _, _, state, fp = make_run()
    with checkpoint.Checkpointer(tmp_path, fp, every_steps=0) as ckpt:
        assert not ckpt.save(state, checkpoint.Position(), force=True)
        with pytest.raises(ValueError, match="checkpoint_every_steps"):
            ckpt.start(state, resume=True)
    assert not os.listdir(tmp_path)


def test_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    make = train.make_train_step

    def non_finite_at_step_10(*args, **kwargs):
        step = make(*args, **kwargs)

        def run(state, batch):
            state, metrics = step(state, batch)
            return state, {**metrics, "finite": metrics["finite"] & (state.step != 10)}
        return run

    monkeypatch.setattr(train, "make_train_step", non_finite_at_step_10)
    with pytest.raises(FloatingPointError, match="step 10"):
        experiment.train_and_evaluate(tiny_digits_config(affinity=None), str(tmp_path))
    restored = final_state(tmp_path, affinity=None)
    assert restored.step == 8  # saved every 4 steps; nothing after the failure


# The CLI in a child process whose train steps take >= 0.1 s, so the test's SIGTERM lands
# mid-run however fast the machine is (sleeping does not change what a step computes).
CHILD = """
import sys, time
from tr_jax import cli, train
make = train.make_train_step
def slow(*args, **kwargs):
    step = make(*args, **kwargs)
    return lambda state, batch: (time.sleep(0.1), step(state, batch))[1]
train.make_train_step = slow
cli.main(sys.argv[1:])
"""


def test_sigterm_to_the_cli_saves_and_resume_finishes_the_run(straight, tmp_path):
    config_file = tmp_path / "config.py"
    config_file.write_text("import ml_collections\n\n\ndef get_config():\n    return "
                           f"ml_collections.ConfigDict({tiny_digits_config().to_dict()!r})\n")
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "train", "--config",
                             str(config_file), "--workdir", str(workdir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_THREEFRY_PARTITIONABLE": "0"})
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.PREEMPTED_EXIT_CODE, err
    assert "stopped by SIGTERM" in err
    stopped = final_state(workdir)
    assert 2 <= stopped.step < EPOCHS * 10

    cli.main(["train", "--config", str(config_file), "--workdir", str(workdir), "--resume"])
    got = final_state(workdir)
    assert got.step == EPOCHS * 10
    assert_bitwise_equal(got.state, straight[1].state)


def test_resumed_run_logs_each_step_once(tmp_path):
    # The stopped run logged steps 4 and 5 after its last checkpoint (step 3); the resumed
    # run logs them again, so the writer drops the stale records first.
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the line a hard kill cut off
    writer = MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)
    writer.write(4, {"loss": -4.0})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, -4.0)]
