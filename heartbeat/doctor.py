"""`nightlab doctor`: will a night of runs work on this machine, and with which profile?

Checks what a run needs, each finding with what to do about it: the GPUs (nvidia-smi: model,
memory, compute capability, bf16, driver), torch as the runs will import it (version, CUDA build,
whether it sees the GPU or Apple MPS, FlexAttention; probed in a child process, because the daemon
never imports torch), the FA3 kernel in the local kernels cache (Hopper), free disk for data and
workspace, the data and tokenizer (and the folder train.py's view of them is made in), the
workspace's protected files and whether its editable Python files parse, git, the
programs the config's commands start, each configured chat channel (a real call through the same
client library the bot uses), and the profile `auto`
picks with its reason (and whether the config's context and eval sizes fit it). `fail` findings mean a
run would fail: the command exits 1. `nightlab run` logs the same findings when it starts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nightlab.heartbeat.health import free_disk_gb, space_used, watched_paths
from nightlab.loop import hardware
from nightlab.loop.state.config import RUN_OVERHEAD_S, ConfigError, Settings, is_named_source, resolve_secrets
from nightlab.loop.state.errors import UserError
from nightlab.loop.workspace import (
    MISSING_FILES,
    MISSING_FILES_FIX,
    HarnessUpgrade,
    edited_fix,
    harness_upgrade,
    installed_harness,
    missing_program,
    missing_project_files,
    open_workspace,
    project_commands,
    protected_mismatches,
    workspace_problem,
)
from nightlab.trainer.profiles import (
    DTYPE_ENV,
    NOT_PYTHON_FIX,
    PROFILES,
    Choice,
    Machine,
    choose,
    dtype_for,
    estimated_peak_bytes,
    not_python,
    read_constants,
)

log = logging.getLogger("nightlab.doctor")

Level = Literal["ok", "warn", "fail"]
_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
_TORCH_TIMEOUT_S = 180.0  # importing torch (and CUDA's first init) on a cold, slow disk
_CHANNEL_TIMEOUT_S = 10.0

# Run as `python -c` with the interpreter the runs use; prints one JSON line. Only facts, no verdicts.
TORCH_PROBE = r"""
import json, sys
facts = {"python": sys.version.split()[0]}
try:
    import torch
