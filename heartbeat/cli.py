"""The `nightlab` command. Each subcommand is a thin front for the module that owns the behaviour.

User errors (bad config, bad arguments, missing data) print one clear message and exit with 2;
nothing here prints a traceback for them. Heavy modules are imported inside the handlers so
`nightlab --help` is instant and the daemon never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nightlab.loop.state.config import (
    MAX_SHARDS,
    Settings,
    is_named_source,
    load_settings,
    render_settings,
    settings_from_table,
)
from nightlab.loop.state.errors import EXIT_USER_ERROR, UserError
from nightlab.loop.state.store import DB_FILENAME, STATE_DIRNAME, state_dir, unusable


def _settings(args: argparse.Namespace) -> Settings:
    config = _not_empty(getattr(args, "config", None), "--config is empty; give the TOML file,"
                        " e.g. --config nightlab.toml")
    settings = load_settings(config) if config else settings_from_table({}, source="<defaults>")
    workspace = _not_empty(getattr(args, "workspace", None), "--workspace is empty; give a folder,"
                           " e.g. --workspace ~/nightlab-workspace")
    if workspace:
        settings = dataclasses.replace(
            settings, workspace=dataclasses.replace(settings.workspace, path=str(workspace))
        )
    return settings


def _named_settings(args: argparse.Namespace) -> Settings:
    """Settings for a command that acts on an existing loop: the user must say which one (a
    command never lands in a default workspace nobody named) and it must be there."""
    settings = _settings(args)  # first: an empty --workspace "" is said as such
    if not (args.config or args.workspace):
        raise UserError(f"{args.command}: which loop? give --config FILE (the one `nightlab run` uses)"
                        " or --workspace DIR")
    path = settings.workspace_path
    if not (state_dir(path) / DB_FILENAME).is_file():
        config = shlex.quote(args.config) if args.config else "FILE"  # the command to type, filled in
        raise UserError(f"{path} is not a nightlab workspace (no {STATE_DIRNAME}/{DB_FILENAME});"
                        f" check --workspace / [workspace] path, or start one with `nightlab run --config {config}`")
    return settings


def _workspace_dir(path: Path) -> Path:
    """Make sure `path` is (or can become) the workspace directory; a clear message otherwise."""
    from nightlab.loop.workspace import workspace_problem

    problem = workspace_problem(path)  # said now: the daemon would first leave its state folder there
    if problem:
        raise UserError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the workspace {path}: {exc.strerror}; give a directory you can"
                        " write to (--workspace DIR)") from None
    return path


def _not_empty(path: str | None, message: str) -> str | None:
    """`path` as given; UserError(`message`) for "" (an unset variable in `--workspace "$WS"`),
    which would otherwise fall back to a default path the user did not name."""
    if path == "":
        raise UserError(message)
    return path


def _positive_int(text: str) -> int:
    from nightlab.loop.state.commands import MAX_NUMBER, whole_number

    value = whole_number(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_NUMBER}, got {text!r}")
    return value


def _shard_count(text: str) -> int:
    """--shards: -1 (all) or a number of shards; 0 and other negatives mean nothing."""
    from nightlab.loop.state.commands import whole_number

    value = -1 if text == "-1" else whole_number(text, MAX_SHARDS)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected -1 (all) or a number from 1 to {MAX_SHARDS}, got {text!r}")
    return value


# -- handlers ----------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    from nightlab.loop.state.config import resolve_secrets

    settings = load_settings(args.file)
    resolve_secrets(settings)  # a missing secret is an error here too, not at 3 a.m.
    sys.stdout.write(render_settings(settings))
    print(f"# {args.file}: OK")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from nightlab.trainer import prepare

    settings = _settings(args)
    source = _absolute_source(args.source) if args.source else settings.data_source
    shards = args.shards if args.shards is not None else settings.data.shards  # 0 is a mistake, not "unset"
    try:
        data_dir = prepare.prepare(source, shards, settings.cache_path)
    except prepare.PrepareError as exc:
        raise UserError(str(exc)) from None
    (settings.cache_path / LAST_PREPARED).write_text(source + "\n")
    print(f"data and tokenizer ready in {data_dir}")
    from nightlab.heartbeat.health import left_data_dirs

    for line in left_data_dirs(data_dir):
        print(line)
    # with a config, `nightlab train` reads that config's cache and source, not the marker
    train = "nightlab train"
    if args.config:
        train += f" --config {shlex.quote(args.config)}"
        if source != settings.data_source:
            train += f" --source {shlex.quote(source)}"
    print(f"`{train}` uses it; in a config: [data] source = " + json.dumps(source))
    from nightlab.loop.kernel_prefetch import prefetch_fa3

    print(prefetch_fa3().line)
    return 0


LAST_PREPARED = "last-prepared-source"  # in the data cache: what `nightlab train` uses by default


def _absolute_source(source: str) -> str:
    """A folder's absolute path (the same one from anywhere); a named source as it is."""
    return source if is_named_source(source) else str(Path(source).expanduser().resolve())


