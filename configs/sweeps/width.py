"""Width sweep on the embedded corpus: five widths of the tiny model at a fixed number of tokens.

    heft sweep --sweep=configs/sweeps/width.py --workdir=runs/width

Heads grow with the width (head_dim 32), the MLP is 3x the width, depth 4; every point sees the
same 400 x 16 x 128 = 819,200 tokens. Its fit is L(N) at fixed data (bench/RESULTS.md).
"""

from heft.configs import tiny

WIDTHS = (32, 64, 128, 192, 256)


def points() -> dict:
    return {f"w{w}": {"model.width": w, "model.heads": w // 32, "model.kv_heads": max(1, w // 64),
                      "model.mlp_width": 3 * w} for w in WIDTHS}


def get_config(point: str | None = None):
    c = tiny.get_config()
    c.name = "width_sweep"
    c.train.steps = 400
    c.train.warmup_steps = 40
    c.train.eval_every = 400
    c.train.eval_batches = 16
    c.train.checkpoint_every = 400
    if point:
        c.update_from_flattened_dict(points()[point])
    return c
