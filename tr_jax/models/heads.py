"""Multi-task heads: the heads of all T tasks as one batched kernel."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tr_jax.routing import TaskIds


class MultiTaskHead(nn.Module):
    """T linear heads stored as one kernel (D, T, K) and bias (T, K).

    312 heads cost one einsum instead of 312 small matmuls.

    Attributes:
      num_tasks: T.
      num_classes: K, classes per task (2 for binary attributes).
      dtype: computation dtype (None: from inputs and params).
    """

    num_tasks: int
    num_classes: int = 2
    dtype: Any = None

    @nn.compact
    def __call__(self, features: jax.Array, task: TaskIds | None = None) -> jax.Array:
        """Applies the heads.

        Args:
          features: (B, D).
          task: None (all heads), an int scalar (one head for the batch) or (B,) ints.

        Returns:
          (B, T, K) logits when ``task`` is None, else (B, K).
        """
        d = features.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                            (d, self.num_tasks, self.num_classes))
        bias = self.param("bias", nn.initializers.zeros_init(),
                          (self.num_tasks, self.num_classes))
        features, kernel, bias = nn.dtypes.promote_dtype(features, kernel, bias, dtype=self.dtype)
        if task is None:
            return jnp.einsum("bd,dtk->btk", features, kernel) + bias
        if jnp.ndim(task) == 0:
            return features @ kernel[:, task] + bias[task]
        return jnp.einsum("bd,dbk->bk", features, kernel[:, task]) + bias[task]
