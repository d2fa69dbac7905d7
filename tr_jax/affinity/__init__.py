"""TAG task affinity: per-task gradients, lookahead affinity, gradient cosine similarity.

``loss_fn(shared, rest, batch) -> (T,)`` is the common currency: see
:mod:`tr_jax.affinity.per_task`.
"""
from tr_jax.affinity.per_task import merge_params, per_task_grads, split_params

__all__ = [
    "merge_params",
    "per_task_grads",
    "split_params",
]
