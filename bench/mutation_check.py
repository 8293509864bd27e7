"""Mutation check: deliberate faults that the test suite must catch.

Copies the repository (``git ls-files`` plus untracked files git does not
ignore) to a scratch folder, then for each fault: applies it as an exact text
substitution (the pattern must occur exactly once, else the fault is reported
``MISSING``), runs the test files named for it with ``pytest -x -q`` in the
scratch copy, restores the file, and prints one line:

    KILLED <name> by <test>     a test failed, as it must
    SURVIVED <name>             every selected test passed: a gap in the suite
    MISSING <name> (<file>)     the code changed; update the pattern

Exit status 1 if any fault survived or is missing. It need not run in CI (it
runs the selected tests once per fault); run it before releasing:

    .venv/bin/python bench/mutation_check.py            # all faults
    .venv/bin/python bench/mutation_check.py --only wrong_least,cap_exponent
    .venv/bin/python bench/mutation_check.py --baseline # also run each selection unmutated
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Fault:
    name: str
    path: str          # file to mutate, relative to the repository root
    old: str           # exact text, must occur once
    new: str
    tests: tuple       # pytest arguments (files, -k expressions)
    why: str


FAULTS = [
    # -- target selection (utils.py) --------------------------------------
    Fault("wrong_least", "utils.py",
          "least = order[0]", "least = order[1]",
          ("tests/test_known_answers.py", "-k", "least or random or background"),
          "least-likely target is the second lowest logit"),
    Fault("random_may_be_top2", "utils.py",
          "taken = {int(least), int(top2), int(predicted)}",
          "taken = {int(least), int(predicted)}",
          ("tests/test_known_answers.py", "-k", "random"),
          "the random target may repeat the top-2 class"),
    Fault("random_skips_misclassified", "utils.py",
          "if not uses_user_targets(kinds, mine):",
          "if not uses_user_targets(kinds, mine) and predicted == true_label:",
          ("tests/test_known_answers.py", "-k", "originals"),
          "misclassified images do not advance the random-target stream"),
    Fault("background_least_top2", "utils.py",
          "allowed = [j for j in range(logits.size) if j not in skip]",
          "allowed = list(range(logits.size))",
          ("tests/test_known_answers.py", "-k", "background"),
          "class 0 of a 1001-output model can be the least-likely or top-2 target"),
    Fault("background_untargeted", "utils.py",
          "allowed = [j for j in range(num_classes) if j not in set(excluded)]",
          "allowed = list(range(num_classes))",
          ("tests/test_known_answers.py", "-k", "background"),
          "class 0 of a 1001-output model is an untargeted target"),
    # -- sampling (randsphere.py) ------------------------------------------
    Fault("transform_skipped_in_workers", "randsphere.py",
          "    if not transform:\n        return pts\n",
          "    if True:\n        return pts\n",
          ("tests/test_known_answers.py", "-k", "workers"),
          "the sampling workers hand the model untransformed points (BPDA broken)"),
    Fault("clip_skipped", "randsphere.py",
          "np.clip(pts, clip[0], clip[1], out=pts)", "pts",
          ("tests/test_stage1.py", "-k", "clipped"),
          "samples leave the data range [-0.5, 0.5]"),
    # -- norms and caps (common.py) ----------------------------------------
    Fault("dual_norm_swapped", "common.py",
          "return {Norm.L1: Norm.LINF, Norm.L2: Norm.L2, Norm.LINF: Norm.L1}[norm]",
          "return {Norm.L1: Norm.L1, Norm.L2: Norm.L2, Norm.LINF: Norm.LINF}[norm]",
          ("tests/test_known_answers.py", "-k", "dual"),
          "bound_L1 from G1_max instead of Gi_max (and Linf from Ginf)"),
    Fault("cap_exponent", "common.py",
          "max(0.0, inv[sample_norm] - inv[bound_norm])",
          "max(0.0, inv[bound_norm] - inv[sample_norm])",
          ("tests/test_known_answers.py", "-k", "cap"),
          "radius cap exponent 1/p - 1/s instead of 1/s - 1/p"),
    Fault("default_radius_li", "common.py",
          '"li": 0.1,', '"li": 0.3,',
          ("tests/test_cli_options.py", "-k", "sample_norm and caps0"),
          "the L-infinity sampling radius is not the original's 0.1"),
    # -- stage-1 statistics (estimate_gradient_norm.py) --------------------
    Fault("nan_counted_as_max", "estimate_gradient_norm.py",
          "tf.where(bad[:, :, None], -np.inf, norms)",
          "tf.where(bad[:, :, None], np.inf, norms)",
          ("tests/test_known_answers.py", "-k", "nan"),
          "a NaN gradient sample becomes the batch maximum"),
    Fault("slope_distance_norms_swapped", "estimate_gradient_norm.py",
          "dist = tf.stack([tf.reduce_max(tf.abs(dx), axis=1), tf.norm(dx, axis=1),\n"
          "                         tf.reduce_sum(tf.abs(dx), axis=1)], axis=1)",
          "dist = tf.stack([tf.reduce_sum(tf.abs(dx), axis=1), tf.norm(dx, axis=1),\n"
          "                         tf.reduce_max(tf.abs(dx), axis=1)], axis=1)",
          ("tests/test_stage1.py", "-k", "slope_on_a_linear"),
          "SLOPE L1_max/Li_max divide by the wrong distance norm"),
    # -- stage-2 fit (weibull_fit.py) --------------------------------------
    Fault("fit_fallback_removed", "weibull_fit.py",
          "if math.isnan(best_p) or best_p < MIN_PVALUE:", "if math.isnan(best_p):",
          ("tests/test_clever.py", "tests/test_original_stage2.py", "-k", "ill_conditioned"),
          "an ill-conditioned fit's location is used instead of max(S)"),
    Fault("shape_reg_ignored", "weibull_fit.py",
          "weight = float(shape_reg) if method is Method.MLE_REG else 0.0",
          "weight = 0.0",
          ("tests/test_cli_options.py", "-k", "fit_options"),
          "--shape_reg never reaches the likelihood"),
    # -- early stopping (converge.py) --------------------------------------
    Fault("converge_noise_ignored", "converge.py",
          "threshold = np.maximum(threshold, np.where(np.isfinite(noise), noise, 0.0))",
          "threshold = threshold",
          ("tests/test_converge.py", "-k", "noise_criterion"),
          "a move below the run's own noise never counts as converged"),
    Fault("converge_checks_early", "converge.py",
          "return iteration_done >= self.min_iters and iteration_done % self.check_every == 0",
          "return iteration_done % self.check_every == 0",
          ("tests/test_converge.py", "-k", "min_iters"),
          "the rule may stop before --min_iters"),
]


def repository_files(root: str) -> list[str]:
    """Tracked files plus untracked ones that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
    return sorted({f for f in out.decode().split("\0") if f})


