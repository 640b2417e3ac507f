"""Reading a fine-tune back as a whole model: for `heft eval`, `heft generate` and `heft merge`.

A fine-tune's checkpoint holds the weights it trained and its base's identity (finetune.py). To
use it, the base is found where the manifest says, checked to be the very checkpoint it was
trained on (its manifest digest), and read; the trained weights are read beside it, and the two
make the model's parameters (`trainable.params`): LoRA folded into its projections, adapters, a
prefix or a prompt put in place. Importing this module registers that as the `finetune` kind of
heft.train.checkpoint's one loader, so `checkpoint.load` reads a fine-tune like any checkpoint.

`merge` writes that whole model as a parameters-only checkpoint (`checkpoint.save_params`): with
LoRA or full fine-tuning it is a plain model of the base's architecture (so Hugging Face export
works as usual); with adapters, a prefix or a prompt it keeps those pieces (heft reads it).
"""

import jax
from etils import epath

from heft.adapt import config as adapt_config
from heft.adapt import finetune, trainable
from heft.train import checkpoint, manifest, sharding


def base_of(facts: dict, where: epath.Path) -> str:
    """The base directory a fine-tune's manifest names, after checking it still holds that base."""
    saved = facts["finetune"]["base"]
    try:
        _, _, identity = finetune.identify(saved["path"])
    except manifest.CheckpointError as e:
        raise manifest.CheckpointError(f"{where} was fine-tuned from {saved['path']}, which cannot be read now "
                                       f"({e}); put that base back where it was") from None
    finetune.check_base(facts["finetune"], identity, str(where))
    return saved["path"]


def _load(directory: epath.Path, facts: dict, run, mesh, verify: bool) -> checkpoint.Loaded:
    """Reads a fine-tune (already verified by `checkpoint.load`) as the whole model its base and trained
    weights make, on `mesh`; `run` is the fine-tune's config. The base needs no verify key: the fine-tune's
    manifest (signed, where a key was given) pins it by its manifest's digest (`base_of`)."""
    base = checkpoint.load(base_of(facts, directory), mesh=mesh, verify=verify, config=adapt_config.base_view(run),
                           accept=(checkpoint.FLOAT,)).params
    abstract = trainable.abstract(run)
    weights = checkpoint.read_params(directory, sharding.placed(abstract, finetune.shardings(run, mesh, abstract)))
    out = sharding.param_dict_shardings(run.model, mesh, run)
    with sharding.activated(mesh, run):
        params = jax.jit(lambda w, b: trainable.params(run, w, b), out_shardings=out)(weights, base)
    return checkpoint.Loaded(run, params, checkpoint.tokenizer_in(directory, facts["files"]), directory, facts, KIND)


KIND = "finetune"
checkpoint.register(checkpoint.Kind(KIND, lambda facts, config: checkpoint.is_finetune(facts), _load))


def merge(source: epath.PathLike, out: epath.PathLike, verify_key: str | None = None) -> dict:
    """Writes the fine-tune `source` (a workdir or a step) as a whole parameters-only model at `out`;
    returns what was merged ({"method", "base", "step", "hooks"}). With `verify_key`, the fine-tune's
    seal must be a statement signed by its key (its base is pinned by the digest that statement covers)."""
    directory = checkpoint.resolve(source)
    if not checkpoint.is_finetune(checkpoint.verified(directory, verify=False, verify_key=verify_key)):
        raise manifest.CheckpointError(f"{directory} is not a fine-tune (its manifest names no base); it is a whole "
                                       "model already: heft export writes its parameters alone")
    loaded = checkpoint.load(directory, accept=(KIND,), verify_key=verify_key)
    run, facts = loaded.config, loaded.facts
    hooks = {h: run.model[h] for h in adapt_config.HOOKS.values() if run.model[h]}
    checkpoint.save_params(out, run, loaded.params, loaded.tokenizer, step=facts.get("step"),
                           merged={"from": str(directory), **facts["finetune"]})
    return {"method": run.finetune.method, "base": facts["finetune"]["base"]["path"], "step": facts.get("step"),
            "hooks": hooks}
