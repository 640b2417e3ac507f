"""A sweep's report: one row per point, the fits, and plots, written to WORKDIR/report/.

    table.csv, table.md   name, overrides, parameters, tokens, compute, final losses
    fits.json             L(N) and L(C) power laws (bootstrap 95% intervals, R²); the IsoFLOP analysis
    curves.png            training loss against tokens, one line per point
    loss_vs_params.png, loss_vs_tokens.png, loss_vs_compute.png   final held-out loss, with the fits

Parameters and FLOPs come from `heft size` (train/size.py): N is the non-embedding parameter count
and compute is training FLOPs per token (6N plus attention) times tokens seen, as `heft train`'s
MFU counts them.
"""

import csv
import io

import numpy as np
from etils import epath

from heft.data import paths
from heft.scaling import fit, sweep
from heft.train import size, storage


def row(point: sweep.Point) -> dict | None:
    """One point's numbers, or None if it has no held-out loss yet."""
    rows = sweep.metrics(point.workdir)
    evals = [r for r in rows if "eval_loss" in r]
    losses = [r for r in rows if "loss" in r]
    if not evals:
        return None
    c = point.config
    r = size.report(c)
    steps = evals[-1]["step"]
    tokens = steps * c.train.batch_size * c.train.seq_len
    return {
        "name": point.name,
        **{k: v for k, v in point.overrides.items()},
        "params": r["non_embedding_params"],
        "total_params": r["total_params"],
        "steps": steps,
        "tokens": tokens,
        "compute": r["flops_per_token"] * tokens,
        "train_loss": float(np.mean([x["loss"] for x in losses[-3:]])) if losses else None,
        "eval_loss": evals[-1]["eval_loss"],
        "status": point.status,
    }


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fits(rows: list[dict]) -> dict:
    """The power laws over the points' final held-out losses (those that can be fitted); for a sweep
    over the learning rate, each setting's best rate instead (a size there has a loss per rate, so a
    law through all of them would fit the rates, not the sizes)."""
    if lr := lr_optima(rows):
        return {"lr_optimum": lr}
    out = {}
    for axis in ("params", "compute", "tokens"):
        xs = np.array([r[axis] for r in rows], float)
        if len(np.unique(xs)) >= 3:
            out[f"loss_vs_{axis}"] = fit.power_law(xs, [r["eval_loss"] for r in rows]).to_json()
    iso = fit.isoflop([{"compute": r["compute"], "params": r["params"], "loss": r["eval_loss"]} for r in rows])
    if iso.budgets:
        out["isoflop"] = iso.to_json()
    return out


def _groups(rows: list[dict], over: str) -> dict:
    """Rows grouped by every override but `over`: {(("model.width", 64), ...): [rows]}."""
    keys = [k for k in rows[0] if "." in k and k != over]
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple((k, r[k]) for k in keys), []).append(r)
    return groups


def lr_optima(rows: list[dict]) -> list[dict]:
    """For a sweep over `train.lr`: each other setting's best learning rate (fit.optimum)."""
    if not rows or "train.lr" not in rows[0]:
        return []
    out = []
    for key, group in _groups(rows, "train.lr").items():
        if len({r["train.lr"] for r in group}) >= 3:
            lrs, losses = [r["train.lr"] for r in group], [r["eval_loss"] for r in group]
            out.append({**dict(key), "lr_opt": fit.optimum(lrs, losses), "loss_at_best": float(np.nanmin(losses)),
                        "lrs": len(group)})
    return out


