"""The online linear probe: BatchNorm without affine parameters, then a linear classifier.

It reads stop-gradient features, so it watches the representation without shaping it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class LinearProbe(nn.Module):
    """BatchNorm (no scale, no bias) → Dense(num_classes), as in MAE's linear-probing protocol."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        features = features.astype(jnp.float32)
        features = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                                momentum=0.9, epsilon=1e-6, name="bn")(features)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                        name="head")(features)
