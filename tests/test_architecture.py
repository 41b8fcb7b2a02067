"""The package boundaries a newcomer relies on, checked on the source itself.

- ``rso`` (shared code) imports neither ``beam_pipelines`` nor ``trainer`` nor ``rso_cli``;
- ``trainer`` never imports Apache Beam or ``beam_pipelines``;
- ``beam_pipelines`` never imports ``trainer``;
- no module of ours shadows a standard-library module (a script run from its folder would
  import ours instead: ``python beam_pipelines/pipeline.py`` once crashed in ``selectors``).
Imports inside functions count: the scan walks the whole syntax tree.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "rso": ("beam_pipelines", "trainer", "rso_cli", "apache_beam"),
    "trainer": ("apache_beam", "beam_pipelines", "rso_cli"),
    "beam_pipelines": ("trainer", "rso_cli"),
}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_no_module_shadows_the_standard_library():
    ours = [p for pkg in ("rso", "rso_cli", "trainer", "beam_pipelines", "deploy", "benchmarks")
            for p in (ROOT / pkg).rglob("*.py")]
    shadowing = sorted(str(p.relative_to(ROOT)) for p in ours
                       if p.stem in sys.stdlib_module_names)
    assert not shadowing, shadowing


def test_the_import_rules_catch_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from beam_pipelines import read\n")
    assert "beam_pipelines" in imported_modules(bad)


def test_pipeline_script_help_runs_from_its_folder():
    out = subprocess.run([sys.executable, str(ROOT / "beam_pipelines" / "pipeline.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--num-candidates" in out.stdout


OURS = ("rso", "rso_cli", "trainer", "beam_pipelines", "deploy", "benchmarks", "tests")


def _module_path(name: str) -> pathlib.Path | None:
    """The source file of one of our modules (a package's __init__), or None."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _top_level_names(path: pathlib.Path) -> set[str]:
    """Names a module defines at its top level (defs, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):  # conditional definitions
            names.update(_top_level_names_of(node))
    return names


def _top_level_names_of(node: ast.AST) -> set[str]:
    out: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
            out.add(child.name)
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            out.add(child.id)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in child.names)
    return out


def unresolved_imports(path: pathlib.Path) -> list[str]:
    """Imports of our own modules in ``path`` that name a module or a name that does not exist:
    a script's imports inside functions are only run when it is, so a rename would otherwise go
    unnoticed until somebody runs the benchmark (``from rso import demo`` once did)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            mods = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in mods:
            if module.split(".")[0] not in OURS:
                continue
            source = _module_path(module)
            if source is None:
                bad.append(f"line {node.lineno}: no module {module}")
            elif name and name != "*" and _module_path(f"{module}.{name}") is None \
                    and name not in _top_level_names(source):
                bad.append(f"line {node.lineno}: {module} has no {name}")
    return [f"{path.relative_to(ROOT)} {b}" for b in bad]


def test_every_import_of_our_modules_resolves():
    files = [p for pkg in OURS for p in (ROOT / pkg).rglob("*.py")]
    problems = [b for p in sorted(files) for b in unresolved_imports(p)]
    assert not problems, "\n".join(problems)


def test_the_import_check_catches_a_renamed_module(tmp_path):
    bad = ROOT / "tests" / f"_tmp_bad_import_{tmp_path.name}.py"
    bad.write_text("def f():\n    from rso import demo\n    from rso.stats import nope\n")
    try:
        problems = unresolved_imports(bad)
    finally:
        bad.unlink()
    assert any("rso has no demo" in p for p in problems), problems
    assert any("rso.stats has no nope" in p for p in problems), problems
