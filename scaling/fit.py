"""Scaling laws fitted to a sweep's points: power laws with bootstrap intervals, and IsoFLOP optima.

A power law with an irreducible loss, L(x) = E + A·x^-α (x: parameters N, tokens D or compute C),
is linear in log space once E is fixed: log(L - E) = log A - α·log x. So the fit scans E over a
fine grid below the smallest loss, solves the linear least squares for each, keeps the E with the
least squared error in loss space, and refines around it. No optimiser to tune, no starting point
to guess; numpy alone.

Chinchilla's approach 2 (IsoFLOP profiles): at each compute budget C, the loss is a parabola in
log N; its vertex is N_opt(C), and D_opt(C) = C / (6·N_opt). Power laws N_opt ∝ C^a and D_opt ∝ C^b
over the budgets give the exponents.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + A·x^-alpha, with R² on the points and bootstrap 95% intervals ((low, high) per field)."""

    E: float
    A: float
    alpha: float
    r2: float
    n: int
    intervals: dict = dataclasses.field(default_factory=dict)

    def __call__(self, x):
        return self.E + self.A * np.power(np.asarray(x, float), -self.alpha)

    def to_json(self) -> dict:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "r2": self.r2, "points": self.n,
                "intervals_95": {k: list(v) for k, v in self.intervals.items()}}


def _linear_fit(x_log, y_log):
    """Least squares y = c0 + c1·x; returns (c0, c1)."""
    design = np.stack([np.ones_like(x_log), x_log], axis=1)
    (c0, c1), *_ = np.linalg.lstsq(design, y_log, rcond=None)
    return c0, c1


def _fit_for(E, x, y):
    """(A, alpha, squared error) of the best law with irreducible loss E."""
    c0, c1 = _linear_fit(np.log(x), np.log(y - E))
    A, alpha = math.exp(c0), -c1
    return A, alpha, float(np.sum((E + A * x ** -alpha - y) ** 2))


def _point_fit(x, y, grid: int = 400) -> tuple[float, float, float]:
    """(E, A, alpha) minimising the squared error, E in [0, min(y))."""
    top = float(np.min(y))
    best = None
    lo, hi = 0.0, top * (1 - 1e-6)
    for _ in range(3):  # a coarse scan, then two finer ones around the best E
        for E in np.linspace(lo, hi, grid):
            A, alpha, err = _fit_for(E, x, y)
            if best is None or err < best[3]:
                best = (E, A, alpha, err)
        step = (hi - lo) / grid
        lo, hi = max(0.0, best[0] - 2 * step), min(top * (1 - 1e-6), best[0] + 2 * step)
    return best[:3]


def power_law(x, y, bootstrap: int = 200, seed: int = 0) -> PowerLaw:
    """Fits L = E + A·x^-alpha to points (x > 0, y > 0); at least 3 points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        raise ValueError(f"a power law with an irreducible term needs at least 3 points, not {len(x)}")
    E, A, alpha = _point_fit(x, y)
    residual = np.sum((E + A * x ** -alpha - y) ** 2)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - residual / total if total > 0 else 1.0
    intervals = {}
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(x), len(x))
            if len(np.unique(x[pick])) < 3:
                continue
            samples.append(_point_fit(x[pick], y[pick], grid=100))
        if samples:
            s = np.array(samples)
            intervals = {name: (float(np.percentile(s[:, i], 2.5)), float(np.percentile(s[:, i], 97.5)))
                         for i, name in enumerate(("E", "A", "alpha"))}
    return PowerLaw(float(E), float(A), float(alpha), float(r2), len(x), intervals)


@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """Per compute budget, the loss-minimising N and D; and the exponents of N_opt(C), D_opt(C)."""

    budgets: list  # [{"compute", "n_opt", "d_opt", "loss_opt", "points"}]
    n_exponent: float | None  # a in N_opt ∝ C^a
    d_exponent: float | None  # b in D_opt ∝ C^b

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def isoflop(points: list[dict]) -> IsoFlop:
    """`points`: [{"compute": C, "params": N, "loss": L}], several N per budget (budgets equal within 5%)."""
    groups: list[list[dict]] = []
    for p in sorted(points, key=lambda p: p["compute"]):
        if groups and abs(p["compute"] / groups[-1][0]["compute"] - 1) < 0.05:
            groups[-1].append(p)
        else:
            groups.append([p])
    budgets = []
    for g in groups:
        if len(g) < 3:
            continue
        logn = np.log([p["params"] for p in g])
        loss = np.array([p["loss"] for p in g])
        c2, c1, c0 = np.polyfit(logn, loss, 2)
        if c2 <= 0:  # no minimum inside: the budget's sizes do not bracket the optimum
            continue
        vertex = -c1 / (2 * c2)
        compute = float(np.mean([p["compute"] for p in g]))
        n_opt = float(math.exp(vertex))
        budgets.append({"compute": compute, "n_opt": n_opt, "d_opt": compute / (6 * n_opt),
                        "loss_opt": float(c0 + c1 * vertex + c2 * vertex**2), "points": len(g)})
    n_exp = d_exp = None
    if len(budgets) >= 2:
        logc = np.log([b["compute"] for b in budgets])
        n_exp = float(_linear_fit(logc, np.log([b["n_opt"] for b in budgets]))[1])
        d_exp = float(_linear_fit(logc, np.log([b["d_opt"] for b in budgets]))[1])
    return IsoFlop(budgets, n_exp, d_exp)


def optimum(xs, ys) -> float:
    """The x (e.g. a learning rate) at the bottom of y, from a parabola in log x through the best point
    and its neighbours; the best point itself when it lies at an edge of the grid."""
    order = np.argsort(xs)
    x, y = np.log(np.asarray(xs, float)[order]), np.asarray(ys, float)[order]
    i = int(np.nanargmin(y))
    if i == 0 or i == len(x) - 1:
        return float(math.exp(x[i]))
    c2, c1, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    return float(math.exp(-c1 / (2 * c2))) if c2 > 0 else float(math.exp(x[i]))
