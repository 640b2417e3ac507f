"""A Hugging Face folder's files as `heft convert --from_hf` reads them: the one door through which
their bytes enter heft.

The folder is someone else's download, so nothing in it is trusted:
- every name, heft's own (`config.json`) or one a file gives (a weight_map's shard), passes `member`:
  it must stay inside the folder once `..` and symlinks are resolved, and name a regular file (a FIFO
  blocks a read forever, a device never ends). A symlink out of the folder is refused, except the hub
  cache's own, `models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH`, which stays in its repo;
- every read is bounded by a size checked before it starts (`read_bytes`);
- JSON comes back as an object (`read_json`), whose fields are checked for their kind before any
  family module reads them (`check_fields`): a size that is a string, a list where an object belongs,
  a missing field, each is one line naming the file, the field and what it must hold.
Sizes that must also agree with the tensors stored (layers, experts, shapes) are checked in hf.py,
against the safetensors headers, before anything is planned or allocated.
"""

import dataclasses
import json
import math
import os
import posixpath
import stat
from typing import Callable

from etils import epath

from heft.convert.errors import ConvertError
from heft.data import paths

# config.json is a few kB and the largest hub index (~90k tensors) about 10 MB; anything far beyond is
# not a Hugging Face file, and is refused before a byte of it is read.
MAX_JSON = 64 << 20


# Names inside the folder.


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _hub_blobs(root: str) -> str | None:
    """The blobs folder of a hub cache snapshot (`models--ORG--NAME/snapshots/REV`, resolved), whose files
    are symlinks into it; None for any other folder."""
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return os.path.join(repo, "blobs")
    return None


def member(folder: epath.Path, name, named_by: epath.Path | None = None) -> epath.Path | None:
    """`folder / name` when something is there, None when nothing is.

    folder: as heft.data.paths.path() gave it (a local absolute path, or a URL).
    named_by: the file that gave `name` (a weight_map's index), for the message; None for heft's own names.
    Raises ConvertError if `name` is not a relative file name, leads outside `folder` (through `..`, or
    a symlink), or names something other than a regular file.

    A local name is checked in its resolved form, by os.path.realpath: epath's resolve() only makes a
    path absolute and follows no symlink. A bucket has no symlinks, so there the name alone says where
    it leads.
    """
    source = named_by or folder
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ConvertError(f"{source} names {json.dumps(name)[:80]} as a file; it must be a file name in the model "
                           "folder: download it again")
    outside = ConvertError(f"{source} names {name!r}, which is outside {folder}; heft reads a model's files from its "
                           "own folder only, so keep every file in it")
    if paths.is_remote(folder):
        clean = posixpath.normpath(name)
        if posixpath.isabs(clean) or clean == ".." or clean.startswith("../"):
            raise outside
        full = folder / clean
        if not full.exists():
            return None
        if full.is_dir():
            raise ConvertError(f"{full} is a folder, not a file; pass a Hugging Face model folder as saved")
        return full
    root = os.path.realpath(folder)
    if os.path.isabs(name) or not _within(os.path.normpath(os.path.join(root, name)), root):
        raise outside
    full = folder / name
    if not os.path.lexists(full):
        return None
    real = os.path.realpath(full)
    blobs = _hub_blobs(root)
    if not (_within(real, root) or (blobs and _within(real, blobs))):
        raise ConvertError(f"{full} is a symlink to {real}, outside {folder}; heft reads a model's files from its own "
                           "folder only, so copy the file in")
    if not os.path.exists(real):  # a symlink to nothing inside the folder: as good as absent
        return None
    if not stat.S_ISREG(os.stat(real).st_mode):
        kind = "a folder" if os.path.isdir(real) else "not a regular file (a pipe, socket or device)"
        raise ConvertError(f"{full} is {kind}; heft reads only regular files, so replace it with the file as "
                           "downloaded")
    return full


# Bounded reads.


def read_bytes(path: epath.Path, limit: int) -> bytes:
    """The bytes of a file `member` returned, refused before reading when it holds more than `limit`."""
    size = path.stat().length
    if size > limit:
        raise ConvertError(f"{path} holds {size:,} bytes, more than the {limit:,} heft reads from such a file; it is "
                           "not the file Hugging Face saves: download it again")
    with path.open("rb") as f:
        data = f.read(size + 1)  # not limit + 1: a read allocates all it may return before it starts
    if len(data) != size:
        raise ConvertError(f"{path} changed while it was read ({size:,} bytes, then {len(data):,}); read it when "
                           "nothing is writing it")
    return data


def parse_json(data: bytes, path: epath.Path):
    """The JSON value of `data` (read from `path`), or a ConvertError naming the file."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a number too long, nesting too deep
        raise ConvertError(f"{path} is not valid JSON ({str(e)[:120]}); download it again") from None


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def read_json(path: epath.Path, limit: int = MAX_JSON) -> dict:
    """The JSON object in `path`, read bounded; a ConvertError if it is anything else."""
    value = parse_json(read_bytes(path, limit), path)
    if not isinstance(value, dict):
        raise ConvertError(f"{path} holds {_json_kind(value)}, not an object of fields; download it again")
    return value


# The kinds of config.json's fields.


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field must hold: `means` says it in the message, `test` checks a value; `optional` fields may be
    absent or null (read as absent); `fields` is the schema of an object's own fields."""

    means: str
    test: Callable[[object], bool]
    optional: bool = False
    fields: dict | None = None


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Sizes stay below 2**31: a shape dimension beyond that is no model's, and overflows index arithmetic.
SIZE = Kind("a positive integer below 2**31", lambda v: _integer(v) and 1 <= v < 2**31)
INDEX = Kind("an integer from 0 below 2**31", lambda v: _integer(v) and 0 <= v < 2**31)
NUMBER = Kind("a finite number", lambda v: (_integer(v) or isinstance(v, float)) and math.isfinite(v))
FLAG = Kind("true or false", lambda v: isinstance(v, bool))
TEXT = Kind("a string", lambda v: isinstance(v, str))
TEXTS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))


def optional(kind: Kind) -> Kind:
    return dataclasses.replace(kind, optional=True)


def obj(fields: dict, optional: bool = True) -> Kind:
    """An object whose own fields follow `fields`."""
    return Kind("an object", lambda v: isinstance(v, dict), optional, fields)


def check_fields(values: dict, schema: dict, path: epath.Path, within: str = "") -> dict:
    """`values` with each field of `schema` checked for its kind, and optional nulls dropped (read as
    absent); other fields pass as they are. A ConvertError names the file, the field and its kind."""
    out = dict(values)
    for name, kind in schema.items():
        field = within + name
        if values.get(name) is None:
            if not kind.optional:
                raise ConvertError(f"{path} has no field {field}, which must be {kind.means}; add it (the Hugging "
                                   "Face file of this model has it)")
            out.pop(name, None)
            continue
        value = values[name]
        if not kind.test(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ConvertError(f"{path} has {field}={shown} ({_json_kind(value)}), but it must be {kind.means}; "
                               "fix it there")
        if kind.fields is not None:
            out[name] = check_fields(value, kind.fields, path, field + ".")
    return out
