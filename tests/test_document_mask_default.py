"""By default, training on packed rows sees each document as inference does: alone, from position 0.

Packing (data/packing.py) restarts positions at every document; with the default config the loss of
a packed row is then the sum of each document's loss computed on its own.
"""

import jax
import numpy as np

from heft.configs import base
from heft.model.build import init_params
from heft.train import step


def test_default_loss_on_a_packed_row_is_the_sum_of_each_document_alone():
    c = base.get_config()
    c.model.update(vocab=128, width=32, depth=2, heads=4, kv_heads=2, mlp_width=64)
    rng = np.random.default_rng(0)
    # Random parameters of the model's shapes (compiling the initializer would take longer than the test).
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                          jax.eval_shape(lambda: init_params(c.model, 0)))
    lengths = (8, 8)  # one shape for both documents alone: two compiles in all
    docs = [rng.integers(0, c.model.vocab, n + 1).astype(np.int32) for n in lengths]  # inputs and targets

    def batch(rows):
        inputs = np.concatenate([d[:-1] for d in rows])[None]
        return {"inputs": inputs, "targets": np.concatenate([d[1:] for d in rows])[None],
                "positions": np.concatenate([np.arange(len(d) - 1) for d in rows])[None].astype(np.int32),
                "segment_ids": np.concatenate([np.full(len(d) - 1, i + 1) for i, d in enumerate(rows)])[None]
                .astype(np.int32),
                "weights": np.ones_like(inputs, np.float32)}

    loss_sums = jax.jit(lambda p, b: step.loss_sums(c, p, b))
    packed, _ = loss_sums(params, batch(docs))
    alone = sum(float(loss_sums(params, batch([d]))[0]) for d in docs)
    np.testing.assert_allclose(float(packed), alone, rtol=1e-5)
