"""The mixture of experts (model/moe.py) against NumPy: routing, both dispatches, the router losses;
its training loss; its config errors. Sharded runs are in test_moe_sharding.py."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from heft.configs import tiny_moe
from heft.model import moe
from heft.model.checks import ConfigError
from heft.model.decoder import Decoder
from heft.train import state as train_state
from heft.train import step


def _m(**fields):
    c = tiny_moe.get_config()
    c.model.moe.update(fields)
    return c.model


def _silu(x):
    return x / (1 + np.exp(-x))


def _np_route(logits, k):
    """Softmax, the k most probable experts (best first), their probabilities over their sum."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(p, ids, -1)
    return top / top.sum(-1, keepdims=True), ids


def _np_expert(x, w, e):
    """Expert e's SwiGLU MLP on every row of x [n, embed]."""
    return (_silu(x @ w["gate"][e]) * (x @ w["up"][e])) @ w["down"][e]


def _np_reference(x, ids, weights, w, kept=None):
    """A dense loop over experts: each expert on every token, kept where the token chose it."""
    B, T, D = x.shape
    rows, ids, weights = x.reshape(-1, D), ids.reshape(B * T, -1), weights.reshape(B * T, -1)
    kept = np.ones(ids.shape, bool) if kept is None else kept.reshape(B * T, -1)
    out = np.zeros_like(rows)
    for e in range(w["up"].shape[0]):
        share = (((ids == e) & kept) * weights).sum(-1)  # the token's weight for e, 0 if not chosen or dropped
        out += share[:, None] * _np_expert(rows, w, e)
    return out.reshape(B, T, D)


def _random_case(m, B=2, T=16, seed=0):
    r = np.random.default_rng(seed)
    E, D, F = m.moe.experts, m.width, m.moe.expert_width
    x = r.normal(size=(B, T, D)).astype(np.float32)
    w = {"gate": r.normal(size=(E, D, F)) / math.sqrt(D), "up": r.normal(size=(E, D, F)) / math.sqrt(D),
         "down": r.normal(size=(E, F, D)) / math.sqrt(F)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    logits = r.normal(size=(B, T, E)).astype(np.float32) * 2
    return x, w, logits


def test_router_chooses_the_top_k_experts_with_renormalised_weights_as_numpy_does():
    logits = np.random.default_rng(1).normal(size=(3, 7, 8)).astype(np.float32) * 3
    for k in (1, 2, 3):
        weights, ids = moe.route(jnp.asarray(logits), k)
        want_weights, want_ids = _np_route(logits, k)
        np.testing.assert_array_equal(np.asarray(ids), want_ids)
        np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_dropless_output_equals_a_dense_loop_over_experts():
    m = _m(capacity_factor=0.0)
    x, w, logits = _random_case(m)
    weights, ids = _np_route(logits, m.moe.top_k)
    got = moe.experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), jax.tree.map(jnp.asarray, w), m)
    np.testing.assert_allclose(np.asarray(got), _np_reference(x, ids, weights, w), atol=2e-5, rtol=1e-5)