except Exception as e:
    facts["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(facts)); sys.exit(0)
facts.update(torch=torch.__version__, cuda=torch.version.cuda, hip=getattr(torch.version, "hip", None),
             cuda_available=torch.cuda.is_available(), devices=[])
if facts["cuda_available"]:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        facts["devices"].append({"name": p.name, "memory_mib": p.total_memory // 2**20,
                                 "capability": [p.major, p.minor]})
    try:
        facts["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        facts["bf16"] = torch.cuda.is_bf16_supported()
mps = getattr(torch.backends, "mps", None)
facts["mps"] = bool(mps is not None and mps.is_available())
try:
    from torch.nn.attention.flex_attention import flex_attention
    facts["flex"] = True
except Exception:
    facts["flex"] = False
print(json.dumps(facts))
"""


@dataclass(frozen=True)
class Finding:
    level: Level
    topic: str
    text: str
    fix: str = ""  # what to do (warn and fail findings)

    def line(self) -> str:
        return f"{_MARK[self.level]} {self.topic:<9} {self.text}" + (f"\n               -> {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Report:
    findings: tuple[Finding, ...]
    choice: Choice | None

    @property
    def exit_code(self) -> int:
        return 1 if any(f.level == "fail" for f in self.findings) else 0

    def text(self) -> str:
        fails = sum(f.level == "fail" for f in self.findings)
        warns = sum(f.level == "warn" for f in self.findings)
        verdict = (f"{fails} problem(s) would make runs fail" if fails
                   else "runs can start" + (f" ({warns} warning(s))" if warns else ""))
        return "\n".join([*(f.line() for f in self.findings), f"doctor: {verdict}"])


def diagnose(settings: Settings, python: str = sys.executable) -> Report:
    """Every check, in the order a user fixes things; `python` is the interpreter runs use."""
    found: list[Finding] = []
    builtin = not settings.project.run_command
    gpus = hardware.query_gpus(settings.executor.gpus)
    found += _gpu_findings(settings, gpus)
    torch = _torch_facts(python) if builtin else None
    if torch is not None:
        found += _torch_findings(torch, gpus, python)
    choice = None
    if builtin:  # the config check has vetted the profile's name
        machine = Machine(gpus.gpus, mps=hardware.apple_silicon() or bool(torch and torch.get("mps")))
        choice = choose(settings.trainer.profile, machine)
        found += _profile_findings(settings, choice, choose("auto", machine), gpus)
        found += _attention_findings(gpus, torch or {}, choice)
    found += _disk_findings(settings)
    found.append(_run_sandbox_finding(settings))
    if builtin:
        found.append(_sandbox_finding())
        found.append(_packages_finding())
        found.append(_data_finding(settings))
        found += _view_findings(settings)
    found += _protected_findings(settings)
    found += _python_findings(settings)
    found.append(_git_finding())
    found += _program_findings(settings)
    found += _channel_findings(settings)
    return Report(tuple(found), choice)


# -- GPUs and torch ------------------------------------------------------------------------------
def _gpu_findings(settings: Settings, report: hardware.GpuReport) -> list[Finding]:
    if not report.gpus:
        if settings.executor.gpus:
            return [Finding("fail", "gpu", f"executor.gpus = {list(settings.executor.gpus)} but {report.problem}",
                            "list GPUs that `nvidia-smi -L` shows, or set executor.gpus = [] (all visible)")]
        return [Finding("warn", "gpu", f"no NVIDIA GPU: {report.problem}",
                        "fine for a CPU or Apple silicon night; on a GPU box install the NVIDIA driver")]
    out = []
    for i, gpu in enumerate(report.gpus):
        dtype = dtype_for(gpu.capability)
        bf16 = "bf16 yes" if dtype == "bf16" else f"no bf16: trains in {dtype}"
        out.append(Finding("ok", "gpu", f"{i}: {gpu.describe()}, {bf16}, driver {report.driver or 'unknown'}"))
    if settings.executor.kind == "slurm":
        out.append(Finding("warn", "gpu", "executor.kind = slurm: these are this host's GPUs, not the nodes'",
                           "set trainer.profile to the tier of the cluster's GPUs (see README, hardware)"))
    return out


def _torch_facts(python: str) -> dict[str, Any]:
    return dict(_probe_torch(python, os.environ.get("CUDA_VISIBLE_DEVICES")))


@functools.cache  # an interpreter's torch does not change while one process asks again (~1.5 s a probe)
def _probe_torch(python: str, visible: str | None) -> dict[str, Any]:
    try:
        out = subprocess.run([python, "-c", TORCH_PROBE], capture_output=True, text=True,
                             timeout=_TORCH_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{python} did not run ({type(exc).__name__})"}
    last = (out.stdout.strip().splitlines() or [""])[-1]
    try:
        facts: dict[str, Any] = json.loads(last)
    except json.JSONDecodeError:
        said = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the torch probe failed (exit {out.returncode}): {said}"}
    return facts


def _torch_findings(t: dict[str, Any], gpus: hardware.GpuReport, python: str) -> list[Finding]:
    if "error" in t:
        return [Finding("fail", "torch", f"{python}: {t['error']}",
                        f"{python} -m pip install torch==2.13.0 (the CUDA build on a GPU box)")]
    build = f"CUDA {t['cuda']}" if t.get("cuda") else f"ROCm {t['hip']}" if t.get("hip") else "CPU-only build"
    head = f"torch {t['torch']} ({build}), Python {t['python']}"
    if gpus.gpus and not t.get("cuda_available"):
        why = "a CPU-only build" if not t.get("cuda") else f"built for CUDA {t['cuda']}; the driver may be too old"
        return [Finding("fail", "torch", f"{head} cannot use the GPU nvidia-smi shows ({why})",
                        f"{python} -m pip install --force-reinstall torch==2.13.0 (pip picks the CUDA build on a "
                        "GPU box), or update the NVIDIA driver")]
    if t.get("cuda_available"):
        names = ", ".join(d["name"] for d in t.get("devices", []))
        bf16 = "bf16 yes" if t.get("bf16") else "no bf16 (fp16/fp32 profile variant)"
        return [Finding("ok", "torch", f"{head} sees {names}; {bf16}")]
    if t.get("mps"):
        return [Finding("ok", "torch", f"{head}; Apple MPS available")]
    return [Finding("ok", "torch", f"{head}; no GPU: runs train on the CPU")]


def _attention_findings(gpus: hardware.GpuReport, t: dict[str, Any], choice: Choice) -> list[Finding]:
    if not gpus.gpus or choice.profile.harness_env.get(DTYPE_ENV):
        return []  # CPU, MPS and cards without bf16 use SDPA by design
    out = []
    if t and not t.get("flex", False):
        out.append(Finding("warn", "attention", "FlexAttention is not in this torch: runs use SDPA (slower "
                           "with sliding windows)", "install torch >= 2.5 (2.13.0 is pinned in the README)"))
    if any(g.capability == (9, 0) for g in gpus.gpus):
        from nightlab.loop.kernel_prefetch import (  # no torch
            FA3_KERNELS,
            cached_snapshot,
        )

        cached = [ref for ref in FA3_KERNELS if cached_snapshot(ref) is not None]
        if cached:
            out.append(Finding("ok", "attention", f"FA3 kernel cached locally ({cached[0]})"))
        else:
            out.append(Finding("warn", "attention", "Hopper GPU but no FA3 kernel in the local cache: runs use "
                               "FlexAttention (a little slower than upstream's FA3)",
                               "`nightlab prepare` fetches it while the box is online (`nightlab run` does too, "
                               "before its first run)"))
    elif t.get("flex"):
        out.append(Finding("ok", "attention", "FlexAttention available (FA3 is for Hopper only)"))
    return out


def _profile_findings(settings: Settings, choice: Choice, auto: Choice, gpus: hardware.GpuReport) -> list[Finding]:
    from nightlab.trainer import prepare  # no torch (pyarrow, tokenizers)

    # what the harness will use: the config's and the profile's values over its defaults
    harness = prepare.harness_settings(settings.trainer.harness_env(choice.profile.harness_env))
    budget, steps = harness["TIME_BUDGET"], harness.get("BUDGET_STEPS")
    seq, evals = harness["MAX_SEQ_LEN"], harness["EVAL_TOKENS"]
    text = (f"{choice.profile.name!r}: {choice.reason}. {choice.profile.description}. In force: "
            + (f"{steps} optimizer steps (trainer.time_budget for seconds)" if steps else f"time budget {budget} s")
            + f", seq {seq}, {evals:,} eval tokens")
    if choice.profile.name != auto.profile.name:
        text += f". auto would pick {auto.profile.name!r} ({auto.reason})"
    others = ", ".join(n for n in PROFILES if n != choice.profile.name.split("-")[0])
    out = [Finding("ok", "profile", text + f" (others: {others}; set trainer.profile)")]
    out += _shape_findings(choice, seq, evals)
    if not steps and settings.heartbeat.run_timeout < budget + RUN_OVERHEAD_S:  # a step budget has no clock
        out.append(Finding("fail", "profile", f"heartbeat.run_timeout = {settings.heartbeat.run_timeout:g} s is"
                           f" shorter than the {budget} s budget + {RUN_OVERHEAD_S} s of start-up and eval: every"
                           " run would be killed as a timeout", f"heartbeat.run_timeout = {budget + 300}"))
    smallest = min((g.memory_mib for g in gpus.gpus if g.memory_mib), default=None)
    need = estimated_peak_bytes(choice.profile) / 2**20
    if smallest is not None and need > 0.9 * smallest and choice.profile.name != auto.profile.name:
        out.append(Finding("warn", "profile", f"{choice.profile.name!r} needs about {need / 1024:.0f} GB by its "
                           f"estimate, the GPU has {smallest / 1024:.0f} GB: train.py lowers the micro-batch to fit "
                           "(slower steps)", f"trainer.profile = \"auto\" (picks {auto.profile.name!r})"))
    return out


def _shape_findings(choice: Choice, seq: int, evals: int) -> list[Finding]:
    """The harness stops every run whose context does not divide a step's tokens or whose eval is
    shorter than one row; the config's max_seq_len / eval_tokens can make either true."""
    total = int(str(choice.profile.constants.get("TOTAL_BATCH_SIZE", _shipped_constant("TOTAL_BATCH_SIZE"))))
    out = []
    if total % seq:
        out.append(Finding("fail", "profile", f"a context of {seq} tokens does not divide the {total:,} tokens of"
                           f" a {choice.profile.name!r} step (TOTAL_BATCH_SIZE): every run would stop at its start",
                           "trainer.max_seq_len = a power of two such as 256 or 1024, or 0 for the profile's"))
    if evals < seq:
        out.append(Finding("fail", "profile", f"{evals:,} eval tokens are less than one row of {seq}: every run"
                           " would fail when it is scored", f"trainer.eval_tokens = at least {seq} (max_seq_len),"
                           " or 0 for the profile's"))
    return out


def _shipped_constant(name: str) -> object:
    """A constant of the built-in train.py as shipped (the `default` profile leaves them alone)."""
    import nightlab.trainer

    source = (Path(nightlab.trainer.__path__[0]) / "train.py").read_text(encoding="utf-8")
    return read_constants(source, [name])[name]


# -- disk, data, git -----------------------------------------------------------------------------
def _disk_findings(settings: Settings) -> list[Finding]:
    problem = workspace_problem(settings.workspace_path)
    out = [Finding("fail", "workspace", problem, "set workspace.path (or --workspace)")] if problem else []
    need = settings.heartbeat.min_free_disk_gb
    for label, path in watched_paths(settings, settings.workspace_path).items():
        free = free_disk_gb(path)  # as the heartbeat measures it when it pauses the loop
        if free < need:
            used = space_used(settings.workspace_path, settings.cache_path)
            out.append(Finding("fail", "disk", f"{label} {path}: {free:.1f} GB free, under heartbeat.min_free_disk_gb "
                               f"= {need:g} (the loop pauses itself below it)", "free some space or move the "
                               f"{label} (workspace.path / data.cache_dir)"
                               + (f"; nightlab's files: {used}" if used else "")))
        else:
            out.append(Finding("ok", "disk", f"{label} {path}: {free:.1f} GB free"))
    return out


def _sandbox_finding() -> Finding:
    """Whether the scorer can confine the model's processes (README: Integrity)."""
    from nightlab.trainer.prepare import ENV_SANDBOX, SECCOMP_DENIED, landlock_abi  # no torch (pyarrow, tokenizers)

    abi = landlock_abi()
    if os.environ.get(ENV_SANDBOX, "").strip() == "0":
        return Finding("warn", "sandbox", f"{ENV_SANDBOX}=0: the scorer's model processes run unconfined; a model can"
                       " hand its calls to the probe's process or read the validation rows", f"unset {ENV_SANDBOX}")
    if abi < 1:
        return Finding("warn", "sandbox", "the kernel has no landlock: the scorer's model processes run unconfined; a"
                       " model can hand its calls to the probe's process or read the validation rows",
                       "Linux 5.13 or later with landlock in its lsm= boot list confines them")
    machine = os.uname().machine
    seccomp = f"seccomp on {machine}" if machine in SECCOMP_DENIED else f"no seccomp table for {machine}"
    return Finding("ok", "sandbox", f"the scorer confines the model's processes (landlock ABI {abi}, {seccomp})")


def _run_sandbox_finding(settings: Settings) -> Finding:
    """Whether a run here is kept from the workspace's state (loop/executors/sandbox.py)."""
    from nightlab.loop.executors.sandbox import ENV_SANDBOX, probe

    risk = "a run can write the ledger (.nightlab/state.db) the keep rule reads, and fake a win"
    if settings.executor.kind != "local":
        return Finding("warn", "runs", f"runs on {settings.executor.kind} are not sandboxed: {risk}")
    if os.environ.get(ENV_SANDBOX, "").strip() == "0":
        return Finding("warn", "runs", f"{ENV_SANDBOX}=0: runs are not sandboxed: {risk}", f"unset {ENV_SANDBOX}")
    said = probe()
    if said:
        return Finding("warn", "runs", f"{said}: {risk}",
                       "allow unprivileged user namespaces (Ubuntu 23.10+: `sudo sysctl"
                       " kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile that allows `userns`"
                       " for this Python)")
    return Finding("ok", "runs", "each run sees the workspace's state and git read-only (its training the data and"
                   " the code that scores too), and only its own processes")


def _packages_finding() -> Finding:
    """Whether a run can check the scorer's Python for files changed since its change began
    (`prepare.environment_changes`, by `find`): a .pth file planted in site-packages runs in the scorer."""
    if shutil.which("find") is None:
        return Finding("warn", "packages", "no `find` here: a run does not check the scorer's Python for changed files,"
                       " and a .pth file a run or an agent plants in site-packages would run in the scorer",
                       "install findutils (sudo apt-get install -y findutils)")
    return Finding("ok", "packages", "each run checks the scorer's Python for files changed since its change began")


def _data_finding(settings: Settings) -> Finding:
    from nightlab.trainer import prepare  # no torch (pyarrow, tokenizers)

    source = settings.data_source
    folder = not is_named_source(source)
    if folder and not Path(source).is_dir():
        shown = "" if source == settings.data.source else f" ({source})"  # a relative one: where it was looked for
        return Finding("fail", "data", f"data.source = {settings.data.source!r}{shown} is not a directory",
                       "point data.source at a folder of parquet shards, or use climbmix / stdlib / a mirror URL")
    chosen: list[tuple[int, Path]] = []
    if folder:
        try:  # what `nightlab run` prepares from: a bad file there fails it
            chosen = prepare.local_shards(Path(source), settings.data.shards)
        except prepare.PrepareError as exc:
            return Finding("fail", "data", str(exc), "fix or move the file named, then run `nightlab doctor` again")
    data_dir = settings.cache_path / prepare.source_id(source)
    shards = sorted(data_dir.glob(prepare.SHARD_PATTERN)) if data_dir.is_dir() else []
    tokenizer = (data_dir / prepare.TOKENIZER_FILE).is_file()
    # the command to type, with this config's path (a placeholder only when no file was given)
    given = not settings.origin.startswith("<")
    prepare_now = "nightlab prepare" + (f" --config {shlex.quote(settings.origin)}" if given else "")
    if shards and tokenizer:
        return (_folder_change(source, data_dir, shards, chosen, prepare_now) if chosen else None) or \
            Finding("ok", "data", f"{len(shards)} shards and the tokenizer in {data_dir}")
    what = "shards" if not shards else "the tokenizer"
    fetch = " (downloads them)" if source == "climbmix" or source.startswith("http") else ""
    return Finding("warn", "data", f"{what} not prepared yet in {data_dir}",
                   f"`nightlab run` prepares them first{fetch}; or now: {prepare_now}")


def _view_findings(settings: Settings) -> list[Finding]:
    """The data dir as train.py reads it (`<data dir>.train`, beside it): `nightlab run` makes it at its
    start and each run brings it up to date, so one this user cannot write there fails them all (data
    prepared by another user, in a folder shared read-only). Probed by making a folder and removing it:
    what the run does, not what the mode bits say (root, a read-only file system)."""
    from nightlab.trainer import prepare  # no torch (pyarrow, tokenizers)

    view = prepare.training_view_dir(settings.cache_path / prepare.source_id(settings.data_source))
    if view.exists() and not view.is_dir():
        return [Finding("fail", "data", f"{view}, where runs put the data dir as train.py reads it, is not a folder",
                        f"remove {view}; `nightlab run` makes it")]
    target = view if view.is_dir() else next(p for p in view.parents if p.is_dir())  # what `nightlab run` writes in
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".nightlab-doctor-", dir=target))
    except OSError as e:
        return [Finding("fail", "data", f"cannot {'update' if target == view else 'make'} {view}, the data dir as"
                        " train.py reads it, kept next to the data"
                        f" dir: {target} cannot be written ({e.strerror})", f"make {target} writable for this user, or"
                        " set data.cache_dir to a folder it can write (then `nightlab prepare`)")]
    return []


