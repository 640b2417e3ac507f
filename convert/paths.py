"""Folders on this machine or in a bucket (`gs://...`), through etils `epath` (gcsfs serves gs://).

Libraries that want a file name (safetensors' `safe_open` and `save_file`, sentencepiece) get a
local copy: a remote file is streamed into a temporary file, one at a time, and deleted after.
"""

import contextlib
import os
import shutil
import tempfile

from etils import epath

from heft.convert.errors import ConvertError

CHUNK = 64 << 20  # bytes per read while streaming a file between here and a bucket


def path(p) -> epath.Path:
    return epath.Path(p)


def is_local(p) -> bool:
    return "://" not in os.fspath(p)


def join(folder, name: str) -> str:
    """`folder/name` as a string, for a local folder or a bucket one alike."""
    return os.fspath(path(folder) / name)


def holds_files(folder) -> bool:
    """The folder exists and is not empty."""
    p = path(folder)
    return p.is_dir() and any(True for _ in p.iterdir())


def is_file(p) -> bool:
    """`p` exists and is a file (not a folder)."""
    p = path(p)
    return p.exists() and not p.is_dir()


def copy(src, dst) -> None:
    """Streams one file from `src` to `dst`, either of them local or in a bucket."""
    with path(src).open("rb") as f, path(dst).open("wb") as g:
        shutil.copyfileobj(f, g, CHUNK)


@contextlib.contextmanager
def _temporary(name: str):
    """A fresh local file name ending in `name`, deleted when the block ends."""
    fd, tmp = tempfile.mkstemp(prefix="heft-convert-", suffix="-" + name)
    os.close(fd)
    try:
        yield tmp
    finally:
        os.remove(tmp)


@contextlib.contextmanager
def local_copy(p):
    """A local file name holding `p`'s bytes: `p` itself when it is local, else a temporary copy
    that is deleted when the block ends."""
    if is_local(p):
        yield os.fspath(p)
        return
    with _temporary(path(p).name) as tmp:
        copy(p, tmp)
        yield tmp


@contextlib.contextmanager
def written_locally(dst):
    """A local file name to write; when the block ends, the file is at `dst` (uploaded and deleted
    when `dst` is in a bucket)."""
    if is_local(dst):
        yield os.fspath(dst)
        return
    with _temporary(path(dst).name) as tmp:
        yield tmp
        copy(tmp, dst)


# Where convert may write, checked before the slow part (and before importing JAX).


def check_import_folder(out: str) -> None:
    """The checkpoint folder of an import must be new or empty."""
    if is_file(out):
        raise ConvertError(f"--out={out} is an existing file; pass a new directory for the checkpoint")
    if holds_files(out):
        raise ConvertError(f"{out} is not empty; pass a new directory for the checkpoint")


def check_export_folder(out: str) -> None:
    """The Hugging Face folder of an export may be new or hold other things, but not a file or a model."""
    if is_file(out):
        raise ConvertError(f"--out={out} is an existing file; pass a new folder for the Hugging Face model")
    if path(out).is_dir() and any(p.name.endswith((".safetensors", ".json")) for p in path(out).iterdir()):
        raise ConvertError(f"{out} already holds a model; pick an empty or new folder")