def test_a_slice_of_the_experts_adds_only_their_share():
    """Expert parallelism's unit: experts 2..5 held here add exactly what the loop over them adds, and
    with the other experts' share the whole."""
    for capacity_factor in (0.0, 1.25):
        m = _m(capacity_factor=capacity_factor)
        x, w, logits = _random_case(m, seed=3)
        weights, ids = _np_route(logits, m.moe.top_k)

        def run(ids, held, first):
            return np.asarray(moe.experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
                                          jax.tree.map(jnp.asarray, held), m, first))

        middle = run(ids, {k: v[2:6] for k, v in w.items()}, 2)
        # The rest (0, 1, 6, 7) as one slice: renumber 6, 7 to 2, 3 and hide 2..5.
        rest = run(np.where(ids >= 6, ids - 4, np.where(ids < 2, ids, 99)),
                   {k: np.concatenate([v[:2], v[6:]]) for k, v in w.items()}, 0)
        if capacity_factor == 0.0:
            inside = (ids >= 2) & (ids < 6)
            np.testing.assert_allclose(middle, _np_reference(x, ids, weights, w, inside), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(middle + rest, run(ids, w, 0), atol=2e-5, rtol=1e-5)


def _np_kept(ids, experts, capacity):
    """Capacity routing's rule, per sequence: choices in token order (a token's in rank order), each
    expert keeping its first `capacity`."""
    kept = np.zeros(ids.shape, bool)
    for b in range(ids.shape[0]):
        taken = np.zeros(experts, int)
        for t in range(ids.shape[1]):
            for j in range(ids.shape[2]):
                e = ids[b, t, j]
                kept[b, t, j] = taken[e] < capacity
                taken[e] += 1
    return kept


def test_capacity_routing_drops_exactly_the_overflow_tokens():
    m = _m(capacity_factor=0.5)  # C = ceil(0.5 * 8 * 2 / 8) = 1 slot per expert per sequence
    assert moe.capacity(m, 8) == 1
    x, w, _ = _random_case(m, B=1, T=8, seed=4)
    # Hand-built: every token's first choice is expert 0, second choices spread over 1..7 with two on 3.
    ids = np.array([[[0, 1], [0, 2], [0, 3], [0, 3], [0, 4], [0, 5], [0, 6], [0, 7]]])
    weights = np.full((1, 8, 2), 0.5, np.float32)
    kept = _np_kept(ids, 8, 1)
    assert kept[0, :, 0].tolist() == [True] + [False] * 7  # only token 0 reaches expert 0
    assert kept[0, 3, 1] == False and kept[0, 2, 1]  # noqa: E712  (expert 3: token 2 first)
    got = moe.experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), jax.tree.map(jnp.asarray, w), m)
    np.testing.assert_allclose(np.asarray(got), _np_reference(x, ids, weights, w, kept), atol=2e-5, rtol=1e-5)
    # Random routing at the preset's 1.25: the same rule.
    m = _m(capacity_factor=1.25)
    x, w, logits = _random_case(m, seed=5)
    weights, ids = _np_route(logits, 2)
    kept = _np_kept(ids, 8, moe.capacity(m, x.shape[1]))
    assert 0 < (~kept).sum() < kept.size  # some dropped, not all
    got = moe.experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), jax.tree.map(jnp.asarray, w), m)
    np.testing.assert_allclose(np.asarray(got), _np_reference(x, ids, weights, w, kept), atol=2e-5, rtol=1e-5)


def test_balance_loss_equals_its_formula_on_a_hand_built_routing():
    # 4 tokens, 4 experts, top-2. Probabilities chosen by hand (logits = their logs).
    p = np.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.3, 0.1]],
                 np.float32)
    logits = jnp.log(jnp.asarray(p))
    weights, ids = moe.route(logits, 2)
    assert np.asarray(ids).tolist() == [[0, 1], [0, 1], [3, 2], [0, 2]]
    f = np.array([3, 2, 2, 1]) / 4  # the share of tokens that chose each expert
    P = p.mean(0)
    assert float(moe.balance_loss(logits, ids)) == pytest.approx(4 * (f * P).sum(), rel=1e-6)
    # Perfectly balanced routing scores top_k; z-loss is the mean squared logsumexp.
    uniform = jnp.zeros((8, 4))
    assert float(moe.balance_loss(uniform, moe.route(uniform, 2)[1])) == pytest.approx(2.0)
    assert float(moe.z_loss(logits)) == pytest.approx(0.0, abs=1e-6)  # log-probabilities: logsumexp 0
    assert float(moe.z_loss(logits + 2.0)) == pytest.approx(4.0, rel=1e-5)


def _batch(c, B=8, T=32, seed=0):
    seq = np.random.default_rng(seed).integers(0, c.model.vocab, (B, T + 1)).astype(np.int32)
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "positions": np.broadcast_to(np.arange(T), (B, T)).astype(np.int32),
            "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}


