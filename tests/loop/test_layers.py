"""The layers hold: the state layer (nightlab.loop.state) loads nothing of the engine, and bot/ and
heartbeat/ reach loop/ only through it, except where the heartbeat drives the engine itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Where bot/ and heartbeat/ may use a loop module outside the state layer, and why. Keep it short.
ALLOWED = {
    ("heartbeat/daemon.py", "nightlab.loop.executors"): "the heartbeat cancels runs past their timeout",
    ("heartbeat/daemon.py", "nightlab.loop.workspace"): "`nightlab run` initialises a missing workspace",
    ("heartbeat/daemon.py", "nightlab.loop.kernel_prefetch"): "the daemon fetches the FA3 kernel once",
    ("heartbeat/jobs.py", "nightlab.loop.executors"): "the timeout and stall jobs kill runs",
    ("heartbeat/doctor.py", "nightlab.loop.hardware"): "`nightlab doctor` probes the GPUs",
    ("heartbeat/doctor.py", "nightlab.loop.kernel_prefetch"): "`nightlab doctor` checks the FA3 kernel",
    ("heartbeat/doctor.py", "nightlab.loop.workspace"): "`nightlab doctor` says what init would refuse",
    ("heartbeat/doctor.py", "nightlab.loop.executors"): "`nightlab doctor` tries the run sandbox",
    ("heartbeat/cli.py", "nightlab.loop.workspace"): "`nightlab init` creates the workspace",
    ("heartbeat/cli.py", "nightlab.loop.kernel_prefetch"): "`nightlab prepare` fetches the FA3 kernel",
    # `nightlab train` runs train.py once, the way the engine runs an experiment
    ("heartbeat/train_once.py", "nightlab.loop.executors"): "it launches the run with the local executor",
    ("heartbeat/train_once.py", "nightlab.loop.runenv"): "the run gets an experiment's environment",
    ("heartbeat/train_once.py", "nightlab.loop.workspace"): "it opens the workspace",
    ("heartbeat/train_once.py", "nightlab.loop.summary"): "it prints the run's summary",
}


def _nightlab_imports(path: Path) -> set[str]:
    """The nightlab modules a file imports (`from nightlab.loop import x` imports nightlab.loop.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("nightlab.")}


def _loop_imports(path: Path) -> set[str]:
    return {m for m in _nightlab_imports(path) if m.startswith("nightlab.loop.")}


def _outside_state(module: str) -> str | None:
    """The loop module (two levels: nightlab.loop.x) when `module` is outside the state layer."""
    top = ".".join(module.split(".")[:3])
    return None if top == "nightlab.loop.state" else top


def test_importing_the_state_layer_and_the_router_loads_nothing_of_the_engine() -> None:
    state = sorted(f"nightlab.loop.state.{p.stem}" for p in (REPO / "loop" / "state").glob("*.py")
                   if p.stem != "__init__")
    code = (
        "import sys\n"
        f"import nightlab.bot.router, {', '.join(state)}\n"
        "print(' '.join(sorted(m for m in sys.modules if m in ('psutil', 'torch') or m.startswith('nightlab.loop.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert "nightlab.loop.state.steering" in loaded  # the probe saw the state layer itself
    assert [m for m in loaded if _outside_state(m)] == []  # no engine, executors, judge, hardware, psutil


def test_state_modules_import_only_the_state_layer() -> None:
    wrong = {f"loop/state/{p.name}: {m}" for p in (REPO / "loop" / "state").glob("*.py")
             for m in _loop_imports(p) if _outside_state(m)}
    assert wrong == set()


def test_bot_and_heartbeat_reach_loop_only_through_the_state_layer() -> None:
    used: set[tuple[str, str]] = set()
    for package in ("bot", "heartbeat"):
        for path in (REPO / package).glob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            used |= {(rel, top) for m in _loop_imports(path) if (top := _outside_state(m))}
    assert sorted(used - ALLOWED.keys()) == []
    assert sorted(ALLOWED.keys() - used) == []  # a stale exception would let a new import through unseen


def test_the_engine_never_imports_the_bot_or_the_daemon_nor_the_bot_the_daemon_or_the_trainer() -> None:
    """And the trainer imports nothing of the others."""
    never = {"loop": ("nightlab.bot", "nightlab.heartbeat"), "bot": ("nightlab.heartbeat", "nightlab.trainer"),
             "trainer": ("nightlab.loop", "nightlab.bot", "nightlab.heartbeat")}
    wrong = {f"{p.relative_to(REPO)}: {m}" for package, banned in never.items() for p in (REPO / package).rglob("*.py")
             for m in _nightlab_imports(p) if m.startswith(banned)}
    assert wrong == set()