def cmd_init(args: argparse.Namespace) -> int:
    from nightlab.loop.workspace import init_workspace

    if args.path is None and not args.config:
        raise UserError("init: which directory? give it (nightlab init DIR), or --config FILE whose"
                        " [workspace] path names it")
    _not_empty(args.path, "the workspace path is empty; give a folder, e.g. nightlab init ~/nightlab-workspace")
    settings = _settings(args)
    ws = init_workspace(Path(args.path) if args.path else settings.workspace_path, tag=args.tag, settings=settings)
    print(f"workspace ready: {ws.path} on branch {ws.branch}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.health import check_data_source
    from nightlab.heartbeat.train_once import train_once

    settings = _settings(args)
    source = args.source
    if source is None and not args.config:
        # No config: what `nightlab prepare` made last, else the offline corpus (a smoke test
        # must not need the network).
        marker = settings.cache_path / LAST_PREPARED
        source = marker.read_text().strip() if marker.is_file() else "stdlib"
        why = f"from the last `nightlab prepare` ({marker})" if marker.is_file() else \
            "offline; `nightlab prepare --source …` first, --source or --config for other data"
        print(f"nightlab: data source {source} ({why})", file=sys.stderr)
    if source is not None:  # typed here (or written by prepare): relative to this directory, not the config's
        settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, source=_absolute_source(source)))
    path = settings.workspace_path
    check_data_source(settings)  # before a workspace is made: a refusal after it left it behind
    if not path.exists():
        print(f"nightlab: creating the workspace {path} (--workspace DIR to put it elsewhere)", file=sys.stderr)
    _workspace_dir(path)
    return train_once(settings, profile=args.profile)


