"""An encoder-decoder end to end, as decoders are: span-corruption pretraining that resumes bit for bit
from a checkpoint, its held-out loss, a LoRA fine-tune on input/target pairs whose targets lie in
both stacks, read back with its base, and generation from it."""

import json

import jax
import numpy as np
import pytest

from heft.adapt import finetune, load
from heft.configs import milton, t5_tiny
from heft.data import processes
from heft.eval import seq2seq
from heft.eval.heldout import evaluate
from heft.model.build import bind
from heft.train import checkpoint, loop

STEPS = 4


def _small(c, root):
    c.model.update(vocab=384, width=32, depth=1, encoder_depth=1, heads=2, kv_heads=2, mlp_width=64, remat="none")
    c.data.update(cache_dir=str(root / "cache"), workers=1, sentinels=64)
    c.train.update(batch_size=8, seq_len=64, compilation_cache=str(root / "compiled"), peak_flops=1e11)
    return c


def _losses(workdir):
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(root, workdir, config) of a tiny T5 pretrained 4 steps by span corruption, stopped and resumed at 2."""
    root = tmp_path_factory.mktemp("t5")
    rng = np.random.default_rng(0)
    words = ("of man's first disobedience and the fruit of that forbidden tree whose mortal taste brought death "
             "into the world and all our woe with loss of eden till one greater man restore us").split()
    docs = ["\n".join(" ".join(rng.choice(words, 9)) for _ in range(20)) for _ in range(40)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = _small(t5_tiny.get_config(), root)
    c.data.corpus = str(root / "corpus.jsonl")
    c.train.update(steps=STEPS, warmup_steps=1, log_every=1, eval_every=STEPS, eval_batches=2, checkpoint_every=2)
    assert loop.train(c, str(root / "split"), stop_requested=lambda step: step == 2)["stopped_at"] == 2
    resumed = loop.train(c, str(root / "split"))
    straight = loop.train(c, str(root / "straight"))
    assert resumed["eval_loss"] == straight["eval_loss"] and np.isfinite(straight["eval_loss"])
    return root, str(root / "straight"), c


def test_span_corruption_pretraining_resumes_bit_for_bit(pretrained):
    root, straight, _ = pretrained
    assert _losses(str(root / "split")) == _losses(straight)
    assert list(_losses(straight)) == list(range(1, STEPS + 1))


def test_heldout_loss_of_a_checkpoint_is_the_loops_last(pretrained):
    root, straight, c = pretrained
    config, params, tokenizer = checkpoint.load_params(straight)
    assert config.model.family == "encoder_decoder"
    prepared = processes.prepare_for_processes(config, tokenizer, progress=False)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    last = [json.loads(line) for line in open(f"{straight}/metrics.jsonl") if "eval_loss" in line][-1]
    assert evaluate(config, params, mesh, prepared, batches=2)["eval_loss"] == pytest.approx(last["eval_loss"],
                                                                                          rel=1e-5)


def test_lora_fine_tunes_both_stacks_on_pairs_and_generates(pretrained):
    root, straight, _ = pretrained
    c = _small(milton.get_config("lora"), root)
    c.train.update(steps=3, warmup_steps=1, log_every=1, eval_every=3, eval_batches=1, checkpoint_every=3,
                   target_len=32)
    c.finetune.lora_targets = "q|v"
    summary = finetune.finetune(c, straight, str(root / "lora"))
    assert np.isfinite(summary["eval_loss"])
    run, params, tokenizer = _whole(str(root / "lora"))
    saved = checkpoint.read_config(str(root / "lora"))
    assert saved.finetune.method == "lora" and run.model.family == "encoder_decoder"
    trained = load.trainable.names(run)
    stacks = {(p[0], p[2]) for p in trained}  # (stack, self- or cross-attention)
    assert stacks == {("encoder", "attention"), ("decoder", "attention"), ("decoder", "cross_attention")}
    assert summary["trainable_params"] == 2 * 3 * 8 * (32 + 32)  # q and v of 3 attentions: rank 8 x (in + out)
    out = seq2seq.generate(bind(run.model, params), [[5, 6, 7, 3]], 6)
    assert len(out) == 1 and 1 <= len(out[0]) <= 6


def _whole(directory):
    """(config, params, tokenizer) of a fine-tune read through the one loader (the base made whole)."""
    from heft.train import checkpoint

    loaded = checkpoint.load(directory)
    assert loaded.kind == load.KIND
    return loaded.config, loaded.params, loaded.tokenizer
