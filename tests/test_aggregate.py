"""aggregate.py on hand-built values with known answers: the bound and its cap, the
per-info mean and minimum, the per-image minimum and n_classes; and that the callers
(clever.py, paper_tables.py) report what it computes."""
import math
import subprocess
import sys

import numpy as np
import pytest

import aggregate
import paper_tables
from aggregate import Reduce
from common import Norm


def test_file_bound_of_a_linear_classifier_and_its_cap():
    # g(x) = (w_c - w_j) . x + b: the bound is g(x0) / ||w_c - w_j||_q exactly.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(784,))
    g_x0 = 0.7
    lip_l2 = float(np.linalg.norm(w, 2))   # dual of L2 is L2
    b = aggregate.file_bound(1, g_x0, lip_l2, radius=5.0, sample_norm=Norm.L2,
                             bound_norm=Norm.L2, dim=784)
    assert b.uncapped == pytest.approx(g_x0 / lip_l2, rel=1e-15)
    assert b.cap == 5.0 and b.bound == b.uncapped    # far inside the ball
    # A radius below the bound caps it; Li inside an L2 ball of 784 dims: R / sqrt(784).
    b = aggregate.file_bound(1, g_x0, lip_l2, radius=0.01, sample_norm=Norm.L2,
                             bound_norm=Norm.L2, dim=784)
    assert (b.uncapped, b.cap, b.bound) == (g_x0 / lip_l2, 0.01, 0.01)
    b = aggregate.file_bound(1, 2.0, 1.0, radius=0.28, sample_norm=Norm.L2,
                             bound_norm=Norm.LINF, dim=784)
    assert b.cap == pytest.approx(0.01, rel=1e-15) and b.bound == b.cap and b.uncapped == 2.0
    # Unknown dimension where the cap needs it: not capped; L = 0: +inf, then capped.
    b = aggregate.file_bound(1, 2.0, 1.0, 0.28, Norm.L2, Norm.LINF, None)
    assert b.cap is None and b.bound == 2.0
    b = aggregate.file_bound(1, 2.0, 0.0, 0.5, Norm.L2, Norm.L2, 784)
    assert math.isinf(b.uncapped) and b.bound == 0.5
    # NaN stays NaN (never turned into the cap); second order: g / a as H -> 0.
    assert math.isnan(aggregate.capped(math.nan, 0.5))
    b = aggregate.file_bound(2, 1.5, 0.0, 5.0, Norm.L2, Norm.L2, 784, grad_norm=3.0)
    assert b.uncapped == 0.5 and b.bound == 0.5
    assert aggregate.reported(0.5, 0.9, radius_cap=True) == 0.5
    assert aggregate.reported(0.5, 0.9, radius_cap=False) == 0.9


def test_reduce_mean_min_and_nan():
    assert aggregate.reduce([1.0, 2.0, 6.0]) == 3.0
    assert aggregate.reduce([1.0, 2.0, 6.0], Reduce.MIN) == 1.0
    assert aggregate.reduce([3.0, 1.0], "min") == 1.0
    # a NaN is never hidden, wherever it stands
    for values in ([math.nan, 1.0], [1.0, math.nan]):
        assert math.isnan(aggregate.reduce(values, Reduce.MIN))
        assert math.isnan(aggregate.reduce(values, Reduce.MEAN))
    with pytest.raises(ValueError):
        aggregate.reduce([])


def test_reduce_fields_keeps_field_order_and_refuses_missing_fields():
    rows = [{"L1": 4.0, "L2": 1.0, "Li": 0.1}, {"L1": 2.0, "L2": 3.0, "Li": 0.3}]
    mean = aggregate.reduce_fields(rows)
    assert list(mean) == ["L1", "L2", "Li"]
    assert mean == pytest.approx({"L1": 3.0, "L2": 2.0, "Li": 0.2}, rel=1e-15)
    assert aggregate.reduce_fields(rows, Reduce.MIN) == {"L1": 2.0, "L2": 1.0, "Li": 0.1}
    # extra fields (e.g. an interval's ends) are carried like any other
    rows = [{"L2": 1.0, "L2_lo": 0.5}, {"L2": 3.0, "L2_lo": 2.5}]
    assert aggregate.reduce_fields(rows) == {"L2": 2.0, "L2_lo": 1.5}
    with pytest.raises(ValueError, match="L2_lo"):
        aggregate.reduce_fields([{"L2": 1.0, "L2_lo": 0.5}, {"L2": 3.0}])


def test_group_and_per_image_minimum():
    files = [(7, {"L2": 0.9, "Li": 0.05}), (0, {"L2": 0.4, "Li": 0.02}),
             (0, {"L2": 0.2, "Li": 0.03}), (7, {"L2": 1.2, "Li": 0.01}),
             (0, {"L2": 0.3, "Li": 0.01})]
    assert list(aggregate.group(files)) == [7, 0]          # first-seen order
    images = aggregate.per_image_minimum(files)
    assert [m.image for m in images] == [0, 7]              # sorted by id
    # each field on its own: the L2 and the Li minima may come from other files
    assert images[0].values == {"L2": 0.2, "Li": 0.01}
    assert images[1].values == {"L2": 0.9, "Li": 0.01}
    assert [m.n_files for m in images] == [3, 2]
    assert [m.n_classes for m in images] == [4, 3]          # files + the true class
    assert aggregate.n_classes(9) == 10 and aggregate.n_classes(1) == 2
    # and the overall mean over images, as clever.py --untargeted prints it
    overall = aggregate.reduce_fields([m.values for m in images])
    assert overall == pytest.approx({"L2": 0.55, "Li": 0.01}, rel=1e-15)


def _record(img, info, target, l2, true_label=1):
    norms = {label: {"bound": value} for label, value in (("L1", 10 * l2), ("L2", l2),
                                                          ("Li", l2 / 10))}
    return {"id": img, "true_label": true_label, "target_label": target, "info": info,
            "norms": norms}


def test_paper_tables_clever_u_uses_the_same_minimum_and_n_classes():
    # nine class files of a ten-class model: n_classes 10, the value reproduce_tables checks
    recs = [_record(3, f"class{j}", j, 1.0 + 0.1 * j) for j in range(10) if j != 1]
    recs.append(_record(3, "top2", 4, 0.7))
    unt = paper_tables.clever_rows(recs, "m", untargeted=True)
    assert len(unt) == 1 and unt[0]["n_classes"] == paper_tables.NUM_CLASSES == 10
    want = aggregate.per_image_minimum(
        (r["id"], {f"clever_{k}": n["bound"] for k, n in r["norms"].items()})
        for r in recs if r["info"].startswith("class"))[0]
    assert {k: unt[0][k] for k in want.values} == want.values
    assert unt[0]["clever_L2"] == 1.0                      # class0; top2 is not a class file
    tgt = paper_tables.clever_rows(recs, "m")
    assert [(r["kind"], r["n_classes"], r["clever_L2"]) for r in tgt] == [("top2", 2, 0.7)]


def test_import_aggregate_and_clever_stay_free_of_tensorflow():
    code = ("import sys, aggregate, clever\n"
            "assert clever.clever_bound is aggregate.clever_bound\n"
            "print('tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=aggregate.__file__.rsplit("/", 1)[0], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
