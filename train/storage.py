"""What train/ adds to the one path layer (heft.data.paths, which gives every stage its `path()`).

Paths reach these helpers as `epath.Path`, converted once where they entered (a flag, a config
field, `Checkpointer(workdir)`, `checkpoint.resolve`...). Two facts shape them:

- gcsfs caches directory listings, which goes stale when another host writes the same bucket;
  hosts coordinate through files here, so the cache is off for gs:// (heft.data.paths: train/
  reads what data/ wrote, never the other way).
- GCS has no atomic rename. A small file written here is either whole or absent on both: locally it
  is written beside its place and renamed; on GCS one upload is one object, visible only once
  complete (`paths.write_bytes`). What marks a larger thing complete is written last (see manifest.py).
"""

import contextlib
import json

from etils import epath

from heft.data import paths


def write_json(target: epath.Path, obj) -> None:
    paths.write_bytes(target, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(target: epath.Path):
    return json.loads(target.read_text())


def files_under(directory: epath.Path, skip=()) -> list[str]:
    """Every file below `directory` (one listing, even on GCS), as sorted paths relative to it;
    hidden files (a write in progress) and subfolders named in `skip` (custody's scratch) are left out."""
    base = str(directory).rstrip("/") + "/"
    rels = (name[len(base):] for name in paths.files_under(directory))
    return sorted(rel for rel in rels if rel.split("/")[0] not in skip)


@contextlib.contextmanager
def whole_or_removed(directory: epath.Path, error: type[Exception], remover: bool = True):
    """Around a write of new entries into `directory` (an export, a conversion): if it fails, what it
    added is removed, and `directory` too if it made it, since a half-written output would only block
    the next try ("already exists"); a full disk becomes one line, `error`. Only one process (`remover`)
    removes."""
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
        if paths.no_space(e):
            raise error(f"no space left on {paths.device_of(directory)} while writing {directory}; removed the "
                        "partial write; free some space or write elsewhere") from None
        raise
