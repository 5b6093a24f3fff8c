"""A scripted proposer for engine tests: step i of the script is what the i-th proposal does.

The step index is rebuilt from the ledger (the history without baselines and confirms), as a real
proposer's state is, so an engine restarted mid-session proposes exactly what the old one would
have. A step is a dict:
  {"set": {"VAL_BPB": [0.9]}}         rewrite train.py constants (the stub trainer's behaviour)
  {"write": {"prepare.py": "text"}}   write any file, or a new one (a protected one -> rejected)
  {"noop": True}                      change nothing
  {"raise": "message"}                fail with ProposalError
  {"bug": "message"}                  fail with RuntimeError (a bug in a proposer)
  {"wait": "/path"}                   first wait for that file (a proposal that takes its time)
  {"clean": True}                     `git clean -fdx` in the workspace, as agents do: .nightlab too
  {"remove": ".nightlab"}             `rm -rf` that folder of the workspace
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from nightlab.loop.proposers.base import Proposal, ProposalContext, ProposalError
from nightlab.trainer.profiles import apply_constants

from tests.waiting import wait_until

AREAS = ("lr", "arch")


class ScriptedProposer:
    areas: tuple[str, ...] | None = AREAS

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        self.steps = steps
        self.contexts: list[ProposalContext] = []

    def propose(self, ctx: ProposalContext) -> Proposal:
        self.contexts.append(ctx)
        index = sum(1 for h in ctx.history if not h.description.startswith(("baseline", "confirm", "re-measure")))
        step = self.steps[min(index, len(self.steps) - 1)]
        if "wait" in step:
            wait_until(Path(step["wait"]).exists, f"the test's file {step['wait']}", timeout=120)
        if step.get("clean"):
            subprocess.run(["git", "clean", "-fdxq"], cwd=ctx.workspace, check=True)
        if "remove" in step:
            shutil.rmtree(Path(ctx.workspace) / step["remove"])
        if "raise" in step:
            raise ProposalError(step["raise"])
        if "bug" in step:
            raise RuntimeError(step["bug"])
        for name, text in step.get("write", {}).items():
            path = Path(ctx.workspace) / name
            if path.exists():  # a protected file is read-only
                path.chmod(0o644)
            path.write_text(text)
        if step.get("set"):
            train = Path(ctx.workspace) / "train.py"
            train.write_text(apply_constants(train.read_text(), step["set"]))
        what = ", ".join(f"{k}={v}" for k, v in step.get("set", {}).items()) or ", ".join(step) or "nothing"
        return Proposal(f"step {index}: {what}", f"hypothesis {index}", area=step.get("area", "lr"),
                        params=dict(step.get("set", {})))
