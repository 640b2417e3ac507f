"""Fine-tuning end to end, on a small base trained here for a few dozen steps: every method lowers the
embedded task's held-out loss and leaves the base as it was; a fine-tune checkpoint holds only what
was trained, refuses another base, resumes bit for bit, merges, and reads back in heft eval."""

import concurrent.futures
import json
import lzma
import os
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from heft.adapt import config as adapt_config
from heft.adapt import finetune, load, trainable
from heft.configs import milton, tiny
from heft.convert.checkpoints import run_export
from heft.data import corpus, processes
from heft.eval.heldout import evaluate
from heft.model import build
from heft.train import checkpoint, loop, manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"full": 40, "lora": 60, "adapter": 60, "prefix": 80, "prompt": 80}
HELDOUT_BATCHES = 8  # of 16 rows, the same ones in the loop's last evaluation and in the base's


def _small(config, root):
    config.model.update(vocab=512, width=64, depth=2, heads=4, kv_heads=2, mlp_width=128)
    config.data.update(cache_dir=str(root / "cache"), workers=1)
    config.train.update(batch_size=16, seq_len=128, log_every=10, eval_batches=HELDOUT_BATCHES, peak_flops=1e11)
    return config


def _config(root, method):
    c = _small(milton.get_config(method), root)
    c.train.update(steps=STEPS[method], warmup_steps=10, eval_every=STEPS[method], checkpoint_every=STEPS[method])
    return c


def _task_loss(run, params, tokenizer, batches=0) -> float:
    """Held-out loss of `params` on `run`'s data, as heft eval computes it (batches=0: all of it)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    prepared = processes.prepare_for_processes(run, tokenizer, progress=False)
    return evaluate(run, params, mesh, prepared, batches)["eval_loss"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(root, base workdir, its parameters, its task loss): a base trained 40 steps on a fifth of the
    embedded corpus, Milton's books among it."""
    root = tmp_path_factory.mktemp("finetune")
    with lzma.open(corpus.embedded_path(), "rt") as f:
        docs = [json.loads(line) for line in f]
    keep = [d for d in docs if d["author"] == "Milton"][:4] + [d for d in docs if d["author"] != "Milton"][:36]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in keep))
    c = _small(tiny.get_config(), root)
    c.data.corpus = str(root / "corpus.jsonl")
    c.train.update(steps=40, warmup_steps=5, eval_every=1000, checkpoint_every=1000)
    base_dir = str(root / "base")
    loop.train(c, base_dir)
    _, params, tokenizer = checkpoint.load_params(base_dir)
    run = adapt_config.run_config(_config(root, "lora"), checkpoint.read_config(base_dir))
    before = _task_loss(adapt_config.base_view(run), params, tokenizer, HELDOUT_BATCHES)
    return root, base_dir, jax.device_get(params), before


def _finetuned(base, method) -> tuple[str, dict]:
    root, base_dir, _, _ = base
    workdir = str(root / method)
    summary = {} if os.path.exists(workdir) else finetune.finetune(_config(root, method), base_dir, workdir)
    return workdir, summary


@pytest.mark.parametrize("method", list(STEPS))
def test_each_method_lowers_the_task_loss_and_leaves_the_base_bit_equal(base, method):
    _, base_dir, base_params, before = base
    workdir, summary = _finetuned(base, method)
    assert summary["eval_loss"] < before - 0.05, (method, before, summary["eval_loss"])
    jax.tree.map(np.testing.assert_array_equal, base_params, jax.device_get(checkpoint.load_params(base_dir)[1]))
    # The checkpoint holds the trained weights and Adam's two moments of them, nothing of the base.
    step_dir = os.path.join(workdir, "checkpoints", str(STEPS[method]))
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata
    sizes = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved[k])) for k in ("params", "opt_state")}
    run = checkpoint.read_config(workdir)
    trained = trainable.count(trainable.abstract(run))
    assert summary["trainable_params"] == sizes["params"] == trained
    assert 2 * trained <= sizes["opt_state"] <= 2 * trained + 8  # mu, nu and a few scalar counts
    facts = json.load(open(os.path.join(step_dir, "manifest.json")))["finetune"]
    assert facts["method"] == method and facts["base"]["path"] == os.path.join(base_dir, "checkpoints", "40")


def test_merged_lora_equals_the_unmerged_fine_tune_and_exports_as_a_plain_model(base):
    root = base[0]
    workdir, _ = _finetuned(base, "lora")
    out = str(root / "merged")
    load.merge(workdir, out)
    run, unmerged, _ = _whole(workdir)
    config, merged, tokenizer = checkpoint.load_params(out)  # a plain model: no LoRA, no base lookup
    assert tokenizer is not None and build.abstract_params(config.model).keys() == merged.keys()
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 512)
    np.testing.assert_allclose(np.asarray(build.bind(config.model, merged)(tokens)),
                               np.asarray(build.bind(run.model, unmerged)(tokens)), rtol=1e-5, atol=1e-5)
    files = run_export(out, str(root / "merged_hf"))  # a plain model exports to Hugging Face as any other
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)


