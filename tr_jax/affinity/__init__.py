"""TAG task affinity: per-task gradients, lookahead affinity, gradient cosine similarity.

``loss_fn(shared, rest, batch) -> (T,)`` is the common currency: see
:mod:`tr_jax.affinity.per_task`.
"""
from tr_jax.affinity.cosine import cosine_from_grads, gradient_cosine
from tr_jax.affinity.estimators import (model_representation, model_representation_affinity,
                                        representation_affinity, sketch_variance,
                                        sketched_affinity, taylor_affinity)
from tr_jax.affinity.lookahead import (affinity_from_losses, lookahead_affinity, lookahead_losses,
                                       optax_lookahead, sgd_update)
from tr_jax.affinity.per_task import (merge_params, per_task_and_total_grads, per_task_grads,
                                      split_params)
from tr_jax.affinity.strategy import resolve_strategy

__all__ = [
    "affinity_from_losses",
    "cosine_from_grads",
    "gradient_cosine",
    "lookahead_affinity",
    "lookahead_losses",
    "merge_params",
    "model_representation",
    "model_representation_affinity",
    "optax_lookahead",
    "per_task_and_total_grads",
    "per_task_grads",
    "representation_affinity",
    "resolve_strategy",
    "sgd_update",
    "sketch_variance",
    "sketched_affinity",
    "split_params",
    "taylor_affinity",
]
