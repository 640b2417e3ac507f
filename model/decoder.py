"""A decoder-only transformer: embed, `depth` pre-norm blocks under a scan, norm, readout.

The blocks' parameters are stacked on a leading "layers" axis and run under `nnx.scan`, so compile
time does not grow with depth; `model.scan_layers=False` unrolls the same parameters.

Fine-tuning (heft.adapt) adds three optional pieces, each off (0) unless its model field is set:
adapters in every block (`adapter_width`), learned keys and values that every layer attends to
first (`prefix_length`), and learned input embeddings ahead of every sequence (`prompt_length`).
With all three off the parameters and the computation are the pretrained model's.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import checks, dense, init, precision
from heft.model.adapter import Adapter
from heft.model.attention import Attention
from heft.model.axes import constrain
from heft.model.mlp import MLP
from heft.model.moe import MoE
from heft.model.norms import Norm

REMAT_POLICIES = {
    "full": None,  # keep only each block's input; recompute the rest
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(m) -> str:
    """model.remat as the blocks run it. `auto` is chosen by the training loop (train/remat.py) before
    the step is built; where nothing chose (a forward pass, a step compiled by hand) it runs as
    save_matmuls, which only changes what a backward pass keeps, never a number."""
    return "save_matmuls" if m.remat == "auto" else m.remat


class Block(nnx.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)); the mlp is a mixture of experts with model.mlp=moe."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        self.attention_norm = Norm(m, rngs)
        self.attention = Attention(m, rngs)
        self.mlp_norm = Norm(m, rngs)
        if checks.sparse(m):
            self.moe = MoE(m, rngs)  # in the MLP's place: a router and its experts (model/moe.py)
        else:
            self.mlp = MLP(m, rngs)
        if checks.hook(m, "adapter_width"):
            self.attention_adapter = Adapter(m, rngs)
            self.mlp_adapter = Adapter(m, rngs)

    def __call__(self, x, positions, segment_ids=None, cache=None, prefix=None):
        """x: [batch, length, embed] -> ([batch, length, embed], cache, router losses). prefix: see
        Attention. The router losses are None, or with model.mlp=moe {name: float32 scalar} (MoE's)."""
        adapters = checks.hook(self.m, "adapter_width")
        h = precision.compute(self.attention_norm(x), self.m)
        h, cache = self.attention(h, positions, segment_ids, cache, prefix)
        if adapters:
            h = self.attention_adapter(h)
        x = x + h.astype(x.dtype)
        h, router = precision.compute(self.mlp_norm(x), self.m), None
        if checks.sparse(self.m):
            h, router = self.moe(h)
        else:
            h = self.mlp(h)
        if adapters:
            h = self.mlp_adapter(h)
        x = constrain(x + h.astype(x.dtype), "batch", "length", "act_embed")
        return x, cache, router


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
        # Fine-tuning's pieces come last, so that the pretrained parameters' init is unchanged.
        if checks.hook(m, "prefix_length"):
            shape = (m.depth, m.prefix_length, m.kv_heads, checks.head_dim(m))
            names = ("layers", "prefix", "kv_heads", "head_dim")
            self.prefix_keys = init.param(rngs, init.embedding(m), shape, names, m)
            self.prefix_values = init.param(rngs, init.embedding(m), shape, names, m)
        if checks.hook(m, "prompt_length"):
            self.prompt = init.param(rngs, init.embedding(m), (m.prompt_length, m.width), ("prefix", "embed"), m)

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False,
                 return_router_losses=False):
        """Next-token logits.

        tokens: [batch, length] int; positions: [batch, length] (default 0..length-1);
        segment_ids: [batch, length], documents packed in a row (used when model.document_mask);
        cache: None, or per-layer (keys, values, end) stacked on a leading [depth] axis (decoding).
        Returns logits [batch, length, vocab] float32; with a cache, (logits, cache); with
        return_hidden, also the residual stream after each block [depth, batch, length, embed];
        with return_router_losses, (that, router losses): a mixture of experts' auxiliary losses
        {name: float32 scalar}, each the mean over layers (None for a dense model).
        """
        m = self.m
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        prefix = None
        if checks.hook(m, "prefix_length"):  # [depth, 1, prefix, kv_heads, head_dim]: one per layer
            prefix = (self.prefix_keys[...][:, None], self.prefix_values[...][:, None])
        if checks.hook(m, "prompt_length"):
            prefix = self._prompt_prefix()
            positions = positions + m.prompt_length  # the prompt holds positions 0..prompt_length-1
        x = self._embed(tokens, positions)
        x, cache, hidden, router = self._blocks(x, positions, segment_ids, cache, prefix, return_hidden)
        x = precision.compute(self.final_norm(x), m)
        if m.tied_embeddings:
            w = precision.compute(self.embed[...], m).T
        else:
            w = precision.compute(self.readout[...], m)
        logits = dense.project(x, w, preferred_element_type=precision.STATS)
        logits = constrain(logits, "batch", "length", "act_vocab")
        out = (logits, cache) if cache is not None else logits
        if return_router_losses:
            out = (out, jax.tree.map(jnp.mean, router))
        return (out, hidden) if return_hidden else out

    def _embed(self, tokens, positions):
        """[batch, length] token ids -> [batch, length, embed] in the compute dtype."""
        m = self.m
        # Gather rows from a table whose embed axis is whole on every device (FSDP's all-gather).
        x = jnp.take(constrain(self.embed[...], "vocab", "act_embed"), tokens, axis=0)
        if m.positions == "learned":
            x = x + jnp.take(self.position_embed[...], positions, axis=0)
        # The residual stream is carried in the compute dtype (half the activation memory under
        # bf16); norms still take their statistics in float32.
        return constrain(precision.compute(x, m), "batch", "length", "act_embed")

    def _blocks(self, x, positions, segment_ids, cache, prefix, return_hidden):
        """Every block in turn (under a scan): x [batch, length, embed] -> (x, cache, hidden, router
        losses), the last two stacked on a leading [depth] axis (None when not asked for / dense).
        cache and prefix, when given, hold one entry per layer on a leading [depth] axis."""
        m = self.m

        def layer(block, x, cache, prefix):
            return block(x, positions, segment_ids, cache, prefix)

        if remat_policy(m) != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[remat_policy(m)], prevent_cse=False)

        @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0, 0),
                  unroll=1 if m.scan_layers else True,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x, cache, prefix):
            x, cache, router = layer(block, x, cache, prefix)
            return x, cache, (x if return_hidden else None), router

        return run(self.blocks, x, cache, prefix)

    def _prompt_prefix(self):
        """The learned prompt as every layer's keys and values: the prompt [prompt_length, embed] runs
        through the blocks alone at positions 0..prompt_length-1 (it attends only to itself, so this
        is what prepending it to each sequence computes). Returns (keys, values), each
        [depth, 1, prompt_length, kv_heads, head_dim]."""
        m = self.m
        p = m.prompt_length
        positions = jnp.arange(p)[None]
        x = self.prompt[...][None]
        if m.positions == "learned":
            x = x + self.position_embed[...][:p][None]
        cache = init_cache(m, 1, p, precision.dtype(m.compute_dtype))
        _, (keys, values, _), _, _ = self._blocks(precision.compute(x, m), positions, None, cache, None, False)
        return keys, values


def init_cache(m, batch: int, cache_len: int, dtype=jnp.float32):
    """An empty KV cache: per layer keys/values [depth, batch, cache_len, kv_heads, head_dim]."""
    shape = (m.depth, batch, cache_len, m.kv_heads, checks.head_dim(m))
    return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((m.depth, batch), jnp.int32))
