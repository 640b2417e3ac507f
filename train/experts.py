"""Expert parallelism: how a mixture of experts' layers run over the mesh (`model.mlp=moe`).

The model routes tokens and says which expert each chooses; `model.moe.experts` runs the experts it
is given. Here that function runs under `jax.shard_map`, once per device, on the tokens and experts
the rules table gives the device:
- tokens: the device's own rows of the batch ("batch", "length"), so every device sorts and
  dispatches only its own tokens (left to GSPMD, a sort over the whole batch would gather it);
- experts: the device's share of the expert axis ("expert", mesh axis `expert`) and of their
  hidden width ("mlp", `tensor`); their embed axis is gathered at the boundary, as FSDP does for
  every weight it uses.
Where the weights are split over an axis that also splits the tokens (`expert`, by default), the
devices of that axis first all-gather their tokens, each runs its own experts on all of them, and a
reduce-scatter sums every token's expert outputs back onto the device that owns the token: an
all-gather dispatcher (Megatron-LM's "allgather" token dispatcher). Axes that split only the
weights (`tensor`) sum the partial outputs (psum). With every such axis of size 1 the collectives
vanish: each device runs all experts on its own tokens.
"""

import jax
from jax.sharding import PartitionSpec

from heft.model import moe
from heft.model.checks import ConfigError, sparse
from heft.train import rules


def parallel(mesh, config):
    """`moe.experts` over `mesh` as the rules lay it out: same arguments, same result."""
    batch, length = rules.spec(("batch", "length"), config)
    expert, mlp = rules.spec(("expert", "mlp"), config)
    split = rules.axes(expert) + rules.axes(mlp)  # axes that split the weights (of size 1, their collectives vanish)
    # Per token dimension (0: batch, 1: length), the weight-splitting axes that also split it: these
    # devices trade tokens. The other weight-splitting axes hold the same tokens: they sum their parts.
    gathered = [(dim, tuple(a for a in split if a in rules.axes(entry))) for dim, entry in ((0, batch), (1, length))]
    gathered = [(dim, axes) for dim, axes in gathered if axes]
    summed = tuple(a for a in split if a not in rules.axes(batch) + rules.axes(length))

    token_spec = PartitionSpec(batch, length, None)
    up_spec = PartitionSpec(expert, None, mlp)  # [experts, embed, mlp]: embed whole (gathered)
    down_spec = PartitionSpec(expert, mlp, None)

    def local(x, ids, weights, w, m):
        held = w["up"].shape[0]
        first = jax.lax.axis_index(rules.axes(expert)) * held if rules.axes(expert) else 0
        for dim, axes in gathered:
            x, ids, weights = (jax.lax.all_gather(t, axes, axis=dim, tiled=True) for t in (x, ids, weights))
        y = moe.experts(x, ids, weights, w, m, first)
        for dim, axes in reversed(gathered):
            y = jax.lax.psum_scatter(y, axes, scatter_dimension=dim, tiled=True)
        if summed:
            y = jax.lax.psum(y, summed)
        return y

    def run(x, ids, weights, w, m):
        specs = {name: down_spec if name == "down" else up_spec for name in w}
        return jax.shard_map(lambda x, ids, weights, w: local(x, ids, weights, w, m), mesh=mesh,
                             in_specs=(token_spec, token_spec, token_spec, specs), out_specs=token_spec)(
            x, ids, weights, w)

    return run


def check(config, mesh) -> None:
    """The expert axis must split the experts evenly (raises ConfigError naming both fields)."""
    if not sparse(config.model):
        return
    n = rules.size(mesh.shape, rules.spec(("expert",), config)[0])
    experts = config.model.moe.experts
    if experts % n:
        raise ConfigError(f"model.moe.experts={experts} is not divisible by the {n} devices of the expert axis "
                          f"(mesh.expert={mesh.shape.get('expert', 1)}); pick a mesh.expert that divides {experts}")
