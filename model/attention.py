"""Causal self-attention with grouped key/value heads (MHA, GQA or MQA by `model.kv_heads`).

Projections are stored per head ([embed, heads, head_dim]) so the rules table can shard heads.
Softmax runs in float32 inside `jax.nn.dot_product_attention`, which also repeats the kv heads.
A `prefix` (fine-tuning: learned keys and values, or a learned prompt's) is attended to by every
query before its own sequence; without one, nothing here changes.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import dense, init, kernels, precision
from heft.model.axes import constrain
from heft.model.checks import head_dim
from heft.model.positions import rope


class Attention(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        D, H, K, Dh = m.width, m.heads, m.kv_heads, head_dim(m)
        self.q = init.param(rngs, init.matrix(m, D), (D, H, Dh), ("embed", "heads", "head_dim"), m)
        self.k = init.param(rngs, init.matrix(m, D), (D, K, Dh), ("embed", "kv_heads", "head_dim"), m)
        self.v = init.param(rngs, init.matrix(m, D), (D, K, Dh), ("embed", "kv_heads", "head_dim"), m)
        out = init.matrix(m, H * Dh, residual=True)
        self.o = init.param(rngs, out, (H, Dh, D), ("heads", "head_dim", "embed"), m)
        if m.use_bias:
            self.q_bias = init.param(rngs, init.zeros, (H, Dh), ("heads", "head_dim"), m)
            self.k_bias = init.param(rngs, init.zeros, (K, Dh), ("kv_heads", "head_dim"), m)
            self.v_bias = init.param(rngs, init.zeros, (K, Dh), ("kv_heads", "head_dim"), m)
            self.o_bias = init.param(rngs, init.zeros, (D,), ("embed",), m)

    def _project(self, x, name):
        """[batch, length, embed] -> [batch, length, heads, head_dim] for weight `name`."""
        w = getattr(self, name)[...]
        y = dense.project(x, precision.compute(w, self.m))
        if self.m.use_bias:
            y = y + precision.compute(getattr(self, name + "_bias")[...], self.m)
        return y

    def __call__(self, x, positions, segment_ids=None, cache=None, prefix=None):
        """Attends causally within a sequence (and within a document when asked).

        x: [batch, length, embed] in compute dtype; positions, segment_ids: [batch, length].
        cache: None for training, or (keys, values, end) with keys/values
          [batch, cache_len, kv_heads, head_dim] and end [batch] the number of filled slots; the new
          keys are written at slots end..end+length and the updated cache is returned.
        prefix: None, or (keys, values) [batch or 1, prefix, kv_heads, head_dim] that every query
          sees ahead of the sequence (and of the cache), whatever its document.
        Returns ([batch, length, embed], cache).
        """
        m = self.m
        q = constrain(self._project(x, "q"), "batch", "length", "act_heads", None)
        k = constrain(self._project(x, "k"), "batch", "length", "act_kv_heads", None)
        v = constrain(self._project(x, "v"), "batch", "length", "act_kv_heads", None)
        if m.positions == "rope":
            q, k = rope(q, positions, m), rope(k, positions, m)
        if cache is None:
            mask = None
            if m.document_mask and segment_ids is not None:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                mask = same[:, None, :, :]  # [batch, 1, length, length]
            if prefix is None:
                # Training's path: XLA's attention or the platform's flash kernel (model/kernels.py).
                y = kernels.causal_attention(q, k, v, segment_ids if m.document_mask else None, m)
            else:
                causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
                mask = causal if mask is None else mask & causal
                y = _with_prefix(q, k, v, mask, prefix, m)
        else:
            keys, values, end = cache
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, 0))
            keys = write(keys, k.astype(keys.dtype), end)
            values = write(values, v.astype(values.dtype), end)
            # Query t sees every filled slot at or before its own position.
            slots = jnp.arange(keys.shape[1])
            query_slot = end[:, None] + jnp.arange(x.shape[1])[None, :]  # [batch, length]
            mask = slots[None, None, :] <= query_slot[:, :, None]  # [batch, length, cache_len]
            if prefix is None:
                y = jax.nn.dot_product_attention(q, precision.compute(keys, m),
                                                 precision.compute(values, m), mask=mask[:, None])
            else:
                y = _with_prefix(q, precision.compute(keys, m), precision.compute(values, m), mask[:, None], prefix, m)
            cache = (keys, values, end)
        y = dense.project(y, precision.compute(self.o[...], m), inputs=2)
        if m.use_bias:
            y = y + precision.compute(self.o_bias[...], m)
        return constrain(y, "batch", "length", "act_embed"), cache

    # The encoder-decoder's attention (model/encoder_decoder.py): the same weights and projections,
    # with keys and values from any sequence (cross-attention: the encoder's output), a mask and
    # T5's relative position bias given by the caller, and no RoPE.

    def keys_values(self, context):
        """context [batch, keys, embed] -> its (keys, values), each [batch, keys, kv_heads, head_dim]."""
        k = constrain(self._project(context, "k"), "batch", "length", "act_kv_heads", None)
        v = constrain(self._project(context, "v"), "batch", "length", "act_kv_heads", None)
        return k, v

    def attend(self, x, keys, values, mask=None, bias=None, scale=None):
        """The queries of x [batch, length, embed] over `keys_values` of some context (or a cache of
        them): mask [batch or 1, 1, length, keys] bool, bias [batch or 1, heads, length, keys] added to
        the scores, scale None for 1 / sqrt(head_dim) (T5's is 1). Returns [batch, length, embed]."""
        m = self.m
        q = constrain(self._project(x, "q"), "batch", "length", "act_heads", None)
        y = jax.nn.dot_product_attention(q, precision.compute(keys, m), precision.compute(values, m),
                                         bias=bias, mask=mask, scale=scale)
        y = dense.project(y, precision.compute(self.o[...], m), inputs=2)
        if m.use_bias:
            y = y + precision.compute(self.o_bias[...], m)
        return constrain(y, "batch", "length", "act_embed")


def _with_prefix(q, k, v, mask, prefix, m):
    """Attention over the prefix's keys, then the sequence's. q: [batch, length, heads, head_dim];
    k, v: [batch, keys, kv_heads, head_dim]; mask: [batch or 1, 1, length, keys]; prefix: (keys,
    values) [batch or 1, prefix, kv_heads, head_dim], every slot visible to every query."""
    batch, length = q.shape[:2]
    pk, pv = (jnp.broadcast_to(precision.compute(p, m), (batch,) + p.shape[1:]) for p in prefix)
    mask = jnp.broadcast_to(mask, (batch, 1, length, k.shape[1]))
    mask = jnp.concatenate([jnp.ones((batch, 1, length, pk.shape[1]), bool), mask], axis=-1)
    return jax.nn.dot_product_attention(q, jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1),
                                        mask=mask)
