"""Fake coding agent that commits its own edit (like aider without --no-auto-commits)."""

import re
import subprocess
from pathlib import Path

src = Path("train.py").read_text()
Path("train.py").write_text(re.sub(r"^DEPTH = .*$", "DEPTH = 10", src, count=1, flags=re.MULTILINE))
subprocess.run(["git", "commit", "-qam", "agent commit"], check=True)
