"""The layers contract (pyproject.toml, import-linter): imports only go down config → data → model → train →
(evaluate, export) → plan → (serve, recipes, launch, demo) → cli. `make test` runs `lint-imports`; these tests
show that the contract holds and that it catches an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contract, on the `tunesmith` package found in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def _copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "src" / "tunesmith", tmp_path / "src" / "tunesmith",
                    ignore=shutil.ignore_patterns("__pycache__", "resources"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "src"


def test_the_package_keeps_the_layers_contract():
    result = _lint(REPO / "src", REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, upward",
    [
        ("data/loader.py", "from tunesmith.train import checkpoint  # noqa"),  # data → train
        ("train/loop.py", "import tunesmith.serve.app  # noqa"),  # train → serve
        ("model/generate.py", "from tunesmith.evaluate import metrics  # noqa"),  # model → evaluate
        ("serve/chat.py", "from tunesmith.launch import torchrun  # noqa"),  # sibling front ends
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    src = _copy_of_the_package(tmp_path)
    path = src / "tunesmith" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{upward}\n", encoding="utf-8")
    result = _lint(src, tmp_path)
    assert result.returncode != 0, result.stdout
    importer = "tunesmith." + module.removesuffix(".py").replace("/", ".")
    assert "BROKEN" in result.stdout and importer in result.stdout, result.stdout
