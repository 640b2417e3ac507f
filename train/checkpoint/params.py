"""Parameters-only checkpoints: a directory with `params/` (orbax), `config.json`, the tokenizer and a
sealed manifest — for serving, evaluation and conversion, a third of a train state's size."""

import jax
import orbax.checkpoint as ocp
from etils import epath

from heft.data import paths
from heft.train import custody, hosts, manifest, quiet, storage
from heft.train.checkpoint.facts import config_dict, config_to_json, tokenizer_file
from heft.train.checkpoint.load import FLOAT, load
from heft.train.manifest import CheckpointError


def save_params(directory: epath.PathLike, config, params: dict, tokenizer_path: epath.PathLike | None = None,
                **facts) -> None:
    """A parameters-only checkpoint (for serving, evaluation, conversion): smaller than a train state."""
    directory = paths.path(directory)
    if (directory / "params").exists() or (directory.exists() and not directory.is_dir()):
        raise CheckpointError(f"{directory} already exists and is not an empty directory; choose a new one")
    quiet.failed_save_echoes()
    with storage.whole_or_removed(directory, CheckpointError, remover=jax.process_index() == 0):
        if jax.process_index() == 0:
            directory.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(directory / "params", params)
            ckptr.wait_until_finished()
        extra = {"config.json": config_to_json(config).encode()}
        if tokenizer_path:
            data = paths.path(tokenizer_path).read_bytes()
            extra[tokenizer_file(data)] = data
        all_facts = {"config": config_dict(config), "code_version": manifest.code_version(), **facts}
        custody.seal(directory, all_facts, jax.process_index(), jax.process_count(), extra_files=extra)
    hosts.barrier("params saved")


def export_params(source: epath.PathLike, out: epath.PathLike, verify_key: str | None = None) -> str:
    """A parameters-only checkpoint at `out` from a training checkpoint or workdir; returns the source step."""
    loaded = load(source, accept=(FLOAT,), verify_key=verify_key)
    save_params(out, loaded.config, loaded.params, loaded.tokenizer, step=loaded.facts.get("step"),
                tokens_seen=loaded.facts.get("tokens_seen"), exported_from=str(loaded.directory))
    return str(loaded.directory)
