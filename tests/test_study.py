"""The end-to-end task-grouping study: a tiny digits study through the CLI, the results'
bookkeeping (every method and k, totals, serving, no network trained twice, the HOA matrix),
group networks by label masking against genuinely smaller networks, and TAG on planted groups."""
import contextlib
import io
import itertools
import json
import pathlib

import jax
import numpy as np
import pytest

from tr_jax import cli, grouping, train
from tr_jax.data import load_digits, task_subset
from tr_jax.data.synthetic import load_synthetic
from tr_jax.experiment import build_model, build_optimizer
from tr_jax.study import METHODS, GroupTrainer, hold_out_validation, random_partition

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
TINY = f"""
import importlib.util

spec = importlib.util.spec_from_file_location("study_digits", {str(CONFIGS / "study_digits.py")!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)


def get_config():
    c = base.get_config()
    c.tasks = ("even", "ge_5", "prime", "square")
    c.model_kwargs.hidden = (8,)
    c.batch_size = 128
    c.num_epochs = 2
    c.group_counts = (2, 3)
    c.random_seeds = 2
    c.repeats = 2
    c.progress = False
    return c
"""


def tiny_config(**overrides):
    config = cli.load_config(str(CONFIGS / "study_digits.py"), ["--config.progress=False"])
    config.update({"model_kwargs": {"hidden": (8,)}, "batch_size": 128, "num_epochs": 2,
                   **overrides})
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run through ``tr-jax study``: (results, printed text, workdir)."""
    workdir = tmp_path_factory.mktemp("study")
    config_file = workdir / "tiny.py"
    config_file.write_text(TINY)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["study", "--config", str(config_file), "--workdir", str(workdir / "out")])
    results = json.loads((workdir / "out" / "study.json").read_text())
    return results, out.getvalue(), workdir / "out"


def served_entries(results):
    m = results["methods"]
    yield "all_in_one", m["all_in_one"]
    yield "one_per_task", m["one_per_task"]
    for k in results["group_counts"]:
        for method in METHODS:
            yield f"{method}@{k}", m[method][str(k)]
        for seed, entry in enumerate(m["random"][str(k)]["seeds"]):
            yield f"random@{k}#{seed}", entry


def test_cli_prints_the_table_and_writes_every_file(study):
    results, printed, workdir = study
    assert "### Total test error" in printed and "| TAG |" in printed and "HOA / TAG" in printed
    assert (workdir / "study.md").read_text().strip() in printed
    for name in ("study.png", "affinity_tag.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["task_names"] == ["even", "ge_5", "prime", "square"]


def test_every_method_and_group_count_is_reported(study):
    results, _, _ = study
    m = results["methods"]
    assert set(m) == {"all_in_one", "one_per_task", "random", *METHODS}
    for method in (*METHODS, "random"):
        assert set(m[method]) == {"2", "3"}
        assert set(results["selection_cost"]) == set(METHODS)
    for k in (2, 3):
        assert len(m["random"][str(k)]["seeds"]) == 2
        for method in METHODS:  # at most k groups; singletons only where the objective allows
            groups = m[method][str(k)]["groups"]
            assert 1 <= len(groups) <= k
            if method != "hoa":
                assert all(len(g) >= 2 for g in groups)
    assert m["all_in_one"]["groups"] == [[0, 1, 2, 3]]
    assert m["one_per_task"]["groups"] == [[0], [1], [2], [3]]


def test_totals_are_sums_of_per_task_errors(study):
    results, _, _ = study
    t = len(results["task_names"])
    for name, entry in served_entries(results):
        error = np.array(entry["per_task_error"])
        assert error.shape == (t,) and np.all((error >= 0) & (error <= 1)), name
        assert entry["total_error"] == pytest.approx(error.sum()), name
        assert entry["mean_error"] == pytest.approx(error.mean()), name
    for k in results["group_counts"]:
        summary = results["methods"]["random"][str(k)]
        totals = [s["total_error"] for s in summary["seeds"]]
        assert summary["total_error_mean"] == pytest.approx(np.mean(totals))
        assert summary["total_error_std"] == pytest.approx(np.std(totals))


def networks(results, measured=None):
    """{(task set, seed): network record} of the plain runs (or those measuring ``measured``)."""
    return {(tuple(n["tasks"]), n["seed"]): n for n in results["networks"]
            if n["measured"] == measured}


def test_every_task_is_read_from_a_serving_network_that_has_it(study):
    results, _, _ = study
    t = len(results["task_names"])
    nets = {**networks(results), **networks(results, "lookahead")}
    for name, entry in served_entries(results):
        groups, serving = entry["groups"], entry["serving"]
        assert set(itertools.chain(*groups)) == set(range(t)), name
        per_seed = []
        for seed in (0, 1):  # repeats = 2: errors are averaged over the two training seeds
            errors = []
            for task, s in enumerate(serving):
                assert task in groups[s], name
                errors.append(nets[tuple(groups[s]), seed]["test_error"][task])
            per_seed.append(errors)
        assert entry["per_task_error"] == pytest.approx(np.mean(per_seed, axis=0)), name
        assert entry["total_error_repeats"] == pytest.approx(np.sum(per_seed, axis=1)), name


def test_no_task_set_is_trained_twice(study):
    results, _, _ = study
    t = len(results["task_names"])
    runs = [(tuple(n["tasks"]), n["seed"], n["measured"]) for n in results["networks"]]
    everything = tuple(range(t))
    assert runs[:2] == [(everything, 0, "lookahead"), (everything, 0, "cosine")]
    plain = [(s, seed) for s, seed, measured in runs[2:] if measured is None]
    assert len(plain) == len(runs) - 2 and len(set(plain)) == len(plain)
    hoa = {(i,) for i in range(t)} | set(itertools.combinations(range(t), 2))
    evaluated = set()
    for _, entry in served_entries(results):
        evaluated |= {tuple(g) for g in entry["groups"]}
    # seed 0 of the all-task network is the TAG run (measuring affinity leaves the update as is)
    expected = {(s, 0) for s in hoa | evaluated} | {(s, 1) for s in evaluated}
    assert set(plain) == expected - {(everything, 0)}
    assert results["training"]["networks_trained"] == len(runs) == len(plain) + 2
    assert results["training"]["requests"] > len(plain)  # the cache answered the rest


def test_hoa_matrix_holds_single_task_errors_on_the_diagonal(study):
    results, _, _ = study
    hoa = np.array(results["matrices"]["hoa"])
    nets = networks(results)
    t = len(hoa)
    for s, target in itertools.product(range(t), repeat=2):  # selection runs use seed 0 only
        key = (target,) if s == target else tuple(sorted((s, target)))
        # scores[source, target], as grouping's "hoa" objective
        assert hoa[s, target] == nets[key, 0]["validation_error"][target]
    cost = results["selection_cost"]
    assert cost["hoa"]["runs"] == t + t * (t - 1) // 2 and cost["tag"]["runs"] == 1
    steps = results["training"]["steps_per_network"]
    assert cost["hoa"]["steps"] == cost["hoa"]["runs"] * steps == cost["tag"]["steps"] * 10
    for k in results["group_counts"]:  # HOA's choice is the optimum of its own matrix
        chosen = results["methods"]["hoa"][str(k)]
        best = grouping.select_groups(hoa, k, objective="hoa", method="exact")
        assert chosen["selection_score"] == pytest.approx(best.score)


def test_random_partitions_and_validation_split():
    rng = np.random.default_rng(0)
    for k in (1, 2, 5):
        groups = random_partition(5, k, rng)
        assert len(groups) == k and all(groups)
        assert sorted(itertools.chain(*groups)) == list(range(5))
    digits = load_digits()
    split = hold_out_validation(digits, 0.2, seed=0)
    train_x, val_x = split.splits["train"]["image"], split.splits["validation"]["image"]
    assert len(val_x) == round(0.2 * 1347) and len(train_x) + len(val_x) == 1347
    rows = {x.tobytes() for x in np.concatenate([train_x, val_x])}
    assert rows == {x.tobytes() for x in digits.splits["train"]["image"]}
    assert hold_out_validation(split, 0.5, seed=0) is split  # an existing split is kept


def test_group_network_equals_a_network_with_only_the_group_heads():
    """A group network is the full-width model with the other tasks' labels masked: it must
    learn what a model built on ``task_subset`` (its own heads only) learns from the same start
    and batches."""
    config = tiny_config(tasks=("even", "ge_5", "prime"))
    dataset = hold_out_validation(task_subset(load_digits(), config.tasks), 0.2, config.seed)
    trainer = GroupTrainer(config, dataset)
    group = (0, 2)
    net = trainer.network(group)
    assert trainer.network(group) is net and len(trainer.trained) == 1  # cached

    small = task_subset(dataset, group)
    model, optimizer = build_model(config, 2), build_optimizer(config, 1)
    sample = next(small.batches("train", config.batch_size))
    full = trainer._init(jax.random.key(config.seed), trainer._sample)
    state = train.create_train_state(model, optimizer, jax.random.key(config.seed), sample)
    index = np.array(group)
    head = jax.tree.map(lambda w: w[:, index] if w.ndim == 3 else w[index], full.params["head"])
    params = {"encoder": full.params["encoder"], "head": head}
    state = state.replace(params=params, opt_state=optimizer.init(params))
    step = train.make_train_step(model, optimizer, mode="all_tasks")
    for epoch in range(config.num_epochs):
        for batch in small.batches("train", config.batch_size, epoch=epoch, seed=config.seed):
            state, _ = step(state, {k: batch[k] for k in ("image", "labels", "label_mask")})
    assert int(state.step) == net.steps
    eval_step = train.make_eval_step(model)
    for split, error in (("validation", net.validation_error), ("test", net.test_error)):
        acc = train.evaluate(eval_step, state, small.batches(split, 512, shuffle=False,
                                                              drop_remainder=False))["accuracy"]
        n = small.num_examples(split)
        np.testing.assert_allclose(error[list(group)], 1.0 - acc, atol=1.5 / n)
        assert np.isnan(error[1])  # the masked task is not reported


def test_tag_recovers_the_planted_groups():
    """On the planted synthetic tasks of ``study_synthetic.py``, the TAG run's affinity selects
    exactly the planted groups for k = 3 (cosine similarity too)."""
    config = cli.load_config(str(CONFIGS / "study_synthetic.py"),
                             ["--config.progress=False", "--config.num_epochs=3"])
    dataset = hold_out_validation(load_synthetic(**config.dataset_kwargs.to_dict()), 0.2,
                                  config.seed)
    trainer = GroupTrainer(config, dataset)
    for affinity in ("lookahead", "cosine"):
        matrix = trainer.affinity_run(affinity).affinity
        choice = grouping.select_groups(matrix, 3, objective="tag")
        assert set(choice.groups) == set(dataset.groups), affinity
