"""The dtype policy, in one place.

Parameters are stored in `param_dtype`; matmuls run in `compute_dtype`; softmax, norm statistics and
logits are always float32, because their sums lose too much in bfloat16.
"""

import jax.numpy as jnp

STATS = jnp.float32  # softmax, norm statistics, logits, loss


def dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def compute(x, m):
    """Casts `x` (an activation or a weight) to the config's compute dtype for a matmul.

    `jnp.asarray`, not `x.astype`: qwix intercepts it, so a quantized weight (heft.quantize) reaches
    the matmul as integers and scales instead of failing to cast.
    """
    return jnp.asarray(x, dtype(m.compute_dtype))
