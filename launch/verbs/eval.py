"""`heft eval --checkpoint=DIR [--mesh=1,2,2] [--corpus=...] [--json]`: held-out loss, perplexity and bits
per byte of any checkpoint, float or quantized, on any mesh (eval/heldout.py).

`heft eval --checkpoint=DIR --tasks=heft_shakespeare_cloze,hellaswag [--limit=N]` runs tasks of
lm-evaluation-harness instead (eval/harness.py; `pip install "heft[eval]"`), writes their results
as JSON beside the checkpoint and prints one table."""

import json
import sys

from absl import flags

from heft.launch.flags import define_verify_key
from heft.model.checks import ConfigError
from heft.train.manifest import CheckpointError


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a checkpoint, a workdir (its newest one) or a params-only dir")
    flags.DEFINE_string("corpus", None, "evaluate this corpus's held-out split instead (.txt/.jsonl/.parquet)")
    flags.DEFINE_enum("format", None, ["text", "prompt_completion"], "how --corpus is read (default: text), or "
                      "the checkpoint's data.format without --corpus")
    flags.DEFINE_integer("batches", 0, "held-out batches to evaluate; 0 means the whole split")
    flags.DEFINE_integer("batch_size", 0, "global batch in sequences (default: the checkpoint's)")
    flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes, e.g. 1,2,4 (default: fsdp over all devices)")
    flags.DEFINE_bool("skip_verify", False, "restore without checking the manifest's hashes")
    flags.DEFINE_bool("json", False, "print one JSON object")
    flags.DEFINE_list("tasks", [], "lm-evaluation-harness tasks to run instead of the held-out loss, e.g. "
                      "heft_shakespeare_cloze (offline) or hellaswag,arc_easy (need the internet)")
    flags.DEFINE_integer("limit", None, "with --tasks: at most this many examples per task")
    flags.DEFINE_integer("num_fewshot", None, "with --tasks: examples shown before each question (default: the task's)")
    define_verify_key()


def check_flags(f) -> None:
    """The flags' own mistakes, before the checkpoint is even opened."""
    if not f.checkpoint:
        raise CheckpointError("heft eval needs --checkpoint=DIR (a workdir, a step directory or a params-only dir)")
    if f.batches < 0 or f.batch_size < 0:
        raise ConfigError(f"--batches={f.batches} and --batch_size={f.batch_size} cannot be negative "
                          "(0 means the whole split and the checkpoint's batch size)")
    if f.mesh:
        from heft.eval.heldout import parse_mesh  # here: `heft eval --help` needs no JAX

        parse_mesh(f.mesh)
    if f.tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError('--tasks needs lm-evaluation-harness: pip install "heft[eval]"') from None
        if f.limit is not None and f.limit < 1:
            raise ConfigError(f"--limit={f.limit} must be at least 1 (or left out for every example)")


def main(argv):
    del argv
    f = flags.FLAGS
    check_flags(f)  # before the imports that take seconds
    from heft.data import processes as data_processes
    from heft.eval.heldout import evaluate, parse_mesh
    from heft.launch.checkpoints import load
    from heft.train import checkpoint, checks, sharding

    directory = checkpoint.resolve(f.checkpoint)
    config = checkpoint.read_config(directory)
    if f.mesh:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = parse_mesh(f.mesh)
        config.mesh.slices = 1  # one slice here, whatever the run trained on
    if f.batch_size:
        config.train.batch_size = f.batch_size
    if f.corpus:
        config.data.corpus = f.corpus
        config.data.format = "text"  # a fine-tune's own data may be prompt/completion pairs; --corpus is text
    if f.format:
        config.data.format = f.format
    mesh = sharding.make_mesh(config) if f.mesh else checkpoint.serving_mesh(config)
    checks.check_batch(config, mesh.shape, config.train.batch_size, "--batch_size")  # before the slow load
    # Any kind: float, quantized (heft quantize), or a fine-tune read with its base into the whole model.
    loaded = load(directory, mesh=mesh, verify=not f.skip_verify, config=config, verify_key=f.verify_key)
    if f.tasks:
        return run_tasks(f, loaded)
    # The checkpoint's own tokenizer decides the ids; without one (a checkpoint saved outside
    # heft train), the data config's tokenizer is rebuilt as training built it.
    prepared = data_processes.prepare_for_processes(loaded.config, tokenizer_path=loaded.tokenizer,
                                                    progress=sys.stderr.isatty())
    result = evaluate(loaded.config, loaded.params, mesh, prepared, f.batches, bind=loaded.bind)
    if f.json:
        print(json.dumps(result))
    else:
        print(f"held-out loss {result['eval_loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
              f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} tokens "
              f"({result['bytes']:,} bytes) on mesh {dict(mesh.shape)}")


def run_tasks(f, loaded) -> None:
    """lm-evaluation-harness tasks on the loaded checkpoint; results beside it and in one table."""
    import jax

    from heft.data import tokenizer as tokenizers
    from heft.eval import harness
    from heft.quantize import rules

    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.directory} holds no tokenizer (tokenizer.model or tokenizer.json); the "
                              "harness gives text, so it needs one: save the checkpoint with its tokenizer")
    harness.task_manager(f.tasks)  # an unknown task stops here, before anything compiles
    config = loaded.config
    lm = harness.HeftLM(config, loaded.params, tokenizers.load(loaded.tokenizer), loaded.mesh, bind=loaded.bind,
                        batch_size=f.batch_size or 16)
    summary = harness.summary(harness.evaluate(lm, f.tasks, f.limit, f.num_fewshot))
    weights = rules.describe(config) if rules.is_quantized(config) else config.model.param_dtype
    if jax.process_index() == 0:
        path = harness.write_results(loaded.directory, summary, weights=weights, limit=f.limit)
        print(json.dumps(summary) if f.json else f"{harness.table(summary)}\nresults: {path}")
