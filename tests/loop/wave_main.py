"""The engine with N local slots in a subprocess, for kill -9 tests of a wave.

    python wave_main.py WORKSPACE STEPS_JSON MAX SLOTS [MODE]     (MODE: waves | async)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nightlab.loop import engine

from tests.fakes.loop_workspace import stub_settings
from tests.loop.test_waves import WaveProposer


def main() -> int:
    workspace, steps, limit, slots = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "waves"
    settings = stub_settings(workspace, executor={"gpus": list(range(slots))}, loop={"mode": mode})
    return engine.run_engine(settings, limit, proposer=WaveProposer(steps))


if __name__ == "__main__":
    sys.exit(main())
