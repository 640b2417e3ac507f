"""The one checkpoint loader: whatever checkpoint a path names, its config, parameters, tokenizer and
how to run them.

    loaded = checkpoint.load("runs/tiny")            # a workdir: its newest sealed step
    logits = loaded.model()(tokens)                  # or build.forward(loaded.config.model, loaded.model(), batch)

Every verb that reads a checkpoint (eval, generate, export, convert, merge, quantize, a fine-tune's
base) reads it here, and resuming a run trusts a step through the same `verified`, so every one
finds, verifies and places it the same way: the path resolved (find.py), the seal and its statement
checked (manifest.py: with a verify key, its signature; in a workdir of signed steps, a signature
always), every host's share of the files checked against the sealed manifest (custody.py), the
arrays read straight into the shards `mesh` asks for (default: `serving_mesh`), never gathered.

Checkpoints come in kinds, told apart by their manifest. `float` is this module's: a training
checkpoint (its parameters read out of the train state) or a parameters-only one. Later stages add
theirs with `register` when they are imported — a fine-tune (heft.adapt.load: its trained weights
made whole with its base) and a quantized checkpoint (heft.quantize.checkpoint: integers and
scales) — so that train/ never imports them; the `heft` command imports them all. A kind's `bind`
makes the model its parameters run in.
"""

import dataclasses
import json
from collections.abc import Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from heft.model import build
from heft.train import custody, hosts, manifest, sharding
from heft.train.checkpoint.facts import config_from_json, described, model_differences, tokenizer_in
from heft.train.checkpoint.find import resolve
from heft.train.manifest import CheckpointError


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint read onto a mesh."""

    config: ml_collections.ConfigDict  # the checkpoint's (or the one the caller passed), what `bind` builds
    params: dict  # nested dict of arrays, placed on the mesh
    tokenizer: str | None  # path of its tokenizer.model / tokenizer.json, if it holds one
    directory: epath.Path  # the step directory read
    facts: dict  # its manifest
    kind: str  # "float", or a registered kind's name
    bind: Callable = build.bind  # (model config, params) -> the model to call

    @property
    def mesh(self):
        return jax.tree.leaves(self.params)[0].sharding.mesh

    def model(self):
        """The model holding the parameters (cheap under jit; build it inside the jitted function there)."""
        return self.bind(self.config.model, self.params)


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of checkpoint a later stage knows how to read."""

    name: str
    holds: Callable[[dict, ml_collections.ConfigDict], bool]  # (manifest, config) -> whether a checkpoint is one
    load: Callable[..., Loaded]  # (directory, manifest, config, mesh, verify) -> Loaded


KINDS: dict[str, Kind] = {}
FLOAT = "float"


def register(kind: Kind) -> None:
    """Adds (or replaces) a kind; `load` asks each registered kind in turn before reading float parameters."""
    KINDS[kind.name] = kind


def is_finetune(facts: dict) -> bool:
    """A fine-tune's manifest names its base (heft.adapt)."""
    return "finetune" in facts


def quantized_weights(config) -> str:
    """`quantize.weights` of a checkpoint's config when its parameters are stored as integers ("none" for
    float ones, and for quantization-aware training, whose weights stay float)."""
    q = config.get("quantize", {})
    return "none" if q.get("qat", False) else q.get("weights", "none")


def kind_of(facts: dict, config) -> str:
    """The kind of the checkpoint whose manifest is `facts`, read with `config`."""
    for kind in KINDS.values():
        if kind.holds(facts, config):
            return kind.name
    return FLOAT


def _refusal(directory: epath.Path, facts: dict, config, accept) -> str:
    """Why a caller that reads only `accept` kinds cannot read this checkpoint, and what to do."""
    if is_finetune(facts):
        return (f"{directory} is a fine-tune of {facts['finetune']['base']['path']} and holds only the weights it "
                "trained; heft eval and heft generate read it with its base, and heft merge writes the whole model "
                "for everything else")
    if quantized_weights(config) != "none":
        return (f"{directory} holds {quantized_weights(config)} weights (heft quantize); heft eval and heft generate "
                "read it, everything else needs the float checkpoint it was quantized from")
    return f"{directory} is a float checkpoint; this reads only {', '.join(accept)} checkpoints"


