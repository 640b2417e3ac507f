"""μP: the coordinate check (activations' movement stays flat across widths under μP and grows under
the standard parametrisation), and its learning-rate factors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heft.configs import tiny
from heft.model.build import bind
from heft.train import optimizer, step
from heft.train import state as train_state

WIDTHS = (64, 1024)


def _config(init: str, width: int):
    c = tiny.get_config()
    c.model.update(vocab=256, depth=1, width=width, heads=width // 32, kv_heads=width // 32, mlp_width=2 * width,
                   max_len=64, init=init, mup_base_width=64, remat="none")
    c.train.update(lr=3e-3, warmup_steps=0, steps=100, schedule="constant", grad_clip=0.0, weight_decay=0.0,
                   seq_len=16, batch_size=4)
    return c


def movement(init: str, width: int, steps: int = 4) -> tuple[float, float]:
    """(mean |Δ residual stream|, std of Δ logits) after `steps` Adam steps on one fixed batch."""
    c = _config(init, width)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 17))
    batch = jax.tree.map(jnp.asarray, {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(16), (4, 1)),
        "segment_ids": np.ones((4, 16), np.int32), "weights": np.ones((4, 16), np.float32)})
    state = jax.jit(lambda: train_state.fresh(c))()
    forward = jax.jit(lambda p: bind(c.model, p)(batch["inputs"], batch["positions"], return_hidden=True))
    logits0, hidden0 = forward(state["params"])
    train = jax.jit(lambda s: step.train_step(c, s, batch)[0])
    for _ in range(steps):
        state = train(state)
    logits, hidden = forward(state["params"])
    return float(jnp.mean(jnp.abs(hidden - hidden0))), float(jnp.std(logits - logits0))


@pytest.mark.slow
def test_coordinates_stay_flat_across_widths_under_mup_and_grow_under_standard():
    sp = [movement("scaled_normal", w) for w in WIDTHS]
    mup = [movement("mup", w) for w in WIDTHS]
    # Standard: Adam moves every weight by ~lr whatever the width, so wider layers move their
    # outputs more (here ~6x from 64 to 1024).
    assert sp[-1][0] > 3 * sp[0][0] and sp[-1][1] > 3 * sp[0][1], sp
    # μP: the same movement at every width, within 2x.
    for i in (0, 1):
        values = [m[i] for m in mup]
        assert max(values) < 2 * min(values), mup
    assert mup[0] == pytest.approx(sp[0], rel=1e-4)  # at the base width μP is the standard run


def test_mup_learning_rate_factors_scale_matrices_only():
    c = _config("mup", 256)
    factors = optimizer.mup_multipliers(c)
    assert factors[("embed",)] == 1.0 and factors[("final_norm", "scale")] == 1.0
    matrices = [f for path, f in factors.items() if path[-1] in ("q", "k", "v", "o", "readout")]
    assert matrices and all(f == 64 / 256 for f in matrices)
    state = jax.eval_shape(lambda: train_state.fresh(c))  # the grouped optimizer builds and counts
    assert optimizer.schedule_count(state["opt_state"]).shape == ()


def test_a_mup_run_away_from_its_base_width_compiles_sharded_and_equals_the_unsharded_step():
    """μP's per-width groups (optax.multi_transform) leave MaskedNodes in Adam's state, which the
    train state's shardings must carry: `heft train` with model.init=mup at width != mup_base_width."""
    from heft.train import compiled, sharding

    c = _config("mup", 128)  # base 64: two learning-rate groups
    c.mesh.data, c.mesh.fsdp = 2, -1
    c.train.batch_size = 8  # a row per device
    mesh = sharding.make_mesh(c)
    tokens = np.random.default_rng(1).integers(0, 256, (8, 17))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(16), (8, 1)),
             "segment_ids": np.ones((8, 16), np.int32), "weights": np.ones((8, 16), np.float32)}
    state = train_state.init(c, mesh)
    with sharding.activated(mesh, c):
        state, metrics = compiled.train_step(c, mesh)(state, jax.device_put(batch, sharding.batch_sharding(c, mesh)))
    reference = jax.jit(lambda s: step.train_step(c, s, jax.tree.map(jnp.asarray, batch)))(jax.jit(lambda: train_state.fresh(c))())
    np.testing.assert_allclose(float(metrics["loss"]), float(reference[1]["loss"]), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(reference[0]["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)  # Adam: ~1% of a step
