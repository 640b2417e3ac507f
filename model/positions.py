"""Rotary position embeddings (RoPE), in the half-rotation layout Hugging Face Llama uses.

The head dimension is split into two halves (x1, x2) rotated as (x1 cos - x2 sin, x2 cos + x1 sin),
with frequency theta^(-2i / head_dim) for pair i.
"""

import jax.numpy as jnp


def rope(x, positions, theta: float):
    """Rotates queries or keys. x: [batch, length, heads, head_dim]; positions: [batch, length]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    angle = positions.astype(jnp.float32)[..., None] * freq  # [batch, length, half]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
