"""The train step: mesh-independent, accumulation-exact, decay-masked, and it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from heft.configs import tiny
from heft.train import compiled, sharding
from heft.train import state as train_state


def _config(**train):
    c = tiny.get_config()
    c.model.update(vocab=512, width=64, depth=2, heads=4, kv_heads=4, mlp_width=128)
    c.train.update(batch_size=8, seq_len=32, warmup_steps=2, steps=20, lr=1e-2, **train)
    return c


def _batches(c, n, seed=0):
    """n batches of a fixed, learnable sequence family (each row counts up from a random start)."""
    rng = np.random.default_rng(seed)
    B, T = c.train.batch_size, c.train.seq_len
    out = []
    for _ in range(n):
        start = rng.integers(0, c.model.vocab, (B, 1))
        seq = (start + np.arange(T + 1)) % c.model.vocab
        out.append({"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                    "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)})
    return out


def _run(c, mesh, batches):
    state = train_state.init(c, mesh)
    fn = compiled.train_step(c, mesh)
    losses = []
    with sharding.activated(mesh, c):
        for b in batches:
            state, m = fn(state, jax.device_put(b, sharding.batch_sharding(c, mesh)))
            losses.append(float(m["loss"]))
    return losses, state


@pytest.mark.slow
def test_same_losses_on_every_mesh_and_state_stays_sharded():
    batches = _batches(_config(), 5)
    c = _config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    reference, _ = _run(c, sharding.make_mesh(c, jax.devices()[:1]), batches)
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        c = _config()
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
        mesh = sharding.make_mesh(c)
        losses, state = _run(c, mesh, batches)
        np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(shape))
        want = train_state.shardings(c, mesh)
        for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
            assert got.sharding.is_equivalent_to(expected, got.ndim), shape


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight():
    c = _config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    batch = _batches(c, 1)[0]
    _, one = _run(c, mesh, [batch])
    c.train.micro_batches = 4
    _, four = _run(c, mesh, [batch])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one["params"], four["params"])


def test_weight_decay_changes_only_what_its_mask_selects():
    """With a zero gradient (all weights 0), only decay moves parameters: exactly the masked ones."""
    c = _config(weight_decay=0.5, grad_clip=0.0)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    batch = dict(_batches(c, 1)[0], weights=np.zeros((8, 32), np.float32))
    before = jax.device_get(train_state.init(c, mesh)["params"])
    c.train.warmup_steps = 0
    _, after = _run(c, mesh, [batch])
    changed = traverse_util.flatten_dict(jax.tree.map(lambda a, b: bool((a != b).any()), before,
                                                      jax.device_get(after["params"])))
    for path, moved in changed.items():
        matrix = path[-1] in ("q", "k", "v", "o", "up", "gate", "down", "readout")
        assert moved == matrix, path


def test_loss_falls_over_twenty_steps():
    c = _config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    batch = _batches(c, 1)[0]
    losses, _ = _run(c, sharding.make_mesh(c, jax.devices()[:1]), [batch] * 20)
    assert losses[-1] < 0.5 * losses[0], losses


def test_bfloat16_compute_trains_and_tracks_float32():
    batches = _batches(_config(), 20)
    results = {}
    for dtype in ("float32", "bfloat16"):
        c = _config()
        c.model.compute_dtype = dtype
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
        results[dtype], state = _run(c, sharding.make_mesh(c, jax.devices()[:1]), batches)
        assert jax.tree.leaves(state["params"])[0].dtype == jnp.float32  # fp32 master weights
    f32, bf16 = np.array(results["float32"]), np.array(results["bfloat16"])
    assert bf16[-1] < 0.7 * bf16[0]
    np.testing.assert_allclose(bf16, f32, rtol=0.05)


def test_a_non_finite_step_keeps_weights_and_moments_and_moves_step_and_schedule_on():
    """Step 1's loss is NaN: nothing changes but the step and the schedule. Step 2's gradient is
    zero (all weights 0), so only weight decay moves a matrix, by lr * weight_decay * w: the change
    gives the lr optax applied, which must be the logged one (lr / 2, the schedule at step 1)."""
    import optax

    from heft.train import optimizer

    c = _config()  # warmup over 2 steps: schedule(0) = 0, schedule(1) = lr / 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    batch = _batches(c, 1)[0]
    nan, zero = (dict(batch, weights=np.full((8, 32), v, np.float32)) for v in (np.nan, 0.0))
    state = train_state.init(c, mesh)
    before = jax.device_get(state["params"])
    fn = compiled.train_step(c, mesh)
    with sharding.activated(mesh, c):
        state, skipped = fn(state, jax.device_put(nan, sharding.batch_sharding(c, mesh)))
        assert not bool(skipped["finite"]) and int(state["step"]) == 1
        jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state["params"]))
        state, applied = fn(state, jax.device_put(zero, sharding.batch_sharding(c, mesh)))
    after = jax.device_get(state["params"])
    assert bool(applied["finite"])
    lr = (before["readout"] - after["readout"]) / (c.train.weight_decay * before["readout"])
    np.testing.assert_allclose(lr, float(applied["lr"]), rtol=1e-3)
    assert float(applied["lr"]) == pytest.approx(c.train.lr / 2)
    # The schedule stands at the step; Adam's moments (and their count) saw the one finite step only.
    assert int(optimizer.schedule_count(state["opt_state"])) == int(state["step"]) == 2
    adam = optax.tree.get(state["opt_state"], "count", filtering=lambda p, _: p[-1].tuple_name == "ScaleByAdamState")
    assert int(adam) == 1
