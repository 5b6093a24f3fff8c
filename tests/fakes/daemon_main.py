"""Runs the real daemon with test options: no channels, and a fake engine with no data
preparation, or (nothing after `--`) the real engine with the daemon's own preparation.

    python daemon_main.py CONFIG WORKSPACE [--max-experiments N] -- [ENGINE_PROGRAM...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nightlab.heartbeat.daemon import Daemon, DaemonOptions
from nightlab.loop.config import load_settings
from nightlab.loop.errors import UserError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("workspace")
    p.add_argument("--max-experiments", type=int)
    split = sys.argv.index("--")
    args, engine = p.parse_args(sys.argv[1:split]), sys.argv[split + 1:]
    settings = load_settings(args.config)
    settings = dataclasses.replace(
        settings, workspace=dataclasses.replace(settings.workspace, path=args.workspace)
    )
    options = DaemonOptions(args.max_experiments, engine or None, prepare=not engine, channels=False)
    try:
        return Daemon(settings, options).run()
    except UserError as exc:
        print(f"nightlab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
