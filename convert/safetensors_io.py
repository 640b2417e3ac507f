"""Safetensors on disk: read a Hugging Face weight folder one tensor at a time, write it sharded.

A folder holds `model.safetensors`, or shards named in `model.safetensors.index.json`
({"weight_map": {tensor name: file}}). Pickled weights (`.bin`, `.pt`, ...) run code when loaded,
so they are refused, never opened.
"""

import json
import os

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy reader needs)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from heft.convert.errors import ConvertError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The dtypes of weights heft imports; quantized or integer tensors are another kind of file.
FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


class Reader:
    """The tensors of one folder, by name. Each read opens its file, copies out one tensor and
    closes it again, so no mapping of a whole shard stays resident in this process."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files = _weight_map(folder)  # tensor name -> file name
        self._shapes = {}
        for file in sorted(set(self.files.values())):
            with safe_open(os.path.join(folder, file), "numpy") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    self._shapes[name] = (tuple(s.get_shape()), s.get_dtype())
        missing = sorted(n for n in self.files if n not in self._shapes)
        if missing:
            raise ConvertError(
                f"{INDEX} in {folder} maps {missing[0]} to {self.files[missing[0]]}, which does not hold it; "
                "re-download the checkpoint"
            )

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

    def read(self, name: str) -> np.ndarray:
        """One tensor, as a numpy array in its stored dtype."""
        with safe_open(os.path.join(self.folder, self.files[name]), "numpy") as f:
            return f.get_tensor(name)


def _weight_map(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder} is not a directory; pass the folder holding config.json and the weights")
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index} has no weight_map; re-download the checkpoint")
        for file in set(weight_map.values()):
            if not os.path.exists(os.path.join(folder, file)):
                raise ConvertError(f"{index} names {file}, which is not in {folder}; download every shard")
        return weight_map
    single = os.path.join(folder, SINGLE)
    if os.path.exists(single):
        with safe_open(single, "numpy") as f:
            return {name: SINGLE for name in f.keys()}
    pickled = sorted(f for f in os.listdir(folder) if f.endswith(PICKLED))
    if pickled:
        raise ConvertError(
            f"{folder} holds pickled weights ({', '.join(pickled)}), which heft never loads because unpickling "
            "runs code; convert them to safetensors first (e.g. with transformers: "
            "from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
        )
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
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


def write_shard(folder: str, file: str, tensors: dict[str, np.ndarray]) -> None:
    # transformers refuses safetensors files without a "format" entry in their metadata.
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(folder, file),
              metadata={"format": "pt"})


def write_index(folder: str, weight_map: dict[str, str], total_bytes: int) -> None:
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
