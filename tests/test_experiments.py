"""Tests for the experiment configs: every config and variant loads through the CLI loader,
the sweeps are what their docstrings say, the runlocal variants train end to end on mock or
fabricated data (with early stopping and checkpoints), and the metrics are readable as
TensorBoard event files."""
import functools
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tr_jax import checkpoint, cli, experiment
from tr_jax.data import celeba
from test_checkpoint import fast_prng_compiles  # noqa: F401 -- module-wide, autouse
from test_data_cub import write_cub_tree  # the data tests' fabricated CUB_200_2011/ tree

# One worker under `pytest -n 2 --dist loadgroup`: the module-scoped runs are made once.
pytestmark = pytest.mark.xdist_group("experiments")
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def module(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config_variants():
    for path in sorted(CONFIGS.glob("*.py")):
        yield path.stem, None
        for variant in getattr(module(path.stem), "VARIANTS", ()):
            yield path.stem, variant


@pytest.mark.parametrize("name, variant", list(config_variants()))
def test_every_config_and_variant_loads(name, variant):
    path = str(CONFIGS / f"{name}.py") + (f":{variant}" if variant else "")
    config = cli.load_config(path, [])
    assert config.dataset and config.model in experiment.MODELS
    assert config.mode in ("task_per_batch", "per_example", "all_tasks")
    assert config.batch_size > 0 and config.num_epochs > 0


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown config variants"):
        module("cub_routing").get_config("runlokal")


def test_cub_sweep_covers_counts_schemes_and_sharing():
    cub = module("cub_routing")
    runs = cub.sweep()
    keys = {(r["num_tasks"], r["scheme"], r["sharing"]) for r in runs}
    assert len(keys) == len(runs) == 4 * 8  # per count: random σ>0 (4) + partition σ<1 (4)
    assert {r["num_tasks"] for r in runs} == {20, 40, 100, 312}
    assert not any(s == 0.0 and scheme == "random" for _, scheme, s in keys)
    assert sum(s == 1.0 for _, _, s in keys) == 4
    config = cub.get_config()
    for run in runs:  # every override applies to the config (names and types match)
        config.update(run)
        assert (config.num_tasks, config.sharing, config.scheme) == tuple(run.values())


def test_baseline_variants_and_overrides():
    cub = module("cub_routing")
    assert cub.get_config("shared").sharing == 1.0
    disjoint = cub.get_config("disjoint")
    assert (disjoint.sharing, disjoint.scheme) == (0.0, "partition")
    independent = cub.independent_overrides(3)
    assert [o["tasks"] for o in independent] == [(0,), (1,), (2,)]
    config = cub.get_config()
    config.update(independent[2])
    assert config.sharing is None and config.tasks == (2,)
    tag = module("celeba_tag")
    groups = tag.group_overrides([(0, 4, 5), (1, 2)])
    assert groups[0]["tasks"] == ("5_o_Clock_Shadow", "Goatee", "Mustache")
    assert groups[1]["tasks"] == ("Black_Hair", "Blond_Hair")
    config = tag.get_config()
    config.update(groups[1])
    assert config.affinity is None and config.tasks == ("Black_Hair", "Blond_Hair")


def test_celeba_config_has_the_official_hyper_parameters():
    c = module("celeba_tag").get_config()
    assert tuple(c.tasks) == celeba.TAG_TASKS and c.dataset_kwargs.image_size == (64, 64)
    assert (c.model, c.get("sharing"), c.mode) == ("RoutedResNet", None, "all_tasks")
    assert (c.optimizer, c.learning_rate, c.momentum, c.batch_size) == ("sgd", 5e-4, 0.9, 256)
    assert (c.lr_decay_epochs, c.lr_decay, c.num_epochs, c.early_stop_patience) == (15, 0.5,
                                                                                     100, 10)
    assert (c.affinity, c.affinity_every, c.lookahead) == ("lookahead", 1, "optimizer")


def test_learning_rate_halves_every_decay_period_and_normalizes_the_affinity():
    c = module("celeba_tag").get_config()
    rate = experiment.build_learning_rate(c, steps_per_epoch=10)
    assert [float(rate(s)) for s in (0, 149, 150, 300)] == pytest.approx(
        [5e-4, 5e-4, 2.5e-4, 1.25e-4])
    assert experiment.affinity_options(c, steps_per_epoch=10)["lr"](150) == rate(150)
    with c.unlocked():
        c.lr_decay_epochs = 0
    assert experiment.build_learning_rate(c, steps_per_epoch=10) == 5e-4


def sync_saves(monkeypatch):
    """Synchronous checkpoint saves: TFDS's testing file-system mocks (mock_data, builders)
    swap functions that Orbax's background writer thread uses."""
    monkeypatch.setattr(experiment.checkpoint, "Checkpointer",
                        functools.partial(checkpoint.Checkpointer, async_save=False))


@pytest.fixture(scope="module")
def celeba_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("celeba")
    config = module("celeba_tag").get_config("runlocal")
    with pytest.MonkeyPatch.context() as mp, tfds.testing.mock_data(num_examples=16):
        sync_saves(mp)
        result = experiment.train_and_evaluate(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return config, workdir, result, records


def test_celeba_runlocal_trains_with_early_stopping(celeba_run):
    config, workdir, result, records = celeba_run
    assert result["task_names"] == list(celeba.TAG_TASKS)
    assert 0.0 <= result["mean_accuracy"] <= 1.0
    affinity = np.load(workdir / "affinity.npy")  # measured every 2nd step, averaged
    assert affinity.shape == (9, 9) and np.isfinite(affinity).all()
    # Replay the early-stopping rule on the logged validation accuracies.
    errors = [1 - r["val_mean_accuracy"] for r in records if "val_mean_accuracy" in r]
    best, bad, epochs = None, 0, 0
    for error in errors:
        epochs += 1
        best, bad = (error, 0) if best is None or error < best else (best, bad + 1)
        if bad >= config.early_stop_patience:
            break
    assert len(errors) == epochs and result["steps"] == epochs * 4  # 16 examples / batch 4
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())[-1] == epochs * 4


def test_metrics_are_readable_tensorboard_events(celeba_run):
    import tensorflow as tf

    _, workdir, _, records = celeba_run
    (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    scalars = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):  # checks record CRCs
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    want = {(k, r["step"]): v for r in records for k, v in r.items()
            if k != "step" and isinstance(v, float)}
    assert want and scalars.keys() == want.keys()
    assert all(np.isclose(scalars[k], want[k], rtol=1e-6) for k in want)  # float32 in events


def test_cub_runlocal_trains_routed_vgg_on_a_fabricated_tree(tmp_path, monkeypatch):
    sync_saves(monkeypatch)
    ref = write_cub_tree(tmp_path / "manual")
    config = module("cub_routing").get_config("runlocal")
    config.data_dir = str(tmp_path / "tfds")
    config.dataset_kwargs.manual_dir = str(tmp_path / "manual")  # prepared on first use
    result = experiment.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["task_names"] == list(ref["names"][:20])
    assert result["steps"] == 2 * 3  # 6 train images / batch 2, 2 epochs
    assert len(result["accuracy"]) == 20
    # The final checkpoint holds the (T=20, C) routing masks of the sharing-0.5 VGG.
    meta = json.loads((tmp_path / "run" / "checkpoints" / "6" / "meta" / "metadata").read_text())
    masks = {k: v for k, v in meta["fingerprint"]["state"].items() if k.startswith("['routing']")}
    assert len(masks) == 8 and all(v.startswith("float32[20, ") for v in masks.values())