def _folder_change(source: str, data_dir: Path, shards: list[Path], chosen: list[tuple[int, Path]],
                   prepare_now: str) -> Finding | None:
    """What `nightlab run` will change in a folder's data dir prepared before: the folder's files
    changed since (another file validates), or the tokenizer has seen what validates now; None when
    neither. Said so the changed setting of the night (the best measured again) is no surprise."""
    from nightlab.trainer import prepare  # no torch (pyarrow, tokenizers)

    index, validation = chosen[-1]
    wanted = {prepare.shard_name(i): src.resolve() for i, src in chosen}
    present = {p.name: p.resolve() for p in shards}
    seen = prepare.trained_on_validation(data_dir / prepare.TOKENIZER_FILE, validation, prepare.shard_name(index))
    if wanted == present and seen is None:
        return None
    was = next(reversed(present.values()))  # the validation shard of the data dir as it is
    said = [f"{source}'s files changed since it was prepared in {data_dir}"] if wanted != present else []
    if seen is not None:
        said.append(f"the tokenizer must be trained again: {seen}")
    elif was != validation.resolve():
        said.append(f"{validation.name} validates now, not {was.name}")
    fix = ("`nightlab run` prepares it again first" + (" and trains the tokenizer again" if seen else "")
           + ("; runs are then scored on other text: a new setting, the best is measured again"
              if was != validation.resolve() or seen else "; the same validation shard: the same setting")
           + f"; or now: {prepare_now}")
    return Finding("warn", "data", "; ".join(said), fix)