def verified(directory: epath.Path, verify: bool = True, verify_key: str | None = None) -> dict:
    """The manifest of the checkpoint at `directory`, once it is trusted: the one place that decides,
    for this loader and for resuming a run (trainstate.py) alike.

    Always: the seal covers the manifest, its statement fits the folder, and a step among signed ones
    is signed by the same signer (manifest.read). With `verify_key`: its signature verifies with that
    key. With `verify`: every host checks its share of the files too (custody.verify).
    """
    if verify:
        return custody.verify(directory, jax.process_index(), jax.process_count(), verify_key, hosts.gather_ints())
    return manifest.read(directory, verify_key)


def load(directory: epath.PathLike, mesh=None, verify: bool = True, config=None,
         accept: tuple[str, ...] | None = None, verify_key: str | None = None) -> Loaded:
    """Reads the checkpoint `directory` names (a workdir: its newest sealed step) onto `mesh` (default:
    `serving_mesh` of its config).

    verify: every host checks its share of the files against the sealed manifest first.
    verify_key: an ed25519 public key (`checkpoint.verify_key`, `--verify_key`): the seal must be a
    statement signed by its private key. Whatever `verify` says, the seal itself is always checked.
    config: replaces the checkpoint's own (another mesh or batch size); its model fields must match.
    accept: the kinds the caller can use (default: any); another kind is refused in one line saying
    which verb reads it.
    """
    directory = resolve(directory)
    facts = verified(directory, verify, verify_key)
    if config is None:
        config = config_from_json(json.dumps(facts["config"]))
    elif model := model_differences(facts.get("config", {}), config):
        raise CheckpointError(f"{directory} holds another model than the config given to read it: {described(model)}; "
                              "read it with its own model config")
    name = kind_of(facts, config)
    if (accept is not None and name not in accept) or (name == FLOAT and not _float(facts, config)):
        raise CheckpointError(_refusal(directory, facts, config, accept or (FLOAT,)))
    mesh = mesh if mesh is not None else serving_mesh(config)
    if name == FLOAT:
        return _load_float(directory, facts, config, mesh)
    return KINDS[name].load(directory, facts, config, mesh, verify)


def _float(facts: dict, config) -> bool:
    """Whether a checkpoint no registered kind claimed holds float parameters (else: a kind whose stage
    was not imported)."""
    return not is_finetune(facts) and quantized_weights(config) == "none"


def _load_float(directory: epath.Path, facts: dict, config, mesh) -> Loaded:
    target = sharding.placed(build.abstract_params(config.model), sharding.param_dict_shardings(config.model, mesh,
                                                                                                config))
    return Loaded(config, read_params(directory, target), tokenizer_in(directory, facts["files"]), directory, facts,
                  FLOAT)


def read_params(directory: epath.Path, target: dict) -> dict:
    """The parameters stored in the checkpoint at `directory` (its `params/`, or a train state's
    `state/params`), read into `target`: ShapeDtypeStructs carrying the shardings to read them into."""
    if (directory / "params").is_dir():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(directory / "params", target)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    with ocp.PyTreeCheckpointer() as ckptr:  # only the parameters out of the train state
        state = ckptr.restore(directory / "state", args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return state["params"]


def load_params(directory: epath.PathLike, mesh=None, verify: bool = True, config=None,
                verify_key: str | None = None):
    """(config, params, tokenizer path or None) of a float checkpoint: `load` for the readers that need
    float parameters (export, conversion, quantization, a fine-tune's base)."""
    loaded = load(directory, mesh, verify, config, accept=(FLOAT,), verify_key=verify_key)
    return loaded.config, loaded.params, loaded.tokenizer


def serving_mesh(config):
    """Parameters split over every device (fsdp), so any model that fits the devices loads."""
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.mesh.slices = 1  # where it serves, not the slices it trained on
    if "expert" in config.mesh:  # nor the expert parallelism it trained with: experts split by fsdp alone
        config.mesh.expert = 1
    return sharding.make_mesh(config)