def test_router_losses_join_the_training_objective_with_their_weights():
    c = tiny_moe.get_config()
    c.model.update(depth=1)
    params = nnx.to_pure_dict(nnx.state(Decoder(c.model, nnx.Rngs(0)), nnx.Param))
    batch = _batch(c, B=2, T=16)
    lm, count = jax.jit(lambda p, b: step.loss_sums(c, p, b))(params, batch)
    total, (count2, logged) = jax.jit(lambda p, b: step.training_sums(c, p, b))(params, batch)
    assert float(count2) == float(count) and float(logged["loss"]) == pytest.approx(float(lm), rel=1e-6)
    bal, z = float(logged["balance_loss"]) / float(count), float(logged["z_loss"]) / float(count)
    assert 1.0 <= bal <= c.model.moe.experts and z > 0
    want = float(lm) + float(count) * (c.model.moe.balance_loss_weight * bal + c.model.moe.z_loss_weight * z)
    assert float(total) == pytest.approx(want, rel=1e-6)


def test_loss_falls_on_the_tiny_moe_and_the_router_losses_are_logged():
    c = tiny_moe.get_config()
    c.model.update(depth=1, remat="none")
    c.train.update(warmup_steps=2, steps=30, lr=1e-2)
    state = train_state.fresh(c)
    batch = jax.tree.map(jnp.asarray, _batch(c, B=2, T=32))
    train = jax.jit(lambda s, b: step.train_step(c, s, b))
    losses = []
    for _ in range(25):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert {"loss", "balance_loss", "z_loss"} <= set(metrics)
    assert losses[-1] < 0.5 * losses[0], losses
    assert 1.0 <= float(metrics["balance_loss"]) <= 8.0


@pytest.mark.parametrize("fields,message", [
    ({"top_k": 9}, r"model.moe.top_k=9 exceeds model.moe.experts=8"),
    ({"capacity_factor": -1.0}, r"model.moe.capacity_factor=-1.0 must be >= 0"),
    ({"experts": 0}, r"model.moe.experts=0 must be a positive integer"),
    ({"expert_width": 0}, r"model.moe.expert_width=0 must be a positive integer, or None"),
])
def test_bad_moe_fields_are_named_in_one_line(fields, message):
    m = _m(**fields)
    with pytest.raises(ConfigError, match=message):
        Decoder(m, nnx.Rngs(0))


def test_an_expert_axis_that_does_not_divide_the_experts_is_named_with_a_fix():
    from heft.train import checks, sharding

    c = tiny_moe.get_config()
    c.model.moe.experts = 6
    c.mesh.data, c.mesh.expert = -1, 4
    with pytest.raises(ConfigError, match=r"model.moe.experts=6 is not divisible by the 4 devices of the expert axis "
                                          r"\(mesh.expert=4\); pick a mesh.expert that divides 6"):
        checks.check(c, sharding.make_mesh(c))


def test_mixtral_8x7b_has_its_published_count_and_flops_count_active_parameters():
    from heft.configs import mixtral_8x7b
    from heft.train import size

    c = mixtral_8x7b.get_config()
    r = size.report(c, batch=1, seq_len=4096)
    assert r["total_params"] == 46_702_792_704  # transformers' MixtralForCausalLM (docs: FACTS.md)
    # Active: everything but 6 of each layer's 8 experts (3 matrices of 4096 x 14336 each).
    assert r["active_params"] == 46_702_792_704 - 32 * 6 * 3 * 4096 * 14336 == 12_879_925_248
    assert r["flops_per_token"] == 6 * (r["active_params"] - 32000 * 4096) + 12 * 32 * 4096 * 4096
    table = size.table(r)
    assert "46,702,792,704 parameters" in table and "active per token  12,879,925,248" in table


def test_resume_refuses_a_changed_mixture_of_experts_and_allows_a_changed_dispatch(tmp_path):
    from heft.train import checkpoint

    saved = tiny_moe.get_config()
    resume = checkpoint.Resume(10, tmp_path, {"config": json.loads(checkpoint.config_to_json(saved))})

    def check(**fields):
        c = tiny_moe.get_config()
        c.model.update({k: v for k, v in fields.items() if k == "mlp"})
        c.model.moe.update({k: v for k, v in fields.items() if k != "mlp"})
        return checkpoint.Checkpointer(str(tmp_path), c).check_config(resume)

    for field, value in (("experts", 4), ("top_k", 1), ("expert_width", 96), ("mlp", "dense")):
        name = "model.mlp" if field == "mlp" else f"model.moe.{field}"
        with pytest.raises(checkpoint.CheckpointError, match=rf"the model differs from the checkpoint's .*{name}="):
            check(**{field: value})
    # How the experts run, and the router losses' weights, may change on resume.
    notes = check(capacity_factor=0.0, balance_loss_weight=0.1)
    assert any(n.startswith("model.moe.capacity_factor:") for n in notes)


