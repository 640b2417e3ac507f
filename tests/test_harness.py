"""lm-evaluation-harness on heft checkpoints: heft's own task runs offline end to end and a trained
model beats chance; the LM's rolling log-likelihood is heft's held-out loss on the same text."""

import json
import os
import subprocess
import sys

import pytest
import workers

lm_eval = pytest.importorskip("lm_eval")

SEQ = 32  # the held-out rows, and the harness's windows, in the agreement test
SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def _heft(*args, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=workers.xla_flags(1), **(env or {}))
    return subprocess.run([sys.executable, "-c", "from heft.launch.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for 150 steps on the embedded corpus (~30 s): (workdir, cache dir)."""
    root = tmp_path_factory.mktemp("harness")
    fields = {"data.cache_dir": root / "cache", "model.vocab": 512, "model.width": 64, "model.depth": 2,
              "model.mlp_width": 192, "model.max_len": 128, "train.seq_len": 64, "train.steps": 150,
              "train.warmup_steps": 10, "train.eval_every": 1000, "train.checkpoint_every": 1000,
              "train.log_every": 50}
    r = _heft("train", "--config=configs/tiny.py", f"--workdir={root / 'run'}",
              *[f"--config.{k}={v}" for k, v in fields.items()])
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", root / "cache"


def test_cloze_task_runs_offline_and_a_trained_model_beats_chance(trained, tmp_path):
    workdir, _ = trained
    r = _heft("eval", f"--checkpoint={workdir}", "--tasks=heft_shakespeare_cloze", "--limit=80",
              env={"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((workdir / "eval" / "150.json").read_text())
    row = results["tasks"]["heft_shakespeare_cloze"]
    assert row["samples"] == 80
    assert row["acc"] > 0.25 + 3 * row["acc_stderr"], row  # chance is one in four
    assert f"heft_shakespeare_cloze       acc          {row['acc']:.4f}" in r.stdout


def test_an_unknown_task_is_refused_in_one_line_naming_it(trained):
    workdir, _ = trained
    r = _heft("eval", f"--checkpoint={workdir}", "--tasks=heft_no_such_task", env={"HF_HOME": str(workdir / "hf")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("heft eval: --tasks names heft_no_such_task, which lm-eval does not know;"), last
    assert "heft_shakespeare_cloze" in last


def test_rolling_loglikelihood_is_the_heldout_loss_of_the_same_text(trained, tmp_path):
    from lm_eval.api.instance import Instance

    from heft.data import prepare, tokenizer
    from heft.eval import harness, heldout
    from heft.train import checkpoint

    workdir, cache = trained
    config, params, tokenizer_path = checkpoint.load_params(str(workdir))
    tok = tokenizer.load(tokenizer_path)
    # One held-out document whose tokens fill whole rows: then held-out rows and harness windows
    # hold the same tokens at the same positions, and the held-out split's one extra target (the
    # EOS closing the document) is a row of its own, scored here as a continuation.
    text = SONNET
    while len(tok.encode(text)) % SEQ:
        text = text[:-1]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("A first document, for training.\n")
    (corpus / "b.txt").write_text(text)
    config.data.update(corpus=str(corpus), cache_dir=str(cache), heldout_fraction=0.5, workers=1)
    config.train.update(seq_len=SEQ, batch_size=8)
    prepared = prepare.prepare(config, progress=False, tokenizer_path=tokenizer_path)
    mesh = checkpoint.serving_mesh(config)
    result = heldout.evaluate(config, params, mesh, prepared)
    ids = tok.encode(text)
    assert result["tokens"] == len(ids) + 1

    lm = harness.HeftLM(config, params, tok, mesh, batch_size=8, max_length=SEQ)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    (closing, _), = lm.score_tokens([([ids[-1]], [tok.eos_id])])
    assert -(rolling + closing) == pytest.approx(result["eval_loss"] * result["tokens"], rel=1e-5)
    # loglikelihood of a context and its continuation is the same scorer's sum.
    split = len(text) // 2
    (pair, _), = lm.loglikelihood([Instance("loglikelihood", {}, (text[:split], text[split:]), 0)])
    context, continuation = lm._encode_pair(text[:split], text[split:])
    assert pair == pytest.approx(lm.score_tokens([(context, continuation)])[0][0], rel=1e-6)


def test_generate_until_is_the_greedy_continuation_cut_at_the_first_stop_string(trained):
    from lm_eval.api.instance import Instance

    from heft.data import tokenizer
    from heft.eval import harness
    from heft.eval.generate import generate
    from heft.model.build import bind
    from heft.train import checkpoint, sharding

    workdir, _ = trained
    config, params, tokenizer_path = checkpoint.load_params(str(workdir))
    tok = tokenizer.load(tokenizer_path)
    mesh = checkpoint.serving_mesh(config)
    lm = harness.HeftLM(config, params, tok, mesh, batch_size=4)
    contexts = ["KING.\nWhat say you", "HAMLET.\nTo be, or not"]
    got = lm.generate_until([Instance("generate_until", {}, (c, {"until": [" "], "max_gen_toks": 12}), i)
                             for i, c in enumerate(contexts)])
    with sharding.activated(mesh, config):
        rows = generate(bind(config.model, params), [[tok.eos_id] + tok.encode(c) for c in contexts], 12,
                        eos_id=tok.eos_id)
    for text, row in zip(got, rows):
        full = tok.decode([t for t in row if t != tok.eos_id])
        assert text == (full[: full.index(" ")] if " " in full else full)


def test_results_are_written_beside_a_gs_checkpoint_and_kept_across_runs(gcs):
    from heft.eval import harness
    from heft.train import storage

    ckpt = f"{gcs}/llama-int4"
    assert str(harness.results_path(ckpt)) == f"{gcs}/llama-int4.eval.json"
    harness.write_results(ckpt, {"a": {"acc": 0.5}})
    harness.write_results(ckpt, {"b": {"acc": 0.75}}, weights="int4, groups of 32")
    saved = storage.read_json(harness.results_path(ckpt))
    assert saved["tasks"] == {"a": {"acc": 0.5}, "b": {"acc": 0.75}} and saved["weights"] == "int4, groups of 32"
    assert str(harness.results_path("runs/tiny/checkpoints/600")).endswith("runs/tiny/eval/600.json")
