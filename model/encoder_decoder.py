"""An encoder-decoder transformer (T5 v1.1): a bidirectional encoder reads the input, and a causal
decoder writes the output while attending to the encoder's.

    encoder: embed(inputs) -> encoder_depth blocks of
                 x + attention(norm(x))                 every input token sees every other
                 x + mlp(norm(x))
             -> norm                                    = encoded [batch, input_length, embed]
    decoder: embed(tokens) -> depth blocks of
                 x + attention(norm(x))                 causal
                 x + cross_attention(norm(x), encoded)  keys and values from the encoder
                 x + mlp(norm(x))
             -> norm -> readout                         = logits [batch, length, vocab]

The pieces are heft's own: Norm (`model.norm`; T5's is rmsnorm, no centring, no offset), MLP
(`model.activation`; T5 v1.1's "gated-gelu" is geglu), Attention (its `keys_values` and `attend`).
What T5 adds: positions only as a relative bias on the attention scores (relative.py), one table per
stack shared by its layers, none in cross-attention; unscaled scores, softmax(q . k), the
1 / sqrt(head_dim) folded into the query's init instead; one token embedding for both stacks; and
an untied readout applied without T5 v1.0's d_model**-0.5 output scale (v1.1).

Blocks are stacked on a "layers" axis and run under nnx.scan with the remat policies of decoder.py.
A batch (data/seq2seq.py) holds the encoder's tokens and segment ids [batch, input_length] and the
decoder's [batch, length]. Segment ids keep the examples packed in a row apart (a token sees only its
own example's tokens, a decoder token its own example's encoder tokens) and mark padding with 0,
which no real token sees.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import checks, dense, init, precision
from heft.model.attention import Attention
from heft.model.axes import constrain
from heft.model.decoder import REMAT_POLICIES, remat_policy
from heft.model.mlp import MLP
from heft.model.norms import Norm
from heft.model.relative import RelativeBias

SCALE = 1.0  # T5's attention scores are unscaled; its query init is smaller by sqrt(head_dim) instead


def _attention(m, rngs: nnx.Rngs) -> Attention:
    """heft's attention with T5's query init: the scores are not divided by sqrt(head_dim), so the
    query starts that much smaller and the initial scores have heft's usual scale."""
    attention = Attention(m, rngs)
    attention.q[...] = attention.q[...] / math.sqrt(checks.head_dim(m))
    return attention


def _allowed(query_segments, key_segments):
    """[batch, queries] and [batch, keys] segment ids -> mask [batch, 1, queries, keys]: same example.
    Padding (0) only meets padding, so no real token sees it and a padded row stays finite."""
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


class EncoderBlock(nnx.Module):
    """x + attention(norm(x)) over the whole input, then x + mlp(norm(x))."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        self.attention_norm = Norm(m, rngs)
        self.attention = _attention(m, rngs)
        self.mlp_norm = Norm(m, rngs)
        self.mlp = MLP(m, rngs)

    def __call__(self, x, mask, bias):
        """x [batch, length, embed]; mask [batch, 1, length, length]; bias [1, heads, length, length]."""
        h = precision.compute(self.attention_norm(x), self.m)
        h = self.attention.attend(h, *self.attention.keys_values(h), mask=mask, bias=bias, scale=SCALE)
        x = x + h.astype(x.dtype)
        h = self.mlp(precision.compute(self.mlp_norm(x), self.m))
        return constrain(x + h.astype(x.dtype), "batch", "length", "act_embed")


class DecoderBlock(nnx.Module):
    """x + causal attention(norm(x)), x + cross_attention(norm(x), encoded), then x + mlp(norm(x))."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        self.attention_norm = Norm(m, rngs)
        self.attention = _attention(m, rngs)
        self.cross_attention_norm = Norm(m, rngs)
        self.cross_attention = _attention(m, rngs)
        self.mlp_norm = Norm(m, rngs)
        self.mlp = MLP(m, rngs)

    def __call__(self, x, mask, bias, cross, cross_mask, cache=None):
        """x [batch, length, embed]; mask [batch, 1, length, keys] and bias [batch or 1, heads, length,
        keys] of the self-attention; cross: the (keys, values) of the encoder's output for this layer
        ([batch, input_length, kv_heads, head_dim] each), seen where cross_mask [batch, 1, length,
        input_length] allows. cache: None, or (keys, values, end) as in Attention: the new keys go
        to slots end..end+length and the query sees the filled slots (mask and bias say which).
        Returns ([batch, length, embed], cache)."""
        m = self.m
        h = precision.compute(self.attention_norm(x), m)
        keys, values = self.attention.keys_values(h)
        if cache is not None:
            cached_keys, cached_values, end = cache
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, 0))
            keys = write(cached_keys, keys.astype(cached_keys.dtype), end)
            values = write(cached_values, values.astype(cached_values.dtype), end)
            cache = (keys, values, end)
        h = self.attention.attend(h, keys, values, mask=mask, bias=bias, scale=SCALE)
        x = x + h.astype(x.dtype)
        h = precision.compute(self.cross_attention_norm(x), m)
        h = self.cross_attention.attend(h, *cross, mask=cross_mask, scale=SCALE)
        x = x + h.astype(x.dtype)
        h = self.mlp(precision.compute(self.mlp_norm(x), m))
        return constrain(x + h.astype(x.dtype), "batch", "length", "act_embed"), cache


