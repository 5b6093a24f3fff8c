"""mypy (configured in pyproject.toml) is part of the suite, beside ruff in test_lint.py.

The packages install as nightlab.<name> through setuptools' package-dir, which mypy cannot see
through the editable install; so mypy reads them through a nightlab/<name> symlink layout."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import REPO

CACHE = REPO / ".mypy_cache"  # kept between runs: a warm check takes seconds


def _layout() -> list[str]:
    """Links nightlab/<name> -> <repo>/<name> for each top-level package; returns their module names."""
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = {module: folder for module, folder in dirs.items() if module.count(".") == 1}
    root = CACHE / "layout" / "nightlab"
    root.mkdir(parents=True, exist_ok=True)
    for module, folder in top.items():
        link = root / module.split(".")[1]
        if not (link.is_symlink() and link.resolve() == (REPO / folder).resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(REPO / folder, target_is_directory=True)
    return sorted(top)


def test_mypy_finds_nothing() -> None:
    packages = [arg for module in _layout() for arg in ("-p", module)]
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                          "--cache-dir", str(CACHE), *packages], cwd=CACHE / "layout",
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
