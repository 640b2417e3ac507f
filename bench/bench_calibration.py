"""`heft plan`'s predicted MFU against MaxText's published TPU runs, and the one calibration constant
per chip generation (train/chips.py `mxu_efficiency`) fitted to them.

    python bench/bench_calibration.py                  # compile every row (minutes apiece), write the JSON
    python bench/bench_calibration.py --table          # the table again from bench/calibration.json

Each row reproduces a published run as closely as heft's options allow: the model's shapes, the
batch, the sequence, FSDP over the slice and tensor parallelism as MaxText set them, flash
(splash) attention, and the remat policy nearest MaxText's (heft has none, save_matmuls and full;
MaxText's `minimal` saves the matmul outputs, as save_matmuls does). Where the step does not fit
whole, heft's next choice is planned instead (full remat, then 2, 4, ... micro-batches) and the row
says so.
The plans are compiled with mxu_efficiency = 1 and their per-region times kept in the JSON, so the
constant is fitted afterwards without compiling again: for each generation, the value that makes
the predicted step times match the published ones best (least squares of log(predicted /
published) over that generation's rows; a single row is matched exactly, and says so).
"""

import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JSON = os.path.join(HERE, "calibration.json")

# name, topology (libtpu's), published MFU, source, heft overrides, what heft cannot reproduce.
TIERING = "maxtext.readthedocs.io reference/models/tiering.md"
# The v5p table of MaxText's README as first published (commit 04262f3cf5d4, 2024-04-08, lines 61-63),
# each row run by MaxText/configs/v5p/{32b,64b,128b}.sh at that commit (per_device_batch_size 6, 3, 1;
# remat_policy=minimal). A later edit (9501baa1303c, 2025-01-23) put 67.76% beside the 32B row's
# unchanged 328 TFLOP/s per chip, which is 71.5% of v5p's 459: the first figure is kept.
OLD_README = ("github.com/AI-Hypercomputer/maxtext README.md at 04262f3cf5d4 ('Runtime Performance Results', "
              "v5p); MaxText/configs/v5p/{32b,64b,128b}.sh at the same commit")
ROWS = [
    ("Llama2-70B", "v5p:4x8x8", 0.654, TIERING + "; MaxText/configs/v5p/llama2_70b.sh",
     dict(model="llama2_70b", batch=4 * 256, seq=4096, tensor=1, remat="save_matmuls"),
     "remat save_dot_except_mlpwi -> save_matmuls (keeps the MLP's up-projections too)"),
    ("Llama3.1-8B", "v6e:16x16", 0.4546, "MaxText benchmarks/maxtext_trillium_model_configs.py llama3_1_8b_8192",
     dict(model="llama3_1_8b", batch=4 * 256, seq=8192, tensor=1, remat="full"),
     "MaxText offloads the layer inputs and q/k/v/out projections to host memory; heft cannot: full remat"),
    ("Llama2-70B on v6e", "v6e:16x16", 0.438, TIERING + "; maxtext_trillium_model_configs.py llama2_70b_4096_synthetic",
     dict(model="llama2_70b", batch=2 * 256, seq=4096, tensor=1, remat="save_matmuls"),
     "MaxText offloads the q/k/v projections to host memory (qkv_proj_offloaded); heft cannot"),
    ("Llama3.1-70B", "v6e:16x16", 0.5033, TIERING + "; maxtext_trillium_model_configs.py llama3_1_70b_8192",
     dict(model="llama3_1_70b", batch=5 * 256, seq=8192, tensor=1, remat="save_matmuls"),
     "MaxText offloads the layer inputs and q/k/v projections to host memory; heft cannot"),
    ("32B (MaxText default_32b)", "v5p:4x4x4", 0.7147, OLD_README,
     dict(model=("scale", 32), batch=6 * 64, seq=2048, tensor=4, remat="save_matmuls"), ""),
    ("64B (MaxText default_64b)", "v5p:4x4x4", 0.7031, OLD_README,
     dict(model=("scale", 64), batch=3 * 64, seq=2048, tensor=4, remat="save_matmuls"), ""),
    ("128B (MaxText default_128b)", "v5p:4x4x8", 0.6868, OLD_README,
     dict(model=("scale", 128), batch=1 * 128, seq=2048, tensor=8, remat="save_matmuls"), ""),
]


