"""The tiny dense model's compiled train step as text, for checking that a change leaves it alone.

    python bench/dense_step_hlo.py OUT.hlo                              # whichever heft is imported
    PYTHONPATH=/tmp/pkg-BRANCH python bench/dense_step_hlo.py OTHER.hlo
    diff OUT.hlo OTHER.hlo

XLA's optimized HLO for one CPU device, with what names the source rather than the program left
out (op metadata, stack frames, file names), so two checkouts compare instruction for instruction.
"""

import re
import sys

import jax
import numpy as np

from heft.configs import tiny
from heft.train import compiled, sharding
from heft.train import state as train_state

SOURCE_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def step_text(config) -> str:
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    B, T = config.train.batch_size, config.train.seq_len
    batch = {name: np.zeros((B, T), np.int32) for name in ("inputs", "targets", "positions", "segment_ids")}
    batch["weights"] = np.ones((B, T), np.float32)
    state = train_state.abstract(config, mesh)
    with sharding.activated(mesh, config):
        lowered = compiled.train_step(config, mesh).lower(state, jax.device_put(batch, sharding.batch_sharding(config, mesh)))
        return lowered.compile().as_text()


def normalized(text: str) -> str:
    """The program alone: source tables, metadata and stack frame ids dropped."""
    out, skipping = [], False
    for line in text.split("\n"):
        if line in SOURCE_TABLES:
            skipping = True
            continue
        if skipping and not (line.startswith(("%", "ENTRY", "HloModule")) or line == ""):
            continue
        skipping = False
        line = re.sub(r"metadata=\{[^}]*\}", "", line)
        out.append(re.sub(r",? ?stack_frame_id=\d+", "", line))
    return "\n".join(out)


if __name__ == "__main__":
    c = tiny.get_config()
    c.mesh.data = 1
    with open(sys.argv[1], "w") as f:
        f.write(normalized(step_text(c)))