class Stack(nnx.Module):
    """One side: its blocks (stacked on "layers"), its relative position bias and its final norm."""

    def __init__(self, m, depth: int, block, bidirectional: bool, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return block(m, rngs)

        self.blocks = make_blocks(rngs)
        self.relative_bias = RelativeBias(m, bidirectional, rngs)
        self.final_norm = Norm(m, rngs)


class EncoderDecoder(nnx.Module):
    """The T5-style model. `EncoderDecoder(config.model, rngs)`; call it on the encoder's and the
    decoder's tokens to get the decoder's logits, or `encode` once and `decode` step by step."""

    def __init__(self, m, rngs: nnx.Rngs):
        checks.check_model(m)
        self.m = m
        self.embed = init.param(rngs, init.embedding(m), (m.vocab, m.width), ("vocab", "embed"), m)
        self.encoder = Stack(m, checks.encoder_depth(m), EncoderBlock, True, rngs)
        self.decoder = Stack(m, m.depth, DecoderBlock, False, rngs)
        self.readout = init.param(rngs, init.readout(m), (m.width, m.vocab), ("embed", "vocab"), m)

    def __call__(self, encoder_tokens, tokens, encoder_segment_ids=None, segment_ids=None):
        """Logits [batch, length, vocab] float32 of the decoder's next tokens.

        encoder_tokens: [batch, input_length] int; tokens: [batch, length] int, the decoder's inputs
        (model.decoder_start, then the targets but the last); encoder_segment_ids [batch,
        input_length], segment_ids [batch, length]: the example of each token, 0 for padding
        (None: one example filling the row).
        """
        encoded = self.encode(encoder_tokens, encoder_segment_ids)
        return self.decode(tokens, encoded, segment_ids, encoder_segment_ids)

    def encode(self, tokens, segment_ids=None):
        """tokens [batch, input_length] -> the encoder's output [batch, input_length, embed] (compute dtype)."""
        m = self.m
        segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        positions = jnp.arange(tokens.shape[1])[None]  # differences within an example are what count
        mask = _allowed(segment_ids, segment_ids)
        bias = self.encoder.relative_bias(positions, positions)
        x, _ = self._run(self.encoder.blocks, lambda block, x, _: (block(x, mask, bias), None), self._embed(tokens))
        return constrain(precision.compute(self.encoder.final_norm(x), m), "batch", "length", "act_embed")

    def decode(self, tokens, encoded=None, segment_ids=None, encoder_segment_ids=None, cache=None, cross=None):
        """The decoder's logits [batch, length, vocab] float32, given the encoder's output.

        tokens: [batch, length] int. encoded: `encode`'s output [batch, input_length, embed], or None
        when `cross` holds its keys and values already (`cross_keys_values`, for decoding).
        segment_ids, encoder_segment_ids: as in __call__ (None: one example, no padding).
        cache: None, or the per-layer (keys, values, end) of `decoder.init_cache` (a decoder's cache):
        `tokens` continue each row at slot `end` and (logits, cache) is returned.
        """
        m = self.m
        batch, length = tokens.shape
        cross = self.cross_keys_values(encoded) if cross is None else cross
        input_length = cross[0].shape[2]
        segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        if encoder_segment_ids is None:
            encoder_segment_ids = jnp.ones((batch, input_length), tokens.dtype)
        cross_mask = _allowed(segment_ids, encoder_segment_ids)
        if cache is None:
            positions = jnp.arange(length)[None]
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            mask = _allowed(segment_ids, segment_ids) & causal
            bias = self.decoder.relative_bias(positions, positions)
        else:
            end = cache[2][0]  # [batch]: every layer's cache is filled to the same slot
            positions = end[:, None] + jnp.arange(length)[None]  # [batch, length]: each query's slot
            slots = jnp.arange(cache[0].shape[2])[None]
            mask = (slots[:, None, :] <= positions[:, :, None])[:, None]  # filled slots at or before the query
            bias = self.decoder.relative_bias(positions, slots)

        def layer(block, x, per_layer):
            layer_cache, layer_cross = per_layer
            return block(x, mask, bias, layer_cross, cross_mask, layer_cache)

        x, cache = self._run(self.decoder.blocks, layer, self._embed(tokens), (cache, cross))
        x = precision.compute(self.decoder.final_norm(x), m)
        logits = dense.project(x, precision.compute(self.readout[...], m), preferred_element_type=precision.STATS)
        logits = constrain(logits, "batch", "length", "act_vocab")
        return logits if cache is None else (logits, cache)

    def cross_keys_values(self, encoded):
        """Every decoder layer's cross-attention keys and values of the encoder's output [batch,
        input_length, embed]: (keys, values), each [depth, batch, input_length, kv_heads, head_dim].
        Decoding computes them once per input, not once per new token."""

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, encoded):
            return encoded, block.cross_attention.keys_values(encoded)

        return run(self.decoder.blocks, encoded)[1]

    def _embed(self, tokens):
        """[batch, length] token ids -> [batch, length, embed] in the compute dtype."""
        x = jnp.take(constrain(self.embed[...], "vocab", "act_embed"), tokens, axis=0)
        return constrain(precision.compute(x, self.m), "batch", "length", "act_embed")

    def _run(self, blocks, layer, x, per_layer=None):
        """x through every block of a stack in turn, under a scan (remat as model.remat says).

        layer(block, x, that layer's slice of per_layer) -> (x, that layer's output); per_layer holds
        one entry per layer on a leading [depth] axis (or None). Returns (x, outputs stacked on [depth]).
        """
        m = self.m
        if remat_policy(m) != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[remat_policy(m)], prevent_cse=False)

        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=1 if m.scan_layers else True,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x, per_layer):
            return layer(block, x, per_layer)

        return run(blocks, x, per_layer)
