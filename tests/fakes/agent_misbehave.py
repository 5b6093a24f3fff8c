"""Fake coding agent that misbehaves the way real ones do, one way per run: `agent_misbehave.py MODE`.

Every mode but the failing ones first makes a real edit to train.py (DEPTH 8→10), so what is
checked is how the proposer treats the misbehaviour, not an empty change.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def edit() -> None:
    src = Path("train.py").read_text()
    Path("train.py").write_text(re.sub(r"^DEPTH = .*$", "DEPTH = 10", src, count=1, flags=re.MULTILINE))


def proposal(text: str) -> None:
    Path(os.environ["NIGHTLAB_PROPOSAL_FILE"]).write_text(text)


mode = sys.argv[1]
if mode == "huge-proposal":  # a runaway model pasting its whole context into the hypothesis
    edit()
    proposal(json.dumps({"description": "deeper", "hypothesis": "because " * 120_000}))
elif mode == "bad-json":  # cut off mid-write
    edit()
    proposal('{"description": "deeper", "hypothesis": ')
elif mode == "deeper":  # a plain edit, the same every time: an agent repeating itself
    edit()
    print("DEPTH 8 -> 10")
elif mode == "delete-train":  # "it was redundant"
    os.remove("train.py")
    print("Removed train.py: it was redundant.")
elif mode == "background":  # "let me check it trains": detached, left running after the agent exits
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    Path(sys.argv[2]).write_text(str(sleeper.pid))
    edit()
elif mode == "asks":  # waits for a yes nobody will type
    print("Apply these edits to train.py? [y/N]", flush=True)
    time.sleep(600)
elif mode == "rm-hooks":  # "cleaned up the repository"
    import shutil

    shutil.rmtree(".git/hooks")
    edit()
elif mode == "long-stderr":  # a provider error after pages of retries and a traceback
    for i in range(3000):
        print(f"retry {i}: POST /v1/messages failed, backing off", file=sys.stderr)
    print("Error: 429 rate limit exceeded; try again in 30s", file=sys.stderr)
    sys.exit(3)
elif mode == "checkpoint":  # "saved the test run's model", beside train.py where git sees it
    edit()
    Path("model.pt").write_bytes(os.urandom(1 << 20))
elif mode == "chatty":  # streams its progress and ends without a word of its own
    edit()
    for i in range(5000):
        print(f"[tool] read_file train.py chunk {i}")
    if sys.argv[2:] == ["closing"]:  # ... or with its closing words after them
        print("\nDeeper: DEPTH 8 -> 10, more capacity for the same budget.")
elif mode == "terminal":  # a CLI writing for a terminal: colours, a bell, a NUL, a link, its title
    edit()
    proposal(json.dumps({"description": "deeper\u0000 \u001b]8;;https://x.example\u0007\u001b[1mnow\u001b[0m\u001b]8;;\u0007"}))
    print("\x1b]0;agent: done\x07\x1b[32m✓\x1b[0m Edited train.py\x07\n\nDeeper:\x00 DEPTH 8 -> 10\x1b[0m")
elif mode == "flood":  # a debug print in a loop: the same line, forever
    edit()
    while True:
        print("[debug] tokens: " + "x" * 65_000, flush=True)
        time.sleep(0.005)
elif mode == "burst":  # a verbose agent that prints 3 MB at once and exits before anyone looks
    edit()
    sys.stdout.write(("[debug] tokens: " + "x" * 65_000 + "\n") * 48)
elif mode == "clean-state":  # "cleaned the build outputs" (not -x: the ledger stays), and says so
    import shutil

    edit()
    shutil.rmtree(".nightlab/agent")
    print("Removed stale outputs; DEPTH 8 -> 10.")
elif mode == "clean-all":  # "cleaned the build outputs", ignored files too: the workspace's .nightlab
    edit()
    subprocess.run(["git", "clean", "-fdxq"], check=True)
    if sys.argv[2:]:  # ... and works on until the test's gate file (a path outside the workspace) exists
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
elif mode == "leak-key":  # a provider refusing the key, quoting it
    print(f"Error: 401 invalid x-api-key {os.environ['ANTHROPIC_API_KEY']}", file=sys.stderr)
    sys.exit(1)
elif mode == "write-key":  # "the model calls the API itself": its key in train.py, its words and its run's output
    key = os.environ["OPENAI_API_KEY"]
    code = f'API_KEY = "{key}"\nprint("calling the API with", API_KEY, flush=True)\nraise SystemExit(f"401 invalid key {{API_KEY}}")\n'
    Path("train.py").write_text(code + Path("train.py").read_text())
    proposal(json.dumps({"description": f"use the API (key {key})", "hypothesis": f"{key} lets the model ask GPT"}))
elif mode == "steal-token":  # the chat token kept from its environment, read in the daemon's (the same user's)
    daemon = int(Path(".nightlab/daemon.lock").read_text())
    environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{daemon}/environ").read_bytes().split(b"\0") if b"=" in v)
    token = environ[sys.argv[2].encode()].decode()
    code = f'TOKEN = "{token}"\nprint("posting with", TOKEN, flush=True)\nraise SystemExit(f"401 bad token {{TOKEN}}")\n'
    Path("train.py").write_text(code + Path("train.py").read_text())
    proposal(json.dumps({"description": f"tell the chat (token {token})", "hypothesis": f"{token} reaches the bot"}))
elif mode == "write-ledger":  # a worse change (the stub trainer's VAL_BPB), the best recorded as worse still
    import sqlite3

    src = Path("train.py").read_text()
    Path("train.py").write_text(re.sub(r"^VAL_BPB = .*$", "VAL_BPB = [1.5]", src, count=1, flags=re.MULTILINE))
    try:
        with sqlite3.connect(".nightlab/state.db", timeout=30) as db:
            db.execute("UPDATE experiments SET metric = 9.0, best = 9.0")
        print("ledger: written")
    except sqlite3.Error as e:
        print(f"ledger: refused ({e})")
elif mode == "write-data":  # "warmed the eval cache": rows of its own where the scorer reads them (the data dir: argv[2])
    edit()
    try:
        (Path(sys.argv[2]) / "eval-cache").mkdir(exist_ok=True)
        (Path(sys.argv[2]) / "eval-cache" / "rows.pt").write_text("easy rows")
        print("data: written")
    except OSError as e:
        print(f"data: refused ({e.strerror})")
elif mode == "plant-pth":  # "installed a helper": a .pth file in the site dir the scorer's Python reads (named argv[2])
    import site

    edit()
    try:
        Path(site.getsitepackages()[0], sys.argv[2]).write_text("# runs in every Python of this environment\n")
        print("python: written")
    except OSError as e:
        print(f"python: refused ({e.strerror})")
elif mode == "link-log":  # its own log made a link to the ledger: our next write of the log went through it
    edit()
    folder = Path(os.environ["NIGHTLAB_PROMPT_FILE"]).parent
    for name in ("stdout.log", "stderr.log", "prompt.md"):
        (folder / f"{name}.tmp").symlink_to(Path(sys.argv[2]))
        os.replace(folder / f"{name}.tmp", folder / name)
elif mode == "fifo-proposal":  # a FIFO where its proposal goes: the engine's open() waited for a writer
    edit()
    os.mkfifo(os.environ["NIGHTLAB_PROPOSAL_FILE"])
elif mode == "zero-link":  # a new file that is a link to an endless device: counted for ever
    edit()
    Path("zeros").symlink_to("/dev/zero")
elif mode == "link-train":  # train.py made a link to code outside the workspace, which the commit would not hold
    outside = Path(sys.argv[2])
    outside.write_text(Path("train.py").read_text().replace("VAL_BPB = [1.0]", "VAL_BPB = [0.5]"))
    os.remove("train.py")
    Path("train.py").symlink_to(outside)
elif mode == "hide-in-own-folder":  # a helper where git never looks (its own folder), which train.py imports
    own = Path(os.environ["NIGHTLAB_PROMPT_FILE"]).parent
    (own / "hp.py").write_text("DEPTH = 10\n")
    (own / "pkg").mkdir(exist_ok=True)
    Path("train.py").write_text("import sys\nsys.path.insert(0, '.nightlab/agent')\nfrom hp import DEPTH\n"
                                + Path("train.py").read_text())
elif mode == "switch-branch":  # works on a branch of its own and leaves the workspace there
    subprocess.run(["git", "checkout", "-qb", "agent-experiment"], check=True)
    edit()
    subprocess.run(["git", "commit", "-qam", "agent: deeper"], check=True)
elif mode == "detach":
    subprocess.run(["git", "checkout", "-q", "--detach"], check=True)
    edit()
elif mode == "hide-ignored":  # a helper where git does not look, which train.py imports
    Path("__pycache__").mkdir(exist_ok=True)
    Path("__pycache__/helper.py").write_text("BONUS = -0.5\n")
    Path("__pycache__/train.cpython-311.pyc").write_bytes(b"\0")  # what a syntax check leaves
    src = Path("train.py").read_text()
    Path("train.py").write_text(src + "import sys\nsys.path.insert(0, '__pycache__')\nfrom helper import BONUS\n")
elif mode == "chmod":  # "made train.py executable", nothing else
    os.chmod("train.py", 0o755)
    print("made it executable")
elif mode == "git-own-files":  # code the daemon's git would run later, and a file hidden from it
    hook = Path(".git/hooks/post-commit")
    hook.write_text("#!/bin/sh\ntouch hooked\n")
    hook.chmod(0o755)
    subprocess.run(["git", "config", "core.fsmonitor", "touch fsmonitored"], check=True)
    with open(".git/info/exclude", "a") as exclude:
        exclude.write("notes.md\n")
    edit()
elif mode == "break-branch":  # "fixed" the repository by hand
    edit()
    Path(".git/refs/heads/autoresearch/test").write_text("not a commit\n")
else:
    sys.exit(f"unknown mode {mode}")
