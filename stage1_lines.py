"""The original tool's printed stage-1 lines, built from a run's events.

``collect_gradients.py`` prints them on stdout; ``reproduce_tables.py`` writes
them into its stage-1 logs. Pure formatting, plus :class:`LinePrinter`, which
writes the lines of a :func:`stage1_run.collect` run to a stream it is given.
"""
from __future__ import annotations

import time
from typing import TextIO

import numpy as np

import stage1
from utils import datagen_line


def iteration_line(st, k: int, target_label: int, elapsed: float) -> str:
    """The original's per-iteration ``[STATS][L2]`` line for target ``k`` of ``st``.

    Order 1 reports the gradient norms (G2, G1, Ginf), preceded by the SLOPE
    maxima (L2, L1, Linf) with --compute_slope; order 2 the curvature H2.
    ``target_class`` at the end is this toolkit's (all targets share a loop).
    """
    g = st.grad_max[k]
    if len(g) == 1:
        values = f"H2 = {g[0]:.5g}"
    else:
        values = f"G2 = {g[1]:.5g}, G1 = {g[0]:.5g}, Ginf = {g[2]:.5g}"
        if st.slope_max is not None:
            s = st.slope_max[k]
            values = f"L2 = {s[1]:.5g}, L1 = {s[0]:.5g}, Linf = {s[2]:.5g}, " + values
    return (f"[STATS][L2] loop = {st.iteration}, time = {elapsed:.5g}, iter_time = "
            f"{st.seconds:.5g}, overhead = {st.wait:.5g}, {values}, target_class = {target_label}")


def summary_lines(record: dict, compute_slope: bool) -> list[str]:
    """The original's per-(image, target) ``[STATS][L1]`` lines after the iterations.

    ``record``: the file's keys (``stage1.mat_record``). Order 1: g_x0 and the
    maxima over iterations, then the bounds g_x0 / max with the dual norms
    (bnd_G2 from G2, bnd_G1 from Ginf, bnd_Ginf from G1; likewise for the
    slopes). Order 2: the gradient norms at x0, max |H2| and the second-order bound.
    """
    g0 = np.float64(record["g_x0"])
    with np.errstate(divide="ignore", invalid="ignore"):
        if "H2_max" in record:
            g1, g2, gi = (np.float64(record[k]) for k in (
                "g_x0_grad_1_norm", "g_x0_grad_2_norm", "g_x0_grad_inf_norm"))
            h = np.float64(np.max(np.abs(record["H2_max"])))
            # H = 0 (no curvature): the bound's limit, the first-order g_x0 / ||grad||.
            bnd = (-g2 + np.sqrt(g2 ** 2 + 2 * g0 * h)) / h if h != 0 else g0 / g2
            return [f"[STATS][L1] g_x0 = {g0:.5g}, g_x0_grad_2_norm = {g2:.5g}, g_x0_grad_1_norm = "
                    f"{g1:.5g}, g_x0_grad_inf_norm = {gi:.5g}, H2_max = {h:.5g}",
                    f"[STATS][L1] bnd_H2_max = {bnd:.5g}"]
        G1, G2, Gi = (np.float64(np.max(record[k])) for k in ("G1_max", "G2_max", "Gi_max"))
        L1, L2, Li = (np.float64(np.max(record[k])) for k in ("L1_max", "L2_max", "Li_max"))
        lines = [f"[STATS][L1] g_x0 = {g0:.5g}, L2_max = {L2:.5g}, L1_max = {L1:.5g}, Linf_max = "
                 f"{Li:.5g}, G2_max = {G2:.5g}, G1_max = {G1:.5g}, Ginf_max = {Gi:.5g}"]
        grad_bnd = (f"bnd_G2_max = {g0 / G2:.5g}, bnd_G1_max = {g0 / Gi:.5g}, "
                    f"bnd_Ginf_max = {g0 / G1:.5g}")
        if compute_slope:
            lines.append(f"[STATS][L1] bnd_L2_max = {g0 / L2:.5g}, bnd_L1_max = {g0 / Li:.5g}, "
                         f"bnd_Linf_max = {g0 / L1:.5g}, " + grad_bnd)
        else:
            lines.append("[STATS][L1] " + grad_bnd)
    return lines


def file_line(seq: int, result, elapsed: float) -> str:
    """The ``[STATS][L1] total = ...`` line closing a file (``result``: a ``FileResult``)."""
    return ("[STATS][L1] total = {}, seq = {}, id = {}, time = {:.3f}, true_class = {}, "
            "target_class = {}, info = {}".format(seq + 1, seq, result.image_id, elapsed,
                                                  result.true_label, result.target_label,
                                                  result.info))


class LinePrinter:
    """The hooks of :func:`stage1_run.collect` that write the original's lines to ``stream``:
    ``[DATAGEN]`` per image, ``[STATS][L2]`` per iteration and target (unless ``quiet``),
    ``[STATS][L1]`` per file."""

    def __init__(self, stream: TextIO, *, quiet: bool = False, compute_slope: bool = False):
        self.stream, self.quiet, self.compute_slope = stream, quiet, compute_slope
        self.start = time.time()
        self.seq_of: dict = {}

    def on_tasks(self, tasks) -> None:
        for task in tasks:
            print(datagen_line(task), file=self.stream, flush=True)
        self.seq_of = stage1.pair_sequence(tasks)
        self.start = time.time()

    def on_iteration(self, task, targets, st) -> None:
        if not self.quiet:
            for k, target in enumerate(targets):
                print(iteration_line(st, k, target.label, time.time() - self.start),
                      file=self.stream)

    def on_file(self, result) -> None:
        for line in summary_lines(result.record, self.compute_slope):
            print(line, file=self.stream)
        seq = self.seq_of[(result.image_id, result.target_label, result.info)]
        print(file_line(seq, result, time.time() - self.start), file=self.stream, flush=True)
