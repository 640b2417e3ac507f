"""Fine-tuning's pieces without training: trainable counts against closed forms, LoRA's fold against
NumPy, step 0 against the base, the model hooks against plain references, prompt/completion packing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heft.adapt import config as adapt_config
from heft.adapt import lora, trainable
from heft.configs import llama2_7b, tiny
from heft.data import pairs
from heft.data.errors import DataError
from heft.eval.generate import full_forward_generate, generate
from heft.model import build
from heft.model.checks import ConfigError


def _run(preset, method, **fields):
    c = preset.get_config()
    c.finetune.method = method
    c.finetune.update(fields)
    return adapt_config.run_config(c, c)


def _closed_form(m, f, method):
    """Trainable weights of each method, from the config's numbers alone."""
    D, L, H, K, F, V = m.width, m.depth, m.heads, m.kv_heads, m.mlp_width, m.vocab
    Dh = m.head_dim or D // H
    r = f.lora_rank
    if method == "lora":  # q, k, v, o: r * (d_in + d_out) per target per layer
        return L * r * ((D + H * Dh) + (D + K * Dh) + (D + K * Dh) + (H * Dh + D))
    if method == "adapter":  # two per block: down D x A + bias A, up A x D + bias D
        return L * 2 * (2 * D * f.adapter_width + f.adapter_width + D)
    if method == "prefix":  # keys and values per layer
        return L * 2 * f.prefix_length * K * Dh
    if method == "prompt":
        return f.prompt_length * D
    block = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F + 2 * D  # attention, swiglu MLP, two norms
    total = 2 * V * D + L * block + D  # untied embedding and readout, final norm
    if method == "full":
        return total
    assert method == "full_frozen"  # embeddings and norms frozen, and the first block
    return total - V * D - (L * 2 * D + D) - (block - 2 * D)


@pytest.mark.parametrize("preset", [tiny, llama2_7b], ids=["tiny", "llama2_7b"])
def test_trainable_counts_equal_the_closed_form_for_every_method(preset):
    for method in adapt_config.METHODS:
        run = _run(preset, method)
        assert trainable.count(trainable.abstract(run)) == _closed_form(run.model, run.finetune, method), method
    run = _run(preset, "full", freeze="embed|norm", freeze_layers=1)
    assert trainable.count(trainable.abstract(run)) == _closed_form(run.model, run.finetune, "full_frozen")
    if preset is llama2_7b:
        assert _closed_form(run.model, run.finetune, "full") == 6_738_415_616  # Llama 2 7B, as Meta counts it


def test_lora_fold_equals_the_low_rank_branch_computed_in_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 16, 4, 8)).astype(np.float32)  # [layers, embed, heads, head_dim], a q
    pair = {"a": rng.normal(size=(3, 16, 2)).astype(np.float32), "b": rng.normal(size=(3, 2, 4, 8)).astype(np.float32)}
    x = rng.normal(size=(5, 16))
    folded = np.asarray(lora.apply(("blocks", "attention", "q"), jnp.asarray(w), pair, 0.5))
    for layer in range(3):
        want = x @ w[layer].reshape(16, 32) + 0.5 * (x @ pair["a"][layer]) @ pair["b"][layer].reshape(2, 32)
        np.testing.assert_allclose(x @ folded[layer].reshape(16, 32), want, rtol=1e-5, atol=1e-5)


def test_lora_dropout_draws_one_mask_per_step_and_is_off_in_evaluation():
    run = _run(tiny, "lora", lora_dropout=0.5)  # alpha 16: with A and B all ones, A @ B adds alpha to W
    ones = lambda tree: jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), tree)
    base, weights = ones(build.abstract_params(run.model)), ones(trainable.abstract(run))
    q = lambda step: np.asarray(trainable.params(run, weights, base, step)["blocks"]["attention"]["q"])
    np.testing.assert_array_equal(q(None), 17.0)  # evaluation: 1 + 16, no dropout
    assert set(np.unique(q(3))) == {1.0, 33.0}  # an input row of A dropped adds 0, a kept one 16 / (1 - 0.5)
    np.testing.assert_array_equal(q(3), q(3))
    assert not np.array_equal(q(3), q(4))


