"""`nightlab service install`: the systemd unit for one config (template: nightlab.service).

The unit agrees with the daemon's stop design (daemon.py): Type=notify with the watchdog,
KillMode=process so a stop or restart never kills the training run in flight (it is re-attached),
secrets through an EnvironmentFile or LoadCredential=, never in the unit or the TOML.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from string import Template

from nightlab.loop.state.config import Settings, load_settings, secret_refs
from nightlab.loop.state.errors import UserError

UNIT_NAME = "nightlab.service"
_CREDENTIALS_PREFIX = "$CREDENTIALS_DIRECTORY/"


def render_unit(config_path: Path, user: bool, run_as: str, executable: list[str]) -> str:
    settings = load_settings(config_path)
    etc = _etc_dir(user)
    exec_start = shlex.join([*executable, "run", "--config", str(config_path)])
    credentials = [f"LoadCredential={name}:{etc / 'credentials' / name}" for name in _credential_names(settings)]
    return Template((files("nightlab.heartbeat") / UNIT_NAME).read_text()).substitute(
        config=config_path,
        exec_start=exec_start,
        working_directory=config_path.parent,
        user_line="" if user else f"User={run_as}\n",
        env_file=etc / "nightlab.env",
        credentials="\n".join(credentials) or "# (no LoadCredential= needed by this config)",
        wanted_by="default.target" if user else "multi-user.target",
    )


def install_unit(config_path: Path, user: bool, dry_run: bool, run_as: str | None = None) -> str:
    """Write the unit (or, with dry_run, return it) and return what to do next. `run_as`: the
    system unit's User= (default: whoever ran `sudo nightlab service install`, else this user)."""
    config_path = Path(config_path).resolve()
    if run_as is not None:
        if user:
            raise UserError("--run-as is for a system unit; a --user unit runs as the user who installs it")
        try:
            pwd.getpwnam(run_as)
        except KeyError:
            raise UserError(f"--run-as {run_as}: no such user on this machine; create it first"
                            f" (sudo useradd --system --create-home {run_as})") from None
    run_as = run_as or os.environ.get("SUDO_USER") or getpass.getuser()
    if not user:
        _check_run_as(run_as, nightlab_command(), config_path)
    unit = render_unit(config_path, user, run_as, nightlab_command())
    if dry_run:
        return unit
    target = (Path.home() / ".config/systemd/user" if user else Path("/etc/systemd/system")) / UNIT_NAME
    backup = target.with_name(UNIT_NAME + ".bak")  # systemd loads no unit from it
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a unit edited by hand (an Environment= line, another User=) is not lost to a re-install
        kept = target.is_file() and target.read_text() != unit
        if kept:
            target.replace(backup)
        target.write_text(unit)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}; run it with sudo, or --user for a user unit"
                        " (--print shows the unit)") from None
    ctl = "systemctl --user" if user else "sudo systemctl"
    journal = "journalctl --user -u nightlab -f" if user else "journalctl -u nightlab -f"
    steps = [
        f"wrote {target}" + (f" (the unit it replaces, which differed: {backup})" if kept else ""),
        *_secret_places(load_settings(config_path), user),
        f"  {ctl} daemon-reload",
        f"  {ctl} enable --now nightlab",
        # `enable --now` leaves a running service on the unit it started with
        *([f"  {ctl} restart nightlab   # if it runs: the new unit applies (no experiment is lost)"] if kept else []),
        f"  {journal}",
    ]
    if user:
        steps.append(f"  loginctl enable-linger {run_as}   # keep it running after you log out")
    return "\n".join(steps)


def _check_run_as(run_as: str, executable: list[str], config_path: Path) -> None:
    """The unit's user must read the config and start this nightlab: a venv made in a home folder
    that is not theirs (mode 700 or 750, Debian's and Ubuntu's default) wrote a unit that failed at
    every start (`status=203/EXEC`, then the start limit). Tried as that user; only root can, and
    it needs no check for itself."""
    entry = pwd.getpwnam(run_as)
    if os.geteuid() != 0 or entry.pw_uid == os.geteuid():
        return
    fix = (f"install nightlab where {run_as} can read it (a venv under /opt, or in {entry.pw_dir}) and run"
           " `service install` from there")
    if not _runs_as(entry, ["test", "-r", str(config_path)]):
        raise UserError(f"--run-as {run_as}: {run_as} cannot read {config_path}; put the config where {run_as} can"
                        f" (e.g. {entry.pw_dir}/nightlab.toml) and name that one")
    if not _runs_as(entry, [*executable, "--version"]):
        raise UserError(f"--run-as {run_as}: {run_as} cannot start {shlex.join(executable)} (a folder on its"
                        f" path, or its Python's, is closed to {run_as}); {fix}")


def _runs_as(entry: pwd.struct_passwd, command: list[str]) -> bool:
    """Whether `command` exits 0 when run as that user, with its groups."""
    try:
        done = subprocess.run(command, user=entry.pw_uid, group=entry.pw_gid,
                              extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid), cwd="/",
                              env={"PATH": os.defpath, "HOME": entry.pw_dir}, capture_output=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):  # not executable by that user, or hung
        return False
    return done.returncode == 0


def nightlab_command() -> list[str]:
    """The absolute command that starts this installation of nightlab."""
    beside = Path(sys.executable).parent / "nightlab"  # the venv's console script
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("nightlab")
    return [str(Path(found).resolve())] if found else [sys.executable, "-m", "nightlab.heartbeat.cli"]


def _etc_dir(user: bool) -> Path:
    return Path.home() / ".config/nightlab" if user else Path("/etc/nightlab")


def _credential_names(settings: Settings) -> list[str]:
    return [ref.file[len(_CREDENTIALS_PREFIX):] for _, ref in secret_refs(settings)
            if ref.file.startswith(_CREDENTIALS_PREFIX)]


def _secret_places(settings: Settings, user: bool) -> list[str]:
    """The env file (and credentials folder) the unit reads, made private before a secret goes in:
    made by hand they get the umask's 644, a token any user of the box can read."""
    etc = _etc_dir(user)
    names = [ref.env for _, ref in secret_refs(settings) if ref.env]
    credentials = _credential_names(settings)
    who = "you" if user else "root (systemd reads it)"
    steps = []
    try:
        if names:
            env_file = etc / "nightlab.env"
            steps.append(_private_file(env_file, "".join(f"#{n}=\n" for n in names), who))
            given = {line.partition("=")[0].strip() for line in env_file.read_text().splitlines()
                     if line.partition("=")[2].strip()}
            steps += [f"  write the value after {n}= in {env_file} (and remove its #)" for n in names if n not in given]
        if credentials:
            folder = etc / "credentials"
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
            steps += [f"  put the secret in {folder / name} (the folder is readable by {who} only)"
                      for name in credentials]
    except OSError as exc:
        raise UserError(f"cannot prepare {exc.filename}: {exc.strerror}; run it with sudo, or --user for a"
                        " user unit") from None
    return steps


def _private_file(path: Path, template: str, who: str) -> str:
    """Create `path` with `template`, mode 600; an existing one keeps its content, made 600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(template)
        return f"made {path} (readable by {who} only)"
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o600)
        return f"{path} was readable by others (mode {mode:o}); now 600"
    return f"{path} is there (readable by {who} only)"
