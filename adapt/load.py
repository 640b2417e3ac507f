"""Reading a fine-tune back as a whole model: for `heft eval`, `heft generate` and `heft merge`.

A fine-tune's checkpoint holds the weights it trained and its base's identity (finetune.py). To
use it, the base is found where the manifest says, checked to be the very checkpoint it was
trained on (its manifest digest), and read; the trained weights are read beside it, and the two
make the model's parameters (`trainable.params`): LoRA folded into its projections, adapters, a
prefix or a prompt put in place. `load_params` does this for a fine-tune and reads any other
checkpoint as `heft.train.checkpoint.load_params` does, so a verb that takes either calls it.

`merge` writes that whole model as a parameters-only checkpoint (`checkpoint.save_params`): with
LoRA or full fine-tuning it is a plain model of the base's architecture (so Hugging Face export
works as usual); with adapters, a prefix or a prompt it keeps those pieces (heft reads it).
"""

import json

import jax
import orbax.checkpoint as ocp

from heft.adapt import config as adapt_config
from heft.adapt import finetune, trainable
from heft.train import checkpoint, custody, hosts, manifest, sharding


def facts_of(directory) -> dict:
    """The manifest of the checkpoint `directory` names (a workdir: its newest), seal checked."""
    return manifest.read(checkpoint.resolve(directory))


def is_finetune(directory) -> bool:
    return "finetune" in facts_of(directory)


def base_of(facts: dict, where) -> str:
    """The base directory a fine-tune's manifest names, after checking it still holds that base."""
    saved = facts["finetune"]["base"]
    try:
        _, _, identity = finetune.identify(saved["path"])
    except manifest.CheckpointError as e:
        raise manifest.CheckpointError(f"{where} was fine-tuned from {saved['path']}, which cannot be read now "
                                       f"({e}); put that base back where it was") from None
    finetune.check_base(facts["finetune"], identity, str(where))
    return saved["path"]


def load_params(directory, mesh=None, verify: bool = True, config=None):
    """(config, params, tokenizer path or None) of any checkpoint; for a fine-tune, the whole model
    its base and trained weights make, placed on `mesh` (default: `checkpoint.serving_mesh`).
    `config` replaces the checkpoint's own (another mesh or batch size)."""
    directory = checkpoint.resolve(directory)
    facts = manifest.read(directory)
    if "finetune" not in facts:
        return checkpoint.load_params(directory, mesh=mesh, verify=verify, config=config)
    base = base_of(facts, directory)
    if verify:
        custody.verify(directory, jax.process_index(), jax.process_count(), gather=hosts.gather_ints())
    run = config if config is not None else checkpoint.config_from_json(json.dumps(facts["config"]))
    mesh = mesh if mesh is not None else checkpoint.serving_mesh(run)
    base_params = checkpoint.load_params(base, mesh=mesh, verify=verify, config=adapt_config.base_view(run))[1]
    abstract = trainable.abstract(run)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
                          finetune.shardings(run, mesh, abstract))
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    with ocp.PyTreeCheckpointer() as reader:
        state = reader.restore(directory / "state", args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    out = sharding.param_dict_shardings(run.model, mesh, run)
    with sharding.activated(mesh, run):
        params = jax.jit(lambda w, b: trainable.params(run, w, b), out_shardings=out)(state["params"], base_params)
    tokenizer = checkpoint.Resume(facts.get("step", 0), directory, facts).tokenizer_path
    return run, params, tokenizer


def merge(source: str, out: str) -> dict:
    """Writes the fine-tune `source` (a workdir or a step) as a whole parameters-only model at `out`;
    returns what was merged ({"method", "base", "step", "hooks"})."""
    directory = checkpoint.resolve(source)
    facts = manifest.read(directory)
    if "finetune" not in facts:
        raise manifest.CheckpointError(f"{directory} is not a fine-tune (its manifest names no base); it is a whole "
                                       "model already: heft export writes its parameters alone")
    run, params, tokenizer = load_params(directory)
    hooks = {h: run.model[h] for h in adapt_config.HOOKS.values() if run.model[h]}
    checkpoint.save_params(out, run, params, tokenizer, step=facts.get("step"),
                           merged={"from": str(directory), **facts["finetune"]})
    return {"method": run.finetune.method, "base": facts["finetune"]["base"]["path"], "step": facts.get("step"),
            "hooks": hooks}
