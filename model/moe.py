"""A mixture of experts (Mixtral's sparse MLP): a router sends each token to `top_k` of `experts` MLPs.

    probs   = softmax(x @ router)                      [batch, length, experts]   (float32)
    chosen  = the top_k experts by probability, their probabilities renormalised to sum to 1
    y       = sum over the chosen experts e of weight_e * mlp_e(x)

Parameters grow with `experts`; the work per token grows only with `top_k`. Two ways to run the
chosen experts (`model.moe.capacity_factor`):
- dropless (0, the default): every token's choices are sorted by expert and each expert multiplies
  its own contiguous rows, one grouped matmul (`jax.lax.ragged_dot`) for all experts;
- capacity (> 0): each expert of each sequence takes at most
  C = ceil(capacity_factor * length * top_k / experts) tokens into fixed slots, in token order; the
  choices past C are dropped (the token keeps its other choices and the residual). Fixed shapes,
  plain batched matmuls.

The router adds two auxiliary losses, averaged over layers and weighted into the training loss by
train/step.py: the load-balancing loss (Switch Transformer; HF's and MaxText's normalisation)
E * sum_e f_e * P_e, with f_e the fraction of tokens that chose expert e and P_e the mean router
probability of e (top_k when balanced, E when every token picks the same experts), and the router
z-loss (ST-MoE) mean over tokens of logsumexp(logits)^2, which keeps the router's logits small.

Where the experts live is not decided here: `experts` runs the experts it is given on the tokens
it is given. Under a mesh, train/ swaps in a version that runs each device's share of the experts
(`experts_by`; train/experts.py), which is where expert parallelism's communication lives.
"""

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import checks, init, precision
from heft.model.axes import constrain
from heft.model.mlp import ACTIVATIONS, GATED


