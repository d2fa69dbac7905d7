"""tr_jax: many-task learning in JAX/Flax -- Task Routing and Task Affinity Grouping.

Modules: :mod:`tr_jax.routing` (masks, TaskRouting), :mod:`tr_jax.models` (routed backbones),
:mod:`tr_jax.losses`, :mod:`tr_jax.affinity` (TAG lookahead, gradient cosine, estimators),
:mod:`tr_jax.grouping` (network selection), :mod:`tr_jax.train` (train state and steps),
:mod:`tr_jax.data` (offline and TFDS datasets), :mod:`tr_jax.sharding` (meshes, sharded steps,
multi-host), :mod:`tr_jax.cpu_runtime` (faster XLA:CPU steps). Imported on first use:
:mod:`tr_jax.checkpoint` (Orbax checkpoints), :mod:`tr_jax.experiment` (config-driven runs),
:mod:`tr_jax.metrics`, :mod:`tr_jax.plots` (matplotlib) and :mod:`tr_jax.study` (TAG studies).
"""
import importlib
from types import ModuleType

from tr_jax import (affinity, cpu_runtime, data, grouping, losses, models, routing, sharding,
                    train)

__version__ = "0.1.0"
_ON_FIRST_USE = ("checkpoint", "experiment", "metrics", "plots", "study")
__all__ = ["affinity", "cpu_runtime", "data", "grouping", "losses", "models", "routing",
           "sharding", "train"]  # not the _ON_FIRST_USE ones: a star import stays light


def __getattr__(name: str) -> ModuleType:
    """Imports the heavier submodules (:data:`_ON_FIRST_USE`) when first named."""
    if name in _ON_FIRST_USE:
        return importlib.import_module(f"tr_jax.{name}")
    raise AttributeError(f"module 'tr_jax' has no attribute {name!r}")
