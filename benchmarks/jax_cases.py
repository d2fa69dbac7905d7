"""The tr_jax side of ``vs_peers.py``: each case is built once (compiled) and returns a
zero-argument callable that runs one step and blocks until it is done.

Cases mirror the peers in ``../shared/anchors``:

* ``tr_train(hw, T, per_example)`` -- routed VGG-11-BN (sharing 0.5), batch 32, SGD momentum
  0.9 through optax, one task per batch (``task_per_batch``, the task id a traced int so no
  step recompiles) or one task id per example (``per_example``).
* ``tr_eval(hw)`` -- the same network in inference mode, forward of one task.
* ``tag(T, what, strategy)`` -- the TAG CelebA ResNet (unrouted, one Dense(2) head per task),
  64x64, batch 64, SGD 5e-4 momentum 0.9: the plain all-tasks step, or the step that also
  measures the lookahead affinity (``tr_jax.train.make_train_step(affinity="lookahead")``).
"""
from __future__ import annotations

import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tr_jax import cpu_runtime, models, train  # noqa: E402

cpu_runtime.configure()   # as the tr-jax command line does

TR_BATCH = 32
TAG_BATCH = 64
TAG_HW = 64
TAG_LR = 5e-4


def _batch(batch: int, hw: int, num_tasks: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.standard_normal((batch, hw, hw, 3)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, 2, (batch, num_tasks)), jnp.int32)}


def _stepper(step, state, batch: dict, next_task: Callable[[int], dict]) -> Callable[[], None]:
    """Wraps a donating train step into ``run()``; the state is threaded through."""
    box = {"state": state, "i": 0}

    def run() -> None:
        extra = next_task(box["i"])
        box["i"] += 1
        box["state"], metrics = step(box["state"], {**batch, **extra})
        jax.block_until_ready(metrics["loss"])

    return run


def tr_train(hw: int, num_tasks: int, per_example: bool, seed: int = 0, *,
             sharing: float | None = 0.5, batch_size: int = TR_BATCH) -> Callable[[], None]:
    """VGG-11-BN train step (SGD momentum 0.9), routed with ``sharing`` (None: unrouted)."""
    model = models.RoutedVGG(num_tasks=num_tasks, sharing=sharing, batch_norm=True)
    opt = optax.sgd(0.01, momentum=0.9)
    batch = _batch(batch_size, hw, num_tasks, seed)
    state = train.create_train_state(model, opt, jax.random.key(seed), batch)
    mode = "per_example" if per_example else "task_per_batch"
    step = train.make_train_step(model, opt, mode=mode)
    rng = np.random.default_rng(seed + 1)
    if per_example:
        def next_task(i):
            return {"task": jnp.asarray(rng.integers(0, num_tasks, batch_size), jnp.int32)}
    else:
        def next_task(i):
            return {"task": jnp.asarray(i % num_tasks, jnp.int32)}
    return _stepper(step, state, batch, next_task)


def tr_eval(hw: int, num_tasks: int = 40, seed: int = 0) -> Callable[[], None]:
    """Routed VGG-11-BN inference forward of one task (batch 32)."""
    model = models.RoutedVGG(num_tasks=num_tasks, sharing=0.5, batch_norm=True)
    batch = _batch(TR_BATCH, hw, num_tasks, seed)
    state = train.create_train_state(model, optax.sgd(0.01), jax.random.key(seed), batch)
    fwd = jax.jit(lambda variables, x, t: model.apply(variables, x, t, False).sum())
    variables, x, task = state.variables, batch["image"], jnp.asarray(1, jnp.int32)
    return lambda: jax.block_until_ready(fwd(variables, x, task))


def tag(num_tasks: int, what: str, strategy: str = "auto", seed: int = 0,
        chunk_size: int | None = None) -> Callable[[], None]:
    """TAG CelebA ResNet step: ``what`` = ``"plain_step"`` or ``"tag_step"``."""
    model = models.RoutedResNet(num_tasks=num_tasks)
    opt = optax.sgd(TAG_LR, momentum=0.9)
    batch = _batch(TAG_BATCH, TAG_HW, num_tasks, seed)
    state = train.create_train_state(model, opt, jax.random.key(seed), batch)
    kwargs = {}
    if what == "tag_step":
        kwargs = dict(affinity="lookahead", lr=TAG_LR, strategy=strategy,
                      affinity_chunk_size=chunk_size)
    elif what != "plain_step":
        raise ValueError(f"what={what!r}: use 'plain_step' or 'tag_step'.")
    step = train.make_train_step(model, opt, mode="all_tasks", **kwargs)
    return _stepper(step, state, batch, lambda i: {})
