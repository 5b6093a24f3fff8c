"""Fake coding agent driven by a plan: `agent_plan.py PLAN.json`. Run i (counted in a file beside
the plan) keeps a copy of the prompt it got as prompt-<i>.md beside the plan, then does step i:
  {"set": {"VAL_BPB": "[0.9]"}}        rewrite train.py constants (the stub trainer's behaviour)
  {"write": {"prepare.py": "text"}}    write any file (a protected one: the engine rejects it)
  {"describe": "...", "why": "..."}    write the proposal file
  {"owner": "note try rope"}           the owner steers while the agent works (nightlab ctl)
"""

import json
import os
import re
import sys
from pathlib import Path

from nightlab.loop.state.steering import send_command

plan_file = Path(sys.argv[1])
counter = plan_file.with_suffix(".count")
index = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(index + 1))
steps = json.loads(plan_file.read_text())
step = steps[min(index, len(steps) - 1)]
(plan_file.parent / f"prompt-{index + 1}.md").write_text(Path(os.environ["NIGHTLAB_PROMPT_FILE"]).read_text())
if "owner" in step:
    send_command(Path.cwd(), step["owner"], "cli:owner")
for name, text in step.get("write", {}).items():
    path = Path(name)
    if path.exists():
        path.chmod(0o644)
    path.write_text(text)
train = Path("train.py")
for name, value in step.get("set", {}).items():
    train.write_text(re.sub(rf"^{name} = .*$", f"{name} = {value}", train.read_text(), count=1, flags=re.MULTILINE))
if "describe" in step:
    Path(os.environ["NIGHTLAB_PROPOSAL_FILE"]).write_text(json.dumps({"description": step["describe"], "hypothesis": step.get("why", "")}))
print(step.get("say", "done"))
