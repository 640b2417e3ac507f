"""Hugging Face folders <-> heft parameters: `import_hf` and `export_hf`.

Import reads one tensor at a time and places each heft parameter straight into its shards: the
unstacked ones with `jax.make_array_from_callback` (each device copies only its slice of the
tensor), the [depth]-stacked block parameters by writing one layer at a time into a donated,
already sharded array. Host memory beyond the placed model is about one checkpoint tensor
(bench/RESULTS.md, "Hugging Face import"). A Hugging Face folder may be local or in a bucket
(gs://): a bucket's shards pass through local disk one at a time (`paths.py`).

Nothing in the folder is trusted: its files are read bounded and checked by hf_folder.py and
safetensors_io.py, and the counts config.json gives (layers, experts) are checked against the stored
tensors' names before the tensor table that grows with them is built; every other size then meets a
stored header's shape before any array is shaped by it.
"""

import json
import re
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from heft.convert import gpt2, hf_folder, llama, mixtral, paths, safetensors_io, t5, tokenizer
from heft.convert.errors import ConvertError
from heft.data import paths as data_paths
from heft.model.build import abstract
from heft.model.checks import check_model, sparse

FAMILIES = {family.MODEL_TYPE: family for family in (llama, gpt2, t5, mixtral)}


# Which family, and the heft config.


# config.json's fields every family reads, to find which family it is.
FIELDS = {"model_type": hf_folder.optional(hf_folder.TEXT), "architectures": hf_folder.optional(hf_folder.TEXTS)}


def read_config(hf_dir: epath.PathLike) -> dict:
    """A folder's config.json, read bounded, its family known and every field that family reads
    checked for its kind (optional nulls dropped)."""
    hf_dir = data_paths.path(hf_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir} is not a directory; pass the folder holding config.json and the weights")
    path = hf_folder.member(hf_dir, "config.json")
    if path is None:
        raise ConvertError(f"{hf_dir} has no config.json; pass a Hugging Face model folder")
    hf = hf_folder.check_fields(hf_folder.read_json(path), FIELDS, path)
    return hf_folder.check_fields(hf, family_of(hf).FIELDS, path)


def family_of(hf: dict):
    """The family module (llama or gpt2) of a config.json, or a ConvertError naming what it is."""
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    family = FAMILIES.get(model_type)
    if family is None or any(a != family.ARCHITECTURE for a in architectures):
        supported = ", ".join(f"{f.ARCHITECTURE} (model_type {t!r})" for t, f in FAMILIES.items())
        raise ConvertError(f"config.json describes architectures={architectures} with model_type={model_type!r}; "
                           f"heft convert supports {supported} only")
    return family


def family_for(m):
    """The family a heft model config can be saved as, or a ConvertError saying what differs."""
    reasons = {}
    for family in FAMILIES.values():
        reasons[family.ARCHITECTURE] = family.unfit(m)
        mlp = getattr(family, "MLP", "dense")  # a mixture of experts exports only to a family that has one
        if mlp != ("moe" if sparse(m) else "dense"):
            reasons[family.ARCHITECTURE].append(f"model.mlp={m.get('mlp', 'dense')!r} ({family.ARCHITECTURE}: {mlp})")
        if not reasons[family.ARCHITECTURE]:
            return family
    detail = "; ".join(f"not {arch}: {', '.join(r)}" for arch, r in reasons.items())
    raise ConvertError(f"this heft model has no Hugging Face counterpart ({detail}); export Llama-, GPT-2- or "
                       "T5-shaped models")


def heft_config(hf_dir: epath.PathLike, config_overrides: dict | None = None):
    """The heft config of a folder's config.json, with dotted-field overrides
    (e.g. {"model.param_dtype": "bfloat16"}) applied, and checked."""
    return _heft_config(read_config(hf_dir), config_overrides)


def _heft_config(hf: dict, config_overrides: dict | None):
    config = family_of(hf).heft_config(hf)
    config.update_from_flattened_dict(dict(config_overrides or {}))
    config.train.seq_len = min(config.train.seq_len, config.model.max_len)
    check_model(config.model)
    return config


# Parameters as {dotted path: array}, and the checks both directions share.


def abstract_params(m) -> nnx.State:
    """The model's parameters as an nnx.State of ShapeDtypeStructs (carrying logical axis names)."""
    return nnx.filter_state(abstract(m)[1], nnx.Param)


def _flat(state) -> dict:
    """An nnx.State or a nested dict of arrays -> {dotted path: array}."""
    if isinstance(state, nnx.State):
        state = nnx.to_pure_dict(state)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): x for path, x in leaves}


def _nested(flat: dict) -> dict:
    out = {}
    for path, x in flat.items():
        *parents, leaf = path.split(".")
        d = out
        for key in parents:
            d = d.setdefault(key, {})
        d[leaf] = x
    return out


