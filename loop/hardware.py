"""Hardware classes: results are compared only between runs on the same hardware and setting.

A run's hardware is found where it runs, by the same shell probe everywhere: the executor's job
wrapper appends the probe's output to the run's start marker (`<log>.exit.start`), and the local
executor runs the probe once per slot before any launch, so a slot's class is known ahead. The
probe asks nvidia-smi for the names of the GPUs the run may use (CUDA_VISIBLE_DEVICES, set by us
for a local slot and by Slurm for a job), and falls back to the CPU's model name.

The setting is everything besides the code that changes what a run measures: the run command, the
environment nightlab gives it (the profile's time budget, sequence length, data), what the
built-in harness declares it measures (its SCORE_VERSION, see `setting_of`) and the text and
tokenizer the built-in trainer's runs are scored on (loop/dataid.py). Together
they make the `HardwareClass` (in loop/state/ledger.py, which records it); the judge keeps one
reference (the best commit's measured metric) per class.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.loop.dataid import DataIdentity
from nightlab.loop.state.config import BUDGET_STEPS_ENV, HARNESS_ENV
from nightlab.loop.state.store import Store
from nightlab.trainer.profiles import DTYPE_ENV, Gpu, Machine

# POSIX sh, one output line per GPU ("gpu: <name>"), or one "cpu: <model>" line. CUDA_VISIBLE_DEVICES
# unset: every GPU; set but empty: none (a CPU slot). nvidia-smi ignores CUDA_VISIBLE_DEVICES, so
# the devices are passed with -i (indices or UUIDs, the forms CUDA_VISIBLE_DEVICES takes). GPUs
# given without a working nvidia-smi are all "unknown GPU" (one class: nothing tells them apart).
PROBE = r"""nightlab_probe() {
  cvd="${CUDA_VISIBLE_DEVICES-all}"
  if [ "$cvd" != "" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      if [ "$cvd" = all ]; then
        names=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)
      else
        names=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$cvd" 2>/dev/null)
      fi
      if [ $? -eq 0 ] && [ -n "$names" ]; then printf '%s\n' "$names" | sed 's/^/gpu: /'; return; fi
    fi
    if [ "$cvd" != all ]; then echo "gpu: unknown GPU"; return; fi
  fi
  model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
  printf 'cpu: %s\n' "${model:-$(uname -m)}"
}
"""
_PROBE_TIMEOUT_S = 30.0


def describe(probe_output: str) -> str:
    """The probe's lines as one readable name; "" when there is nothing to read."""
    gpus = [line[5:].strip() for line in probe_output.splitlines() if line.startswith("gpu: ")]
    if gpus:
        counts = Counter(gpus)
        return " + ".join(name if n == 1 else f"{n}x {name}" for name, n in sorted(counts.items()))
    cpu = next((line[5:].strip() for line in probe_output.splitlines() if line.startswith("cpu: ")), None)
    return "" if cpu is None else f"cpu: {cpu}" if cpu else "cpu"


def probe(cuda_visible_devices: str | None) -> str:
    """Run the probe here, as a run with this CUDA_VISIBLE_DEVICES would (None: unset)."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    try:
        out = subprocess.run(["/bin/sh", "-c", PROBE + "nightlab_probe"], capture_output=True, text=True,
                             env=env, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return describe(out.stdout)


DEFAULT_GOAL = "val_bpb minimize"


def goal_of(metric: str, direction: str) -> str:
    """What a run's number is and which way is better ("accuracy maximize"): part of the setting, so
    a config that names another metric (or flips its direction) compares nothing across."""
    return f"{metric} {direction}"


def setting_of(run_command: str, env: dict[str, str], scorer: str = "", data: DataIdentity | None = None,
               goal: str = DEFAULT_GOAL) -> str:
    """A short digest of what, besides the code, decides a run's result. `scorer`: the SCORE_VERSION
    the workspace's harness declares (workspace.score_version). Only that number, not the harness's
    hash: a harness brought up to date for its messages measures what it measured, so its results stay
    comparable; one whose number moved is a new setting. "" (a copy from before the number, or a
    project of the user's) is left out, so the digests of those workspaces stay what they were.
    `data`: what the built-in trainer's runs are scored on (None: a project of the user's, left out).
    `goal`: `goal_of` the config's metric; the default's is left out, as the scorer's."""
    setting: dict[str, Any] = {"command": run_command, "env": sorted(env.items())}
    if scorer:
        setting["scorer"] = scorer
    if data is not None:
        setting["data"] = data.to_json()
    if goal != DEFAULT_GOAL:
        setting["goal"] = goal
    return hashlib.sha1(json.dumps(setting).encode()).hexdigest()[:8]


