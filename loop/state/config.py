"""The TOML configuration, parsed once at start into frozen dataclasses.

Every section is a dataclass; the parser walks their fields, so a key that is not a field is an
error (typos must not be silently ignored) and every error names the file, the key, the bad value
and what was expected. Secrets never live in the TOML: it names an environment variable or a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from nightlab.loop.state.errors import UserError


class ConfigError(UserError):
    """A user error in the configuration; the CLI prints it and exits with code 2."""


class Secret:
    """A token that prints as *** everywhere (repr, str, f-strings, logs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from: an environment variable or a file (systemd LoadCredential=)."""

    env: str = ""
    file: str = ""

    def describe(self) -> str:
        if self.file:
            return f"file {self.file}"
        return f"environment variable {self.env}" if self.env else "nowhere (no env or file set)"

    def resolve(self, key: str, config_path: Path | str) -> Secret:
        if self.file:
            unset = _unset_variables(self.file)
            if unset:  # "No such file" would be misleading: the path is not even known
                why = ("systemd sets it only inside the service (LoadCredential=), so the secret can be read there"
                       " only" if unset[0] == "CREDENTIALS_DIRECTORY" else "set it, or write the path out")
                raise ConfigError(f"{config_path}: {key}.file = {self.file!r}: ${unset[0]} is not set here; {why}")
            if no_home := _home_problem(self.file):
                raise ConfigError(f"{config_path}: {key}.file = {self.file!r}: {no_home}")
            path = Path(os.path.expandvars(self.file)).expanduser()
            try:
                value = path.read_text().strip()
            except OSError as exc:
                # A name with no folder in it may be the token itself, pasted in: never echo that.
                shown = f" = {self.file!r}" if "/" in self.file else " (not a path; value not shown)"
                raise ConfigError(
                    f"{config_path}: {key}.file{shown}: cannot read the secret ({exc.strerror});"
                    " point it at a readable file (e.g. $CREDENTIALS_DIRECTORY/telegram)"
                ) from None
        elif self.env:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise ConfigError(
                    f"{config_path}: {key}.env = {self.env!r}: the environment variable is not set;"
                    f" export {self.env}=... (or use an EnvironmentFile= in the systemd unit)"
                )
        else:
            raise ConfigError(f"{config_path}: {key}: set either env = \"VAR\" or file = \"/path\"")
        if not value:
            raise ConfigError(f"{config_path}: {key}: the secret from {self.describe()} is empty")
        return Secret(value)


BRANCH_PREFIX = "autoresearch/"  # a session's branch: BRANCH_PREFIX + its tag


@dataclass(frozen=True)
class WorkspaceSettings:
    path: str = "~/nightlab-workspace"  # the git repository the loop works in
    tag: str = ""  # branch autoresearch/<tag>; empty: today's date, e.g. nov23


def is_branch_name(name: str) -> bool:
    """git takes `name` for a branch (its own rules, asked before any repository exists: none is needed)."""
    import git  # here: only a tag to check needs git to read a config

    try:
        git.cmd.Git().check_ref_format("--branch", name)
    except git.GitCommandError:
        return False
    return True


@dataclass(frozen=True)
class DataSettings:
    source: str = "climbmix"  # climbmix | stdlib | http(s)://mirror | /path/to/parquet/shards
    shards: int = 10  # training shards to fetch (plus the pinned validation shard)
    cache_dir: str = "~/.cache/nightlab"


# The harness's environment variables (trainer/prepare.py reads them; named here so the config
# does not import the harness and its data libraries).
HARNESS_ENV = {"time_budget": "NIGHTLAB_TIME_BUDGET", "max_seq_len": "NIGHTLAB_MAX_SEQ_LEN",
               "eval_tokens": "NIGHTLAB_EVAL_TOKENS"}
MAX_SHARDS = 100_000  # training shards: [data] shards and `nightlab prepare --shards` (-1: all)
BUDGET_STEPS_ENV = "NIGHTLAB_BUDGET_STEPS"  # a profile's step budget (tiny's), instead of seconds


# seconds a run needs besides its training budget (start-up, compilation, eval): run_timeout must allow them
RUN_OVERHEAD_S = 120


@dataclass(frozen=True)
class TrainerSettings:
    profile: str = "auto"  # auto (picked from the hardware) | a name in trainer/profiles.py PROFILES
    time_budget: int = 0  # seconds of training per experiment; 0 = the profile's (300 on GPUs, 40 steps on tiny)
    max_seq_len: int = 0  # context length; 0 = the profile's
    eval_tokens: int = 0  # validation tokens val_bpb is scored on; 0 = the profile's

    def harness_overrides(self) -> dict[str, str]:
        """The NIGHTLAB_* values the config sets; they win over the profile's in every run's env."""
        return {env: str(getattr(self, key)) for key, env in HARNESS_ENV.items() if getattr(self, key)}

    def harness_env(self, profile_env: dict[str, str]) -> dict[str, str]:
        """The harness values every run gets: the profile's with the config's over them. A
        time_budget set here also replaces a profile's step budget: the user asked for seconds."""
        env = {**profile_env, **self.harness_overrides()}
        if self.time_budget:
            env.pop(BUDGET_STEPS_ENV, None)
        return env


@dataclass(frozen=True)
class ProjectSettings:
    editable: tuple[str, ...] = ("train.py",)
    protected: tuple[str, ...] = ("prepare.py",)
    run_command: str = ""  # empty: `<python> train.py` for the built-in trainer
    metric: str = "val_bpb"
    direction: Literal["minimize", "maximize"] = "minimize"
    checks_command: str = ""  # run after a successful run; failure -> checks_failed
    # prints the metric from what run_command saved, in its own process (see README: integrity)
    score_command: str = ""


@dataclass(frozen=True)
class LoopSettings:
    baseline_runs: int = 3  # repeats of the unmodified baseline (one per slot where there are more): the first hour's noise
    keep_z: float = 2.0  # keep when the gain beats the best by more than z standard errors of the difference
    max_runs: int = 3  # runs of one candidate at most (first run + re-runs) before it is decided
    noise_prior: float = 0.003  # noise assumed until repeats measure it, as a share of the best's metric
    remeasure_every: int = 20  # experiments between re-measurements of the best (drift); 0 = never
    switch_area_after: int = 5  # experiments in a row without a keep before the search changes area
    pause_after_failures: int = 15  # failures in a row (crash, timeout, rejected) before the loop pauses itself
    checkpoint_interval: float = 1.0  # seconds between command checks while a run is in flight
    # stop after this many more experiments each time `nightlab run` starts (like
    # --max-experiments N, which wins when both are given); 0 = run until stopped
    max_experiments: int = 0
    # waves: N candidates from the best, decided together; async: a freed slot starts the next
    # candidate at once, each result decided as it ends (several slots only)
    mode: Literal["waves", "async"] = "waves"
    # a decided experiment's run log is cut to its first and last halves of this (0 = kept whole): a
    # night of runs killed at heartbeat.max_log_mb would otherwise keep a gigabyte each for good
    decided_log_mb: float = 1.0
    # the compile caches every run shares (.nightlab/compile-cache) are pruned past this, least
    # recently used first, between experiments: each new architecture compiles graphs of its own
    compile_cache_gb: float = 20.0


@dataclass(frozen=True)
class AgentSettings:
    command: str = ""  # e.g. "claude -p --permission-mode acceptEdits < {prompt_file}"
    timeout: float = 900.0
    # stdout + stderr past this is killed: an agent printing in a loop would fill the disk
    max_output_mb: float = 100.0


@dataclass(frozen=True)
class ProposerSettings:
    kind: Literal["search", "agent"] = "search"
    seed: int = 0
    agent: AgentSettings = field(default_factory=AgentSettings)


@dataclass(frozen=True)
class SlurmSettings:
    shared_dir: str = ""  # required: a filesystem the compute nodes see (snapshots, logs, exit files)
    partition: str = ""  # empty: the cluster's default partition
    account: str = ""
    gres: str = "gpu:1"  # per job; empty: no --gres (CPU partitions)
    extra_args: tuple[str, ...] = ()  # more sbatch flags, e.g. ["--qos=low", "--mem=64G"]
    jobs: int = 1  # jobs in flight at once: the wave size
    time_margin: float = 300.0  # --time = heartbeat.run_timeout + this (the backstop when we are down)
    poll_interval: float = 5.0  # at most one squeue call per this many seconds (per process)

    @property
    def shared_path(self) -> Path:
        return Path(os.path.expandvars(self.shared_dir)).expanduser()


@dataclass(frozen=True)
class ExecutorSettings:
    kind: Literal["local", "slurm"] = "local"
    gpus: tuple[int, ...] = ()  # local: empty = all visible GPUs, one slot each
    cpu_slots: int = 1  # local without a GPU: this many CPU slots (tests, demos)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


# kv: [heartbeat] as the daemon last loaded it (a SIGHUP reload); the engine applies it at its
# next checkpoint, so run_timeout means the same to the heartbeat, the checks and Slurm's --time
LIVE_HEARTBEAT_KEY = "settings.heartbeat"
# kv: {"path", "text"} of the config file the daemon started with. Its engine reads the settings
# from here, not from the file as it is now: a restarted engine would otherwise pick up an edit
# nobody reloaded (or die on a half-saved file, every restart, until the loop paused itself).
DAEMON_CONFIG_KEY = "settings.config"


def changed_fields(old: Any, new: Any, section: str) -> list[str]:
    """What a reload changed in one section (two instances of its dataclass), as `section.name
    old -> new`: the daemon and the engine log a SIGHUP's changes the same way."""
    return [
        f"{section}.{f.name} {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in dataclasses.fields(old)
        if getattr(old, f.name) != getattr(new, f.name)
    ]


@dataclass(frozen=True)
class HeartbeatSettings:
    check_interval: float = 5.0
    run_timeout: float = 600.0
    stall_after: float = 180.0
    loop_stall_after: float = 120.0
    max_restarts_per_hour: int = 3
    min_free_disk_gb: float = 2.0
    max_log_mb: float = 1024.0  # a run's log past this is killed: it would fill the disk by morning
    report_time: str = "07:30"  # daily report, HH:MM local time; empty: off
    hours: str = ""  # "22:00-08:00": experiments start only then (local time); empty: any time


def minute_of_day(text: str) -> int | None:
    """ "07:30" -> 450; None unless HH:MM."""
    hh, _, mm = text.strip().partition(":")
    if not (hh.isdigit() and mm.isdigit() and len(mm) == 2 and int(hh) < 24 and int(mm) < 60):
        return None
    return int(hh) * 60 + int(mm)


@dataclass(frozen=True)
class RunHours:
    """`[heartbeat] hours`: the part of each day the loop may start experiments in, from `start`
    to `end` (minutes of the local day; past midnight when end < start)."""

    start: int
    end: int
    text: str

    @classmethod
    def parse(cls, text: str) -> RunHours | None:
        """None for "" (any time); ValueError when it is not "HH:MM-HH:MM" with two different times."""
        if not text.strip():
            return None
        first, _, second = text.partition("-")
        start, end = minute_of_day(first), minute_of_day(second)
        if start is None or end is None or start == end:
            raise ValueError(text)
        return cls(start, end, f"{first.strip()}-{second.strip()}")

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True)
class TelegramSettings:
    token: SecretRef = field(default_factory=lambda: SecretRef(env="NIGHTLAB_TELEGRAM_TOKEN"))
    operators: tuple[int, ...] = ()  # user ids allowed to steer
    viewers: tuple[int, ...] = ()  # user ids allowed read-only commands
    chats: tuple[int, ...] = ()  # chats that receive digests and may send commands
    api_base: str = ""  # Bot API base URL; empty: Telegram's


