"""`heft finetune`: train a few weights (or all) on top of a frozen base checkpoint, with heft's own loop.

`finetune(config, base, workdir)` reads the base's identity (its manifest digest) and config, builds
the run config (adapt/config.py), and hands the training loop (train/loop.py) a Trainee: on the
mesh, the base is read into its shards once and passed to every step as a frozen argument (never
donated, never saved), and the train state {step, params, opt_state} holds the trainable weights
alone, so Adam's moments exist for them only. Everything else is pretraining's: data, metrics,
held-out loss, async sealed checkpoints, recovery after a crash, SIGTERM, the workdir lock, resume.

A fine-tune's checkpoint is a training checkpoint of that small state, plus `finetune` in its
manifest: the method and the base (`path`, `digest` of its manifest, `step`). Resuming checks the
base is the same checkpoint, and so do eval, generate and merge (load.py).
"""

import functools
import json

import jax
from etils import epath
from flax import nnx

from heft.adapt import config as adapt_config
from heft.adapt import trainable
from heft.model import build
from heft.train import checkpoint, loop, manifest, optimizer, rules, sharding, step
from heft.train import state as train_state
from heft.train.manifest import CheckpointError


def identify(base: epath.PathLike, verify_key: str | None = None) -> tuple[epath.Path, dict, dict]:
    """(directory, manifest, identity) of the base checkpoint `base` (a workdir: its newest step), its
    seal checked (and its signature, with `verify_key`) before anything in it is trusted.

    The identity, saved in every checkpoint of the fine-tune, is where the base was and its
    manifest's digest: the digest covers every file's sha256, so it names the weights exactly.
    """
    directory = checkpoint.resolve(base)
    facts = checkpoint.verified(directory, verify=False, verify_key=verify_key)
    if "finetune" in facts:
        raise CheckpointError(f"--base={base} is itself a fine-tune; heft merge it into a whole model first and "
                              "fine-tune that")
    return directory, facts, {"path": str(directory), "digest": manifest.digest(facts), "step": facts.get("step")}


def check_base(saved: dict | None, identity: dict, where: str) -> None:
    """Refuses, in one line naming both, a base other than the one a fine-tune was trained on."""
    if saved is None:
        raise CheckpointError(f"{where} holds a pretraining run, not a fine-tune; fine-tune in a new --workdir")
    base = saved["base"]
    if base["digest"] != identity["digest"]:
        raise CheckpointError(f"{where} was fine-tuned from {base['path']} (manifest {base['digest'][:12]}), not from "
                              f"{identity['path']} (manifest {identity['digest'][:12]}); pass its base, or fine-tune "
                              "in a new --workdir")


def _check_resume(run, identity: dict, resume) -> None:
    where = f"{resume.directory.parent.parent} (step {resume.step})"
    check_base(resume.manifest.get("finetune"), identity, where)
    saved = resume.manifest.get("config", {}).get("finetune", {})
    changed = [f"finetune.{k}={saved.get(k)!r} in the checkpoint but {run.finetune[k]!r} now"
               for k in adapt_config.DEFINING_FIELDS if saved.get(k) != run.finetune[k]]
    if changed:
        raise CheckpointError(f"the fine-tune differs from {where}: {', '.join(changed)}; resume with its "
                              "settings or fine-tune in a new --workdir")


def shardings(run, mesh, abstract: dict) -> dict:
    """NamedShardings of the trainable weights, from their logical axis names and the rules table."""
    names = trainable.names(run)
    wrapped = trainable.nested({p: nnx.Param(x, out_sharding=names[p], eager_sharding=False)
                                for p, x in trainable.flat(abstract).items()})
    return rules.shardings(wrapped, mesh, run)


def state_shardings(run, mesh, abstract: dict) -> dict:
    """Shardings of the fine-tune's train state: Adam's moments laid out like their weights."""
    return train_state.layout(shardings(run, mesh, abstract), abstract, optimizer.make(run.train), mesh)


def init_state(run, base: dict) -> dict:
    return train_state.new(trainable.init(run, base, run.train.seed), optimizer.make(run.train))


def train_step(run, state, base, batch, bind=build.bind):
    """`step.train_step` over the trainable weights: the loss sees the model they make with `base`
    (`bind` makes it: heft.quantize.qat's fake-quantizes it for quantization-aware training).
    (AdamW with train.*'s schedule; μP's per-parameter rates are pretraining's, not applied here.)"""
    def loss(weights, b):
        return step.loss_sums(run, trainable.params(run, weights, base, state["step"]), b, bind=bind)

    return step.train_step(run, state, batch, loss=loss, tx=optimizer.make(run.train))


def eval_step(run, weights, base, batch, bind=build.bind):
    return step.loss_sums(run, trainable.params(run, weights, base), batch, bind=bind)


def program(run, mesh, base_dir, bind=build.bind) -> loop.Program:
    """The fine-tune on `mesh`: the base read into its shards (verified), the state and the steps."""
    base = checkpoint.load_params(base_dir, mesh=mesh, verify=run.checkpoint.verify,
                                  config=adapt_config.base_view(run), verify_key=run.checkpoint.get("verify_key"))[1]
    base_sh = jax.tree.map(lambda x: x.sharding, base)
    abstract = trainable.abstract(run)
    state_sh = state_shardings(run, mesh, abstract)
    batch_sh = sharding.batch_sharding(run, mesh)
    shapes = jax.eval_shape(lambda b: init_state(run, b), base)
    abstract_state = sharding.placed(shapes, state_sh)
    init = jax.jit(functools.partial(init_state, run), in_shardings=(base_sh,), out_shardings=state_sh)

    def fresh_state():
        with sharding.activated(mesh, run):
            return init(base)

    return loop.Program(
        abstract_state=abstract_state, init_state=fresh_state,
        train_step=jax.jit(functools.partial(train_step, run, bind=bind), in_shardings=(state_sh, base_sh, batch_sh),
                           out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0),
        eval_step=jax.jit(functools.partial(eval_step, run, bind=bind), in_shardings=(state_sh["params"], base_sh, batch_sh),
                          out_shardings=sharding.replicated(mesh)),
        frozen=(base,), trainable=trainable.count(abstract))


def finetune(config, base: str, workdir: str, stop_requested=lambda step: False, bind=None) -> dict:
    """Fine-tunes the checkpoint `base` as `config.finetune` says, in `workdir` (resuming from its newest
    checkpoint); returns the training loop's summary with the method, the base and the trained count."""
    adapt_config.check(config)  # before the base is even opened
    base_dir, base_facts, identity = identify(base, config.checkpoint.get("verify_key"))
    run = adapt_config.run_config(config, checkpoint.config_from_json(json.dumps(base_facts["config"])))
    weights = trainable.count(trainable.abstract(run))  # also raises a bad target or freeze regex, early
    tokenizer = checkpoint.Resume(identity["step"] or 0, base_dir, base_facts).tokenizer_path
    if tokenizer is None:
        raise CheckpointError(f"--base={base} holds no tokenizer; a fine-tune reads its data with the base's own "
                              "ids (import the model with its tokenizer, or train the base with heft train)")
    trainee = loop.Trainee(
        make=lambda config, mesh: program(config, mesh, base_dir, bind or build.bind),
        facts={"finetune": {"method": run.finetune.method, "base": identity, "trainable_params": weights}},
        check=functools.partial(_check_resume, run, identity), tokenizer_path=tokenizer)
    summary = loop.train(run, workdir, stop_requested, trainee=trainee)
    return {**summary, "method": run.finetune.method, "base": identity["path"], "trainable_params": weights}
