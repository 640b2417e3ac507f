"""Saving and restoring with orbax: whole train states for resuming, parameters for serving.

A training checkpoint is WORKDIR/checkpoints/STEP/ with orbax items `state` (step, params,
optimizer state: sharded arrays, no pickle) and `data` (the loader's position, JSON), the
tokenizer model, and the manifest (`train/manifest.py`) written once the save has committed.
A parameters-only checkpoint is a directory with `params/`, `config.json`, the tokenizer and a
manifest. Both restore onto any mesh: arrays are read straight into the shards the target mesh
asks for, never gathered on one host.
"""

import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp

from heft.train import manifest
from heft.train.manifest import CheckpointError

TOKENIZER = "tokenizer.model"


def config_to_json(config) -> str:
    return config.to_json(sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def _facts(config, prepared=None, **more) -> dict:
    facts = {"config": json.loads(config_to_json(config)), "code_version": manifest.code_version(), **more}
    if prepared is not None:
        facts["data"] = getattr(prepared, "metadata", {})
    return facts


def _tokenizer_path(prepared):
    return getattr(prepared, "tokenizer_path", None) if prepared is not None else None


class Checkpointer:
    """Async sharded saves of the train state every N steps; resume from the newest complete one."""

    def __init__(self, workdir: str, config, prepared=None):
        self.config, self.prepared = config, prepared
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        k = config.checkpoint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=k.keep, keep_period=k.keep_every or None,
            enable_async_checkpointing=k.async_save, create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self.unsealed: list[int] = []  # saved steps whose manifest is not written yet

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: dict, loader_state: dict, force: bool = False) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(loader_state)), force=force)
        self.unsealed.append(step)
        if not self.config.checkpoint.async_save:
            self.tick()

    def tick(self) -> None:
        """Seals saves that have committed: tokenizer copied in, manifest written (process 0)."""
        if not self.unsealed or self.manager.is_saving_in_progress():
            return
        self.manager.check_for_errors()
        for step in self.unsealed:
            if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
                seal(self.step_dir(step), self.config, self.prepared, step=step,
                     tokens_seen=step * self.config.train.batch_size * self.config.train.seq_len)
        self.unsealed = []

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.tick()
        self.manager.close()

    def restore_latest(self, abstract_state: dict):
        """(state, loader state) from the newest complete checkpoint, or None if there is none.

        A checkpoint without a manifest (its save never finished) is skipped with a warning; one whose
        files do not match its manifest stops the run with CheckpointError naming the file.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            directory = self.step_dir(step)
            if not manifest.exists(directory):
                print(f"heft: skipping incomplete checkpoint {directory} (no manifest: the save did not finish)",
                      flush=True)
                continue
            if self.config.checkpoint.verify:
                manifest.verify(directory)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            return restored.state, restored.data
        return None


def seal(directory: str, config, prepared=None, **facts) -> dict:
    tokenizer = _tokenizer_path(prepared)
    if tokenizer and os.path.exists(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(directory, TOKENIZER))
    return manifest.write(directory, **_facts(config, prepared, **facts))


def save_params(directory: str, config, params: dict, tokenizer_path: str | None = None, **facts) -> None:
    """A parameters-only checkpoint (for serving, evaluation, conversion): smaller than a train state."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, "params")):
        raise CheckpointError(f"{directory} already holds a checkpoint; choose a new directory")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(config_to_json(config))
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(directory, TOKENIZER))
        manifest.write(directory, **_facts(config, **facts))


def resolve(path: str) -> str:
    """A checkpoint directory from a workdir, a checkpoints/ dir, a step dir or a params-only dir:
    for a workdir, its newest complete step."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass a workdir, a step directory "
                              "or a parameters-only checkpoint")
    if manifest.is_checkpoint(path):
        return path
    for candidate in reversed(manifest.step_dirs(path)):
        if manifest.exists(candidate):
            return candidate
        print(f"heft: skipping incomplete checkpoint {candidate}", flush=True)
    raise CheckpointError(f"{path} holds no complete checkpoint; train first or pass another directory")


def serving_mesh(config):
    """Parameters split over every device (fsdp), so any model that fits the devices loads."""
    from heft.train import sharding

    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return sharding.make_mesh(config)


def read_config(directory: str) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with (from its manifest)."""
    return config_from_json(json.dumps(manifest.read(resolve(directory))["config"]))


def load_params(directory: str, mesh=None, verify: bool = True, config=None):
    """(config, params, tokenizer path or None) from any checkpoint, placed on `mesh` if given
    (default: `serving_mesh`). `config` replaces the checkpoint's own (e.g. with another mesh or
    batch size); its model fields must match."""
    from heft.train import sharding

    directory = resolve(directory)
    facts = manifest.verify(directory) if verify else manifest.read(directory)
    if config is None:
        config = config_from_json(json.dumps(facts["config"]))
    mesh = mesh if mesh is not None else serving_mesh(config)
    shardings = sharding.param_dict_shardings(config.model, mesh, config)
    from heft.model.decoder import init_params

    shapes = jax.eval_shape(lambda: init_params(config.model, 0))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    if os.path.isdir(os.path.join(directory, "params")):
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(directory, "params"), abstract)
    else:  # a training checkpoint: read only the parameters out of the train state
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract)
        with ocp.PyTreeCheckpointer() as ckptr:
            state = ckptr.restore(os.path.join(directory, "state"), args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True))
        params = state["params"]
    tokenizer = os.path.join(directory, TOKENIZER)
    return config, params, (tokenizer if os.path.exists(tokenizer) else None)
