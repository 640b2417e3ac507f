"""FLOPs of the Pallas kernels in a compiled step, which XLA's cost analysis does not count.

A plan with flash attention (model/kernels.py) holds splash attention's kernels as TPU custom calls;
XLA counts none of their work (`cost_analysis()` gives None or a stray figure for them), so each is
counted here from its name and its operands' shapes, as the matmuls it runs:

    splash_mha_fwd*   S = Q K^T, O = P V                                2 matmuls
    splash_mha_dq*    S again, dP = dO V^T, dQ = dS K                   3
    splash_mha_dkv*   S again, dV = P^T dO, dP = dO V^T, dK = dS^T Q    4

each 2 * batch * heads * q_length * kv_length * head_dim FLOPs, times the share of blocks a causal
mask leaves: n (n + 1) / 2 of n^2 with n = length / block (splash skips the blocks above the
diagonal; a document mask skips more, but which ones depends on the data, so it is not counted).
"""

from heft.model.kernels import splash_block

MATMULS = (("splash_mha_fwd", 2), ("splash_mha_dq", 3), ("splash_mha_dkv", 4))


def causal_share(length: int, block: int) -> float:
    """The share of [length, length] score blocks of size `block` on or below the diagonal."""
    n = -(-length // block)
    return (n + 1) / (2 * n)


def flops(kernel) -> float:
    """FLOPs of one run of `kernel` (costs.Kernel) on one chip; 0 for a kernel heft does not know."""
    matmuls = next((k for prefix, k in MATMULS if kernel.name.startswith(prefix)), 0)
    # q [batch, heads, length, head_dim], then k; with one sequence per chip Pallas' batching drops the
    # size-1 batch axis and they arrive as [heads, length, head_dim].
    arrays = [tuple(shape) for dtype, shape in kernel.operands if dtype.startswith(("f", "bf")) and len(shape) in (3, 4)]
    if not matmuls or len(arrays) < 2 or len(arrays[0]) != len(arrays[1]):
        return 0.0
    q, k = ((1, *a) if len(a) == 3 else a for a in arrays[:2])
    (batch, heads, q_length, head_dim), kv_length = q, k[2]
    return 2.0 * matmuls * batch * heads * q_length * kv_length * head_dim * causal_share(
        q_length, splash_block(q_length))
