"""Where heft's files live: a local disk, a shared filesystem or a `gs://` bucket, through one path layer.

Every stage (data, train, eval, convert...) turns a path it is given into an etils `epath.Path`
with `path()`, once, where the path enters (a flag, a config field, a public entry point such as
`checkpoint.resolve` or `Checkpointer(workdir)`); everything inside takes that epath and never
wraps it again. The rule is one for every stage:

- a URL (`gs://bucket/key`, anything with `scheme://`) is kept as it is;
- a local path has `~` expanded and is made absolute, relative to where heft started, so that it
  names the same file in every later message, in a cache's records, and to orbax (which wants
  absolute paths) whatever the process does after;
- an epath already in that form is returned as it is, so calling `path()` at an entry point that
  may also be reached from inside costs nothing and changes nothing.

Files are opened, read and written through epath (what orbax uses; gcsfs is its gs:// backend),
so a corpus, a cache or a checkpoint on gs:// takes the same code path as a local one. Three things
epath does not offer are done here with fsspec, the library epath itself calls for gs://:
listings that carry each file's size and version (epath lists names only, and a `stat` per
object would be one request each), recursive globs (epath refuses `**`), and the tensorstore
kvstore spec of a path. This layer lives in data/, the lowest floor that touches files, so that
train/ and the stages above it build on it (train/storage.py, convert/paths.py).

GCS facts that shape the callers:
- gcsfs caches listings, which go stale when another host writes the bucket; hosts coordinate
  through files here, so that cache is off for gs://.
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


def is_remote(p: epath.PathLike) -> bool:
    """Whether `p` is a URL (gs://...) rather than a local path."""
    return "://" in os.fspath(p)


def is_gcs(p: epath.PathLike) -> bool:
    return os.fspath(p).startswith("gs://")


def path(p: epath.PathLike) -> epath.Path:
    """`p` as the epath every function inside heft takes: a URL as it is, a local path with `~`
    expanded and made absolute; an epath already in that form is returned as it is."""
    if isinstance(p, epath.Path) and p.is_absolute():
        return p
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def bucket(p: epath.PathLike) -> str:
    """The bucket of a gs:// path: gs://BUCKET/key -> BUCKET."""
    return str(p)[len("gs://"):].split("/", 1)[0]


def check_bucket(p: epath.Path, field: str) -> None:
    """Raises DataError if `p` is on a gs:// bucket that does not exist (no-op for local paths)."""
    if is_gcs(p) and not path(f"gs://{bucket(p)}").exists():
        raise DataError(f"{field}={str(p)!r}: the bucket gs://{bucket(p)} does not exist; create it or fix the path")


def kvstore(p: epath.Path) -> dict:
    """The tensorstore kvstore spec of a directory: the `gcs` driver for gs://, `file` otherwise."""
    p = os.fspath(p)
    if is_gcs(p):
        key = p[len("gs://"):].split("/", 1)[1] if "/" in p[len("gs://"):] else ""
        return {"driver": "gcs", "bucket": bucket(p), "path": key.rstrip("/") + "/"}
    return {"driver": "file", "path": p}


def _fs(p: epath.Path) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(os.fspath(p))


def _url(fs, name: str) -> str:
    return f"gs://{name}" if not isinstance(fs, fsspec.implementations.local.LocalFileSystem) else name


def version(info: dict) -> dict:
    """What changes whenever a file's content may have: on gs:// the object's generation and crc32c,
    locally its size and modification time."""
    if "generation" in info:
        return {"size": int(info["size"]), "generation": str(info["generation"]), "crc32c": info.get("crc32c")}
    return {"size": int(info["size"]), "mtime": info.get("mtime")}


def info(p: epath.Path) -> dict:
    """`version()` of one file. Raises FileNotFoundError if it is missing."""
    fs, name = _fs(p)
    return version(fs.info(name))


def _hidden(name: str, root: str) -> bool:
    rel = name[len(root):].lstrip("/") if name.startswith(root) else name
    return any(part.startswith(".") for part in rel.split("/"))


def files_under(directory: epath.Path) -> dict[str, dict]:
    """Every file below `directory` whose path below it has no hidden (dot) part: {path: version}."""
    fs, root = _fs(directory)
    found = fs.find(root, detail=True)
    return {_url(fs, n): version(i) for n, i in sorted(found.items())
            if i.get("type") == "file" and not _hidden(n, root.rstrip("/"))}


def glob(pattern: str) -> dict[str, dict]:
    """Files matching `pattern` ({path: version}, sorted), where `**` spans folders as in
    `glob.glob(recursive=True)`; as there, wildcards do not match hidden (dot) names. A local
    pattern follows `path()`'s rule (`~` expanded, made absolute)."""
    fs, pat = _fs(path(pattern))
    root = pat[: min((pat.find(c) for c in GLOB_CHARS if c in pat), default=len(pat))].rsplit("/", 1)[0]
    found = fs.glob(pat, detail=True)
    return {_url(fs, n): version(i) for n, i in sorted(found.items())
            if i.get("type") == "file" and not _hidden(n, root)}


def write_bytes(target: epath.Path, data: bytes) -> None:
    """Writes a whole small file so that a reader sees the old content, or none, or all of the new."""
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


def remove_tree(p: epath.Path) -> None:
    """Deletes a folder and everything below it, if it exists."""
    try:
        if p.is_dir():
            p.rmtree()
    except FileNotFoundError:  # removed meanwhile, or on GCS a prefix with nothing under it
        pass


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


def device_of(p: epath.Path) -> str:
    """What to call the storage holding `p` in a message: `gs://bucket`, or the filesystem (device and
    mount point) from /proc/mounts."""
    p = os.fspath(p)
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
