"""tr_jax: many-task learning in JAX/Flax -- Task Routing and Task Affinity Grouping.

Modules: :mod:`tr_jax.routing` (masks, TaskRouting), :mod:`tr_jax.models` (routed backbones),
:mod:`tr_jax.losses`, :mod:`tr_jax.affinity` (TAG lookahead, gradient cosine, estimators),
:mod:`tr_jax.grouping` (network selection), :mod:`tr_jax.train` (train state and steps),
:mod:`tr_jax.data` (offline and TFDS datasets), :mod:`tr_jax.sharding` (meshes, sharded steps,
multi-host), :mod:`tr_jax.cpu_runtime` (faster XLA:CPU steps).
"""
from tr_jax import (affinity, cpu_runtime, data, grouping, losses, models, routing, sharding,
                    train)

__version__ = "0.1.0"
__all__ = ["affinity", "cpu_runtime", "data", "grouping", "losses", "models", "routing",
           "sharding", "train"]
