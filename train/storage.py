"""Where a run's files live: a local disk, a shared filesystem or a `gs://` bucket, through one path layer.

Every path heft's training side opens goes through `path()` (etils `epath`, which orbax uses too;
gcsfs is its gs:// backend), so local folders and buckets share one code path. Two facts shape it:

- gcsfs caches directory listings, which goes stale when another host writes the same bucket;
  hosts coordinate through files here, so the cache is turned off for gs:// (heft.data.paths,
  which this module builds on: train/ reads what data/ wrote, never the other way).
- GCS has no atomic rename. A small file written here is either whole or absent on both: locally it
  is written beside its place and renamed; on GCS one upload is one object, visible only once
  complete. What marks a larger thing complete is written last (see manifest.py).
"""

import contextlib
import json
import os

from etils import epath

from heft.data import paths as data_paths
from heft.data.paths import device_of, no_space, write_bytes  # noqa: F401  (shared with data/)


def is_remote(p) -> bool:
    return "://" in str(p)


def path(p) -> epath.Path:
    """An epath for a local path (made absolute: a relative one is relative to where heft started)
    or a URL such as gs://bucket/run."""
    p = str(p)
    return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.path.expanduser(p)))


def write_json(target, obj) -> None:
    write_bytes(target, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(target):
    return json.loads(path(target).read_text())


def files_under(directory, skip=()) -> list[str]:
    """Every file below `directory` (one listing, even on GCS), as sorted paths relative to it;
    hidden files (a write in progress) and subfolders named in `skip` (custody's scratch) are left out."""
    directory = path(directory)
    base = str(directory).rstrip("/") + "/"
    rels = (name[len(base):] for name in data_paths.files_under(directory))
    return sorted(rel for rel in rels if rel.split("/")[0] not in skip)


@contextlib.contextmanager
def whole_or_removed(directory, error: type[Exception], remover: bool = True):
    """Around a write of new entries into `directory` (an export, a conversion): if it fails, what it
    added is removed, and `directory` too if it made it, since a half-written output would only block
    the next try ("already exists"); a full disk becomes one line, `error`. Only one process (`remover`)
    removes."""
    directory = path(directory)
    existed = directory.exists()
    before = {p.name for p in directory.iterdir()} if existed else set()
    try:
        yield
    except Exception as e:
        if remover and directory.exists():
            for p in directory.iterdir():
                if p.name not in before:
                    p.rmtree(missing_ok=True) if p.is_dir() else p.unlink(missing_ok=True)
            if not existed:
                directory.rmtree(missing_ok=True)
        if no_space(e):
            raise error(f"no space left on {device_of(directory)} while writing {directory}; removed the "
                        "partial write; free some space or write elsewhere") from None
        raise


