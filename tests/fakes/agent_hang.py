"""Fake coding agent that hangs: spawns a child (in the same group) and a grandchild in its own
session (escapes killpg), records their pids, then sleeps forever."""

import subprocess
import sys
import time
from pathlib import Path

pids_file = Path(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
partial = pids_file.with_suffix(".tmp")  # whole or absent: the test reads it as soon as it exists
partial.write_text(f"{child.pid} {escaped.pid}")
partial.replace(pids_file)
time.sleep(600)
