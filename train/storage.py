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
import errno
import json
import os

from etils import epath

from heft.data import paths as data_paths
from heft.data.paths import write_bytes  # noqa: F401  (one way to write a small file, for both stages)


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


def no_space(e: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the storage is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "disk quota exceeded" in text or "enospc" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


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


def device_of(p) -> str:
    """What to call the storage holding `p` in a message: `gs://bucket`, or the filesystem (device and
    mount point) from /proc/mounts."""
    p = str(p)
    if is_remote(p):
        scheme, _, rest = p.partition("://")
        return f"{scheme}://{rest.split('/')[0]}"
    best = ("", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount = line.split()[:2]
                if (p == mount or p.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[1]):
                    best = (device, mount)
    except OSError:
        return os.path.dirname(p)
    return f"{best[0]} (mounted at {best[1]})" if best[1] else os.path.dirname(p)
