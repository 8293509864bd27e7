"""One aggregation of CLEVER bounds (pure NumPy: no TensorFlow, no printing).

Three steps turn Lipschitz estimates into the numbers the tools report:

1. a file's bound in one norm, capped at the sampling radius
   (:func:`clever_bound`, :func:`second_order_bound`, :func:`cap_for`,
   :func:`file_bound`);
2. the per-info summary over files, their mean or minimum
   (:func:`group`, :func:`reduce_fields`);
3. the per-image minimum over an image's files (:func:`per_image_minimum`):
   CLEVER-u when the files cover every other class.

``clever.py`` (its ``[STATS]`` lines), ``sweep.py`` (``summary.csv``) and
``paper_tables.py`` (the tables' CLEVER-u) call these and nothing else, so one
folder gives one set of numbers whichever tool reads it.

Values travel as mappings field -> float (one field per bound norm in
``clever.py``, the capped and the uncapped bound of a norm in ``sweep.py``):
every field is reduced on its own and in the same way, so a caller that
carries another per-file number (e.g. the two ends of an interval) adds a
field and nothing here changes.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

import common
from common import Norm

K = TypeVar("K", bound=Hashable)   # a field: a bound norm, a column name, ...
G = TypeVar("G", bound=Hashable)   # a group: an info, an image id, a job, ...
V = TypeVar("V")                    # what is grouped: one file's values, a record, ...


class Reduce(enum.Enum):
    """How a group's values become one: ``clever.py`` default, or ``--min``."""

    MEAN = "mean"
    MIN = "min"


# --------------------------------------------------------------------------
# 1. One file's bound
# --------------------------------------------------------------------------
def clever_bound(g_x0: float, lipschitz: float) -> float:
    """First-order CLEVER bound g(x0) / L (docs/format.md); +inf when L is 0.

    ``g_x0``: logit margin f_c(x0) - f_j(x0); ``lipschitz``: estimate of
    max ||grad g||_q in the dual norm q of the bound's norm p.
    """
    if lipschitz == 0.0:
        return math.inf if g_x0 > 0 else (math.nan if g_x0 == 0 else -math.inf)
    return float(g_x0) / float(lipschitz)


def second_order_bound(g_x0: float, grad_norm: float, curvature: float) -> float:
    """Second-order CLEVER L2 bound (GlobalSIP 2018, docs/format.md).

    (-a + sqrt(a^2 + 2 g H)) / H with a = ||grad g(x0)||_2, g = g(x0) and
    H >= 0 the estimated magnitude of the most negative curvature, computed as
    the algebraically equal 2 g / (a + sqrt(a^2 + 2 g H)) (multiply by the
    conjugate), which has no cancellation for small H and tends to the
    first-order value g / a as H -> 0 instead of dividing 0 by 0.
    """
    g, a, h = float(g_x0), float(grad_norm), float(curvature)
    root = math.sqrt(a * a + 2.0 * g * h) if a * a + 2.0 * g * h >= 0 else math.nan
    denom = a + root
    if denom == 0.0:
        return math.inf if g > 0 else math.nan
    return 2.0 * g / denom


def cap_for(radius: float, sample_norm: Norm, bound_norm: Norm, dim: int | None) -> float | None:
    """The radius cap of a bound in ``bound_norm`` (see :func:`common.radius_cap`).

    Returns None when the cap depends on the input dimension and ``dim`` is
    unknown (a file of the original tool with no dataset hint).
    """
    if dim is None:
        # The cap is R / d^e with e >= 0; it needs d only when e > 0, i.e.
        # when it differs between d = 1 and d = 2.
        if common.radius_cap(radius, sample_norm, bound_norm, 2) != float(radius):
            return None
        dim = 1
    return common.radius_cap(radius, sample_norm, bound_norm, int(dim))


def capped(uncapped: float, cap: float | None) -> float:
    """min(bound, cap); the bound itself when the cap is unknown or the bound is NaN."""
    return uncapped if cap is None or math.isnan(uncapped) else min(uncapped, cap)


@dataclass(frozen=True)
class FileBound:
    """One file's bound in one norm: as the original tool computed it, and capped."""

    uncapped: float         # g(x0) / L (order 1) or the second-order root
    cap: float | None       # radius cap in the bound's norm; None when unknown
    bound: float            # capped(uncapped, cap)


