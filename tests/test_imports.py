"""The import graph of the repository's top-level modules: no cycles, no script used as a
library, stage 2 free of TensorFlow.

A *script* is a module that is a command-line tool: it has ``if __name__ ==
"__main__"`` and is run, not imported (its ``parse_args``/``main`` are the CLI's
argument handling). Library code imports the library modules the scripts are
built on, never a script. The exceptions, on purpose:

* ``setup_mnist`` and ``setup_cifar`` are the data loaders (``models.load_dataset``
  reads through them); their ``__main__`` only downloads the data set, so they
  are library modules with a convenience entry point (``LIBRARY_WITH_MAIN``).
* ``clever`` is also the Python face of stage 2 (it re-exports ``stage2``'s
  core); nothing in the repository imports it, and this test keeps it so.

Imports inside functions count: a lazy import is still a dependency, and a
cycle through one is a cycle of the design.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Modules with a __main__ block that are libraries first (see the module docstring).
LIBRARY_WITH_MAIN = {"setup_mnist", "setup_cifar"}
#: The scripts: every module with a __main__ block except LIBRARY_WITH_MAIN.
EXPECTED_SCRIPTS = {"clever", "collect_gradients", "process_log", "reproduce_tables",
                    "setup_imagenet", "sweep", "train_models", "train_nlayer"}
#: Stage 2 and what it needs: importable without TensorFlow (and without Keras).
TF_FREE = ("common", "settings", "clever", "stage2", "stage2_files", "stage2_plots",
           "weibull_fit", "aggregate", "converge", "resume", "stage1", "stage1_lines",
           "stage1_run", "utils", "randsphere", "defense", "paper_tables", "sweep_jobs",
           "sweep_summary")
TF = ("tensorflow", "keras", "tf_keras")


def _modules() -> dict[str, str]:
    return {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}


def _parse(path: str) -> ast.Module:
    with open(path) as fh:
        return ast.parse(fh.read(), path)


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def _all_imports(tree: ast.Module) -> list[str]:
    """Every import of a module, in functions too; ``if TYPE_CHECKING:`` blocks left out
    (annotations only, never run)."""
    out = []

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        out.extend(_imported(node))
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return out


def _is_script(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            left = node.test.left
            if isinstance(left, ast.Name) and left.id == "__name__":
                return True
    return False


def _module_level(tree: ast.Module) -> list[str]:
    """Imports run when the module is imported: top level, and inside top-level
    if/try blocks, not inside functions or classes' methods."""
    out = []

    def visit(stmts):
        for node in stmts:
            out.extend(_imported(node))
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only: never run
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
    visit(tree.body)
    return out


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    trees = {m: _parse(p) for m, p in mods.items()}
    every = {m: {n for n in _all_imports(t) if n in mods and n != m} for m, t in trees.items()}
    top = {m: set(_module_level(t)) for m, t in trees.items()}
    scripts = {m for m, t in trees.items() if _is_script(t)}
    return mods, every, top, scripts


def test_the_scripts_are_the_ones_documented(graph):
    _, _, _, scripts = graph
    assert scripts - LIBRARY_WITH_MAIN == EXPECTED_SCRIPTS
    assert LIBRARY_WITH_MAIN <= scripts


def test_no_import_cycle(graph):
    _, every, _, _ = graph
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(every[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(every):
        if m not in state:
            visit(m)


def test_no_module_imports_a_script(graph):
    _, every, _, scripts = graph
    bad = sorted((m, n) for m, deps in every.items() for n in deps
                 if n in scripts - LIBRARY_WITH_MAIN)
    assert not bad, "modules importing a script: " + ", ".join(f"{m} -> {n}" for m, n in bad)


def test_tensorflow_free_modules_do_not_reach_it_at_import(graph):
    mods, _, top, _ = graph
    for start in TF_FREE:
        assert start in mods, start
        seen, todo, via = {start}, [start], {start: [start]}
        while todo:
            m = todo.pop()
            for n in top[m]:
                if n in TF:
                    pytest.fail(f"{start} imports {n} at import time: "
                                + " -> ".join(via[m] + [n]))
                if n in mods and n not in seen:
                    seen.add(n)
                    via[n] = via[m] + [n]
                    todo.append(n)


def test_stage2_imports_without_tensorflow_in_a_fresh_process():
    code = ("import sys\n"
            f"for m in {list(TF_FREE)!r}:\n"
            "    __import__(m)\n"
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
