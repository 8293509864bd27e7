"""Run a script of this toolkit and hold it still once it has written a result file.

Fault-injection tests need the run to be, for certain, in the middle of its work when
the fault lands, whatever the machine's speed. This driver wraps
``common.atomic_savemat`` (every result file of stage 1 and of the sweep's driver is
written through it): after the ``--after``-th file is complete on disk it prints
``[HOLD] <path>`` on stderr and then waits, inside the run, until the file named by
``--release`` exists (or, without ``--release``, until a signal ends it). The test
injects its fault on that line, an event rather than a delay.

    python tests/hold.py [--after N] [--release FILE] SCRIPT.py ARGS...
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold(release: str | None) -> None:
    if release is None:
        while True:  # a signal's handler raises out of pause(), or the signal kills us
            signal.pause()
    while not os.path.exists(release):
        time.sleep(0.05)


def main(argv: list[str]) -> None:
    after, release = 1, None
    while argv and argv[0].startswith("--"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        if flag == "--after":
            after = int(value)
        elif flag == "--release":
            release = value
        else:
            raise SystemExit(f"hold.py: unknown flag {flag}")
    script, args = argv[0], argv[1:]
    sys.path.insert(0, ROOT)
    import common

    original = common.atomic_savemat
    written = []

    def savemat_then_hold(path, data):
        original(path, data)
        written.append(path)
        if len(written) == after:
            print(f"[HOLD] {path}", file=sys.stderr, flush=True)
            _hold(release)

    common.atomic_savemat = savemat_then_hold
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