def cmd_run(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.daemon import run_daemon
    from nightlab.heartbeat.health import check_data_source
    from nightlab.loop.state import views

    settings = _settings(args)
    check_data_source(settings)  # before a workspace is made: a refusal after it left it behind
    _workspace_dir(settings.workspace_path)
    # the flag wins, else [loop] max_experiments (0 = no limit); both mean N more than the ledger holds
    more = args.max_experiments if args.max_experiments is not None else settings.loop.max_experiments or None
    limit = None
    if more is not None:
        done = views.recorded(settings.workspace_path)  # the engine's limit counts the whole ledger
        limit = done + more
        print(f"nightlab: {views.counted(more, 'more experiment')} ({done} recorded so far)")
    return run_daemon(settings, max_experiments=limit)


def cmd_demo(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.demo import run_demo

    given = _not_empty(args.workspace, "--workspace is empty; give a folder, e.g. --workspace ~/nightlab-demo,"
                       " or leave it out for a new temporary one")
    workspace = _workspace_dir(Path(given).expanduser().resolve()) if given else None
    return run_demo(workspace, experiments=args.experiments)


def cmd_doctor(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.doctor import diagnose

    report = diagnose(_settings(args))
    print(report.text())
    return report.exit_code


def cmd_ctl(args: argparse.Namespace) -> int:
    from nightlab.loop.state.config import Redactor
    from nightlab.loop.state.steering import send_command

    settings = _named_settings(args)
    if args.name == "plot" and not args.words:  # a chat gets the chart as a photo; a terminal, its file
        return _plot(settings)
    text = Redactor.known(settings)(" ".join([args.name, *args.words]))  # a note goes into the agent's prompt
    print(send_command(settings.workspace_path, text, sender=f"cli:{_user()}"))
    return 0


def _plot(settings: Settings) -> int:
    from nightlab.heartbeat.report import write_chart
    from nightlab.loop.state.store import Store

    store = Store.for_workspace(settings.workspace_path)
    try:
        chart = write_chart(settings.workspace_path, store, settings.project)
    finally:
        store.close()
    print(f"progress chart: {chart}" if chart else "no experiments yet: nothing to plot")
    return 0


HISTORY_N = 20  # `nightlab history` without -n or --top: the last 20


def cmd_view(args: argparse.Namespace) -> int:
    from nightlab.loop.state import views

    path = _named_settings(args).workspace_path
    if args.command == "status":
        text = views.status_text(path)
    elif args.command == "history":
        status = "keep" if args.kept_only else args.status
        if args.top and status == "crash":
            raise UserError("--top ranks results and a crash has none; leave out --top to list the crashes")
        text = views.history_text(path, HISTORY_N if args.n is None else args.n, status=status, top=args.top,
                                  direction=_settings(args).project.direction)
    elif args.command == "best":
        text = views.best_text(path)
    elif args.command == "diff":  # a terminal takes all the ledger holds, not a chat message's worth
        text = views.diff_text(path, args.number)
    else:
        text = views.report_markdown(path)
    print(text)
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.service import install_unit

    print(install_unit(Path(args.config).resolve(), user=args.user, dry_run=args.print, run_as=args.run_as))
    return 0


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# -- parser ------------------------------------------------------------------------------------
def _add(
    sub: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    summary: str,
    example: str,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="the TOML configuration file")
    parser.add_argument("--workspace", help="workspace path (overrides [workspace] path)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightlab",
        description="Runs autoresearch experiment loops overnight and reports to Telegram and Slack.",
        epilog="start with:  nightlab demo",
    )
    parser.add_argument("--version", action="version", version=f"nightlab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(sub, "init", cmd_init, "create (or adopt) a workspace git repository",
             "nightlab init ~/nightlab-ws --tag nov23")
    p.add_argument("path", nargs="?", help="the workspace directory (created if missing; an existing git repository"
                   " is adopted); default: the config's [workspace] path")
    p.add_argument("--tag", default="", help="branch autoresearch/<tag> (default: today, e.g. nov23)")
    p.add_argument("--config", help="the TOML configuration file")

    p = _add(sub, "prepare", cmd_prepare, "download data shards, train the tokenizer, fetch the FA3 kernel on Hopper",
             "nightlab prepare --source stdlib")
    _config_args(p)
    p.add_argument("--source", help="climbmix | stdlib | http(s)://mirror | /path/to/shards")
    p.add_argument("--shards", type=_shard_count, help="number of training shards (-1: all; default: the config's, 10)")

    p = _add(sub, "train", cmd_train, "run train.py once (smoke test)",
             "nightlab train --profile tiny")
    _config_args(p)
    from nightlab.loop.state.config import profile_names

    p.add_argument("--source", help="the data to train on, as for `prepare` (default: the config's;"
                                    " without a config the last `nightlab prepare`, else stdlib)")
    p.add_argument("--profile", choices=profile_names(), default=None,
                   help="a hardware tier's constants (see `nightlab doctor`); tiny: a small model for CPUs"
                        " and smoke tests; auto: picked from the GPU (default: the config's trainer.profile)")

    p = _add(sub, "run", cmd_run, "run the daemon: the loop, the heartbeat and the chat channels",
             "nightlab run --config nightlab.toml --max-experiments 3")
    _config_args(p, required=True)
    p.add_argument("--max-experiments", type=_positive_int, default=None, metavar="N",
                   help="stop cleanly after N more experiments (those already recorded do not count)")

    p = _add(sub, "doctor", cmd_doctor, "check this machine before a night: GPU, torch, disk, data, git, "
             "channels, and the profile auto picks (exit 1 when a run would fail)", "nightlab doctor --config nightlab.toml")
    _config_args(p)

    p = _add(sub, "demo", cmd_demo, "the offline demo: a short night on this machine",
             "nightlab demo")
    p.add_argument("--workspace", help="where to put the demo workspace (default: a new temp dir)")
    p.add_argument("--experiments", type=_positive_int, default=4, metavar="N",
                   help="experiments after the baseline (default 4)")

    p = _add(sub, "ctl", cmd_ctl, "steer a running loop: pause [now], resume, focus, note, kill",
             "nightlab ctl --config nightlab.toml focus attention\n"
             "  nightlab ctl note try a longer warmup --workspace ~/nightlab-ws\n"
             "  nightlab ctl --config nightlab.toml note -- text that starts with --")
    _config_args(p)
    p.add_argument("name", metavar="COMMAND", help="pause | resume | focus | note | kill | status | diff | ...")
    # default: without one argparse calls the words required in its error, though none may be given
    p.add_argument("words", nargs="*", default=[], metavar="ARG",
                   help="the command's arguments (after -- when they start with -)")

    for name, summary, example in (
        ("status", "what the loop is doing now", "nightlab status --config nightlab.toml"),
        ("history", "the last experiments", "nightlab history --config nightlab.toml -n 20"),
        ("best", "the best result and its change", "nightlab best --config nightlab.toml"),
        ("diff", "what an experiment changed, as a diff (default: the best against the baseline)",
         "nightlab diff 37 --config nightlab.toml"),
        ("report", "the session report (markdown)", "nightlab report --config nightlab.toml"),
    ):
        p = _add(sub, name, cmd_view, summary, example)
        _config_args(p)
        if name == "history":
            # -n counts the last ones, --top the best ones: given both, one would be ignored
            how_many = p.add_mutually_exclusive_group()
            how_many.add_argument("-n", type=_positive_int, help=f"how many of the last (default {HISTORY_N})")
            how_many.add_argument("--top", type=_positive_int, metavar="N",
                                  help="the N best results, best first (instead of the last ones)")
            only = p.add_mutually_exclusive_group()
            only.add_argument("--kept-only", action="store_true", help="only kept experiments (= --status keep)")
            only.add_argument("--status", choices=("keep", "discard", "crash", "checks_failed", "undecided"),
                              help="only experiments with this status (undecided: runs the rule runs again)")
        if name == "diff":
            p.add_argument("number", nargs="?", type=_positive_int, metavar="N",
                           help="the experiment (default: the best, against the night's baseline)")

    p = _add(sub, "config", lambda a: 0, "configuration tools", "nightlab config check nightlab.toml")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = _add(config_sub, "check", cmd_config_check,
             "validate a configuration and print it with secrets redacted",
             "nightlab config check nightlab.toml")
    p.add_argument("file", help="the TOML configuration file to check")

    p = _add(sub, "service", lambda a: 0, "systemd service tools",
             "nightlab service install --config /etc/nightlab.toml")
    service_sub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    p = _add(service_sub, "install", cmd_service_install, "write the systemd unit for this config",
             "nightlab service install --config ~/nightlab.toml --user")
    p.add_argument("--config", required=True, help="the TOML configuration file the service runs with")
    p.add_argument("--user", action="store_true", help="a user unit (~/.config/systemd/user)")
    p.add_argument("--run-as", metavar="USER", help="the system unit's user, e.g. a `nightlab` system user"
                   " (default: who ran sudo, else you)")
    p.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nightlab")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options may come anywhere, as with any argparse command: `ctl focus attention --config F`.
    The words of a `ctl` command that follow an option come back as extras and join its words."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # `ctl note --config F -- -x`: argparse hands back the `--` and what follows it as extras too
    before, after = _split_at_dashes(extras)
    if extras and args.command == "ctl" and not any(x.startswith("-") for x in before):
        args.words = [*args.words, *before, *after]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}"
                     + ("; text that starts with - goes after --" if args.command == "ctl" else ""))
    return args


def _state_db(args: argparse.Namespace) -> Path:
    try:
        return state_dir(_settings(args).workspace_path) / DB_FILENAME
    except UserError:
        return Path(STATE_DIRNAME) / DB_FILENAME


def _split_at_dashes(words: list[str]) -> tuple[list[str], list[str]]:
    """The words before the first `--` and those after it."""
    if "--" not in words:
        return words, []
    at = words.index("--")
    return words[:at], words[at + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except UserError as exc:
        print(f"nightlab: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except sqlite3.DatabaseError as exc:  # damaged past its schema, or a disk that filled since it opened
        if "locked" in str(exc):
            raise
        print(f"nightlab: {unusable(_state_db(args), exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("nightlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `nightlab history | head`: the reader has what it wanted. Whatever is still buffered goes
        # nowhere, so the exit does not raise again; 141 is what a shell shows for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
