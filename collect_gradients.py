#!/usr/bin/env python3
"""Stage 1 of CLEVER: sample gradient norms around test images.

For each test image and target class, draw N_b = --Niters batches of
N_s = --Nsamps points in an Lp ball around the image, compute the norms of
the gradient of g(x) = f_c(x) - f_j(x), and write one .mat file per
(image, target) with the per-batch maxima (format: docs/format.md), e.g.

    python collect_gradients.py -d digits -m normal -n 10 -N 1024 -i 500

Files already present are skipped, so an interrupted run resumes when run
again. Stage 2 is ``clever.py <save>/<dataset>_<model>``.
"""
from __future__ import annotations

import logging
import signal
import sys

import common
from settings import Stage1Settings

log = logging.getLogger("clever.collect")


def parse_args(argv) -> Stage1Settings:
    """The command line as a :class:`settings.Stage1Settings` (argparse errors exit 2 with
    its usage line; a bad value raises ``settings.SettingsError``, one line)."""
    return Stage1Settings.from_argv(argv, prog="collect_gradients.py",
                                    description=__doc__.split("\n\n")[0])


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(settings: Stage1Settings) -> int:
    """Stage 1 of ``settings`` into ``<save>/<dataset>_<model>``, the original's lines on stdout."""
    import stage1_run

    common.setup_logging(settings.verbose)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        stage1_run.run_lines(settings, sys.stdout, out_dir=settings.out_dir(),
                             progress=not settings.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog="collect_gradients.py"))