def _protected_findings(settings: Settings) -> list[Finding]:
    """An existing workspace's protected files: an edited one stops the loop at its start; a copy of
    an older nightlab's harness is brought up to this one's there."""
    try:
        ws = open_workspace(settings.workspace_path, settings)
    except UserError:  # none yet: `nightlab run` makes it, with this nightlab's harness, from these files
        missing = missing_project_files(settings.workspace_path, settings.project)
        return [Finding("fail", "project", f"{settings.workspace_path}: {MISSING_FILES} {', '.join(missing)}",
                        MISSING_FILES_FIX)] if missing else []
    todo = harness_upgrade(ws, installed_harness()) if ws.builtin_trainer else HarnessUpgrade((), ())
    bad = [name for name in protected_mismatches(ws) if name not in todo.record]  # the start records those
    if bad:
        return [Finding("fail", "protected", f"changed since nightlab recorded them: {', '.join(bad)}; the loop"
                        " does not start on them", edited_fix(ws, bad))]
    if todo:
        return [Finding("ok", "harness", f"{', '.join((*todo.write, *todo.record))}: not this nightlab's copy yet,"
                        " brought up to it when the loop starts (a commit on the session branch, said in chat)")]
    return []


def _python_findings(settings: Settings) -> list[Finding]:
    """The workspace's editable Python files that do not parse: every run crashes on one, and the
    search refuses to start on its file, in the same words."""
    out = []
    for name in settings.project.editable:
        path = settings.workspace_path / name
        if path.suffix == ".py" and path.is_file():
            problem = not_python(str(path), path.read_text(encoding="utf-8", errors="replace"))
            if problem is not None:
                out.append(Finding("fail", "python", problem, NOT_PYTHON_FIX))
    return out