def _check_plan(plan, expected: dict, family) -> None:
    """The family's tensor table covers exactly the model's parameters (a guard on this code)."""
    covered = {path for t in plan for path, _ in t.heft}
    for path in sorted(set(expected) ^ covered):
        side = "has no counterpart in" if path in expected else "is filled by"
        raise ConvertError(f"heft parameter {path} {side} the {family.ARCHITECTURE} tensor table; "
                           "this config cannot be converted")


def _check_counts(hf: dict, family, m, names: list[str], hf_dir: epath.Path) -> None:
    """Each count config.json gives of repeated tensors (layers, experts) is the number stored, numbered
    0 to count - 1. The tensor table grows with these counts, so this runs before it is built: sizes
    config.json gives are never trusted beyond the weights that back them."""
    for fields, size, pattern in family.COUNTS:
        want, found = size(m), set()
        for name in names:
            if match := re.search(pattern, name):
                found.add(int(match.group(1)))
        if len(found) != want or max(found, default=-1) != want - 1:  # i.e. found is 0 .. want - 1
            field = next((f for f in fields if f in hf), fields[-1])
            held = f"{len(found)} (numbered {min(found)} to {max(found)})" if found else "none"
            raise ConvertError(f"config.json in {hf_dir} has {field}={want}, but its tensors hold {held}; fix "
                               "config.json to match the weights, or download every shard")


def _check_tensors(reader, plan, family, m, hf_dir: epath.Path) -> None:
    """Every tensor config.json implies is stored, with its shape and a float dtype, and nothing
    else is stored."""
    wanted = {t.hf: t for t in plan}
    for name, t in wanted.items():
        if name not in reader.files:
            raise ConvertError(f"{hf_dir} has no tensor {name}, which a {family.ARCHITECTURE} with this config.json "
                               "needs; download every shard, or fix config.json to match the weights")
        if reader.shape(name) != t.shape:
            raise ConvertError(f"tensor {name} has shape {list(reader.shape(name))} but config.json implies "
                               f"{list(t.shape)}; the weights and config.json disagree")
        reader.check_float(name)
    for name in reader.names():
        if name not in wanted and not family.ignored(name, m):
            raise ConvertError(f"{hf_dir} holds tensor {name}, which a {family.ARCHITECTURE} with this config.json "
                               "does not have (importing would drop trained weights); check config.json")


# Import.


def _layer_sharding(sharding, n: int = 1):
    """The sharding of one layer of a [depth, ...] parameter (one (layer, expert) slot of a
    [depth, experts, ...] one: n=2): its spec without the first n entries."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[n:]))
    return sharding


def _put(view: np.ndarray, sharding, dtype) -> jax.Array:
    """Places a host array (often a transposed view) so that each device copies only its slice."""
    return jax.make_array_from_callback(view.shape, sharding, lambda index: np.asarray(view[index], dtype=dtype))


@cache
def _zeros(shape: tuple, dtype, sharding):
    """A jitted maker of a zero array created straight into its shards."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@cache
def _layer_writer(sharding):
    # Donating the stacked array lets XLA write the layer in place: the parameter is never copied.
    return jax.jit(lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0),
                   out_shardings=sharding, donate_argnums=0)


@cache
def _slot_writer(sharding):
    """As `_layer_writer`, for one (layer, expert) slot of a [depth, experts, ...] parameter."""
    return jax.jit(lambda stacked, slot, i, e: jax.lax.dynamic_update_slice(
        stacked, slot[None, None], (i, e) + (0,) * slot.ndim), out_shardings=sharding, donate_argnums=0)


