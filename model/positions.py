"""Rotary position embeddings (RoPE), in the half-rotation layout Hugging Face Llama uses.

The head dimension is split into two halves (x1, x2) rotated as (x1 cos - x2 sin, x2 cos + x1 sin),
with frequency theta^(-2i / head_dim) for pair i, optionally rescaled by `model.rope_scaling`.
"""

import math

import jax.numpy as jnp

from heft.model.checks import ConfigError

SCALINGS = ("none", "llama3")


def frequencies(m, head_dim: int):
    """The rotation frequency of each pair, [head_dim // 2] float32, from `m.rope_theta` and scaling."""
    half = head_dim // 2
    freq = m.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if m.rope_scaling == "llama3":
        return _llama3(freq, m)
    if m.rope_scaling != "none":
        raise ConfigError(f"model.rope_scaling={m.rope_scaling!r} is unknown; choose one of {', '.join(SCALINGS)}")
    return freq


def _llama3(freq, m):
    """Llama 3.1's long-context stretch: pairs whose wavelength exceeds the original context / low
    factor turn `rope_scaling_factor` times slower, those shorter than context / high factor keep
    their speed, and the band between blends the two (the formula of Meta's and HF's code)."""
    factor, low, high = m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor
    context = m.rope_original_max_len
    wavelen = 2 * math.pi / freq
    slow = jnp.where(wavelen > context / low, freq / factor, freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freq / factor + smooth * freq
    middle = (wavelen >= context / high) & (wavelen <= context / low)
    return jnp.where(middle, blended, slow)


def rope(x, positions, m):
    """Rotates queries or keys. x: [batch, length, heads, head_dim]; positions: [batch, length];
    m: the model config (its rope_theta and rope_scaling fields)."""
    half = x.shape[-1] // 2
    freq = frequencies(m, x.shape[-1])  # [half]
    angle = positions.astype(jnp.float32)[..., None] * freq  # [batch, length, half]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
