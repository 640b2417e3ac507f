"""What convert/ adds to the one path layer (heft.data.paths): local files for libraries that want a
file name, and checks of where an import or an export may write.

Folders reach these helpers as `epath.Path` (local or `gs://...`), converted once where they entered
(`run_import`, `run_export`, `import_hf`, `export_hf`). Libraries that want a file name (safetensors'
`safe_open` and `save_file`, sentencepiece) get a local copy: a remote file is streamed into a
temporary file, one at a time, and deleted after.
"""

import contextlib
import os
import shutil
import tempfile

from etils import epath

from heft.convert.errors import ConvertError
from heft.data import paths

CHUNK = 64 << 20  # bytes per read while streaming a file between here and a bucket


def copy(src: epath.Path, dst: epath.Path) -> None:
    """Streams one file from `src` to `dst`, either of them local or in a bucket."""
    with src.open("rb") as f, dst.open("wb") as g:
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
def local_copy(p: epath.Path):
    """A local file name holding `p`'s bytes: `p` itself when it is local, else a temporary copy
    that is deleted when the block ends."""
    if not paths.is_remote(p):
        yield os.fspath(p)
        return
    with _temporary(p.name) as tmp:
        copy(p, paths.path(tmp))
        yield tmp


@contextlib.contextmanager
def written_locally(dst: epath.Path):
    """A local file name to write; when the block ends, the file is at `dst` (uploaded and deleted
    when `dst` is in a bucket)."""
    if not paths.is_remote(dst):
        yield os.fspath(dst)
        return
    with _temporary(dst.name) as tmp:
        yield tmp
        copy(paths.path(tmp), dst)


# Where convert may write, checked before the slow part (and before importing JAX).


def _is_file(p: epath.Path) -> bool:
    """`p` exists and is a file (not a folder)."""
    return p.exists() and not p.is_dir()


def check_import_folder(out: epath.Path) -> None:
    """The checkpoint folder of an import must be new or empty."""
    if _is_file(out):
        raise ConvertError(f"--out={out} is an existing file; pass a new directory for the checkpoint")
    if out.is_dir() and any(True for _ in out.iterdir()):
        raise ConvertError(f"{out} is not empty; pass a new directory for the checkpoint")


def check_export_folder(out: epath.Path) -> None:
    """The Hugging Face folder of an export may be new or hold other things, but not a file or a model."""
    if _is_file(out):
        raise ConvertError(f"--out={out} is an existing file; pass a new folder for the Hugging Face model")
    if out.is_dir() and any(p.name.endswith((".safetensors", ".json")) for p in out.iterdir()):
        raise ConvertError(f"{out} already holds a model; pick an empty or new folder")
