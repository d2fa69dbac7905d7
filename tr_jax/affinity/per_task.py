"""Per-task gradients of a shared subtree, and splitting a parameter tree into shared / rest.

Every affinity function takes a ``loss_fn(shared, rest, batch) -> (T,)`` returning one loss per
task: ``shared`` is the subtree whose per-task gradients are wanted (the encoder, θ_s), ``rest``
everything else (heads, BatchNorm statistics, routing masks -- whatever the loss needs), and
``batch`` the data. ``loss_fn`` must be pure; see :mod:`tr_jax.affinity.lookahead` for what
that means for BatchNorm.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, Mapping

import chex
import jax
import jax.numpy as jnp
from flax import traverse_util

from tr_jax.affinity.strategy import Strategy, map_tasks, resolve_strategy, unrolls_backward
from tr_jax.nn.conv import skip_winograd

__all__ = ["LossFn", "PyTree", "assert_task_axis", "check_losses", "check_shared",
           "merge_params", "per_task_and_total_grads", "per_task_grads", "pull_back_tasks",
           "select_like", "split_params", "task_vjp"]

# task_vjp: unrolled per-task backward passes of more tasks than this skip the Winograd
# lowering. Exact lookahead, batch 32, 32x32 input, XLA:CPU (AVX-512, 2026-11-28), compile s /
# run s / peak GB, Winograd -> without: VGG-11-BN (unrouted) T = 9 44 / 1.41 / 3.5 -> 14 / 1.64
# / 2.6, T = 40 110 / 8.28 / 9.9 -> 25 / 9.11 / 7.2; TAG encoder T = 9 13-16 / 0.32-0.35 / 1.1
# -> 4 / 0.31 / 0.7, T = 40 38 / 1.38 / 1.9 -> 7 / 1.35 / 0.8, T = 100 116 / 3.90 / 4.8 -> (all
# layers "xla") 12 / 3.26 / 1.1; at T = 312 compiling with Winograd went past 12 GB.
UNROLLED_WINOGRAD_MAX_TASKS = 16
PyTree = Any
LossFn = Callable[[PyTree, PyTree, Any], jax.Array]
Path = tuple[str, ...]


def check_losses(losses: Any, where: str = "loss_fn") -> int:
    """Checks that ``losses`` is a float vector (T,) with T >= 1 and returns T."""
    shape = getattr(losses, "shape", None)
    if shape is None or len(shape) != 1 or shape[0] < 1:
        raise ValueError(
            f"{where} must return the per-task losses as a vector of shape (T,), got "
            f"{'shape ' + str(shape) if shape is not None else type(losses).__name__}. Return "
            f"one loss per task (e.g. the mean over the batch of each task's loss), not their "
            f"sum and not a (B, T) array.")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise ValueError(f"{where} must return floating-point losses, got dtype {losses.dtype}.")
    return int(shape[0])


def check_shared(shared: PyTree) -> None:
    """Raises a clear error when the shared tree has no array leaves."""
    if not jax.tree.leaves(shared):
        raise ValueError(
            "shared is an empty tree: there are no shared parameters to differentiate. Pass "
            "the shared encoder's parameters, e.g. shared, rest = tr_jax.affinity."
            "split_params(params, ('encoder',)).")


def per_task_grads(loss_fn: LossFn, shared: PyTree, rest: PyTree, batch: Any, *,
                   strategy: Strategy = "auto", chunk_size: int | None = None
                   ) -> tuple[jax.Array, PyTree]:
    """Per-task losses and per-task gradients of the shared parameters, one forward pass.

    Runs ``loss_fn`` once under :func:`jax.vjp`, then pulls back the T one-hot cotangents
    e_1 .. e_T: the forward's residuals are shared by all T backward passes. Row i of the
    result is dL_i/d shared.

    Args:
      loss_fn: ``loss_fn(shared, rest, batch) -> (T,)`` per-task losses. No auxiliary
        outputs: close over or recompute anything else you need.
      shared: the shared parameter tree θ_s (at least one array leaf).
      rest: everything else ``loss_fn`` needs (not differentiated).
      batch: the batch, passed through unchanged.
      strategy: how the T pullbacks run: ``"vmap"`` (one batched pullback), ``"unrolled"``
        (T pullbacks traced one after the other), ``"chunked"`` (``jax.lax.map`` over chunks
        of ``chunk_size`` vmapped pullbacks, bounded memory) or ``"auto"``; see
        :func:`tr_jax.affinity.strategy.resolve_strategy` with ``backward=True`` (on CPU
        backward passes always run unrolled unless ``"vmap"`` is asked for).
      chunk_size: tasks per chunk for ``"chunked"``.

    Returns:
      ``(losses, grads)``: losses (T,) and grads, a tree shaped like ``shared`` whose every
      leaf has a leading task axis T.

    Raises:
      ValueError: if ``shared`` is empty, ``loss_fn`` does not return a (T,) float vector,
        the strategy is unknown or ``chunk_size`` is not a positive int.
    """
    check_shared(shared)
    losses, pullback = task_vjp(lambda s: loss_fn(s, rest, batch), shared, strategy=strategy)
    (grads,) = pull_back_tasks(pullback, losses, strategy, chunk_size)
    return losses, grads


def task_vjp(fn: Callable, *primals: Any, strategy: Strategy, has_aux: bool = False) -> Any:
    """``jax.vjp(fn, *primals, has_aux=has_aux)`` for T per-task pullbacks run by ``strategy``.

    Where those pullbacks are unrolled (on CPU, :func:`~tr_jax.affinity.strategy.unrolls_backward`)
    and T > :data:`UNROLLED_WINOGRAD_MAX_TASKS`, ``fn`` is traced in
    :func:`tr_jax.nn.conv.skip_winograd`: the compiled program holds T copies of the backward
    pass, and T copies of the Winograd layers' transforms made compiling slow and large.
    """
    scope = contextlib.nullcontext()
    if unrolls_backward(strategy):
        out = jax.eval_shape(fn, *primals)
        if check_losses(out[0] if has_aux else out) > UNROLLED_WINOGRAD_MAX_TASKS:
            scope = skip_winograd()
    with scope:
        return jax.vjp(fn, *primals, has_aux=has_aux)


def pull_back_tasks(pullback: Callable, losses: jax.Array, strategy: Strategy = "auto",
                    chunk_size: int | None = None) -> Any:
    """``pullback`` (a VJP function of the (T,) loss vector) applied to the T one-hot
    cotangents, run by ``strategy`` (resolved for backward passes); outputs stacked on a
    leading T axis."""
    num_tasks = check_losses(losses)
    strategy, chunk_size = resolve_strategy(strategy, num_tasks, chunk_size, backward=True)
    return map_tasks(pullback, jnp.eye(num_tasks, dtype=losses.dtype), strategy, chunk_size)


def per_task_and_total_grads(loss_fn: Callable[..., Any], shared: PyTree, rest: PyTree,
                             batch: Any, *, has_aux: bool = False, strategy: Strategy = "auto",
                             chunk_size: int | None = None
                             ) -> tuple[jax.Array, PyTree, PyTree, Any]:
    """Per-task gradients of ``shared`` and the gradient of the summed loss, one forward.

    For a train step that also measures the lookahead affinity: the update's gradient of the
    shared parameters is the sum of the per-task gradients (linearity), so the step needs no
    backward pass of its own through the shared trunk -- only the summed loss's gradient of
    ``rest`` (one pullback whose trunk part XLA prunes as unused). Pass ``(losses, grads)``
    on to :func:`tr_jax.affinity.lookahead_affinity` as ``losses_and_grads``.

    Args:
      loss_fn: ``loss_fn(shared, rest, batch) -> (T,)`` losses, or ``-> ((T,), aux)`` with
        ``has_aux`` (e.g. the updated BatchNorm statistics).
      shared: shared parameters θ_s.
      rest: the other parameters, differentiated too (e.g. the heads).
      batch: one batch.
      has_aux: ``loss_fn`` returns ``(losses, aux)``.
      strategy, chunk_size: how the T per-task pullbacks run, as for :func:`per_task_grads`.

    Returns:
      ``(losses, grads, rest_grad, aux)``: losses (T,); grads like ``shared`` with a leading
      T axis; rest_grad like ``rest``, the gradient of ``losses.sum()``; aux (None without
      ``has_aux``). The summed loss's gradient of ``shared`` is
      ``jax.tree.map(lambda g: g.sum(0), grads)``.
    """
    check_shared(shared)
    out = task_vjp(lambda s, r: loss_fn(s, r, batch), shared, rest, strategy=strategy,
                   has_aux=has_aux)
    losses, pullback, aux = out if has_aux else (*out, None)
    grads = pull_back_tasks(lambda e: pullback(e)[0], losses, strategy, chunk_size)
    rest_grad = pullback(jnp.ones_like(losses))[1]
    return losses, grads, rest_grad, aux


def _normalize_shared(shared: Callable[[Path], bool] | Collection[str | Path]
                      ) -> Callable[[Path], bool]:
    if callable(shared):
        return shared
    prefixes = [(p,) if isinstance(p, str) else tuple(p) for p in shared]
    if not prefixes:
        raise ValueError("shared names no parameters: give at least one key, e.g. ('encoder',).")
    return lambda path: any(path[:len(p)] == p for p in prefixes)


def split_params(params: Mapping, shared: Callable[[Path], bool] | Collection[str | Path]
                 = ("encoder",)) -> tuple[dict, dict]:
    """Splits a nested-dict parameter tree into the shared subtree and the rest.

    Both halves keep the original nesting with only their own leaves, so
    ``merge_params(*split_params(p, s)) == p``.

    Args:
      params: nested dict of arrays (e.g. a Flax model's ``variables["params"]``).
      shared: which leaves are shared: top-level keys or path prefixes (tuples of keys), e.g.
        ``("encoder",)`` or ``[("encoder", "ConvNormRoute_0")]``, or a predicate
        ``path -> bool`` on a leaf's key path (a tuple of str).

    Returns:
      ``(shared_tree, rest_tree)``.

    Raises:
      ValueError: if no leaf is selected as shared.
    """
    is_shared = _normalize_shared(shared)
    flat = traverse_util.flatten_dict(dict(params))
    shared_flat = {k: v for k, v in flat.items() if is_shared(k)}
    if not shared_flat:
        raise ValueError(
            f"split_params selected no shared leaves with shared={shared!r}; top-level keys "
            f"are {sorted({k[0] for k in flat})}.")
    rest_flat = {k: v for k, v in flat.items() if not is_shared(k)}
    return (traverse_util.unflatten_dict(shared_flat), traverse_util.unflatten_dict(rest_flat))


def merge_params(shared: Mapping, rest: Mapping) -> dict:
    """Inverse of :func:`split_params`: the union of two nested dicts with disjoint leaves."""
    flat_shared = traverse_util.flatten_dict(dict(shared))
    flat_rest = traverse_util.flatten_dict(dict(rest))
    overlap = flat_shared.keys() & flat_rest.keys()
    if overlap:
        raise ValueError(f"shared and rest both hold the leaves {sorted(overlap)[:3]}...")
    return traverse_util.unflatten_dict({**flat_rest, **flat_shared})


def select_like(tree: Mapping, like: Mapping) -> dict:
    """The leaves of nested dict ``tree`` at the key paths of nested dict ``like``."""
    flat = traverse_util.flatten_dict(dict(tree))
    return traverse_util.unflatten_dict(
        {k: flat[k] for k in traverse_util.flatten_dict(dict(like))})


def assert_task_axis(grads: PyTree, shared: PyTree, num_tasks: int) -> None:
    """chex check: every leaf of ``grads`` is (T, *shape of the matching shared leaf)."""
    chex.assert_trees_all_equal_structs(grads, shared)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(shared)):
        chex.assert_shape(g, (num_tasks, *s.shape))
