"""Safetensors on disk or in a bucket: read a Hugging Face weight folder one tensor at a time,
write it sharded.

A folder holds `model.safetensors`, or shards named in `model.safetensors.index.json`
({"weight_map": {tensor name: file}}). Pickled weights (`.bin`, `.pt`, ...) run code when loaded,
so they are refused, never opened. Shapes and dtypes come from each file's JSON header alone (a
few kB, read in place even in a bucket); tensors are read with safetensors' `safe_open`, which
needs a local file, so a bucket's shard is streamed to a temporary file while its tensors are
read, and deleted before the next one.
"""

import contextlib
import json

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy reader needs)
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from heft.convert import paths
from heft.convert.errors import ConvertError
from heft.data import paths as data_paths

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The dtypes of weights heft imports; quantized or integer tensors are another kind of file.
FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
REDOWNLOAD = "download it again"


class Reader:
    """The tensors of one folder, by name. Each read opens its file, copies out one tensor and
    closes it again, so no mapping of a whole shard stays resident in this process. Read a bucket's
    tensors file by file: one shard at a time is kept in a local temporary file. Use it in a `with`
    block, which deletes that file at the end."""

    def __init__(self, folder: epath.Path):
        self.folder = folder
        self.files = _weight_map(folder)  # tensor name -> file name
        self._shapes = {}
        for file in sorted(set(self.files.values())):
            self._shapes.update(header(folder / file))
        missing = sorted(n for n in self.files if n not in self._shapes)
        if missing:
            raise ConvertError(
                f"{INDEX} in {folder} maps {missing[0]} to {self.files[missing[0]]}, which does not hold it; "
                "re-download the checkpoint"
            )
        # A bucket's folder: the one shard copied here, (file name, local path), and what deletes it.
        self._local, self._copies = None, contextlib.ExitStack()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._copies.close()
        self._local = None

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name][0]

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag, e.g. "BF16"."""
        return self._shapes[name][1]

    def check_float(self, name: str) -> None:
        if self.dtype(name) not in FLOATS:
            raise ConvertError(
                f"tensor {name} has dtype {self.dtype(name)}; heft imports floating-point weights only, "
                "so dequantize the checkpoint first"
            )

    def _file(self, file: str) -> str:
        """A local path holding `file`: the file itself, or this folder's one temporary copy."""
        source = self.folder / file
        if not data_paths.is_remote(source):
            return str(source)
        if self._local is None or self._local[0] != file:
            self.close()
            self._local = (file, self._copies.enter_context(paths.local_copy(source)))
        return self._local[1]

    def read(self, name: str) -> np.ndarray:
        """One tensor, as a numpy array in its stored dtype."""
        file = self.files[name]
        try:
            with safe_open(self._file(file), "numpy") as f:
                return f.get_tensor(name)
        except SafetensorError as e:
            raise ConvertError(f"{self.folder / file} cannot be read ({e}); {REDOWNLOAD}") from None


def header(file: epath.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype tag)} from a safetensors file's header, without its tensors.

    The layout is an 8-byte little-endian header length, the JSON header, then the tensors' bytes;
    a file whose size is not what its header describes (cut short by a download) is refused here,
    before any weight is read.
    """
    size = file.stat().length
    with file.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ConvertError(f"{file} is not a whole safetensors file ({size:,} bytes, too short for its header); "
                               f"{REDOWNLOAD}")
        try:
            entries = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{file} is not a safetensors file (its header is not JSON); {REDOWNLOAD}") from None
    entries.pop("__metadata__", None)
    try:
        end = max((e["data_offsets"][1] for e in entries.values()), default=0)
        shapes = {name: (tuple(e["shape"]), e["dtype"]) for name, e in entries.items()}
    except (KeyError, IndexError, TypeError):
        raise ConvertError(f"{file} has a malformed safetensors header; {REDOWNLOAD}") from None
    if 8 + n + end != size:
        raise ConvertError(f"{file} holds {size:,} bytes but its header describes {8 + n + end:,}: it is truncated "
                           f"or damaged; {REDOWNLOAD}")
    return shapes


def _weight_map(folder: epath.Path) -> dict[str, str]:
    if not folder.is_dir():
        raise ConvertError(f"{folder} is not a directory; pass the folder holding config.json and the weights")
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except json.JSONDecodeError:
            weight_map = None
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index} has no weight_map; re-download the checkpoint")
        for file in set(weight_map.values()):
            if not (folder / file).exists():
                raise ConvertError(f"{index} names {file}, which is not in {folder}; download every shard")
        return weight_map
    if (folder / SINGLE).exists():
        return {name: SINGLE for name in header(folder / SINGLE)}
    listing = [p.name for p in folder.iterdir()]
    pickled = sorted(f for f in listing if f.endswith(PICKLED))
    if pickled:
        raise ConvertError(
            f"{folder} holds pickled weights ({', '.join(pickled)}), which heft never loads because unpickling "
            "runs code; convert them to safetensors first (e.g. with transformers: "
            "from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
        )
    others = sorted(f for f in listing if f.endswith(".safetensors"))
    hint = f" (it has {', '.join(others)} but no {INDEX})" if others else ""
    raise ConvertError(f"{folder} has neither {SINGLE} nor {INDEX}{hint}; pass a Hugging Face model folder")


def shard_names(n: int) -> list[str]:
    """Hugging Face's file names for n shards."""
    if n == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Groups tensor names, in order, into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + [current] if current else shards


def write_shard(folder: epath.Path, file: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes one shard (locally, then uploaded when `folder` is in a bucket)."""
    with paths.written_locally(folder / file) as local:
        # transformers refuses safetensors files without a "format" entry in their metadata.
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, local, metadata={"format": "pt"})


def write_index(folder: epath.Path, weight_map: dict[str, str], total_bytes: int) -> None:
    text = json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
    (folder / INDEX).write_text(text)