def file_bound(order: int, g_x0: float, estimate: float, radius: float, sample_norm: Norm,
               bound_norm: Norm, dim: int | None, grad_norm: float | None = None) -> FileBound:
    """The bound of one file in ``bound_norm`` from its fitted ``estimate``.

    Order 1: ``estimate`` is the Lipschitz constant in the dual norm; order 2:
    the curvature magnitude H, with ``grad_norm`` = ||grad g(x0)||_2. ``radius``
    and ``sample_norm``: the ball the file's points were drawn from; ``dim``:
    the input dimension (None: unknown).
    """
    if order == 1:
        uncapped = clever_bound(g_x0, estimate)
    else:
        uncapped = second_order_bound(g_x0, grad_norm, estimate)
    cap = cap_for(radius, sample_norm, bound_norm, dim)
    return FileBound(uncapped, cap, capped(uncapped, cap))


def reported(bound: float, bound_uncapped: float, radius_cap: bool = True) -> float:
    """The bound the tools report: capped, or uncapped for ``--no_radius_cap``."""
    return bound if radius_cap else bound_uncapped


# --------------------------------------------------------------------------
# 2. Groups of files: mean or minimum
# --------------------------------------------------------------------------
def reduce(values: Sequence[float], how: Reduce = Reduce.MEAN) -> float:
    """The mean or the minimum of ``values`` (at least one).

    A NaN among them gives NaN either way (an undefined bound is never hidden by
    a smaller one). The mean is Python's left-to-right sum over the count, the
    arithmetic ``clever.py`` has always printed.
    """
    if len(values) == 0:
        raise ValueError("nothing to reduce: a group without values")
    values = [float(v) for v in values]
    if Reduce(how) is Reduce.MIN:
        return float(np.min(values))
    return sum(values) / len(values)


def reduce_fields(rows: Sequence[Mapping[K, float]], how: Reduce = Reduce.MEAN) -> dict[K, float]:
    """Each field's mean or minimum over ``rows``, in the first row's field order.

    Every row must have the first row's fields (one run, one order: the same
    bound norms); a missing field is a ValueError, not a silently shorter mean.
    """
    if not rows:
        raise ValueError("nothing to reduce: a group without rows")
    fields = list(rows[0])
    for row in rows:
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"a row lacks the field {missing[0]!r} of the others")
    return {f: reduce([row[f] for row in rows], how) for f in fields}


def group(items: Iterable[tuple[G, V]]) -> dict[G, list[V]]:
    """(group key, item) pairs as key -> list of items, keys in first-seen order.

    The items are usually one file's values (a mapping field -> float).
    """
    out: dict[G, list[V]] = {}
    for key, values in items:
        out.setdefault(key, []).append(values)
    return out


# --------------------------------------------------------------------------
# 3. Images: the minimum over an image's files
# --------------------------------------------------------------------------
def n_classes(n_files: int) -> int:
    """Classes an image's minimum speaks for: one per file (its target) plus the true class.

    A file holds the bound between the true class and one target, so an image
    with a file for every other class of a K-class model has ``n_classes`` K,
    and one targeted file has 2. The ``n_classes`` of ``clever.py``'s
    ``[STATS][L1]`` lines and of ``paper_tables``' rows.
    """
    return int(n_files) + 1


@dataclass(frozen=True)
class ImageMinimum:
    """One image's minimum over its files, field by field."""

    image: int
    values: Mapping            # field -> minimum over the image's files
    n_files: int

    @property
    def n_classes(self) -> int:
        return n_classes(self.n_files)


def per_image_minimum(items: Iterable[tuple[int, Mapping[K, float]]]) -> list[ImageMinimum]:
    """Per image id, each field's minimum over that image's files; sorted by id.

    ``items``: (image id, values of one file). The caller decides which files
    enter (one run, one job): a minimum here never mixes what it is not given.
    """
    groups = group((int(img), values) for img, values in items)
    return [ImageMinimum(img, reduce_fields(groups[img], Reduce.MIN), len(groups[img]))
            for img in sorted(groups)]
