"""The `nightlab` command. Each subcommand is a thin front for the module that owns the behaviour.

User errors (bad config, bad arguments, missing data) print one clear message and exit with 2;
nothing here prints a traceback for them. Heavy modules are imported inside the handlers so
`nightlab --help` is instant and the daemon never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nightlab.loop.config import Settings, load_settings, render_settings, settings_from_table
from nightlab.loop.errors import UserError

EXIT_USER_ERROR = 2


def _settings(args: argparse.Namespace) -> Settings:
    config = getattr(args, "config", None)
    settings = load_settings(config) if config else settings_from_table({}, source="<defaults>")
    workspace = getattr(args, "workspace", None)
    if workspace:
        import dataclasses

        settings = dataclasses.replace(
            settings, workspace=dataclasses.replace(settings.workspace, path=str(workspace))
        )
    return settings


# -- handlers ----------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    from nightlab.loop.config import resolve_secrets

    settings = load_settings(args.file)
    resolve_secrets(settings)  # a missing secret is an error here too, not at 3 a.m.
    sys.stdout.write(render_settings(settings))
    print(f"# {args.file}: OK")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from nightlab.trainer import prepare

    settings = _settings(args)
    source = args.source or settings.data.source
    shards = args.shards or settings.data.shards
    try:
        data_dir = prepare.prepare(source, shards, settings.cache_path)
    except prepare.PrepareError as exc:
        raise UserError(str(exc)) from None
    print(f"data and tokenizer ready in {data_dir}")
    from nightlab.loop.kernel_prefetch import prefetch_fa3

    print(prefetch_fa3().line)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from nightlab.loop.workspace import init_workspace

    settings = _settings(args)
    ws = init_workspace(Path(args.path), tag=args.tag, settings=settings)
    print(f"workspace ready: {ws.path} on branch {ws.branch}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nightlab.loop.workspace import train_once

    return train_once(_settings(args), profile=args.profile)


def cmd_run(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.daemon import run_daemon

    settings = _settings(args)
    # the flag wins; else [loop] max_experiments (0 = no limit), which means the same as the flag
    limit = args.max_experiments if args.max_experiments is not None else settings.loop.max_experiments or None
    return run_daemon(settings, max_experiments=limit)


def cmd_demo(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.demo import run_demo

    return run_demo(Path(args.workspace) if args.workspace else None, experiments=args.experiments)


def cmd_doctor(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.doctor import diagnose

    report = diagnose(_settings(args))
    print(report.text())
    return report.exit_code


def cmd_ctl(args: argparse.Namespace) -> int:
    from nightlab.loop.steering import send_command

    text = " ".join([args.name, *args.words])
    print(send_command(_settings(args).workspace_path, text, sender=f"cli:{_user()}"))
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from nightlab.loop import views

    path = _settings(args).workspace_path
    if args.command == "status":
        text = views.status_text(path)
    elif args.command == "history":
        status = "keep" if args.kept_only else args.status
        text = views.history_text(path, args.n, status=status, top=args.top,
                                  direction=_settings(args).project.direction)
    elif args.command == "best":
        text = views.best_text(path)
    else:
        text = views.report_markdown(path)
    print(text)
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    from nightlab.heartbeat.service import install_unit

    print(install_unit(Path(args.config).resolve(), user=args.user, dry_run=args.print))
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# -- parser ------------------------------------------------------------------------------------
def _add(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(sub, "init", cmd_init, "create (or adopt) a workspace git repository",
             "nightlab init ~/nightlab-ws --tag nov23")
    p.add_argument("path")
    p.add_argument("--tag", default="", help="branch autoresearch/<tag> (default: today, e.g. nov23)")
    p.add_argument("--config", help="the TOML configuration file")

    p = _add(sub, "prepare", cmd_prepare, "download data shards, train the tokenizer, fetch the FA3 kernel on Hopper",
             "nightlab prepare --source stdlib")
    _config_args(p)
    p.add_argument("--source", help="climbmix | stdlib | http(s)://mirror | /path/to/shards")
    p.add_argument("--shards", type=int, help="number of training shards")

    p = _add(sub, "train", cmd_train, "run train.py once (smoke test)",
             "nightlab train --profile tiny")
    _config_args(p)
    from nightlab.loop.config import profile_names

    p.add_argument("--profile", choices=profile_names(), default=None)

    p = _add(sub, "run", cmd_run, "run the daemon: the loop, the heartbeat and the chat channels",
             "nightlab run --config nightlab.toml --max-experiments 3")
    _config_args(p, required=True)
    p.add_argument("--max-experiments", type=int, default=None, help="stop cleanly after N")

    p = _add(sub, "doctor", cmd_doctor, "check this machine before a night: GPU, torch, disk, data, git, "
             "channels, and the profile auto picks (exit 1 when a run would fail)", "nightlab doctor --config nightlab.toml")
    _config_args(p)

    p = _add(sub, "demo", cmd_demo, "the offline demo: a short night on this machine",
             "nightlab demo")
    p.add_argument("--workspace", help="where to put the demo workspace (default: a new temp dir)")
    p.add_argument("--experiments", type=int, default=4, help="experiments after the baseline")

    p = _add(sub, "ctl", cmd_ctl, "steer a running loop: pause [now], resume, focus, note, kill",
             "nightlab ctl --config nightlab.toml focus attention")
    _config_args(p)
    p.add_argument("name", help="pause | resume | focus | note | kill | status | ...")
    p.add_argument("words", nargs=argparse.REMAINDER, help="the command's arguments")

    for name, summary, example in (
        ("status", "what the loop is doing now", "nightlab status --config nightlab.toml"),
        ("history", "the last experiments", "nightlab history --config nightlab.toml -n 20"),
        ("best", "the best result and its change", "nightlab best --config nightlab.toml"),
        ("report", "the session report (markdown)", "nightlab report --config nightlab.toml"),
    ):
        p = _add(sub, name, cmd_view, summary, example)
        _config_args(p)
        if name == "history":
            p.add_argument("-n", type=int, default=20, help="how many (default 20)")
            p.add_argument("--kept-only", action="store_true", help="only kept experiments (= --status keep)")
            p.add_argument("--status", choices=("keep", "discard", "crash", "checks_failed"),
                           help="only experiments with this status")
            p.add_argument("--top", type=_positive, metavar="N", help="the N best results, best first")

    p = _add(sub, "config", lambda a: 0, "configuration tools", "nightlab config check nightlab.toml")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = _add(config_sub, "check", cmd_config_check,
             "validate a configuration and print it with secrets redacted",
             "nightlab config check nightlab.toml")
    p.add_argument("file")

    p = _add(sub, "service", lambda a: 0, "systemd service tools",
             "nightlab service install --config /etc/nightlab.toml")
    service_sub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    p = _add(service_sub, "install", cmd_service_install, "write the systemd unit for this config",
             "nightlab service install --config ~/nightlab.toml --user")
    p.add_argument("--config", required=True)
    p.add_argument("--user", action="store_true", help="a user unit (~/.config/systemd/user)")
    p.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"nightlab: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("nightlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