def _plots(rows: list[dict], points: list[sweep.Point], laws: dict, out: epath.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.write_bytes(out / name, buf.getvalue())
        written.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        data = [r for r in sweep.metrics(p.workdir) if "loss" in r]
        if data:
            tokens = [r["step"] * p.config.train.batch_size * p.config.train.seq_len for r in data]
            ax.plot(tokens, [r["loss"] for r in data], label=p.name)
    ax.set(xscale="log", xlabel="tokens seen", ylabel="training loss (nats/token)", title="loss curves")
    ax.legend(fontsize=7)
    save(fig, "curves.png")
    for axis, label in (("params", "non-embedding parameters N"), ("tokens", "tokens D"), ("compute", "compute C (FLOPs)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = np.array([r[axis] for r in rows], float)
        ax.scatter(xs, [r["eval_loss"] for r in rows], color="k", zorder=3)
        for r in rows:
            ax.annotate(r["name"], (r[axis], r["eval_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        law = laws.get(f"loss_vs_{axis}")
        if law:
            grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 100)
            ax.plot(grid, law["E"] + law["A"] * grid ** -law["alpha"],
                    label=f"{law['E']:.2f} + {law['A']:.3g}·x^-{law['alpha']:.3f} (R² {law['r2']:.3f})")
            ax.legend(fontsize=8)
        ax.set(xscale="log", xlabel=label, ylabel="held-out loss (nats/token)", title=f"final loss vs {axis}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a sweep's short span labels every minor tick
        save(fig, f"loss_vs_{axis}.png")
    if laws.get("lr_optimum"):
        panels = sorted({r.get("model.init", "") for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels):
            for key, group in sorted(_groups([r for r in rows if r.get("model.init", "") == panel], "train.lr").items()):
                group = sorted(group, key=lambda r: r["train.lr"])
                label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in key if k != "model.init")
                ax.plot([r["train.lr"] for r in group], [r["eval_loss"] for r in group], marker="o", label=label)
            ax.set(xscale="log", xlabel="learning rate", title=panel or "learning rate")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("held-out loss (nats/token)")
        save(fig, "loss_vs_lr.png")
    return written


def write(path: str, workdir: epath.PathLike, plots: bool = True) -> dict:
    """Collects every point with a held-out loss, writes the table, fits and plots; returns the fits."""
    workdir = paths.path(workdir)
    points = sweep.points(path, workdir)
    rows = [r for r in (row(p) for p in points) if r is not None]
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return {}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths.write_bytes(out / "table.csv", buf.getvalue().encode())
    paths.write_bytes(out / "table.md", _markdown(rows).encode())
    laws = fits(rows)
    storage.write_json(out / "fits.json", laws)
    if plots:
        _plots(rows, points, laws, out)
    return {"rows": rows, "fits": laws, "report": str(out)}


def summary(result: dict) -> str:
    if not result:
        return "heft sweep: no point has a held-out loss yet; run the sweep first"
    lines = [f"heft sweep: {len(result['rows'])} points; report in {result['report']}"]
    for name, law in result["fits"].items():
        if name.startswith("loss_vs_"):
            ci = law["intervals_95"].get("alpha")
            ci = f" (α's 95% CI {ci[0]:.3f}..{ci[1]:.3f})" if ci else ""
            lines.append(f"  {name}: L = {law['E']:.3f} + {law['A']:.4g}·x^-{law['alpha']:.3f}{ci}, R² {law['r2']:.3f}")
    by_panel: dict = {}
    for o in result["fits"].get("lr_optimum", []):
        by_panel.setdefault(o.get("model.init", ""), []).append(o)
    for panel, optima in sorted(by_panel.items()):
        best = [o["lr_opt"] for o in optima]
        lines.append(f"  best lr{' (' + panel + ')' if panel else ''}: "
                     + ", ".join(f"{o.get('model.width', '')}: {o['lr_opt']:.2e}" for o in optima)
                     + f"; spread {max(best) / min(best):.1f}x")
    iso = result["fits"].get("isoflop")
    if iso and iso["n_exponent"] is not None:
        lines.append(f"  isoflop: N_opt ∝ C^{iso['n_exponent']:.3f}, D_opt ∝ C^{iso['d_exponent']:.3f} "
                     f"over {len(iso['budgets'])} budgets")
    return "\n".join(lines)
