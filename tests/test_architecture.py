"""The import rules between the layers (setup.cfg [importlinter], docs/architecture.md) hold on
the tree, and a forbidden import added anywhere they cover makes `lint-imports` fail."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("analyze", "loaders", "reports")

pytest.importorskip("importlinter", reason="import-linter is in the test extra")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(root / "setup.cfg"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "templates"))
    shutil.copy(REPO / "setup.cfg", root / "setup.cfg")
    return root


def _with_import(root: Path, module: str, line: str, tmp: Path) -> Path:
    """A copy of `root` in which `module` (a dotted name) also runs `line`."""
    shutil.copytree(root, tmp, dirs_exist_ok=True)
    path = tmp.joinpath(*module.split(".")).with_suffix(".py")
    if not path.exists():
        path = tmp.joinpath(*module.split("."), "__init__.py")
    path.write_text(path.read_text() + f"\n{line}\n")
    return tmp


def test_the_tree_keeps_every_contract(tree_copy: Path) -> None:
    proc = _lint(tree_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().split("contracts:")[-1].split("kept")[0]


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("analyze.metrics.spikes", "import loaders.errors", "Metrics (the formulas)"),
    ("loaders.formats.textlogs", "import analyze.metrics.spikes", "Loaders (the I/O)"),
    ("reports.figures", "import loaders.run", "Reports draw tables"),
    ("loaders.logger", "import pandas", "The logger imports nothing heavy"),
    ("analyze.kernels", "import numpy", "The shared kernels"),
    ("analyze.pipeline.findings", "import analyze.cli", "Only the entry point"),
    ("analyze.models.structure", "import analyze.pipeline.tables", "Rebuilt models"),
])
def test_a_forbidden_import_breaks_its_contract(tree_copy: Path, tmp_path: Path, module: str, line: str,
                                                contract: str) -> None:
    broken = _with_import(tree_copy, module, line, tmp_path / "broken")
    proc = _lint(broken)
    assert proc.returncode != 0, proc.stdout
    report = proc.stdout.split("Broken contracts")[-1]
    assert contract in report and module in report, proc.stdout
