"""Choosing the next token from logits: greedy, or temperature then top-k then top-p sampling.

The sampling knobs are traced values, not Python constants, so one compiled decode loop serves
every temperature, k and p; only greedy (temperature 0) vs sampling is a compile-time choice,
because greedy needs neither the filtering nor the random draw.

Top-k and top-p are thresholds on the logits, found by a 32-step bisection over the bits of the
float32 values instead of by sorting the vocabulary: exact, and on this CPU ~10x faster than
`jnp.sort` (8 rows x 4096: 0.5 ms against 5.7 ms; x 32768: 10 ms against 128 ms), which would
otherwise cost more per step than a small model's forward pass. `lax.top_k` is fast only for a
static, small k, and top-p's nucleus has no size known in advance.
"""

import jax
import jax.numpy as jnp

BITS = 32


def ordered_bits(x):
    """float32 [...] -> uint32 [...] that sorts as the floats do (-inf lowest; no NaN)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (i >> (BITS - 1)) == 1
    return jnp.where(negative, ~i, i | jnp.uint32(1 << (BITS - 1)))


def highest_threshold(keys, weights, target):
    """Per row, the largest t with sum(weights[keys >= t]) >= target, built one bit at a time.

    keys: [batch, vocab] uint32 (from `ordered_bits`); weights: [batch, vocab] >= 0;
    target: [batch, 1]. The sum falls as t rises, so setting each bit from the top whenever the
    sum still reaches the target finds the largest such t. Returns [batch, 1] uint32.
    """

    def try_bit(i, t):
        candidate = t | (jnp.uint32(1) << (BITS - 1 - i).astype(jnp.uint32))
        mass = jnp.sum(jnp.where(keys >= candidate, weights, 0), axis=-1, keepdims=True)
        return jnp.where(mass >= target, candidate, t)

    return jax.lax.fori_loop(0, BITS, try_bit, jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32))


def filter_logits(logits, top_k, top_p):
    """Keeps the `top_k` most likely tokens (0: all), then the fewest of those whose probability
    sums to at least `top_p` (1: all); the rest get -inf.

    logits: [batch, vocab] float32; top_k: int scalar; top_p: float scalar in (0, 1].
    Returns [batch, vocab]. Tokens tied with the last one kept are kept too.
    """
    keys = ordered_bits(logits)
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.float32)
    kth = highest_threshold(keys, jnp.ones_like(logits), jnp.broadcast_to(k, keys.shape[:-1] + (1,)))
    logits = jnp.where(keys >= kth, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)  # renormalized over the top k
    # No mass lies above the most likely token and p > 0, so it is always kept (tiny p: greedy).
    nucleus = highest_threshold(keys, probs, jnp.broadcast_to(top_p, kth.shape))
    nucleus = jnp.where(top_p >= 1.0, jnp.uint32(0), nucleus)  # rounding must not drop a tail
    return jnp.where(keys >= nucleus, logits, -jnp.inf)


def sample(logits, key, temperature, top_k, top_p):
    """One token per row. logits: [batch, vocab] float32 -> [batch] int32.

    Temperature scales the logits before filtering, so top-p's nucleus is that of the tempered
    distribution (as in Hugging Face's samplers).
    """
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def greedy(logits):
    """The most likely token per row. logits: [batch, vocab] -> [batch] int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