# kv['setting.<digest>'] = {"command", "env"[, "scorer"][, "data"]}: what a setting digest stands for
SETTING_KEY = "setting."
# how a change of what runs measure is said (the harness upgrade's line, a start on other data)
NEW_SETTING = ("so runs from here on are a new setting: the best is measured again and no result is compared"
               " with one from before")


# Values that say where things lie, not what a run does: the compile caches (in the workspace) and
# the data dir's folder (the data cache; its last part names the data). A moved workspace changed
# them, and every result after the move was judged as another setting, the best re-measured. A
# local folder's data dir is named after the folder's path: one of another name with the same
# validation shard and tokenizer (the folder moved, prepared again) is the same data.
_PLACE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
DATA_DIR_ENV = "NIGHTLAB_DATA_DIR"  # the data dir of the built-in trainer's runs


def record_setting(store: Store, run_command: str, env: dict[str, str], scorer: str = "",
                   data: DataIdentity | None = None, goal: str = DEFAULT_GOAL) -> str:
    """The setting's digest, with the values behind it kept in the store (readable later). A
    setting recorded before that differs only in where things lie keeps its digest; so does one
    recorded by a nightlab that did not record the data or the goal yet: it takes them as its own,
    and only a later change is a new setting (upgrading nightlab re-measures nothing)."""
    digest = setting_of(run_command, env, scorer, data, goal)
    if store.get(SETTING_KEY + digest) is None:
        for key, recorded in store.with_prefix(SETTING_KEY).items():
            if _moved(recorded, run_command, env, scorer, data, goal):
                adopted = {k: v for k, v in (("goal", goal), ("data", data and data.to_json()))
                           if v is not None and k not in recorded}
                if adopted:
                    store.set(key, {**recorded, **adopted})
                return key[len(SETTING_KEY):]
    values: dict[str, Any] = {"command": run_command, "env": dict(sorted(env.items())), "goal": goal}
    if scorer:
        values["scorer"] = scorer
    if data is not None:
        values["data"] = data.to_json()
    store.set(SETTING_KEY + digest, values)
    return digest


def scorer_of(store: Store, digest: str) -> str:
    """The harness's SCORE_VERSION a recorded setting stands for ("" when none was declared)."""
    return str((store.get(SETTING_KEY + digest) or {}).get("scorer", ""))


def setting_changes(store: Store, before: str, after: str, config: bool = True) -> list[str]:
    """What changed from recorded setting `before` to `after` in what runs measure, as words for a
    person: the harness's score version, the validation shard, the tokenizer and, with `config`, the
    values the config and profile give runs (`time_budget 300 -> 600`) and the run command (those
    change only at a start: a run in flight keeps the ones it started with)."""
    old, new = store.get(SETTING_KEY + before) or {}, store.get(SETTING_KEY + after) or {}
    said = []
    if old.get("scorer", "") != new.get("scorer", ""):
        said.append(f"score version {old.get('scorer') or 'not declared'} -> {new.get('scorer') or 'not declared'}")
    old_data, new_data = DataIdentity.from_json(old.get("data")), DataIdentity.from_json(new.get("data"))
    parts = new_data.changed(old_data) if old_data is not None and new_data is not None else []
    if parts:
        said.append(f"{' and '.join(parts)} changed")
    if not config:
        return said
    old_env, new_env = _in_force(old.get("env", {})), _in_force(new.get("env", {}))
    skip = {*_PLACE_ENV, DATA_DIR_ENV}
    if (BUDGET_STEPS_ENV in old_env) != (BUDGET_STEPS_ENV in new_env):  # steps one side, seconds the other
        said.append(f"the budget {_budget(old_env)} -> {_budget(new_env)}")
        skip |= {BUDGET_STEPS_ENV, HARNESS_ENV["time_budget"]}
    for key in sorted((old_env.keys() | new_env.keys()) - skip):
        was, now = old_env.get(key, "default"), new_env.get(key, "default")
        if was != now:
            said.append(f"{key.removeprefix('NIGHTLAB_').lower()} {was} -> {now}")
    if old.get("command", "") != new.get("command", ""):
        said.append(f"the run command `{old.get('command', '')}` -> `{new.get('command', '')}`")
    if old.get("goal", DEFAULT_GOAL) != new.get("goal", DEFAULT_GOAL):
        said.append(f"the metric {old.get('goal', DEFAULT_GOAL)} -> {new.get('goal', DEFAULT_GOAL)}")
    return said


