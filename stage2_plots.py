"""Figures of stage 2: one fit's histogram and pdf, a run's scores per image.

matplotlib on an Agg canvas (no display needed), imported only when a figure
is asked for.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from common import Norm
from weibull_fit import FitResult, FitStatus

if TYPE_CHECKING:
    import stage2


# --------------------------------------------------------------------------
# Figures (matplotlib, Agg canvas; imported only when asked for)
# --------------------------------------------------------------------------
def _figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def draw_fit(ax, samples: np.ndarray, fit: FitResult) -> None:
    """Draw the histogram of -S and the fitted weibull_min pdf on a matplotlib ``ax``.

    ``samples``: the batch maxima S [N_b] that were fitted; ``fit``: their fit.
    The title gives c, loc, scale, ks and pVal (notebooks draw this inline).
    """
    from scipy.stats import weibull_min

    s = np.asarray(samples, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size:
        ax.hist(-s, bins=20, density=True, histtype="stepfilled", alpha=0.5,
                label="-S (batch maxima)")
    if fit.status is FitStatus.FIT:
        lo, hi = -1.01 * float(s.max()), -0.99 * float(s.min())
        lo, hi = min(lo, hi, fit.loc), max(lo, hi)
        x = np.linspace(lo, hi, 200)
        with np.errstate(all="ignore"):
            ax.plot(x, weibull_min.pdf(x, fit.shape, fit.loc, fit.scale), "r-",
                    label="fitted weibull_min pdf")
        title = (f"c = {fit.shape:.2f}, loc = {fit.loc:.4g}, scale = {fit.scale:.4g}, "
                 f"ks = {fit.ks:.2f}, pVal = {fit.pval:.2f}")
    else:
        title = f"no fit ({fit.status.value}): estimate = max(S) = {fit.estimate:.4g}"
    if math.isfinite(fit.estimate):
        ax.axvline(-fit.estimate, color="k", linestyle="--", label="-estimate")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("-(maximum gradient norm)")
    ax.set_ylabel("pdf")
    ax.legend(loc="best", frameon=False, fontsize=8)


def plot_fit(samples: np.ndarray, fit: FitResult, path: str, label: str = "") -> None:
    """:func:`draw_fit` into a PNG at ``path``, with ``label`` as the figure's title."""
    fig = _figure()
    draw_fit(fig.add_subplot(1, 1, 1), samples, fit)
    if label:
        fig.suptitle(label, fontsize=8)
    fig.savefig(path)


def plot_summary(result: "stage2.RunResult", path: str) -> None:
    """Per image, the CLEVER L2 score of every target (and the minimum if untargeted);
    with ``--interval``, each score's interval as an error bar."""
    fig = _figure(max(6.4, 0.25 * len({fs.file.img_id for fs in result.files}) + 2), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    images = sorted({fs.file.img_id for fs in result.files})
    position = {img: i for i, img in enumerate(images)}
    series: dict[str, tuple[list, list, list, list]] = {}
    with_interval = result.options.interval > 0
    for fs in result.files:
        name = "per class" if result.options.untargeted else fs.file.info
        xs, ys, los, his = series.setdefault(name, ([], [], [], []))
        score = fs.scores[Norm.L2]
        xs.append(position[fs.file.img_id])
        ys.append(result.reported(score))
        lo, hi = result.reported_interval(score)
        los.append(lo)
        his.append(hi)
    markers = "os^vDP*X"
    for i, (name, (xs, ys, los, his)) in enumerate(sorted(series.items())):
        offset = 0.0 if result.options.untargeted else (i - (len(series) - 1) / 2) * 0.15
        x = np.asarray(xs) + offset
        ax.scatter(x, ys, s=18, marker=markers[i % len(markers)], label=name, alpha=0.8)
        if with_interval:
            y, lo, hi = (np.asarray(v, np.float64) for v in (ys, los, his))
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.errorbar(x[ok], y[ok], yerr=np.vstack([y[ok] - lo[ok], hi[ok] - y[ok]]),
                        fmt="none", ecolor=f"C{i}", elinewidth=0.8, capsize=2, alpha=0.8)
    per_image = [a for a in result.aggregates if a.level == "L1"]
    if per_image:
        ax.plot([position[a.image] for a in per_image], [a.values[Norm.L2] for a in per_image],
                "k_", markersize=14, label="CLEVER-u (min)")
    ax.set_xticks(range(len(images)))
    ax.set_xticklabels([str(i) for i in images], rotation=90, fontsize=7)
    ax.set_xlabel("image id")
    ax.set_ylabel("CLEVER L2 score" + ("" if result.options.radius_cap else " (uncapped)"))
    level = (f"; bars: {100 * result.options.interval:g}% interval of another seed"
             if with_interval else "")
    ax.set_title(f"CLEVER L2 per target ({result.options.method.value}, order "
                 f"{result.order}{level})", fontsize=9 if with_interval else None)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)

