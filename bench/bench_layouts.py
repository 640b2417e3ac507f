"""The two measurements behind the bench step's layout choices, each in isolation on this machine.

    python bench/bench_layouts.py

1. Projections: a 4-layer SwiGLU MLP stack at the bench shape (batch 8 x length 256, width 256,
   MLP 1024, float32) under a layer scan with save_matmuls remat, forward and backward, written as
   3-D einsums (`btd,df->btf`) against model/dense.py's 2-D matmuls over the flattened batch and
   length. XLA's CPU backend writes the 3-D form's gradients transposed.
2. The embedding gradient: `jax.grad` of a [8192, 256] table gathered at 8 x 256 tokens, as JAX's
   scatter-add, `jax.ops.segment_sum`, and a one-hot matmul.
Each line is the median of 10 runs after one warm-up, with the GFLOP/s where it is matmul work.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from heft.model import dense

B, T, D, F, L, V = 8, 256, 256, 1024, 4, 8192


def median_seconds(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def mlp_3d(x, w):
    h = jax.nn.silu(jnp.einsum("btd,df->btf", x, w["gate"])) * jnp.einsum("btd,df->btf", x, w["up"])
    return x + jnp.einsum("btf,fd->btd", h, w["down"])


def mlp_2d(x, w):
    h = jax.nn.silu(dense.project(x, w["gate"])) * dense.project(x, w["up"])
    return x + dense.project(h, w["down"])


def projections() -> None:
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (B, T, D))
    w = {"gate": jax.random.normal(keys[1], (L, D, F)) * 0.05, "up": jax.random.normal(keys[2], (L, D, F)) * 0.05,
         "down": jax.random.normal(keys[3], (L, F, D)) * 0.05}
    flops = L * 3 * (2 * B * T * D * F) * 3  # three matmuls a layer, forward and two backward
    for name, block in (("3-D einsums", mlp_3d), ("2-D matmuls (model/dense.py)", mlp_2d)):
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        def loss(w, x, block=block):
            y, _ = jax.lax.scan(lambda c, layer: (block(c, layer), None), x, w)
            return jnp.mean(y**2)

        s = median_seconds(jax.jit(jax.grad(loss)), w, x)
        print(f"MLP stack, {name:30s} {s * 1e3:8.1f} ms  {flops / s / 1e9:6.1f} GFLOP/s")


def embedding_gradient() -> None:
    table = jax.random.normal(jax.random.key(0), (V, D))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    upstream = jax.random.normal(jax.random.key(2), (B, T, D))

    def gather(table, tokens, g):
        return jnp.sum(jnp.take(table, tokens, axis=0) * g)

    def one_hot(table, tokens, g):
        rows = jax.nn.one_hot(tokens.reshape(-1), V, dtype=table.dtype) @ table
        return jnp.sum(rows.reshape(B, T, D) * g)

    def segment_sum(table, tokens, g):
        @jax.custom_vjp
        def embed(t):
            return jnp.take(t, tokens, axis=0)

        embed.defvjp(lambda t: (embed(t), None),
                     lambda _, ct: (jax.ops.segment_sum(ct.reshape(-1, D), tokens.reshape(-1), V),))
        return jnp.sum(embed(table) * g)

    for name, f in (("scatter-add (jnp.take's own)", gather), ("jax.ops.segment_sum", segment_sum),
                    ("one-hot matmul", one_hot)):
        s = median_seconds(jax.jit(jax.grad(f)), table, tokens, upstream)
        print(f"embedding gradient, {name:30s} {s * 1e3:8.2f} ms")


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    projections()
    embedding_gradient()
