"""Building blocks shared by the routed backbones."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from tr_jax import routing
from tr_jax.nn import BatchNorm, Conv


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
    """How a backbone routes its units: T tasks, sharing ratio σ, mask scheme."""

    num_tasks: int
    sharing: float
    scheme: routing.Scheme = "random"

    def layer(self, name: str | None = None) -> routing.TaskRouting:
        return routing.TaskRouting(self.num_tasks, self.sharing, self.scheme, name=name)


def maybe_route(spec: RoutingSpec | None, x: jax.Array, task: routing.TaskIds,
                name: str | None = None) -> jax.Array:
    """Applies a Task Routing Layer to ``x`` (B, ..., C) when ``spec`` is set; identity for
    unrouted networks."""
    return x if spec is None else spec.layer(name)(x, task)


class ConvNormRoute(nn.Module):
    """conv -> (BatchNorm) -> Task Routing Layer; the caller applies the nonlinearity.

    The TRL sits after conv(+BN) and before the ReLU, as in the TR paper.
    """

    features: int
    routing: RoutingSpec | None
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    batch_norm: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, task: routing.TaskIds, train: bool) -> jax.Array:
        """x (B, H, W, Cin) -> routed pre-activation (B, H', W', features)."""
        x = Conv(self.features, self.kernel_size, self.strides, use_bias=not self.batch_norm,
                 dtype=self.dtype, kernel_init=nn.initializers.he_normal())(x)
        if self.batch_norm:
            x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          dtype=self.dtype)(x)
        return maybe_route(self.routing, x, task)
