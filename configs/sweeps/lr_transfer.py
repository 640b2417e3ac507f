"""Learning-rate transfer: the best learning rate at four widths, under the standard parametrisation
and under μP (model.init=mup, base width 64).

    heft sweep --sweep=configs/sweeps/lr_transfer.py --workdir=runs/lr_transfer --parallel=2

Depth 2, head_dim 32 at every width (heads grow with it), MLP 2x the width; 150 steps of 16 x 64
tokens at a constant rate after 15 warmup steps. The report gives each width's best rate (a
parabola in log lr around the best point) for both; under μP it should stay put.
"""

import itertools
import math

from heft.configs import tiny

WIDTHS = (64, 128, 256, 512)
LRS = (2**-12, 2**-10, 2**-8, 2**-6, 2**-4)
INITS = ("scaled_normal", "mup")


def points() -> dict:
    return {f"{'mup' if init == 'mup' else 'sp'}_w{w}_lr2e{round(math.log2(lr))}": {
        "model.init": init, "model.width": w, "model.heads": w // 32, "model.kv_heads": w // 32,
        "model.mlp_width": 2 * w, "train.lr": lr} for init, w, lr in itertools.product(INITS, WIDTHS, LRS)}


def get_config(point: str | None = None):
    c = tiny.get_config()
    c.name = "lr_transfer"
    c.model.depth = 2
    c.model.mup_base_width = 64
    c.train.update(steps=150, warmup_steps=15, schedule="constant", seq_len=64, batch_size=16, log_every=10,
                   eval_every=150, eval_batches=16, checkpoint_every=150)
    if point:
        c.update_from_flattened_dict(points()[point])
    return c
