"""mypy (configured in pyproject.toml) is part of the suite, beside ruff in test_lint.py.

The packages install as nightlab.<name> through setuptools' package-dir, which mypy cannot see
through the editable install; so mypy reads them through a nightlab/<name> symlink layout.

A cold check (a clean clone has no cache) takes ~25 s of one core, so the suite starts it as soon
as it has collected this test (tests/conftest.py): it runs beside the tests that mostly wait on
processes and servers, and the test reads its result. Under pytest-xdist the worker that gets the
test starts it then (the other workers go on beside it): every worker collects every test, and
two checks at once would write one cache."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import REPO

CACHE = REPO / ".mypy_cache"  # kept between runs: a warm check takes seconds
NODEID = "tests/test_types.py::test_mypy_finds_nothing"
_mypy: subprocess.Popen[bytes] | None = None


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


def start_mypy() -> subprocess.Popen[bytes]:
    """mypy over the packages, started once; its output goes to a file (a pipe nobody reads yet
    would stop it when full)."""
    global _mypy
    if _mypy is None:
        packages = [arg for module in _layout() for arg in ("-p", module)]
        with open(CACHE / "suite-output.txt", "wb") as out:
            _mypy = subprocess.Popen([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                                      "--cache-dir", str(CACHE), *packages], cwd=CACHE / "layout",
                                     stdout=out, stderr=subprocess.STDOUT)
    return _mypy


def stop_mypy() -> None:
    """At the end of a session that never read the result (stopped early, say): mypy goes too."""
    if _mypy is not None and _mypy.poll() is None:
        _mypy.kill()
        _mypy.wait()


def test_mypy_finds_nothing() -> None:
    code = start_mypy().wait(timeout=300)
    assert code == 0, (CACHE / "suite-output.txt").read_text()
