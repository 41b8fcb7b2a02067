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