def import_hf(hf_dir: epath.PathLike, mesh=None, config_overrides: dict | None = None):
    """Reads a Hugging Face Llama, GPT-2 or Mixtral folder (config.json + safetensors) into heft.

    mesh: place each parameter into the shards `heft.train.rules.shardings` gives on it;
      None puts everything on the first device.
    config_overrides: dotted config fields to set, e.g. {"model.param_dtype": "bfloat16"}
      (parameters are float32 by default: bfloat16 weights widen exactly).
    Returns (config, params): a heft ConfigDict and an nnx.State of nnx.Param shaped like
    `nnx.state(build.create(config.model), nnx.Param)` (`nnx.to_pure_dict` gives the nested dict
    `heft.train.checkpoint.save_params` takes).
    Raises ConvertError for an unsupported architecture, a missing, unexpected or misshapen
    tensor, and pickled weights, before any weight is read.
    """
    hf_dir = data_paths.path(hf_dir)
    hf = read_config(hf_dir)
    family = family_of(hf)
    config = _heft_config(hf, config_overrides)
    m = config.model
    with safetensors_io.Reader(hf_dir) as reader:  # every header read bounded and checked
        _check_counts(hf, family, m, reader.names(), hf_dir)  # before the plan, whose length they set
        plan = family.tensors(m, reader.names())
        _check_tensors(reader, plan, family, m, hf_dir)  # before any size from config.json shapes an array
        abstract = abstract_params(m)
        expected = _flat(abstract)  # dotted path -> ShapeDtypeStruct
        _check_plan(plan, expected, family)

        if mesh is None:
            shardings = {path: SingleDeviceSharding(jax.devices()[0]) for path in expected}
        else:
            from heft.train import rules

            shardings = _flat(nnx.to_pure_dict(rules.shardings(abstract, mesh, config)))
        dtype = jnp.dtype(m.param_dtype)
        arrays = {}
        # File by file, each read once and in order (from a bucket: one shard at a time on local disk).
        for t in sorted(plan, key=lambda t: reader.files[t.hf]):
            w = reader.read(t.hf)
            for (path, layer), view in zip(t.heft, t.to_heft(w)):
                if layer is None:
                    arrays[path] = _put(view, shardings[path], dtype)
                    continue
                if path not in arrays:
                    arrays[path] = _zeros(tuple(expected[path].shape), dtype, shardings[path])()
                if isinstance(layer, tuple):  # (layer, expert): a mixture of experts' stacked experts
                    part = _put(view, _layer_sharding(shardings[path], 2), dtype)
                    arrays[path] = _slot_writer(shardings[path])(arrays[path], part, *map(jnp.int32, layer))
                    continue
                part = _put(view, _layer_sharding(shardings[path]), dtype)
                arrays[path] = _layer_writer(shardings[path])(arrays[path], part, jnp.int32(layer))
            del w
    nnx.replace_by_pure_dict(abstract, _nested(arrays))
    return config, abstract


# Export.


def export_hf(config, params, out_dir: epath.PathLike, max_shard_bytes: int = 2 * 1024**3, dtype: str | None = None,
              tokenizer_path: epath.PathLike | None = None) -> list[str]:
    """Writes heft parameters as a Hugging Face folder that transformers' from_pretrained loads.

    params: an nnx.State of the model's parameters, or the same as a nested dict of arrays.
    dtype: of the written tensors ("float32" or "bfloat16"); None keeps model.param_dtype.
    tokenizer_path: a sentencepiece model, written as tokenizer.model with a LlamaTokenizer config;
      its bos/eos ids go into config.json.
    Tensors are gathered one shard file at a time: host memory beyond the model is one file
    (at most `max_shard_bytes`, or one tensor if bigger). Returns the names of the files written.
    """
    out_dir = data_paths.path(out_dir)
    tokenizer_path = data_paths.path(tokenizer_path) if tokenizer_path else None
    m = config.model
    family = family_for(m)
    paths.check_export_folder(out_dir)
    flat = _flat(params)
    plan = family.tensors(m)
    _check_plan(plan, flat, family)
    for path, want in _flat(abstract_params(m)).items():
        if tuple(flat[path].shape) != tuple(want.shape):
            raise ConvertError(f"parameter {path} has shape {list(flat[path].shape)} but the model config implies "
                               f"{list(want.shape)}; export with the config the parameters were trained with")
        if isinstance(flat[path], jax.Array) and not flat[path].is_fully_addressable:
            raise ConvertError("export gathers each tensor in this process, but the parameters span several "
                               "processes; run heft convert --to_hf in a single process")
    from heft.train import storage

    with storage.whole_or_removed(out_dir, ConvertError):
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = jnp.dtype(dtype or m.param_dtype)
        by_name = {t.hf: t for t in plan}
        sizes = {t.hf: int(np.prod(t.shape)) * dtype.itemsize for t in plan}
        shards = safetensors_io.plan_shards(sizes, max_shard_bytes)
        files = safetensors_io.shard_names(len(shards))
        for file, names in zip(files, shards):
            tensors = {}
            for name in names:
                t = by_name[name]
                parts = [np.asarray(flat[path] if layer is None else flat[path][layer]) for path, layer in t.heft]
                tensors[name] = np.ascontiguousarray(t.to_hf(*parts), dtype=dtype)
            safetensors_io.write_shard(out_dir, file, tensors)
            del tensors
        written = list(files)
        if len(files) > 1:
            weight_map = {name: file for file, names in zip(files, shards) for name in names}
            safetensors_io.write_index(out_dir, weight_map, sum(sizes.values()))
            written.append(safetensors_io.INDEX)
        bos, eos = tokenizer.special_ids(tokenizer_path)
        hf_config = family.hf_config(m, dtype.name, bos, eos)
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
        written.append("config.json")
        if tokenizer_path:
            written += tokenizer.write(tokenizer_path, out_dir)
    return written
