"""The one dependency rule (docs/architecture.md): methods/ never imports ray, mlflow, optuna or orchestrator."""

import ast
import subprocess
import sys

from conftest import ROOT
FORBIDDEN = {"ray", "mlflow", "optuna", "orchestrator"}


def test_methods_source_has_no_forbidden_imports():
    offenders = []
    files = sorted((ROOT / "methods").rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_every_method_module_loads_no_system_package():
    code = (
        "import sys, pkgutil, importlib, methods\n"
        "for m in pkgutil.walk_packages(methods.__path__, 'methods.'): importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
