"""Where the data stage's files live: a local disk, a shared filesystem or a `gs://` bucket, through one path layer.

Files are opened, read and written through etils `epath` (what orbax uses; gcsfs is its gs://
backend), so a corpus or a cache on gs:// takes the same code path as a local one. Three things
epath does not offer are done here with fsspec, the library epath itself calls for gs://:
listings that carry each file's size and version (epath lists names only, and a `stat` per
object would be one request each), recursive globs (epath refuses `**`), and the tensorstore
kvstore spec of a path.

GCS facts that shape the callers:
- gcsfs caches listings, which go stale when another host writes the bucket; hosts coordinate
  through files here, so that cache is off for gs:// (train/storage.py makes the same choice).
- GCS has no atomic rename. One upload is one object, visible only once complete, so a small
  file is written in one go (`write_bytes`); what marks a larger thing complete is written last.
"""

import errno
import os
import uuid

import fsspec
from etils import epath

from heft.data.errors import DataError

# Listings must be fresh: another host may have written a file since this one last looked.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

GLOB_CHARS = frozenset("*?[")


def is_gcs(p) -> bool:
    return str(p).startswith("gs://")


def path(p) -> epath.Path:
    """`p` as an epath: a gs:// URL as it is, a local path with `~` expanded."""
    p = str(p)
    return epath.Path(p if is_gcs(p) else os.path.expanduser(p))


def bucket(p) -> str:
    """The bucket of a gs:// path: gs://BUCKET/key -> BUCKET."""
    return str(p)[len("gs://"):].split("/", 1)[0]


def check_bucket(p, field: str) -> None:
    """Raises DataError if `p` is on a gs:// bucket that does not exist (no-op for local paths)."""
    if is_gcs(p) and not epath.Path(f"gs://{bucket(p)}").exists():
        raise DataError(f"{field}={str(p)!r}: the bucket gs://{bucket(p)} does not exist; create it or fix the path")


def kvstore(p) -> dict:
    """The tensorstore kvstore spec of a directory: the `gcs` driver for gs://, `file` otherwise."""
    p = str(p)
    if is_gcs(p):
        key = p[len("gs://"):].split("/", 1)[1] if "/" in p[len("gs://"):] else ""
        return {"driver": "gcs", "bucket": bucket(p), "path": key.rstrip("/") + "/"}
    return {"driver": "file", "path": os.path.expanduser(p)}


def _fs(p) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(str(p) if is_gcs(p) else os.path.expanduser(str(p)))


def _url(fs, name: str) -> str:
    return f"gs://{name}" if not isinstance(fs, fsspec.implementations.local.LocalFileSystem) else name


def version(info: dict) -> dict:
    """What changes whenever a file's content may have: on gs:// the object's generation and crc32c,
    locally its size and modification time."""
    if "generation" in info:
        return {"size": int(info["size"]), "generation": str(info["generation"]), "crc32c": info.get("crc32c")}
    return {"size": int(info["size"]), "mtime": info.get("mtime")}


def info(p) -> dict:
    """`version()` of one file. Raises FileNotFoundError if it is missing."""
    fs, name = _fs(p)
    return version(fs.info(name))


def _hidden(name: str, root: str) -> bool:
    rel = name[len(root):].lstrip("/") if name.startswith(root) else name
    return any(part.startswith(".") for part in rel.split("/"))


def files_under(directory) -> dict[str, dict]:
    """Every file below `directory` whose path below it has no hidden (dot) part: {path: version}."""
    fs, root = _fs(directory)
    found = fs.find(root, detail=True)
    return {_url(fs, n): version(i) for n, i in sorted(found.items())
            if i.get("type") == "file" and not _hidden(n, root.rstrip("/"))}


def glob(pattern) -> dict[str, dict]:
    """Files matching `pattern` ({path: version}, sorted), where `**` spans folders as in
    `glob.glob(recursive=True)`; as there, wildcards do not match hidden (dot) names."""
    fs, pat = _fs(pattern)
    root = pat[: min((pat.find(c) for c in GLOB_CHARS if c in pat), default=len(pat))].rsplit("/", 1)[0]
    found = fs.glob(pat, detail=True)
    return {_url(fs, n): version(i) for n, i in sorted(found.items())
            if i.get("type") == "file" and not _hidden(n, root)}


def exists(p) -> bool:
    return path(p).exists()


def is_dir(p) -> bool:
    return path(p).is_dir()


def is_file(p) -> bool:
    return path(p).is_file()


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def write_bytes(target, data: bytes) -> None:
    """Writes a whole small file so that a reader sees the old content, or none, or all of the new."""
    target = path(target)
    if is_gcs(target):
        target.write_bytes(data)  # one object upload: visible only once complete
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a crash leaves old or new, never empty
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, say: the half-written copy is not left behind
        raise


def remove_tree(p) -> None:
    """Deletes a folder and everything below it, if it exists."""
    p = path(p)
    try:
        if p.is_dir():
            p.rmtree()
    except FileNotFoundError:  # removed meanwhile, or on GCS a prefix with nothing under it
        pass


def remove_file(p) -> None:
    path(p).unlink(missing_ok=True)


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


def device_of(p) -> str:
    """What to call the storage holding `p` in a message: `gs://bucket`, or the filesystem (device and
    mount point) from /proc/mounts."""
    p = str(p)
    if "://" in p:
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
