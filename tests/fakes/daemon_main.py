"""Runs the real daemon with test options: no channels (unless --channels: the ones the config
names), and a fake engine with no data preparation, or (nothing after `--`) the real engine with
the daemon's own preparation.

    python daemon_main.py CONFIG WORKSPACE [--max-experiments N] [--channels] -- [ENGINE_PROGRAM...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nightlab.heartbeat.daemon import Daemon, DaemonOptions
from nightlab.loop.state.config import load_settings
from nightlab.loop.state.errors import UserError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("workspace")
    p.add_argument("--max-experiments", type=int)
    p.add_argument("--channels", action="store_true", help="run the bot (the chaos suite's outbox checks)")
    split = sys.argv.index("--")
    args, engine = p.parse_args(sys.argv[1:split]), sys.argv[split + 1:]
    settings = load_settings(args.config)
    settings = dataclasses.replace(
        settings, workspace=dataclasses.replace(settings.workspace, path=args.workspace)
    )
    options = DaemonOptions(args.max_experiments, engine or None, prepare=not engine,
                            channels=args.channels)
    try:
        return Daemon(settings, options).run()
    except UserError as exc:
        print(f"nightlab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