@dataclass(frozen=True)
class SlackSettings:
    bot_token: SecretRef = field(default_factory=lambda: SecretRef(env="NIGHTLAB_SLACK_BOT_TOKEN"))
    app_token: SecretRef = field(default_factory=lambda: SecretRef(env="NIGHTLAB_SLACK_APP_TOKEN"))
    operators: tuple[str, ...] = ()
    viewers: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()  # channel ids that receive digests and may send commands
    api_base: str = ""  # Web API base URL ending in /api/; empty: Slack's


@dataclass(frozen=True)
class DigestSettings:
    mode: Literal["every", "keeps_and_crashes", "hourly"] = "every"
    log_tail_lines: int = 15


@dataclass(frozen=True)
class Settings:
    workspace: WorkspaceSettings = field(default_factory=WorkspaceSettings)
    data: DataSettings = field(default_factory=DataSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    project: ProjectSettings = field(default_factory=ProjectSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    proposer: ProposerSettings = field(default_factory=ProposerSettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    digest: DigestSettings = field(default_factory=DigestSettings)
    telegram: TelegramSettings | None = None  # the section's presence turns the channel on
    slack: SlackSettings | None = None
    origin: str = "<defaults>"  # the file these came from, for messages

    @property
    def workspace_path(self) -> Path:
        return self._path(self.workspace.path)

    @property
    def cache_path(self) -> Path:
        return self._path(self.data.cache_dir)

    @property
    def data_source(self) -> str:
        """data.source as the data is prepared from: a local folder as an absolute path (relative
        to the config's folder, as the other paths), a named source or a mirror's URL as it is."""
        source = self.data.source
        return source if is_named_source(source) else str(self._path(source))

    def _path(self, text: str) -> Path:
        """~ and $VARS expanded; a relative path is relative to the config file's folder (where the
        service runs), so `nightlab status --config F` typed anywhere finds the same workspace.
        Absolute: runs and agents work in the workspace, where a relative data dir named nothing."""
        path = Path(os.path.expandvars(text)).expanduser()
        if path.is_absolute() or self.origin.startswith("<"):  # "<defaults>", "<table>": no file
            return path.resolve()
        return (Path(self.origin).parent / path).resolve()


def is_named_source(source: str) -> bool:
    """climbmix, stdlib or a mirror's URL: not a local folder."""
    return source in ("climbmix", "stdlib") or source.startswith(("http://", "https://"))


def profile_names() -> tuple[str, ...]:
    from nightlab.trainer.profiles import PROFILES  # no torch

    return ("auto", *PROFILES)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a TOML file; raises ConfigError with a message meant for people."""
    return settings_from_text(read_config_text(path), str(path))


def read_config_text(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; copy config.example.toml and edit it, or check the path"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror})") from None
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not a "syntax error at 1:1"
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the file as UTF-8") from None


def settings_from_text(text: str, source: str) -> Settings:
    """Settings from a config file's text; `source` is the file (relative paths start at its folder)."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from None
    return settings_from_table(table, source=source)


def settings_from_table(table: dict[str, Any], source: str = "<table>") -> Settings:
    """Settings from a parsed table; every mistake in it is reported at once, one line each."""
    problems = _Problems(source)
    settings = _build(Settings, {**table, "origin": source}, problems, prefix="")
    _check(settings, problems)
    if problems.lines:
        raise ConfigError("\n".join(problems.lines))
    return settings


class _Problems:
    """The mistakes found so far; a key that is already wrong is not checked again."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []
        self._keys: set[str] = set()

    def add(self, key: str, message: str) -> None:
        self._keys.add(key)
        self.lines.append(message if message.startswith(f"{self.source}: ") else f"{self.source}: {message}")

    def seen(self, key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in self._keys for i in range(1, len(parts) + 1))


# Keys older configs may still set, with what replaced them.
_REPLACED = {
    "loop.confirm_k": "the keep rule replaced it with loop.keep_z (the standard errors a gain must beat)"
                      " and loop.max_runs (the runs of a candidate before it is decided)",
}


def _build(cls: type, table: dict[str, Any], problems: _Problems, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if prefix + key in _REPLACED:
            problems.add(prefix + key, f"{prefix + key} is no longer a setting: {_REPLACED[prefix + key]};"
                                       f" remove it from [{prefix[:-1]}]")
            continue
        if key not in names:
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            known = ", ".join(sorted(n for n in names if n != "origin"))
            problems.add(prefix + key, f"unknown key {prefix + key!r} in {where}; {_unknown_key_hint(key, names, prefix)}"
                                       f" (known keys: {known})")
            continue
        try:
            values[key] = _convert(hints[key], value, problems, f"{prefix}{key}")
        except ConfigError as exc:  # this key keeps its default; the others are still checked
            problems.add(prefix + key, str(exc))
    return cls(**values)


def _sections(cls: type, prefix: str = "") -> dict[str, set[str]]:
    """Every section of the config ("" = the top level, "loop", "proposer.agent", ...) with its keys."""
    hints = typing.get_type_hints(cls)
    found = {prefix: {f.name for f in dataclasses.fields(cls)} - {"origin"}}
    for name, hint in hints.items():
        inner = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        if isinstance(inner, type) and inner is not SecretRef:
            found |= _sections(inner, f"{prefix}{name}.")
    return {section.rstrip("."): keys for section, keys in found.items()}


def _unknown_key_hint(key: str, names: set[str], prefix: str) -> str:
    """What the user most likely meant: a key of another section (one written under the wrong
    header, or appended at the end of the file, lands in the last section), else a near spelling."""
    here = prefix.rstrip(".")
    sections = _sections(Settings)
    homes = [section for section, keys in sections.items() if key in keys and section != here]
    if "" in homes:  # a section's own name ("" is the top level), e.g. [heartbeat.loop] for [loop]
        return f"[{key}] is a section of its own: write it as [{key}], not inside [{here}]"
    if homes:
        which = "that header" if len(homes) == 1 else "the one you meant"
        return f"it is a key of {' or '.join(f'[{h}]' for h in homes)}: move it under {which}"
    close = difflib.get_close_matches(key, sorted(names - {"origin"}), n=1)
    if close and f"{prefix}{close[0]}" in sections:  # a misspelt header: [loops] for [loop]
        return f"did you mean [{prefix}{close[0]}]?"
    return f"did you mean {close[0]!r}?" if close else "remove it"


def _convert(hint: Any, value: Any, problems: _Problems, key: str) -> Any:
    source = problems.source
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`: the section is present
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner, value, problems, key)
    if hint is SecretRef and not isinstance(value, dict):
        # Most likely the token itself was pasted in: never echo it.
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{source}: {key} is a {type(value).__name__} (value not shown): secrets are never written in"
            f' the config; use {name} = {{ env = "VAR" }} or {name} = {{ file = "/path" }}'
        )
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a table [{key}]")
        return _build(hint, value, problems, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{source}: {key} = {value!r}: expected one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            plural = {str: "strings", int: "integers"}.get(item, item.__name__)
            # one value where a list belongs (gpus = 0): the list it most likely meant
            bracket = (f"; in brackets: {key.rsplit('.', 1)[-1]} = [{_toml_value(value)}]"
                       if isinstance(value, item) and not isinstance(value, bool) else "")
            raise ConfigError(f"{source}: {key} = {value!r}: expected a list of {plural}{bracket}")
        return tuple(_convert(item, v, problems, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # TOML allows nan and inf; no setting means anything by them (nan fails every comparison)
        raise ConfigError(f"{source}: {key} = {value!r}: expected a finite number")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: {key} = {value!r}: expected {_type_name(hint)}, got {type(value).__name__}"
        )
    return value


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


_DAY = 86_400  # seconds
_WEEK = 7 * _DAY


def _amount(bound: float) -> str:
    """A bound as it would be written in the TOML: 3600, 0.05, 1e-06."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


def _home_problem(text: str) -> str | None:
    """Why the ~ or ~user a path starts with names no home here, or None. Path.expanduser raises
    RuntimeError for it: every command reading the path would stop with a traceback."""
    expanded = os.path.expandvars(text)
    try:
        Path(expanded).expanduser()
    except RuntimeError:
        home = expanded.split("/", 1)[0]
        why = "HOME is not set" if home == "~" else f"no user {home[1:]!r} here"
        return f"{home} names no home folder ({why}); write the path out, or start it with ~/ for your own home"
    return None


class _Checks:
    """_check's checks, one per kind of value. Each names the file, the key, the value and what to
    write instead; a key already wrong is not checked again (a key that failed to parse holds its
    default: no second line)."""

    def __init__(self, problems: _Problems) -> None:
        self.problems = problems

    def fail(self, key: str, value: Any, expected: str) -> None:
        if not self.problems.seen(key):
            self.problems.add(key, f"{key} = {value!r}: expected {expected}")

    def bounded(self, key: str, value: float, low: float, high: float, expected: str,
                special: tuple[int, ...] = ()) -> None:
        """`value` in [low, high], or one of `special` (0: off or the profile's, -1: all);
        `expected` says so, its {low} and {high} filled in from the bounds. Unbounded, a value
        passed `config check` and crashed later (1e300 s overflows the scheduler's timers)."""
        if value not in special and not low <= value <= high:
            self.fail(key, value, expected.format(low=_amount(low), high=_amount(high)))

    def path(self, key: str, text: str, expected: str) -> None:
        """A folder the config names: `expected` when empty ("" would be whatever directory
        nightlab was started in), and every $NAME and ~user in it known here."""
        if self.problems.seen(key):
            return
        if not text.strip():
            self.fail(key, text, expected)
        elif unset := _unset_variables(text):
            # expandvars leaves an unset $NAME as it is: a folder literally named "$SCRATCH" would appear
            self.problems.add(key, f"{key} = {text!r}: ${unset[0]} is not set here; set it (for the service"
                                   " too, with Environment= in its unit) or write the path out")
        elif why := _home_problem(text):
            self.problems.add(key, f"{key} = {text!r}: {why}")

    def workspace_files(self, key: str, names: tuple[str, ...]) -> None:
        """Files named relative to the workspace. git names changed files that way: "/abs/train.py"
        would never match one, and every proposal would be rejected as changing a file outside
        project.editable; "" or "." names no file at all."""
        if any(not n.strip() or not PurePosixPath(n).parts or PurePosixPath(n).is_absolute() or n.startswith("~")
               or ".." in PurePosixPath(n).parts for n in names):
            self.fail(key, list(names), 'paths of files inside the workspace, relative to it, e.g. ["train.py"]')


def _check(s: Settings, problems: _Problems) -> None:
    """Range and cross-field checks that types alone cannot express."""
    checks = _Checks(problems)
    fail, bounded = checks.fail, checks.bounded

    checks.path("workspace.path", s.workspace.path, 'a directory, e.g. "~/nightlab-workspace"')
    if s.workspace.tag and not is_branch_name(BRANCH_PREFIX + s.workspace.tag):  # else refused only at init
        fail("workspace.tag", s.workspace.tag, f"what git takes in a branch name ({BRANCH_PREFIX}<tag>):"
             " letters, digits, '-', '_' or '.', e.g. \"nov23\"")
    checks.path("data.cache_dir", s.data.cache_dir, 'a directory, e.g. "~/.cache/nightlab"')
    if not is_named_source(s.data.source):
        checks.path("data.source", s.data.source, '"climbmix", "stdlib", an http(s):// mirror or a folder of'
                                                  " parquet shards")
    if s.executor.kind == "slurm":
        checks.path("executor.slurm.shared_dir", s.executor.slurm.shared_dir, 'a directory every compute node'
                    ' sees, e.g. "/shared/nightlab" (run snapshots, logs and exit files go there)')
    if s.trainer.profile not in profile_names():
        fail("trainer.profile", s.trainer.profile, "one of " + ", ".join(map(repr, profile_names())))
    bounded("trainer.time_budget", s.trainer.time_budget, 1, _DAY,
            "0 (the profile's) or seconds of training from {low} to {high}, e.g. 300", special=(0,))
    bounded("trainer.max_seq_len", s.trainer.max_seq_len, 1, 2**20,
            "0 (the profile's) or a context length in tokens from {low} to {high}, e.g. 1024", special=(0,))
    bounded("trainer.eval_tokens", s.trainer.eval_tokens, 1, 10**11,
            "0 (the profile's) or validation tokens from {low} to {high}, e.g. 4194304", special=(0,))
    # a run also starts up (compiles) and evaluates; the heartbeat kills it at run_timeout (a budget
    # already out of range is said once, not again as run_timeout's)
    budget = 0 if problems.seen("trainer.time_budget") else s.trainer.time_budget
    if budget and s.heartbeat.run_timeout < budget + RUN_OVERHEAD_S:
        fail("heartbeat.run_timeout", s.heartbeat.run_timeout, f"at least trainer.time_budget + {RUN_OVERHEAD_S} s"
             f" (start-up and eval); e.g. {budget + 300}")
    bounded("loop.max_experiments", s.loop.max_experiments, 1, 10**6,
            "0 (no limit) or a number of experiments from {low} to {high}", special=(0,))
    bounded("data.shards", s.data.shards, 1, MAX_SHARDS,
            "-1 (all) or a number of training shards from {low} to {high}, e.g. 10", special=(-1,))
    hb = s.heartbeat
    bounded("heartbeat.check_interval", hb.check_interval, 0.1, 3600,
            "seconds from {low} to {high} between supervision checks, e.g. 5")
    for name in ("run_timeout", "stall_after", "loop_stall_after"):
        bounded(f"heartbeat.{name}", getattr(hb, name), 1, _WEEK, "seconds from {low} to {high} (a week)")
    bounded("heartbeat.max_log_mb", hb.max_log_mb, 0.1, 10**6, "megabytes from {low} to {high}, e.g. 1024")
    # the top is past any disk (a check meant to fail everywhere still can), not past a float's range
    bounded("heartbeat.min_free_disk_gb", hb.min_free_disk_gb, 0, 10**9,
            "gigabytes from {low} (no check) to {high}, e.g. 2")
    bounded("heartbeat.max_restarts_per_hour", hb.max_restarts_per_hour, 0, 60,
            "from {low} (pause instead of restarting) to {high} restarts")
    if hb.report_time and minute_of_day(hb.report_time) is None:
        fail("heartbeat.report_time", hb.report_time, 'HH:MM, e.g. "07:30", or ""')
    try:
        RunHours.parse(hb.hours)
    except ValueError:
        fail("heartbeat.hours", hb.hours, 'from-to in local time, e.g. "22:00-08:00", or "" for any time')
    lp = s.loop
    bounded("loop.baseline_runs", lp.baseline_runs, 1, 100, "at least {low} and at most {high} (runs of the baseline)")
    bounded("loop.keep_z", lp.keep_z, 0, 10, "a number >= {low} and <= {high} (standard errors), e.g. 2")
    bounded("loop.max_runs", lp.max_runs, 1, 100, "at least {low} and at most {high} (runs of one candidate)")
    bounded("loop.noise_prior", lp.noise_prior, 1e-6, 1,
            "a positive share from {low} to {high} (all of it), e.g. 0.003 (0.3 % of the metric)")
    bounded("loop.remeasure_every", lp.remeasure_every, 1, 10**5,
            "0 (never) or a number of experiments from {low} to {high}", special=(0,))
    # below 1 these do not mean "never": the loop would pause after every experiment or change area
    # every proposal
    bounded("loop.switch_area_after", lp.switch_area_after, 1, 10**5,
            "at least {low} and at most {high} (experiments without a keep)")
    bounded("loop.pause_after_failures", lp.pause_after_failures, 1, 10**5,
            "at least {low} and at most {high} (failures in a row)")
    # tiny: the engine polls in a busy loop; huge: commands wait for hours (or the wait overflows)
    bounded("loop.checkpoint_interval", lp.checkpoint_interval, 0.05, 60, "seconds from {low} to {high}, e.g. 1.0")
    bounded("loop.decided_log_mb", lp.decided_log_mb, 0.01, 10**6,
            "0 (keep logs whole) or megabytes from {low} to {high}, e.g. 1", special=(0,))
    # no floor but 0: a test of the pruning bounds the caches to a few kilobytes
    bounded("loop.compile_cache_gb", lp.compile_cache_gb, 1e-9, 10**6,
            "a positive number of gigabytes up to {high}, e.g. 20 (the compile caches are pruned past it)")
    agent = s.proposer.agent
    bounded("proposer.agent.timeout", agent.timeout, 1, _DAY, "seconds from {low} to {high}, e.g. 900")
    bounded("proposer.agent.max_output_mb", agent.max_output_mb, 0.1, 10**6, "megabytes from {low} to {high}, e.g. 100")
    bounded("digest.log_tail_lines", s.digest.log_tail_lines, 1, 1000,
            "at least {low} and at most {high} (log lines in a crash digest)")
    if not s.project.editable:
        fail("project.editable", [], "at least one file the proposer may edit")
    checks.workspace_files("project.editable", s.project.editable)
    checks.workspace_files("project.protected", s.project.protected)
    if s.project.score_command and not s.project.run_command:  # else ignored: the built-in trainer's harness scores
        fail("project.score_command", s.project.score_command,
             '"" with the built-in trainer (its harness scores), or your training command in project.run_command')
    if not _METRIC_NAME.fullmatch(s.project.metric):  # no log line could carry it: every run a crash
        fail("project.metric", s.project.metric, "the name the run prints, of letters, digits, _ and . (`accuracy:"
             " 0.91` after a line `---`, or `METRIC accuracy=0.91`)")
    if set(s.project.editable) & set(s.project.protected):
        both = sorted(set(s.project.editable) & set(s.project.protected))
        fail("project.protected", both, "files that are not also editable")
    _check_executor(s, checks)
    if s.proposer.kind == "agent" and not s.proposer.agent.command:
        fail("proposer.agent.command", "", 'a command when proposer.kind = "agent" (see README)')
    for name in _BRACED.findall(s.proposer.agent.command):
        # a misspelt placeholder reaches the agent's shell as text: the agent would get no prompt.
        # Only names like prompt_file count (awk's '{print}' and the like are the shell's business).
        if name != "prompt_file" and difflib.SequenceMatcher(None, name.lower(), "prompt_file").ratio() >= 0.6:
            problems.add("proposer.agent.command", f"proposer.agent.command: {{{name}}} is not a placeholder;"
                         " the one nightlab replaces is {prompt_file} (the prompt's path)")
    if s.telegram is not None and not (s.telegram.operators or s.telegram.viewers):
        fail("telegram.operators", [], "at least one user id in operators or viewers (deny by default)")
    if s.slack is not None and not (s.slack.operators or s.slack.viewers):
        fail("slack.operators", [], "at least one user id in operators or viewers (deny by default)")
    for key, ref in secret_refs(s):
        if ref.env and not _ENV_NAME.fullmatch(ref.env):
            # Not a variable name: likely the token itself; say so without showing it.
            problems.add(f"{key}.env", f'{key}.env is not an environment variable name (value not shown);'
                         f' use {key.rsplit(".", 1)[-1]} = {{ env = "VAR" }} or {{ file = "/path" }}')


_BRACED = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")  # {name}, not the shell's ${NAME}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")  # what loop/summary.py reads (a `.` in METRIC lines only)
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")  # $NAME or ${NAME}, as os.path.expandvars reads them


def _unset_variables(text: str) -> list[str]:
    """The $NAME / ${NAME} in a path that this environment does not set."""
    return [name for name in _VAR.findall(text) if name not in os.environ]


def secret_refs(s: Settings) -> list[tuple[str, SecretRef]]:
    """The configured channels' secrets, each with its key in the config."""
    refs = [("telegram.token", s.telegram.token)] if s.telegram else []
    if s.slack:
        refs += [("slack.bot_token", s.slack.bot_token), ("slack.app_token", s.slack.app_token)]
    return refs


def _check_executor(s: Settings, checks: _Checks) -> None:
    ex = s.executor
    checks.bounded("executor.cpu_slots", ex.cpu_slots, 1, 256, "at least {low} and at most {high} (CPU slots)")
    if len(set(ex.gpus)) != len(ex.gpus) or any(g < 0 for g in ex.gpus):
        checks.fail("executor.gpus", list(ex.gpus), "distinct GPU indices >= 0, e.g. [0, 1, 2, 3]")
    if ex.kind != "slurm":
        return
    sl, fail = ex.slurm, checks.fail
    # shared_path expands ~user: not for a path already found wrong (_Checks.path)
    if not checks.problems.seen("executor.slurm.shared_dir") and not sl.shared_path.is_absolute():
        fail("executor.slurm.shared_dir", sl.shared_dir, "an absolute path (~ and $VARS are expanded)")
    checks.bounded("executor.slurm.jobs", sl.jobs, 1, 1000, "at least {low} and at most {high} (jobs in flight at once)")
    checks.bounded("executor.slurm.time_margin", sl.time_margin, 0, _DAY, "seconds from {low} to {high}, e.g. 300")
    checks.bounded("executor.slurm.poll_interval", sl.poll_interval, 0.01, 600, "seconds from {low} to {high}, e.g. 5")
    owned = ("-o", "--output", "-e", "--error", "-t", "--time", "--parsable", "-D", "--chdir", "-J", "--job-name")
    for arg in sl.extra_args:
        if arg.split("=", 1)[0] in owned:
            fail("executor.slurm.extra_args", list(sl.extra_args),
                 f"no {arg.split('=', 1)[0]} (nightlab sets the job's output, time, name and directory itself)")


@dataclass(frozen=True)
class Secrets:
    telegram_token: Secret | None = None
    slack_bot_token: Secret | None = None
    slack_app_token: Secret | None = None

    def values(self) -> list[Secret]:
        found = (getattr(self, f.name) for f in dataclasses.fields(self))
        return [v for v in found if v is not None]


# Names that say "secret"; long values only, so that a flag or a short word is never starred out.
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|APIKEY)$")
_SECRET_MIN_LEN = 12


def environment_secrets() -> list[Secret]:
    """The runs inherit the daemon's environment (less the chat tokens): an API key or a hub token
    a run prints must not reach a chat or the journal either."""
    return [Secret(value=v) for k, v in os.environ.items()
            if _SECRET_NAME.search(k.upper()) and len(v) >= _SECRET_MIN_LEN]


def readable_secrets(s: Settings) -> list[Secret]:
    """The configured channels' secrets this process can read: in the engine, the ones from files
    (an agent it starts could read those too), not the variables the daemon kept from it."""
    found = []
    for key, ref in secret_refs(s):
        with contextlib.suppress(ConfigError):
            found.append(ref.resolve(key, s.origin))
    return found


# Terminal escape sequences (CSI colours, OSC titles/clipboard/links, two-byte ESC codes) and the
# other control characters but tab and line ends: text from outside written for a terminal (a run's
# log, a coding agent's output) holds them, and none is words (git refuses a NUL in a commit message).
# The one pattern: the chats' formatter (bot/format.py) and the agent proposer drop them with it.
TERMINAL_CODES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?"
                            r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Redactor:
    """Stars out known secret values. Text from outside (an agent's words, a run's log, a note, a
    traceback) goes through one where it enters the store, git, a file, a prompt, a log or a chat,
    so it is the same clean text everywhere after."""

    values: tuple[str, ...] = ()

    @classmethod
    def of(cls, secrets: Iterable[Secret]) -> Redactor:
        # longest first: a value holding another one is starred whole, not left in pieces
        return cls(tuple(sorted({s.reveal() for s in secrets} - {""}, key=len, reverse=True)))

    @classmethod
    def known(cls, s: Settings, handed: Iterable[Secret] = ()) -> Redactor:
        """The secrets this process can know of (the engine, `nightlab ctl`): what an agent, a run
        or a person here could read and write back; `handed`: the chat tokens the daemon kept out
        of the engine's environment and gave it on stdin (an agent can still read them in the
        daemon's /proc/<pid>/environ)."""
        return cls.of([*readable_secrets(s), *environment_secrets(), *handed])

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "***")
        return text


