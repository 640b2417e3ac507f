"""tiny with a mixture of experts: 8 experts of width 192 per block, 2 per token.

A token's experts hold 2 x 192 = 384 hidden units, tiny's dense MLP width, so the two have the same
active parameters (plus the router's 128 x 8 per block) and FLOPs per token, while this one holds
four times tiny's MLP parameters (3.6M parameters in all, 1.84M active). bench/bench_moe.py compares
the two on the embedded corpus.

Capacity routing (1.25) rather than the dropless default: on a CPU, jax.lax.ragged_dot is computed
as a dense matmul against every expert (experts times the work; bench/RESULTS.md, "Mixture of
experts"), which would take this model past tiny's few minutes. On TPU and GPU ragged_dot is a
grouped matmul and dropless is the better choice.
"""

from heft.configs import tiny


def get_config():
    c = tiny.get_config()
    c.name = "tiny_moe"
    m = c.model
    m.mlp = "moe"
    m.moe.experts = 8
    m.moe.top_k = 2
    m.moe.expert_width = 192
    m.moe.capacity_factor = 1.25
    return c
