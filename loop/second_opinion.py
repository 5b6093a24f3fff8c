"""A second opinion on keeps (issue 18): a kept run's model is kept by commit, and a kept change
and the commit it replaced are scored on a held-out slice of the validation shard (rows after the
scored ones, never used for a decision), by the workspace's own harness in its own process."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from nightlab.loop.hardware import DATA_DIR_ENV
from nightlab.loop.processes import stop_tree
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.stats import HELDOUT_GAIN, HELDOUT_UNSCORED, gain, suspect
from nightlab.loop.state.store import state_dir
from nightlab.loop.workspace import Workspace

ARTIFACTS_DIRNAME = "artifacts"  # kept models by commit, for held-out scoring
KEPT_ARTIFACTS = 3  # the newest kept models stay (a default-profile model is ~150 MB)
DEFAULT_SCORE_TIMEOUT_S = 600.0  # a held-out scorer is stopped after this ([heartbeat] run_timeout's default)
TICK_S = 1.0  # `tick` while a held-out scorer runs, well within [heartbeat] loop_stall_after
STOP_GRACE_S = 5.0  # a held-out scorer past its time: SIGTERM, then SIGKILL after this


def keep_artifact(ws: Workspace, run_dir: Path, commit: str) -> Path | None:
    """Keep a kept run's saved model (from its run dir) under the state dir by commit, so a later
    keep can be compared with it on a held-out slice; None when the run saved none. Only the files
    the scorer reads: the folder is train.py's to write, and a held-out score cached beside the model
    (`heldout-<k>.json`) that it left there was read as the model's."""
    from nightlab.trainer.prepare import ARTIFACT_FILES, DEFAULT_ARTIFACT_DIR  # no torch

    source = Path(run_dir) / DEFAULT_ARTIFACT_DIR
    if not (source / "model.pt").is_file():
        return None
    root = state_dir(ws.path) / ARTIFACTS_DIRNAME
    dest = root / commit
    if not (dest / "model.pt").is_file():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            for name in ARTIFACT_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
        except OSError as exc:  # a full disk: a traceback at every restart of the engine, and a half copy
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not keep the kept model of {commit[:7]} in {root} ({_why(exc)}) for the held-out"
                            f" second opinion: free space there (`df -h {root}`), then start nightlab again") from None
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    # A model is needed until the next keep has been compared with it: a few, not a night's worth.
    kept = sorted((p for p in root.iterdir() if p.is_dir() and p != dest), key=lambda p: p.stat().st_mtime)
    for old in kept[: max(0, len(kept) - (KEPT_ARTIFACTS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _why(exc: OSError) -> str:
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno and exc.strerror else str(exc)


@dataclass(frozen=True)
class SecondOpinion:
    slice: int
    kept: float  # held-out bpb of the kept commit
    base: float  # held-out bpb of the commit it replaced
    direction: str = "minimize"

    @property
    def gain(self) -> float:
        return gain(self.kept, self.base, self.direction)

    @property
    def metrics(self) -> dict[str, float]:
        return {HELDOUT_GAIN: self.gain}

    @property
    def suspect(self) -> bool:
        return suspect({HELDOUT_GAIN: self.gain})

    def text(self) -> str:
        verdict = "SUSPECT: the gain vanishes there" if self.suspect else "holds"
        return f"held-out slice {self.slice}: {self.kept:.6f} vs {self.base:.6f} ({self.gain:+.6f}), {verdict}"


@dataclass(frozen=True)
class NoOpinion:
    """A keep the held-out slice could not judge, and why: said in its reason, not left out silently."""

    why: str

    @property
    def metrics(self) -> dict[str, float]:
        return {}

    def text(self) -> str:
        return f"no held-out second opinion: {self.why}"


@dataclass(frozen=True)
class KeptUnscored:
    """A keep whose own model the harness could not score on the held-out slice while the commit it
    replaced scored there: a model's code can tell a held-out slice from the scorer's arguments and
    fail on it (or never end), which had left a keep that memorised the scored rows without a word
    of doubt. Suspect, as a gain that vanishes there."""

    slice: int
    why: str

    @property
    def metrics(self) -> dict[str, float]:
        return {HELDOUT_UNSCORED: 1.0}

    @property
    def suspect(self) -> bool:
        return True

    def text(self) -> str:
        return f"held-out slice {self.slice}: SUSPECT: its model could not be scored there ({self.why})"


def heldout_bpb(ws: Workspace, env: dict[str, str], commit: str, slice_index: int,
                timeout_s: float = DEFAULT_SCORE_TIMEOUT_S, tick: Callable[[], None] = lambda: None) -> float | None:
    """The held-out bpb of a kept commit's model (scored by the workspace's harness once, then
    cached beside the model); None when there is no model or the scorer failed, or ran past
    `timeout_s` (then its process tree is stopped). `tick` is called about once a second meanwhile:
    the engine's liveness, which the daemon restarts it without."""
    artifact = state_dir(ws.path) / ARTIFACTS_DIRNAME / commit
    from nightlab.trainer.prepare import scorer_command  # no torch

    cached = artifact / f"heldout-{slice_index}.json"
    if cached.is_file():
        return float(json.loads(cached.read_text())["bpb"])
    if not (artifact / "model.pt").is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = scorer_command(ws.path / "harness.py", "--split", "heldout", "--slice", str(slice_index),
                             "--artifact", str(artifact), "--result", str(result))
        # the model's code runs in the scorer's model processes and can tell a held-out slice from the
        # scorer's argv: one that never ended there held the engine until the daemon restarted it,
        # again at each restart, and paused the night; its output is not read (a model printing
        # without end filled the engine's memory)
        # in the engine's process group: an engine the daemon stops takes it along
        proc = subprocess.Popen(cmd, cwd=ws.path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if not _finished(proc, timeout_s, tick):
            return None
        try:
            found = json.loads(result.read_text())
        except (OSError, ValueError):
            return None
    if "bpb" not in found:
        return None
    cached.write_text(json.dumps({"bpb": found["bpb"]}))
    return float(found["bpb"])


def _finished(proc: subprocess.Popen[bytes], timeout_s: float, tick: Callable[[], None]) -> bool:
    """Wait for `proc` up to `timeout_s`, calling `tick` about once a second; False (it and its
    descendants stopped; it leads no group of its own) when it ran past it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc.wait(timeout=max(0.0, min(TICK_S, deadline - time.monotonic())))
            return True
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                try:
                    leader: psutil.Process | None = psutil.Process(proc.pid)
                except psutil.NoSuchProcess:
                    leader = None
                stop_tree(proc.pid, leader, STOP_GRACE_S)
                proc.wait()
                return False
            tick()


def second_opinion(ws: Workspace, env: dict[str, str], kept: str, base: str, slice_index: int,
                   direction: str = "minimize", timeout_s: float = DEFAULT_SCORE_TIMEOUT_S,
                   tick: Callable[[], None] = lambda: None) -> SecondOpinion | NoOpinion | KeptUnscored:
    """Score the kept commit and the one it replaced on held-out slice `slice_index` (rows after
    the validation rows, never used for a decision); NoOpinion when a model is not there (an
    agent's `git clean -x` took the state folder's) or its scoring failed or ran past `timeout_s`
    (each model's; `heldout_bpb`); KeptUnscored when only the kept commit's did."""
    root = state_dir(ws.path) / ARTIFACTS_DIRNAME
    gone = [c[:7] for c in (kept, base) if not (root / c / "model.pt").is_file()]
    if gone:
        return NoOpinion(f"the model of {' and '.join(gone)} is not in {root} (removed?); the next keep is"
                         " compared with this one's")
    kept_bpb = heldout_bpb(ws, env, kept, slice_index, timeout_s, tick)
    base_bpb = heldout_bpb(ws, env, base, slice_index, timeout_s, tick)

    def how(commit: str) -> str:
        # the command, to see why: the scorer's output is not kept (a model could print without end), and
        # a keep SUSPECT for it may be the box's doing (out of the GPU's memory) as well as its model's
        data = f"{DATA_DIR_ENV}={shlex.quote(env[DATA_DIR_ENV])} " if env.get(DATA_DIR_ENV) else ""  # the runs' data
        return (f"`{data}python harness.py score --split heldout --slice {slice_index} --artifact {root / commit}` failed"
                f" or ran past {timeout_s:g} s, [heartbeat] run_timeout; run it in the workspace to see why")

    if kept_bpb is None and base_bpb is not None:
        return KeptUnscored(slice_index, f"the model of {base[:7]} it replaced could; {how(kept)}")
    if kept_bpb is None or base_bpb is None:
        unscored = base if kept_bpb else kept
        return NoOpinion(f"the harness could not score the model of {unscored[:7]} on held-out slice {slice_index}"
                         f" ({how(unscored)})")
    return SecondOpinion(slice_index, kept_bpb, base_bpb, direction)