def _heft(*args):
    return subprocess.run(["heft", *args], capture_output=True, text=True)


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_cli_resumes_bit_for_bit_refuses_another_base_then_evaluates_and_generates(base):
    root, base_dir, _, _ = base
    straight, _ = _finetuned(base, "adapter")  # the run the CLI's interrupted one must equal
    preset = os.path.join(ROOT, "configs", "milton.py") + ":adapter"
    steps = STEPS["adapter"]
    args = [f"--config={preset}", f"--config.data.cache_dir={root / 'cache'}", "--config.data.workers=1",
            f"--config.train.steps={steps}", "--config.train.warmup_steps=10", "--config.train.log_every=10",
            f"--config.train.checkpoint_every={steps}", f"--config.train.eval_every={steps}",
            f"--config.train.eval_batches={HELDOUT_BATCHES}", "--config.train.peak_flops=1e11"]
    split = str(root / "split")
    r = _heft("finetune", f"--base={base_dir}", f"--workdir={split}", *args, "--stop_after=25")
    assert r.returncode == 0 and "stopped at step 25" in r.stdout, r.stderr[-3000:]
    r = _heft("finetune", f"--base={base_dir}", f"--workdir={split}", *args)
    assert r.returncode == 0 and "done: adapter fine-tune of" in r.stdout, r.stderr[-3000:]
    assert _losses(split) == _losses(straight)

    other = str(root / "other_base")  # the same weights, exported: another checkpoint, another digest
    checkpoint.export_params(base_dir, other)
    # The three commands below only read the fine-tune: they run at once, their start-ups overlapping.
    with concurrent.futures.ThreadPoolExecutor() as pool:
        refused = pool.submit(_heft, "finetune", f"--base={other}", f"--workdir={split}", *args,
                              f"--config.train.steps={2 * steps}")
        evaluated = pool.submit(_heft, "eval", f"--checkpoint={split}", "--json")
        generated = pool.submit(_heft, "generate", f"--checkpoint={split}", "--prompt=Of Mans First Disobedience\n",
                                "--max_new_tokens=8", "--temperature=0")
    r = refused.result()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"heft finetune: {split} (step {steps}) was fine-tuned from {base_dir}"), line
    assert line.endswith(f"not from {other} (manifest {manifest.digest(manifest.read(other))[:12]}); pass its base, "
                         "or fine-tune in a new --workdir"), line

    r = evaluated.result()
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.loads(r.stdout.strip().splitlines()[-1])
    run, params, tokenizer = _whole(straight)
    np.testing.assert_allclose(evaluated["eval_loss"], _task_loss(run, params, tokenizer), rtol=1e-5)
    r = generated.result()
    assert r.returncode == 0 and "heft generate: " in r.stdout, r.stderr[-3000:]


def test_a_llama_imported_from_hugging_face_fine_tunes_as_a_heft_checkpoint_does(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from heft.convert.checkpoints import run_import
    from heft.data import pairs, tokenizer

    hf = tmp_path / "hf"
    [task] = corpus.resolve("embedded:milton_next_line")
    texts = [p + c for p, c in pairs.read([task], "prompt", "completion")]
    model = tokenizer.train(texts, "bpe", 384)  # ids: pad 0, unk 1, bos 2, eos 3
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf, safe_serialization=True)
    (hf / "tokenizer.model").write_bytes(model)
    llama = str(tmp_path / "llama")
    run_import(str(hf), llama)
    before = jax.device_get(checkpoint.load_params(llama)[1])

    c = _small(milton.get_config("lora"), tmp_path)
    c.train.update(steps=20, warmup_steps=2, log_every=1, eval_every=20, checkpoint_every=20)
    workdir = str(tmp_path / "ft")
    finetune.finetune(c, llama, workdir)
    losses = _losses(workdir)
    assert np.mean([losses[s] for s in (18, 19, 20)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.1, losses
    run = checkpoint.read_config(workdir)
    assert run.data.document_start == "bos" and run.model.vocab == 384  # Llama's: every example leads with BOS
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(checkpoint.load_params(llama)[1]))


def _whole(directory):
    """(config, params, tokenizer) of a fine-tune read through the one loader (the base made whole)."""
    from heft.train import checkpoint

    loaded = checkpoint.load(directory)
    assert loaded.kind == load.KIND
    return loaded.config, loaded.params, loaded.tokenizer