def secret_env_names(s: Settings) -> set[str]:
    """The environment variables the configured channels' tokens come from: only the daemon's bot
    needs them, so the engine (and the runs, agents and checks it starts) get an environment
    without them."""
    return {ref.env for _, ref in secret_refs(s) if ref.env and not ref.file}


def resolve_secrets(s: Settings) -> Secrets:
    """Read the secrets of the enabled channels; raises ConfigError naming every missing one, a
    line each (one at a time, a night's setup took a `config check` per token)."""
    found: dict[str, Secret] = {}
    problems = []
    for key, ref in secret_refs(s):
        try:
            found[key] = ref.resolve(key, s.origin)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return Secrets(telegram_token=found.get("telegram.token"), slack_bot_token=found.get("slack.bot_token"),
                   slack_app_token=found.get("slack.app_token"))


def render_settings(s: Settings) -> str:
    """The effective configuration as TOML-like text; secrets appear only as where they come from."""
    lines: list[str] = [f"# effective configuration from {s.origin}"]

    def emit(obj: Any, section: str) -> None:
        scalars, tables = [], []
        for f in dataclasses.fields(obj):
            if f.name == "origin":
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, SecretRef):
                tables.append((f.name, value))
            elif value is not None:
                scalars.append((f.name, value))
        if section and scalars:
            lines.append(f"\n[{section}]")
        for name, value in scalars:
            if isinstance(value, SecretRef):
                lines.append(f"{name} = <secret from {value.describe()}>")
            else:
                lines.append(f"{name} = {_toml_value(value)}")
        for name, value in tables:
            emit(value, f"{section}.{name}" if section else name)

    emit(s, "")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