def _git_finding() -> Finding:
    git = shutil.which("git")
    if git is None:
        return Finding("fail", "git", "git is not installed (the loop commits every experiment)",
                       "sudo apt-get install -y git")
    out = subprocess.run([git, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return Finding("fail", "git", f"`git --version` failed: {out.stderr.strip()[:120]}", "reinstall git")
    return Finding("ok", "git", out.stdout.strip())


def _program_findings(settings: Settings) -> list[Finding]:
    """The programs the commands of the config start: one that is not installed fails every
    proposal (the agent), every run, or every run's checks or score."""
    commands = project_commands(settings)
    if settings.proposer.kind == "agent":
        commands.append(("proposer.agent.command", settings.proposer.agent.command))
    here = {key for key, _ in project_commands(settings, here=True)} | {"proposer.agent.command"}
    out = []
    for key, command in commands:
        problem = missing_program(command, settings.workspace_path)
        if problem is None:
            continue
        if key in here:
            out.append(Finding("fail", "programs", f"{key} starts {problem}", f"install it, or fix {key}"))
        else:  # as the engine's start: a Slurm node runs it with its own PATH
            out.append(Finding("warn", "programs", f"{key} starts {problem} here",
                               "a Slurm node's PATH decides there: install it on the nodes, or give its full path"))
    return out


# -- chat channels -------------------------------------------------------------------------------
def _channel_findings(settings: Settings) -> list[Finding]:
    if settings.telegram is None and settings.slack is None:
        return [Finding("ok", "channels", "none configured (digests go to the console log)")]
    try:
        secrets = resolve_secrets(settings)
    except ConfigError as exc:  # a line per missing token
        return [Finding("fail", "channels", line, "set the token (README: Telegram / Slack)")
                for line in str(exc).splitlines()]
    out = []
    if settings.telegram is not None and secrets.telegram_token is not None:
        out.append(_reach("telegram", _telegram_me, settings.telegram.api_base, secrets.telegram_token.reveal()))
    if settings.slack is not None and secrets.slack_bot_token is not None:
        out.append(_reach("slack", _slack_me, settings.slack.api_base, secrets.slack_bot_token.reveal()))
    return out


_CLIENT_LOGGERS = ("telegram", "slack_sdk", "httpx")  # the client libraries' own loggers


class _CheckLibraryLog(logging.Filter):
    """Drops the client libraries' records made by the thread that checks a channel. Not their
    levels: the daemon checks in a thread while its bot starts, and the bot's records must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and record.name.split(".")[0] in _CLIENT_LOGGERS)


def _reach(name: str, call: Any, api_base: str, token: str) -> Finding:
    # A client library logs what went wrong (a traceback, e.g. for an api_base that answers HTML)
    # before it raises; the finding says it once, without the traceback.
    quiet = _CheckLibraryLog()
    handlers = [*logging.getLogger().handlers, *([logging.lastResort] if logging.lastResort else [])]
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        return Finding("ok", "channels", f"{name}: reachable, {call(api_base, token)}")
    except Exception as exc:  # noqa: BLE001 - any failure of the client library is the finding
        said = f"{type(exc).__name__}: {str(exc)[:160]}".replace(token, "***")  # URLs carry Telegram's token
        return Finding("fail", "channels", f"{name}: not reachable ({said})",
                       f"check the token and the network (README: {name.capitalize()})")
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _telegram_me(api_base: str, token: str) -> str:
    from telegram import Bot
    from telegram.request import HTTPXRequest

    kwargs: dict[str, Any] = {}
    if api_base:
        kwargs["base_url"] = f"{api_base.rstrip('/')}/bot"
    request = HTTPXRequest(connect_timeout=_CHANNEL_TIMEOUT_S, read_timeout=_CHANNEL_TIMEOUT_S)

    async def me() -> str:
        async with Bot(token, request=request, **kwargs) as bot:
            return f"bot @{bot.username}"

    return asyncio.run(me())


def _slack_me(api_base: str, token: str) -> str:
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    kwargs: dict[str, Any] = {"base_url": api_base} if api_base else {}
    try:
        answer = WebClient(token=token, timeout=int(_CHANNEL_TIMEOUT_S), **kwargs).auth_test()
    except SlackApiError as exc:  # its message is a long preamble; Slack's error code says it all
        raise RuntimeError(f"Slack answered {exc.response.get('error', '?')}") from None
    return f"bot {answer.get('user') or answer.get('user_id', '?')} in {answer.get('team') or answer.get('team_id', '?')}"


def log_report(settings: Settings) -> Report:
    """At the start of `nightlab run`: every finding in the log (warnings and failures as such)."""
    report = diagnose(settings)
    for finding in report.findings:
        level = {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}[finding.level]
        log.log(level, "doctor: %s", finding.line().replace("\n               -> ", "; to fix: "))
    return report