def maxtext_scaled(scale: int):
    """MaxText's base.yml model (width 2048, 16 heads of 128, MLP 7168, 16 layers, vocab 32000, SwiGLU)
    grown by `global_parameter_scale`: each doubling of the scale doubles, in turn, the heads and the
    MLP, then the width, then the depth (its pyconfig's get_individual_scales)."""
    from heft.configs import llama2_7b

    base, rem = divmod(int(math.log2(scale)), 3)
    heads = mlp = base + (rem > 0)
    width, depth = base + (rem > 1), base
    c = llama2_7b.get_config()
    c.name = f"maxtext_{scale}b"
    c.model.update(width=2048 * 2**width, heads=16 * 2**heads, kv_heads=16 * 2**heads, head_dim=128,
                   mlp_width=7168 * 2**mlp, depth=16 * 2**depth, max_len=2048)
    return c


def config(spec: dict):
    from heft.configs import llama2_70b, llama3_8b

    if spec["model"] == "llama2_70b":
        c = llama2_70b.get_config()
    elif spec["model"] == "llama3_1_70b":  # Llama 2 70B's shapes with Llama 3's vocabulary and RoPE
        c = llama2_70b.get_config()
        c.name = "llama3_1_70b"
        c.model.update(vocab=128256, rope_theta=500000.0, rope_scaling="llama3", max_len=8192)
    elif spec["model"] == "llama3_1_8b":
        c = llama3_8b.get_config()
        c.name = "llama3_1_8b"
        c.model.update(rope_scaling="llama3", max_len=8192)
    else:
        c = maxtext_scaled(spec["model"][1])
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, spec["tensor"]
    c.model.remat = spec["remat"]
    c.model.attention = "auto"  # splash on these TPUs (head_dim 128)
    c.train.update(batch_size=spec["batch"], seq_len=spec["seq"], micro_batches=1)
    return c


def compile_rows(names=None):
    """Each row's plan, as it is compiled (a generator: the caller keeps each as it comes)."""
    from heft.launch import plan
    from heft.train import chips

    for chip in chips.CHIPS.values():  # raw times: the constant is fitted afterwards
        object.__setattr__(chip, "mxu_efficiency", 1.0)
    for name, topology, published, source, spec, gap in ROWS:
        if names and not any(n in name for n in names):
            continue
        c = config(spec)
        start = time.perf_counter()
        p = plan.plan(c, topology)
        note = gap
        if not p.fits and c.model.remat != "full":  # heft's next choice: recompute more
            note = (gap + "; " if gap else "") + f"{c.model.remat} needs {p.total / 2**30:.0f} GiB/chip: full remat"
            c.model.remat = "full"
            p = plan.plan(c, topology)
        per_device = c.train.batch_size // p.chips
        # Then fewer sequences at a time: micro-batch counts that split each device's sequences evenly.
        counts = iter([n for n in range(2, per_device + 1) if per_device % n == 0])
        while not p.fits and (n := next(counts, None)) is not None:
            c.train.micro_batches = n
            note = (note + "; " if note else "") + f"{n} micro-batches to fit"
            p = plan.plan(c, topology)
        row = {"name": name, "topology": topology, "published_mfu": published, "source": source, "note": note,
               "wall_seconds": time.perf_counter() - start, "load": os.getloadavg()[0], "plan": _plain(p.to_json())}
        print(json.dumps({k: v for k, v in row.items() if k != "plan"} | {"mfu_raw": p.mfu, "fits": p.fits}),
              file=sys.stderr, flush=True)
        yield row


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def step_seconds(plan: dict, efficiency: float) -> float:
    """The plan's step time with its compute at `efficiency` of the peak (launch/plan.py's formula)."""
    scale = plan["mxu_efficiency"] / efficiency
    return math.fsum(r["trips"] * max(r["compute"] * scale, r["hbm"], r["ici"], r["dcn"]) for r in plan["regions"])


def mfu(plan: dict, efficiency: float) -> float:
    return plan["model_flops"] / step_seconds(plan, efficiency) / plan["peak_flops"]


def fit(rows: list[dict]) -> dict:
    """chip -> the efficiency minimising the squared log error of the step times (golden-section
    search: the error is unimodal in it)."""
    out = {}
    for chip in sorted({r["plan"]["chip"] for r in rows}):
        mine = [r for r in rows if r["plan"]["chip"] == chip and r["plan"]["fits"]]
        if not mine:  # nothing heft can run to fit to
            out[chip] = 1.0
            continue

        def loss(e):
            return math.fsum(math.log(mfu(r["plan"], e) / r["published_mfu"]) ** 2 for r in mine)

        lo, hi = 0.2, 1.0
        for _ in range(60):
            a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
            lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
        out[chip] = round((lo + hi) / 2, 3)
    return out