def test_a_dense_checkpoint_saved_before_the_moe_fields_resumes_as_dense(tmp_path):
    from heft.configs import tiny
    from heft.train import checkpoint

    old = json.loads(checkpoint.config_to_json(tiny.get_config()))
    del old["model"]["mlp"], old["model"]["moe"], old["mesh"]["expert"]
    resume = checkpoint.Resume(10, tmp_path, {"config": old})
    notes = checkpoint.Checkpointer(str(tmp_path), tiny.get_config()).check_config(resume)  # no error
    moe_field = tiny.get_config()
    moe_field.model.mlp = "moe"
    with pytest.raises(checkpoint.CheckpointError, match=r"model.mlp='dense' in the checkpoint but 'moe' now"):
        checkpoint.Checkpointer(str(tmp_path), moe_field).check_config(resume)
    assert not any(n.startswith("model.mlp") for n in notes)


def test_quantizing_or_lora_on_the_experts_is_refused_in_one_line():
    from heft.adapt import lora
    from heft.model.build import abstract_params
    from heft.quantize import rules

    c = tiny_moe.get_config()
    c.quantize.weights = "int8"
    with pytest.raises(ConfigError, match=r"^quantize.weights=int8 with model.mlp=moe: .*set quantize.weights=none$"):
        rules.check(c)
    paths = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params(c.model))[0]]
    paths = [tuple(getattr(k, "key", k) for k in p) for p in paths]
    c.finetune.lora_targets = "q|v"
    assert {p[-1] for p in lora.targets(c.finetune, paths)} == {"q", "v"}  # the attention: as for a dense model
    c.finetune.lora_targets = "q|up"
    with pytest.raises(ConfigError, match=r"lora_targets='q\|up' takes a mixture of experts' expert weights "
                                          r"\(blocks.moe.up\), which LoRA does not adapt"):
        lora.targets(c.finetune, paths)


@pytest.mark.slow  # ~25-40 s here: a fine-tune step compiled
def test_a_moe_base_fine_tunes_with_lora_on_the_attention():
    """LoRA on q and v of a mixture of experts: step 0 is the base exactly, and the loss falls.
    (Adapters sit after the block's MLP or MoE alike: model/decoder.py's Block.)"""
    method = "lora"
    from heft.adapt import config as adapt_config
    from heft.adapt import finetune, trainable
    from heft.model import build

    c = tiny_moe.get_config()
    c.model.update(depth=1, remat="none")
    c.finetune.update(method=method, lora_targets="q|v")
    c.train.update(warmup_steps=1, steps=20, lr=1e-2)
    run = adapt_config.run_config(c, c)
    base_m = adapt_config.base_view(run).model
    base = build.init_params(base_m, 0)
    batch = jax.tree.map(jnp.asarray, _batch(c, B=2, T=16))
    state = finetune.init_state(run, base)
    step0 = build.bind(run.model, trainable.params(run, state["params"], base))(batch["inputs"])
    np.testing.assert_array_equal(np.asarray(step0), np.asarray(build.bind(base_m, base)(batch["inputs"])))
    train = jax.jit(lambda s, b: finetune.train_step(run, s, base, b))
    losses = []
    for _ in range(6):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(b < a for a, b in zip(losses[1:], losses[2:])) and losses[-1] < losses[0] - 0.05, losses


def test_plan_search_keeps_the_expert_axis_and_splits_the_rest():
    from heft.configs import mixtral_8x7b
    from heft.launch import search

    c = mixtral_8x7b.get_config()  # mesh.expert = 8
    c.model.moe.expert_width = 7168  # tensor splits each expert's width, not mlp_width
    layouts = search.layouts(c, 128)
    assert layouts and all(d * f * t == 128 // 8 for d, f, t in layouts)
    assert {t for _, _, t in layouts} == {1, 2, 4, 8}
    c.model.moe.expert_width = 7169  # odd: no tensor split divides it
    assert {t for _, _, t in search.layouts(c, 128)} == {1}
