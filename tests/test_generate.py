"""Generation: the KV-cache decode loop against full forward passes, sampling, eos, the verb."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import workers
from flax import nnx

from heft.configs import tiny
from heft.eval import sampling
from heft.eval.generate import full_forward_generate, generate
from heft.model.checks import ConfigError
from heft.model.decoder import Decoder

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], list(range(100, 120))]
N = 12  # new tokens; one value for every test, so that they share compiled loops


def _model(**fields):
    c = tiny.get_config()
    c.model.update(depth=2, **fields)
    return Decoder(c.model, nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return _model()  # tiny's kv_heads=2 of 4 heads: GQA


@pytest.mark.parametrize("fields", [{}, {"kv_heads": 4}, {"positions": "learned"}],
                         ids=["rope-gqa", "rope-mha", "learned"])
def test_greedy_with_cache_equals_argmax_of_full_forward_passes(fields):
    m = _model(**fields)
    assert generate(m, PROMPTS, N) == full_forward_generate(m, PROMPTS, N)


def test_a_prompt_continues_the_same_alone_or_in_a_batch(model):
    """Right-padding a short prompt next to a long one must not leak into its continuation."""
    batched = generate(model, PROMPTS, N)
    assert batched[:2] == [generate(model, [p], N)[0] for p in PROMPTS[:2]]


def test_same_seed_gives_same_samples_and_another_seed_other_samples(model):
    a = generate(model, PROMPTS, N, temperature=1.0, seed=1)
    assert a == generate(model, PROMPTS, N, temperature=1.0, seed=1)
    assert a != generate(model, PROMPTS, N, temperature=1.0, seed=2)


def test_top_k_1_and_tiny_top_p_sample_the_greedy_tokens(model):
    greedy = generate(model, PROMPTS, N)
    assert generate(model, PROMPTS, N, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, PROMPTS, N, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_tokens_after_eos_are_cut(model):
    full = generate(model, PROMPTS, N)
    eos = full[0][4]  # row 0's fifth token: row 0 must stop there, the others at their own first one
    want = [row[: row.index(eos) + 1] if eos in row else row for row in full]
    assert generate(model, PROMPTS, N, eos_id=eos) == want
    assert want[0][-1] == eos and len(want[0]) <= 5
    # Alone, the row is done at eos and the loop stops early; the result is the same.
    assert generate(model, PROMPTS[:1], N, eos_id=eos) == want[:1]


def test_sampled_frequencies_follow_the_tempered_top_k_distribution():
    """20,000 draws from one row of logits against softmax(logits / T) renormalized over the top k."""
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
    draws = sampling.sample(jnp.broadcast_to(logits, (20_000, 5)), jax.random.key(0),
                            jnp.float32(0.7), jnp.int32(3), jnp.float32(1.0))
    freq = np.bincount(np.asarray(draws), minlength=5) / 20_000
    want = np.exp(np.asarray(logits[:3]) / 0.7)
    want = np.concatenate([want / want.sum(), [0.0, 0.0]])
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_top_p_keeps_the_fewest_most_likely_tokens_reaching_p():
    probs = np.array([0.05, 0.5, 0.1, 0.3, 0.05])  # sorted: 0.5, 0.3, 0.1, 0.05, 0.05
    logits = jnp.log(jnp.array([probs]))
    for top_p, kept in [(0.5, {1}), (0.55, {1, 3}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (1.0, set(range(5)))]:
        out = np.asarray(sampling.filter_logits(logits, jnp.int32(0), jnp.float32(top_p)))[0]
        assert set(np.flatnonzero(np.isfinite(out))) == kept, top_p


def _numpy_filter(logits, top_k, top_p):
    """The textbook filter by sorting: the set of kept token ids per row."""
    kept = []
    for row in logits:
        order = np.argsort(-row, kind="stable")[: top_k or len(row)]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        kept.append(set(order[(before < top_p) | (top_p >= 1)].tolist()))
    return kept


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (40, 1.0), (40, 0.7), (1, 1.0), (0, 1e-6), (0, 1.0)])
def test_filter_keeps_what_sorting_keeps(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (4, 1000))) * 3
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
    assert [set(np.flatnonzero(np.isfinite(r)).tolist()) for r in out] == _numpy_filter(logits, top_k, top_p)


def test_learned_positions_past_max_len_are_refused_before_compiling():
    m = _model(positions="learned", max_len=32)
    with pytest.raises(ConfigError, match="model.max_len=32"):
        generate(m, PROMPTS, 20)


def test_generate_verb_continues_prompts_from_a_saved_checkpoint(tmp_path):
    from heft.data import tokenizer
    from heft.model.build import bind, init_params
    from heft.train import checkpoint

    text = "".join(f"The {w} dog ran over the {v} hill and back again.\n" for w in
                   ("red", "brown", "lazy", "quick", "old") for v in ("green", "far", "steep", "low"))
    spm_path = tmp_path / "tokenizer.model"
    spm_path.write_bytes(tokenizer.train([text] * 20, "bpe", 300))
    c = tiny.get_config()
    c.model.update(depth=2, vocab=512)  # larger than the tokenizer's 300: padded vocabularies happen
    checkpoint.save_params(str(tmp_path / "ckpt"), c, init_params(c.model, 0), str(spm_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=workers.xla_flags(1))
    result = subprocess.run(
        [sys.executable, "-c", "from heft.launch.cli import main; main()", "generate",
         f"--checkpoint={tmp_path / 'ckpt'}", "--prompt=The red dog", "--prompt=A",
         "--max_new_tokens=6", "--temperature=0"],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # The same continuation as generating here from the saved parameters, documents led by EOS.
    config, params, _ = checkpoint.load_params(str(tmp_path / "ckpt"))
    tok = tokenizer.load(str(spm_path))
    new = generate(bind(config.model, params), [[tok.eos_id] + tok.encode(t) for t in ("The red dog", "A")],
                   6, eos_id=tok.eos_id)
    texts = [tok.decode([t for t in row if t < tok.vocab_size and t != tok.eos_id]) for row in new]
    assert result.stdout.startswith(f"The red dog{texts[0]}\n")
    assert f"\nA{texts[1]}\n" in result.stdout
    assert f"{sum(map(len, new))} new tokens for 2 prompts" in result.stdout