def validation(rows: list[dict]) -> list[dict]:
    """Per fitting row of a chip with at least two: the error (points of MFU) with the chip's constant
    fitted to all its rows (in-sample), fitted to its other rows alone (leave-one-out), and of the null
    baseline that predicts the other rows' mean published MFU."""
    out = []
    for r in rows:
        p = r["plan"]
        others = [o for o in rows if o is not r and o["plan"]["chip"] == p["chip"] and o["plan"]["fits"]]
        if not p["fits"] or not others:
            continue
        published = r["published_mfu"]
        out.append({"name": r["name"], "chip": p["chip"], "published": published,
                    "in_sample": 100 * (mfu(p, fit([r, *others])[p["chip"]]) - published),
                    "leave_one_out": 100 * (mfu(p, fit(others)[p["chip"]]) - published),
                    "null": 100 * (math.fsum(o["published_mfu"] for o in others) / len(others) - published)})
    return out


def validation_table(rows: list[dict]) -> str:
    v = validation(rows)
    if not v:
        return "no chip has two rows that fit: nothing to validate"
    lines = ["| run | chip | published MFU | in-sample error | leave-one-out error | null baseline error |",
             "|---|---|---|---|---|---|"]
    for x in v:
        lines.append(f"| {x['name']} | {x['chip']} | {x['published']:.2%} | {x['in_sample']:+.1f} | "
                     f"{x['leave_one_out']:+.1f} | {x['null']:+.1f} |")
    for chip in sorted({x["chip"] for x in v}):
        mine = [x for x in v if x["chip"] == chip]
        mae = {k: math.fsum(abs(x[k]) for x in mine) / len(mine) for k in ("in_sample", "leave_one_out", "null")}
        lines.append(f"| **{chip}: mean absolute error** ({len(mine)} rows) | | | {mae['in_sample']:.1f} | "
                     f"{mae['leave_one_out']:.1f} | {mae['null']:.1f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    constants = fit(rows)
    lines = ["| run | slice | heft's setting | GiB/chip | compute / HBM / ICI / exposed (s) | predicted MFU, "
             "uncalibrated | predicted MFU, calibrated | published MFU | difference | what heft cannot reproduce |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["plan"]
        e = constants[p["chip"]]
        scale = p["mxu_efficiency"] / e
        compute = math.fsum(x["trips"] * x["compute"] * scale for x in p["regions"])
        hbm = math.fsum(x["trips"] * x["hbm"] for x in p["regions"])
        ici = p["ici_seconds"] or 0.0
        step = step_seconds(p, e)
        exposed = step - math.fsum(x["trips"] * max(x["compute"] * scale, x["hbm"]) for x in p["regions"])
        calibrated = mfu(p, e)
        setting = (f"batch {p['batch']} x {p['seq_len']}, fsdp {p['mesh']['fsdp']} x tensor {p['mesh']['tensor']}, "
                   f"remat {p['remat']}, {p['micro_batches']} micro, attention {p['attention']}")
        lines.append(f"| {r['name']} | {r['topology']} ({p['chips']} chips) | {setting} | "
                     f"{p['total'] / 2**30:.1f} {'' if p['fits'] else '(does not fit)'} | "
                     f"{compute:.2f} / {hbm:.2f} / {ici:.2f} / {exposed:.2f} | {mfu(p, 1.0):.1%} | {calibrated:.1%} | "
                     f"{r['published_mfu']:.2%} | {100 * (calibrated - r['published_mfu']):+.1f} points | "
                     f"{r['note'] or '-'} |")
    lines.append("")
    counts = {chip: sum(r["plan"]["chip"] == chip and r["plan"]["fits"] for r in rows) for chip in constants}
    lines.append("calibration constants (mxu_efficiency, train/chips.py): "
                 + ", ".join(f"{chip} {e} (fitted to {counts[chip]} row{'s' * (counts[chip] > 1)})"
                             for chip, e in constants.items()))
    for chip, n in counts.items():
        others = [e for c, e in constants.items() if c != chip and counts[c] > 1]
        if n == 1 and others:  # one row fits its own constant exactly: test it with another generation's
            for r in rows:
                if r["plan"]["chip"] == chip:
                    lines.append(f"{r['name']} with the other generation's constant ({others[0]}) instead of its own: "
                                 f"predicted {mfu(r['plan'], others[0]):.1%} against {r['published_mfu']:.2%} published")
    return "\n".join(lines)


def main(argv):
    if "--table" in argv:
        rows = json.load(open(JSON))
    else:
        names = [a for a in argv[1:] if not a.startswith("--")]
        rows = json.load(open(JSON)) if os.path.exists(JSON) else []
        order = [r[0] for r in ROWS]
        for row in compile_rows(names):  # each row replaces its old one, written as soon as it is done
            rows = [r for r in rows if r["name"] != row["name"]] + [row]
            rows.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
            with open(JSON, "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))
    print()
    print(validation_table(rows))


if __name__ == "__main__":
    main(sys.argv)
