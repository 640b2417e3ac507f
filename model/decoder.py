"""A decoder-only transformer: embed, `depth` pre-norm blocks under a scan, norm, readout.

The blocks' parameters are stacked on a leading "layers" axis and run under `nnx.scan`, so compile
time does not grow with depth; `model.scan_layers=False` unrolls the same parameters.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import checks, init, precision
from heft.model.attention import Attention
from heft.model.axes import constrain
from heft.model.mlp import MLP
from heft.model.norms import Norm

REMAT_POLICIES = {
    "full": None,  # keep only each block's input; recompute the rest
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        self.attention_norm = Norm(m, rngs)
        self.attention = Attention(m, rngs)
        self.mlp_norm = Norm(m, rngs)
        self.mlp = MLP(m, rngs)

    def __call__(self, x, positions, segment_ids=None, cache=None):
        """x: [batch, length, embed] -> ([batch, length, embed], cache)."""
        h = precision.compute(self.attention_norm(x), self.m)
        h, cache = self.attention(h, positions, segment_ids, cache)
        x = x + h.astype(x.dtype)
        h = self.mlp(precision.compute(self.mlp_norm(x), self.m))
        x = constrain(x + h.astype(x.dtype), "batch", "length", "act_embed")
        return x, cache


class Decoder(nnx.Module):
    """The language model. `Decoder(config.model, rngs)`; call it on tokens to get logits."""

    def __init__(self, m, rngs: nnx.Rngs):
        checks.check_model(m)
        self.m = m
        self.embed = init.param(rngs, init.embedding(m), (m.vocab, m.width), ("vocab", "embed"), m)
        if m.positions == "learned":
            self.position_embed = init.param(
                rngs, init.embedding(m), (m.max_len, m.width), ("length", "embed"), m
            )

        @nnx.split_rngs(splits=m.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(m, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(m, rngs)
        if not m.tied_embeddings:
            self.readout = init.param(rngs, init.readout(m), (m.width, m.vocab), ("embed", "vocab"), m)

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False):
        """Next-token logits.

        tokens: [batch, length] int; positions: [batch, length] (default 0..length-1);
        segment_ids: [batch, length], documents packed in a row (used when model.document_mask);
        cache: None, or per-layer (keys, values, end) stacked on a leading [depth] axis (decoding).
        Returns logits [batch, length, vocab] float32; with a cache, (logits, cache); with
        return_hidden, also the residual stream after each block [depth, batch, length, embed].
        """
        m = self.m
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # Gather rows from a table whose embed axis is whole on every device (FSDP's all-gather).
        x = jnp.take(constrain(self.embed[...], "vocab", "act_embed"), tokens, axis=0)
        if m.positions == "learned":
            x = x + jnp.take(self.position_embed[...], positions, axis=0)
        # The residual stream is carried in the compute dtype (half the activation memory under
        # bf16); norms still take their statistics in float32.
        x = constrain(precision.compute(x, m), "batch", "length", "act_embed")

        def layer(block, x, cache):
            return block(x, positions, segment_ids, cache)

        if m.remat != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[m.remat], prevent_cse=False)

        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0),
                  unroll=1 if m.scan_layers else True,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x, cache):
            x, cache = layer(block, x, cache)
            return x, cache, (x if return_hidden else None)

        x, cache, hidden = run(self.blocks, x, cache)
        x = precision.compute(self.final_norm(x), m)
        if m.tied_embeddings:
            w = precision.compute(self.embed[...], m).T
        else:
            w = precision.compute(self.readout[...], m)
        logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=precision.STATS)
        logits = constrain(logits, "batch", "length", "act_vocab")
        out = (logits, cache) if cache is not None else logits
        return (out, hidden) if return_hidden else out


def init_cache(m, batch: int, cache_len: int, dtype=jnp.float32):
    """An empty KV cache: per layer keys/values [depth, batch, cache_len, kv_heads, head_dim]."""
    shape = (m.depth, batch, cache_len, m.kv_heads, checks.head_dim(m))
    return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((m.depth, batch), jnp.int32))


def abstract(m):
    """(graphdef, abstract state) of the model for config `m`: shapes only, nothing allocated.

    The one place the abstract model is built; every shape question (sizes, shardings, restores,
    conversion) starts here.
    """
    return nnx.split(nnx.eval_shape(lambda: Decoder(m, nnx.Rngs(0))))


def abstract_params(m) -> dict:
    """The parameters as a nested dict of ShapeDtypeStructs: `init_params`' form, nothing allocated."""
    return nnx.to_pure_dict(nnx.filter_state(abstract(m)[1], nnx.Param))


def init_params(m, seed: int) -> dict:
    """Freshly initialized parameters as a nested dict of arrays (the form train/ and orbax keep)."""
    return nnx.to_pure_dict(nnx.state(Decoder(m, nnx.Rngs(seed)), nnx.Param))


def bind(m, params: dict) -> Decoder:
    """The model for config `m` holding `params` (a nested dict of arrays); cheap under jit."""
    graphdef, state = abstract(m)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
