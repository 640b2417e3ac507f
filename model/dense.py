"""Dense projections: the trailing axes of activations contracted with the leading axes of a weight.

On the CPU they run as one 2-D matmul over the flattened batch and length axes. For a [batch,
length, embed] · [embed, out] einsum, XLA's CPU backend gives the backward pass transposed copies
of the [batch, length, out] gradient, which cost as much as the matmuls themselves
(bench/RESULTS.md, "Training": the bench shape's MLP stack under the layer scan ran at 71 GFLOP/s as
3-D einsums and 130 GFLOP/s as 2-D matmuls, and the whole step went from 1.15 to 0.71 s). TPUs and
GPUs lay the einsum out well, and there it stays as it was: compiled for a TPU, the flattened form
left the calibration's plans' FLOPs and step times as they were and moved their memory both ways
(Llama-3.1 8B at sequence 8192 on v6e-256 +1.8 GiB per chip, Llama-2 70B on v5p-512 -1.9 GiB).
The platform is the one the step compiles for (model/kernels.py's `platform()`).

`jnp.einsum` either way: qwix (heft.quantize) intercepts it to run quantized weights.
"""

import math

import jax.numpy as jnp

from heft.model import kernels

_IN, _OUT = "cdeg", "uvwxyz"


def project(x, w, inputs: int = 1, **einsum_kwargs):
    """x [*lead, *c] · w [*c, *out] -> [*lead, *out], c the last `inputs` axes of x.

    E.g. attention's query projection: x [batch, length, embed] · w [embed, heads, head_dim] ->
    [batch, length, heads, head_dim]; its output: y [batch, length, heads, head_dim] · w [heads,
    head_dim, embed] with inputs=2 -> [batch, length, embed].
    """
    c, o = _IN[:inputs], _OUT[: w.ndim - inputs]
    if kernels.platform() != "cpu":
        return jnp.einsum(f"...{c},{c}{o}->...{o}", x, w, **einsum_kwargs)
    lead = x.shape[: x.ndim - inputs]
    y = jnp.einsum(f"n{c},{c}{o}->n{o}", x.reshape(math.prod(lead), *x.shape[x.ndim - inputs:]), w,
                   **einsum_kwargs)
    return y.reshape(*lead, *y.shape[1:])
