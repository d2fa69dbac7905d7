"""tr_jax: many-task learning in JAX/Flax -- Task Routing and Task Affinity Grouping."""
from tr_jax import models, routing

__version__ = "0.1.0"
__all__ = ["models", "routing"]
