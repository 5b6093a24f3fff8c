"""`nightlab service install`: the systemd unit for one config (template: nightlab.service).

The unit agrees with the daemon's stop design (daemon.py): Type=notify with the watchdog,
KillMode=process so a stop or restart never kills the training run in flight (it is re-attached),
secrets through an EnvironmentFile or LoadCredential=, never in the unit or the TOML.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
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


def install_unit(config_path: Path, user: bool, dry_run: bool) -> str:
    """Write the unit (or, with dry_run, return it) and return what to do next."""
    config_path = Path(config_path).resolve()
    run_as = os.environ.get("SUDO_USER") or getpass.getuser()  # `sudo nightlab service install`
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
        *_secret_steps(load_settings(config_path), user),
        f"  {ctl} daemon-reload",
        f"  {ctl} enable --now nightlab",
        f"  {journal}",
    ]
    if user:
        steps.append(f"  loginctl enable-linger {run_as}   # keep it running after you log out")
    return "\n".join(steps)


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


def _secret_steps(settings: Settings, user: bool) -> list[str]:
    etc = _etc_dir(user)
    steps = []
    for _, ref in secret_refs(settings):
        if ref.env:
            steps.append(f"  put {ref.env}=... in {etc / 'nightlab.env'} (chmod 600)")
    for name in _credential_names(settings):
        steps.append(f"  put the secret in {etc / 'credentials' / name} (chmod 600)")
    return steps
