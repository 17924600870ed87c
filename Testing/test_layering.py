"""The engine's layers: the runtime never imports maml.evaluation at module level, and the metrics
import no other maml module (both would close an import cycle again)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import maml

MAML = Path(maml.__file__).parent
# Not runtime: training imports the metrics for its validation (it moves to maml.training).
NOT_RUNTIME = {"training"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(MAML.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module_level: bool) -> set[str]:
    """The maml modules a file imports: at module level only, or anywhere (inside functions too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if not module_level else _module_level_nodes(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # from . import x
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "maml" or m.startswith("maml.")}


def _module_level_nodes(tree):
    """Statements run on import: the module body and the blocks of its if/try/with, not functions."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def test_runtime_modules_do_not_import_evaluation_at_module_level():
    files = {_module_name(p): p for p in MAML.rglob("*.py")}
    runtime = [name for name in files
               if not name.startswith("maml.evaluation") and name.split(".")[-1] not in NOT_RUNTIME
               and not name.startswith("maml.training")]
    assert {"maml.pipeline", "maml.postprocessing", "maml.inference", "maml.batch"} <= set(runtime)
    for start in runtime:
        # follow module-level imports through the maml modules they reach
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen or name not in files:
                continue
            seen.add(name)
            todo.extend(_imports(files[name], module_level=True))
        assert not any(m.startswith("maml.evaluation") for m in seen), f"{start} imports maml.evaluation"


def test_importing_the_runtime_loads_no_evaluation_module():
    # a fresh interpreter, so that nothing imported by other tests hides an import
    script = ("import json, sys, maml.pipeline, maml.batch, maml.postprocessing, maml.cli\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('maml.evaluation'))))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MAML.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_metrics_import_only_errors():
    assert _imports(MAML / "evaluation" / "metrics.py", module_level=False) <= {"maml.errors"}
    # the check sees relative imports inside functions: the folder scoring does use the runtime
    assert "maml.preprocessing" in _imports(MAML / "evaluation" / "folders.py", module_level=False)
    assert "maml.preprocessing" not in _imports(MAML / "evaluation" / "folders.py", module_level=True)