def copy_repository(root: str, dest: str) -> int:
    n = 0
    for rel in repository_files(root):
        src = os.path.join(root, rel)
        if not os.path.isfile(src) or os.path.islink(src):
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)
        n += 1
    return n


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_tests(scratch: str, python: str, tests: tuple, timeout: float) -> tuple[int, str, str]:
    """(pytest exit status, first failing test id or '', output tail)."""
    cmd = [python, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return -1, "", "timeout"
    out = proc.stdout + proc.stderr
    m = FAILED.search(out)
    return proc.returncode, (m.group(1) if m else ""), out[-3000:]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma list of fault names")
    p.add_argument("--baseline", action="store_true",
                   help="first run each test selection on the unmutated copy")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    p.add_argument("--python", default=sys.executable, help="interpreter with the test deps")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    return p.parse_args(argv)


def main(args) -> int:
    faults = FAULTS
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {f.name for f in FAULTS}
        if unknown:
            print(f"mutation_check.py: error: --only: unknown fault(s) {sorted(unknown)}",
                  file=sys.stderr)
            return 2
        faults = [f for f in FAULTS if f.name in wanted]
    if args.list:
        for f in faults:
            print(f"{f.name}: {f.path}: {f.why}; tests: {' '.join(f.tests)}")
        return 0
    scratch = tempfile.mkdtemp(prefix="clever-mutants-")
    bad = 0
    try:
        n = copy_repository(ROOT, scratch)
        print(f"# scratch copy: {scratch} ({n} files); python {args.python}", flush=True)
        if args.baseline:
            for tests in dict.fromkeys(f.tests for f in faults):
                rc, first, tail = run_tests(scratch, args.python, tests, args.timeout)
                status = "ok" if rc == 0 else f"FAILS UNMUTATED (status {rc}, {first})"
                print(f"# baseline {' '.join(tests)}: {status}", flush=True)
                if rc != 0:
                    bad += 1
                    print(tail, file=sys.stderr)
        for fault in faults:
            path = os.path.join(scratch, fault.path)
            text = open(path).read() if os.path.exists(path) else ""
            if text.count(fault.old) != 1:
                print(f"MISSING {fault.name} ({fault.path}: pattern found "
                      f"{text.count(fault.old)} times)", flush=True)
                bad += 1
                continue
            start = time.time()
            with open(path, "w") as fh:
                fh.write(text.replace(fault.old, fault.new))
            try:
                rc, first, tail = run_tests(scratch, args.python, fault.tests, args.timeout)
            finally:
                with open(path, "w") as fh:
                    fh.write(text)
            took = time.time() - start
            if rc == 0 or rc == 5:  # 5: no test selected, which catches nothing
                print(f"SURVIVED {fault.name} ({fault.why}; {' '.join(fault.tests)}; "
                      f"{took:.0f} s)", flush=True)
                bad += 1
            elif rc == -1:
                print(f"SURVIVED {fault.name} (timeout after {took:.0f} s)", flush=True)
                bad += 1
            else:
                print(f"KILLED {fault.name} by {first or f'pytest status {rc}'} ({took:.0f} s)",
                      flush=True)
    finally:
        if args.keep:
            print(f"# kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