class MoE(nnx.Module):
    """The router [embed, experts] and the experts' stacked weights: gate and up
    [experts, embed, expert_width] (gate only for gated activations), down [experts, expert_width, embed]."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        D, E, F = m.width, m.moe.experts, checks.expert_width(m)
        # The router's expert axis stays whole on every device: top-k needs all of a token's logits.
        self.router = init.param(rngs, init.matrix(m, D), (D, E), ("embed", None), m)
        if m.activation in GATED:
            self.gate = init.param(rngs, init.matrix(m, D), (E, D, F), ("expert", "embed", "mlp"), m)
        self.up = init.param(rngs, init.matrix(m, D), (E, D, F), ("expert", "embed", "mlp"), m)
        self.down = init.param(rngs, init.matrix(m, F, residual=True), (E, F, D), ("expert", "mlp", "embed"), m)

    def __call__(self, x):
        """[batch, length, embed] -> ([batch, length, embed], {"balance_loss", "z_loss": float32 scalars})."""
        m = self.m
        logits = jnp.einsum("btd,de->bte", x.astype(precision.STATS), self.router[...].astype(precision.STATS))
        weights, ids = route(logits, m.moe.top_k)
        losses = {"balance_loss": balance_loss(logits, ids), "z_loss": z_loss(logits)}
        w = {name: precision.compute(getattr(self, name)[...], m) for name in ("gate", "up", "down") if hasattr(self, name)}
        y = (_EXPERTS.get() or experts)(x, ids, weights, w, m)
        return constrain(y, "batch", "length", "act_embed"), losses


def route(logits, top_k: int):
    """Each token's top_k experts and their weights: the router's softmax probabilities of the
    chosen experts, renormalised to sum to 1 (Mixtral's; the same as a softmax over their logits).
    logits: [..., experts] float32 -> (weights [..., top_k] float32, ids [..., top_k] int32), best first."""
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return probs / jnp.sum(probs, axis=-1, keepdims=True), ids


def balance_loss(logits, ids):
    """E * sum_e f_e * P_e over every token: f_e the fraction of tokens with e among their choices,
    P_e the mean router probability of e. logits: [..., experts]; ids: [..., top_k]."""
    E = logits.shape[-1]
    chose = jnp.sum(jax.nn.one_hot(ids, E, dtype=precision.STATS), axis=-2)  # [..., experts], 0 or 1
    f = jnp.mean(chose.reshape(-1, E), axis=0)
    p = jnp.mean(jax.nn.softmax(logits, axis=-1).reshape(-1, E), axis=0)
    return E * jnp.sum(f * p)


def z_loss(logits):
    """Mean over tokens of logsumexp(router logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


# Which function runs the chosen experts: `experts` unless train/ has set one for its mesh.
_EXPERTS = contextvars.ContextVar("heft_moe_experts", default=None)


@contextlib.contextmanager
def experts_by(fn):
    """Within it, MoE layers run their experts with `fn` (same arguments as `experts`). train/
    sets an expert-parallel one while its mesh is active (train/sharding.py, train/experts.py)."""
    token = _EXPERTS.set(fn)
    try:
        yield
    finally:
        _EXPERTS.reset(token)


def experts(x, ids, weights, w, m, first=0):
    """Each token's weighted sum of its chosen experts' MLPs, over the experts in `w`.

    x: [batch, length, embed] (compute dtype); ids, weights: [batch, length, top_k] from `route`;
    w: {"gate" (gated activations only), "up": [held, embed, mlp], "down": [held, mlp, embed]}, the
      weights of experts first..first+held-1 (all of them, unless expert parallelism split them);
    first: the index of the first expert in `w` (an int or a traced scalar).
    Choices of experts outside `w` add nothing (another device adds them). Returns [batch, length, embed].
    """
    held = w["up"].shape[0]
    local = ids - first
    here = (local >= 0) & (local < held)
    expert = jnp.where(here, local, held)  # [batch, length, top_k]: choices of experts not here are `held`
    run = _capacity if m.moe.capacity_factor else _dropless
    return run(x, expert, jnp.where(here, weights, 0), w, m)


def _mlp(rows, w, m, matmul):
    """The experts' MLP on rows already grouped by expert; `matmul(rows, weight)` does the grouping."""
    act = ACTIVATIONS[m.activation]
    h = act(matmul(rows, w["gate"])) * matmul(rows, w["up"]) if m.activation in GATED else act(matmul(rows, w["up"]))
    return matmul(h, w["down"])


def _dropless(x, expert, weights, w, m):
    """Sort every (token, choice) by expert and run each expert on its own rows: one ragged_dot per
    projection, with `group_sizes` the rows of each expert. Choices of experts not held here (E)
    sort last, past every group, where ragged_dot writes zeros."""
    B, T, D = x.shape
    k, E = expert.shape[-1], w["up"].shape[0]
    expert = expert.reshape(-1)  # [tokens * top_k], token-major
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=E + 1)[:E].astype(jnp.int32)
    rows = jnp.take(x.reshape(B * T, D), order // k, axis=0)  # [tokens * top_k, embed], grouped
    out = _mlp(rows, w, m, lambda r, weight: jax.lax.ragged_dot(r, weight, sizes))
    out = jnp.take(out, jnp.argsort(order), axis=0).reshape(B, T, k, D)  # back to token-major
    return jnp.einsum("btkd,btk->btd", out, weights.astype(out.dtype))


def capacity(m, length: int) -> int:
    """Slots per expert per sequence: ceil(capacity_factor * length * top_k / experts)."""
    return max(1, math.ceil(m.moe.capacity_factor * length * m.moe.top_k / m.moe.experts))


def _capacity(x, expert, weights, w, m):
    """Per sequence, each expert takes its first C choices (token order, a token's choices in rank
    order) into C slots; the rest are dropped. Experts then run as one batched matmul over
    [batch, held experts, C] slots. Choices of experts not held here (E) take no slot."""
    B, T, D = x.shape
    k, E = expert.shape[-1], w["up"].shape[0]
    C = capacity(m, T)
    expert = expert.reshape(B, T * k)  # each sequence's choices, token-major
    # Rank of each choice among its expert's choices in this sequence: 0, 1, 2, ...
    onehot = jax.nn.one_hot(expert, E + 1, dtype=jnp.int32)
    rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [batch, tokens * top_k]
    kept = (expert < E) & (rank < C)
    slot = jnp.where(kept, expert * C + rank, E * C)  # slot E*C: a spare that nothing reads
    # Each slot's token (T: a zero row past the sequence, for slots no choice filled).
    token = jnp.broadcast_to(jnp.arange(T * k) // k, (B, T * k))
    filled = jnp.full((B, E * C + 1), T, jnp.int32).at[jnp.arange(B)[:, None], slot].set(token)[:, : E * C]
    padded = jnp.concatenate([x, jnp.zeros((B, 1, D), x.dtype)], axis=1)
    rows = jnp.take_along_axis(padded, filled[..., None], axis=1).reshape(B, E, C, D)
    out = _mlp(rows, w, m, lambda r, weight: jnp.einsum("becd,edf->becf", r, weight))
    out = jnp.concatenate([out.reshape(B, E * C, D), jnp.zeros((B, 1, D), out.dtype)], axis=1)
    picked = jnp.take_along_axis(out, slot[..., None], axis=1).reshape(B, T, k, D)  # dropped: zeros
    return jnp.einsum("btkd,btk->btd", picked, weights.astype(out.dtype))
