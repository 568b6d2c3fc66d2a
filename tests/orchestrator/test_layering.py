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


def _orchestrator_imports() -> dict[str, set[str]]:
    """Each orchestrator module and the orchestrator modules it imports, at module level or
    inside a function (an import in a function body hides a dependency, it does not remove it)."""
    package = ROOT / "orchestrator"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in package.rglob("*.py")
               if p.name != "__init__.py"}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_import_cycle_inside_the_orchestrator():
    graph = _orchestrator_imports()
    assert len(graph) >= 30
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


# What drives jobs: the command line, the job service, sweeps and their trials, the launchers and
# the commands' own modules. The training worker runs inside Ray on every node and needs none.
DRIVER_MODULES = {"cli", "service", "sweep", "trial", "retry", "launch", "reproduce", "report", "claims", "stop",
                  "submit", "ui", "evaluate_run", "optuna_store", "datasets", "cluster_files", "metrics"}


def test_the_training_worker_imports_no_driver_module():
    graph = _orchestrator_imports()
    assert {f"orchestrator.{m}" for m in DRIVER_MODULES} <= graph.keys()
    reached = {m.removeprefix("orchestrator.") for m in _reachable(graph, "orchestrator.train")}
    assert not reached & (DRIVER_MODULES | {"commands"}), sorted(reached & DRIVER_MODULES)
    assert not [m for m in reached if m.startswith("commands.")], sorted(reached)


def test_only_the_command_layer_and_reproduce_import_the_job_service():
    graph = _orchestrator_imports()
    importers = sorted(m for m, targets in graph.items() if "orchestrator.service" in targets)
    assert importers == ["orchestrator.commands.resume", "orchestrator.commands.run", "orchestrator.commands.sweep",
                         "orchestrator.reproduce"], importers


def test_the_command_layer_is_imported_by_the_command_line_alone():
    """One module per subcommand under orchestrator/commands/ (parser, call, printing); cli builds
    the parser from them, and no library module reaches back up into them or into cli. The docs'
    reference generator sits above them all: it reads the parser to document it, and nothing
    imports it."""
    graph = _orchestrator_imports()
    assert not [m for m, targets in graph.items() if "orchestrator.reference" in targets]
    commands = {m for m in graph if m.startswith("orchestrator.commands.")}
    assert len(commands) >= 15, sorted(commands)
    outside = sorted(m for m, targets in graph.items()
                     if m not in commands and m not in ("orchestrator.cli", "orchestrator.reference")
                     and targets & (commands | {"orchestrator.cli"}))
    assert not outside, outside
    from orchestrator.cli import COMMANDS

    assert {m.__name__ for m in COMMANDS} == commands - {"orchestrator.commands.options"}