def _in_force(env: dict[str, str]) -> dict[str, str]:
    """`env` less a time budget that a step budget (tiny's) overrides: the profile's 15 s under its
    40 steps was said as changed though no run ever trained by it."""
    if BUDGET_STEPS_ENV not in env:
        return env
    return {k: v for k, v in env.items() if k != HARNESS_ENV["time_budget"]}


def _budget(env: dict[str, str]) -> str:
    """The budget in force: "40 steps", "5 s", or the harness's own when neither is set."""
    if BUDGET_STEPS_ENV in env:
        return f"{env[BUDGET_STEPS_ENV]} steps"
    seconds = env.get(HARNESS_ENV["time_budget"])
    return f"{seconds} s" if seconds is not None else "the harness's default seconds"


def _moved(recorded: dict[str, Any], run_command: str, env: dict[str, str], scorer: str,
           data: DataIdentity | None, goal: str) -> bool:
    old = recorded.get("env", {})
    if recorded.get("command") != run_command or old.keys() != env.keys() or recorded.get("scorer", "") != scorer:
        return False
    if recorded.get("goal", goal) != goal:  # one recorded before the goal counted has none: it matches
        return False
    # one recorded before the data counted has none: any data matches it (record_setting makes it its own)
    if "data" in recorded and DataIdentity.from_json(recorded["data"]) != data:
        return False
    same_data = data is not None and "data" in recorded  # by content: the data dir's name does not matter
    return all(old[k] == v or k in _PLACE_ENV
               or (k == DATA_DIR_ENV and (same_data or Path(old[k]).name == Path(v).name)) for k, v in env.items())


def harness_values(env: dict[str, str]) -> dict[str, str]:
    """The budget values in force in a run's environment (time budget or budget steps, sequence
    length, eval tokens, dtype), by their short names; the harness's defaults apply to those absent.
    A step budget (tiny's) is the budget: its time budget would only mislead."""
    names = {*HARNESS_ENV.values(), BUDGET_STEPS_ENV, DTYPE_ENV}
    if BUDGET_STEPS_ENV in env:
        names.discard(HARNESS_ENV["time_budget"])
    return {k[len("NIGHTLAB_"):].lower(): v for k, v in sorted(env.items()) if k in names}


@dataclass(frozen=True)
class GpuReport:
    """What nvidia-smi says about the GPUs runs will use: the cards, the driver, and why it said
    nothing ("" when it answered)."""

    gpus: tuple[Gpu, ...]
    driver: str = ""
    problem: str = ""


_GPU_FIELDS = "name,memory.total,compute_cap,driver_version"


def query_gpus(indices: Sequence[int] = ()) -> GpuReport:
    """The GPUs at `indices` (none given: all) with memory and compute capability, from nvidia-smi.
    No torch: the daemon calls this to pick a profile."""
    argv = ["nvidia-smi", f"--query-gpu={_GPU_FIELDS}", "--format=csv,noheader,nounits"]
    if indices:
        argv += ["-i", ",".join(str(i) for i in indices)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return GpuReport((), problem="nvidia-smi is not installed (no NVIDIA driver)")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return GpuReport((), problem=f"nvidia-smi did not answer ({type(exc).__name__})")
    if out.returncode != 0:
        said = (out.stdout + out.stderr).strip().splitlines()
        return GpuReport((), problem=f"nvidia-smi failed (exit {out.returncode}): {said[0] if said else 'no output'}")
    gpus, driver = [], ""
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0]:
            continue
        name, memory, cap, driver = parts
        gpus.append(Gpu(name, int(memory) if memory.isdigit() else None, _capability(cap)))
    return GpuReport(tuple(gpus), "" if driver.startswith("[") else driver)


def _capability(text: str) -> tuple[int, int] | None:
    major, _, minor = text.partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def apple_silicon() -> bool:
    """Apple MPS is there on arm64 macOS (checked without torch; `nightlab doctor` confirms it with torch)."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def machine(indices: Sequence[int] = ()) -> Machine:
    """What a run here trains on, for `trainer.profiles.choose`."""
    return Machine(query_gpus(indices).gpus, mps=apple_silicon())
