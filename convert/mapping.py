"""How one Hugging Face tensor corresponds to heft parameters: names, shapes and layout, both ways.

A family module (llama.py, gpt2.py) lists a `Tensor` for every tensor of a checkpoint. Layout
functions work on numpy arrays and return views where they can (transposes, reshapes that split
an axis, slices), so an import copies a tensor only when placing it on devices.
"""

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor.

    hf: its name in the safetensors files; shape: the shape it must have there.
    heft: the heft parameters it fills, as (dotted path, layer or None for unstacked parameters):
      the stacked block parameters take one layer's slice each.
    to_heft: the HF array -> one array per entry of `heft`, in heft's layout.
    to_hf: the heft arrays (one per entry of `heft`) -> the HF array.
    """

    hf: str
    shape: tuple[int, ...]
    heft: tuple[tuple[str, int | None], ...]
    to_heft: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def same(x):
    return x


def one(name: str, shape: tuple, path: str, layer: int | None = None, to_heft=same, to_hf=same) -> Tensor:
    """A tensor that fills exactly one heft parameter."""
    return Tensor(name, tuple(shape), ((path, layer),), lambda w: (to_heft(w),), to_hf)


def transposed(shape: tuple):
    """[out, in] (torch Linear) -> heft [in, *shape], where shape splits `out`; and back."""
    return (lambda w: w.T.reshape(w.shape[1], *shape)), (lambda x: x.reshape(x.shape[0], -1).T)


def split_columns(shape: tuple, n: int):
    """One [in, n * out] matrix (GPT-2's fused Conv1D) <-> n heft arrays [in, *shape]."""
    def to_heft(w):
        width = w.shape[1] // n
        return tuple(w[:, i * width:(i + 1) * width].reshape(w.shape[0], *shape) for i in range(n))

    def to_hf(*xs):
        return np.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)

    return to_heft, to_hf


def split_vector(shape: tuple, n: int):
    """One [n * out] bias <-> n heft arrays of `shape`."""
    def to_heft(b):
        width = b.shape[0] // n
        return tuple(b[i * width:(i + 1) * width].reshape(shape) for i in range(n))

    return to_heft, (lambda *xs: np.concatenate([x.reshape(-1) for x in xs]))