def _small(method, **fields):
    c = tiny.get_config()
    c.model.update(vocab=256, width=64, depth=2, heads=4, kv_heads=2, mlp_width=128)
    c.finetune.method = method
    c.finetune.update(fields)
    return adapt_config.run_config(c, c)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_step_zero_logits_equal_the_base_exactly(method):
    run = _small(method, lora_targets="q|k|v|o|gate|up|down|readout")
    base_m = adapt_config.base_view(run).model
    base = build.init_params(base_m, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    want = jax.jit(lambda b: build.bind(base_m, b)(tokens))(base)
    got = jax.jit(lambda b: build.bind(run.model, trainable.params(run, trainable.init(run, b, 0), b))(tokens))(base)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_prompt_tuning_equals_prepending_the_prompt_to_the_sequence():
    """Reference: the plain model with p extra vocabulary rows holding the prompt, fed those ids first."""
    run = _small("prompt", prompt_length=3)
    run.model.document_mask = False
    params = build.init_params(run.model, 0)
    prompt = params.pop("prompt")
    plain = run.model.copy_and_resolve_references()
    plain.prompt_length, plain.vocab = 0, 256 + 3
    wide = dict(params, embed=jnp.concatenate([params["embed"], prompt]),
                readout=jnp.pad(params["readout"], ((0, 0), (0, 3))))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    with_prompt = build.bind(run.model, dict(params, prompt=prompt))(tokens)
    prepended = build.bind(plain, wide)(jnp.concatenate([jnp.broadcast_to(256 + jnp.arange(3), (2, 3)), tokens], 1))
    np.testing.assert_allclose(np.asarray(with_prompt), np.asarray(prepended[:, 3:, :256]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])  # the two that change attention
def test_decoding_with_the_kv_cache_matches_full_forwards(method):
    run = _small(method, prefix_length=4, prompt_length=4, adapter_width=8)
    params = build.init_params(run.model, 3)
    model = build.bind(run.model, params)
    prompts = [[3, 17, 45, 90], [3, 8]]
    assert generate(model, prompts, 6) == full_forward_generate(model, prompts, 6)


def test_bad_finetune_fields_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"finetune.method='qlora' is unknown; choose one of full, lora"):
        _run(tiny, "qlora")
    with pytest.raises(ConfigError, match=r"finetune.lora_targets='wq' matches no projection of this model; "
                                          r"choose among q, k, v, o, gate, up, down, readout"):
        trainable.abstract(_run(tiny, "lora", lora_targets="wq"))
    with pytest.raises(ConfigError, match=r"finetune.freeze='nothing' matches no parameter path"):
        trainable.abstract(_run(tiny, "full", freeze="nothing"))
    with pytest.raises(ConfigError, match=r"finetune.freeze_layers=4 freezes every one of the base's 4 blocks"):
        _run(tiny, "full", freeze_layers=4)


def test_a_base_that_is_not_a_checkpoint_is_one_line(tmp_path):
    from heft.adapt import finetune
    from heft.train.manifest import CheckpointError

    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path / 'nope'} does not exist; pass a workdir"):
        finetune.identify(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        finetune.identify(str(tmp_path / "empty"))


def test_pairs_put_the_loss_on_the_completion_and_its_end():
    inputs, targets, weights, cut = pairs.example([10, 11, 12], [20, 21], 16, start_id=3, eos_id=3)
    assert (inputs, targets, weights, cut) == ([3, 10, 11, 12, 20, 21], [10, 11, 12, 20, 21, 3],
                                               [0, 0, 0, 1, 1, 1], False)
    # Too long for a row of 4: the prompt's end stays next to the completion.
    assert pairs.example([10, 11, 12], [20, 21], 4, 3, 3) == ([3, 12, 20, 21], [12, 20, 21, 3], [0, 1, 1, 1], True)
    rows = pairs.pack([([3, 10, 20], [10, 20, 3], [0, 1, 1]), ([3, 11], [11, 3], [0, 1]),
                       ([3, 12, 13, 21], [12, 13, 21, 3], [0, 0, 1, 1])], seq_len=6)
    np.testing.assert_array_equal(rows["inputs"], [[3, 10, 20, 3, 11, 0], [3, 12, 13, 21, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(rows["weights"], [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])


def test_a_pair_without_its_completion_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2 has no 'completion' field"):
        pairs.read([str(path)], "prompt", "completion")


def test_the_embedded_task_holds_milton_lines():
    from heft.data import corpus

    [path] = corpus.resolve("embedded:milton_next_line")
    examples = pairs.read([path], "prompt", "completion")
    assert len(examples) > 5000
    prompt, completion = examples[0]
    assert prompt.count("\n") == 3 and "Disobedience" in prompt and "\n" not in completion
    with pytest.raises(DataError, match="names no embedded file; choose one of embedded:milton_next_line"):
        corpus.resolve("embedded:nope")
