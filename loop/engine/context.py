"""What every phase of the cycle shares: the settings, the workspace and its store and git, the
executor and its slots, the run environment, and where each candidate's files go."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from nightlab.loop import hardware
from nightlab.loop.dataid import DataIdentity, identify
from nightlab.loop.executors import Executor
from nightlab.loop.executors.runfiles import read_tail, run_hardware
from nightlab.loop.proposers.base import Proposer
from nightlab.loop.ratchet import Git
from nightlab.loop.state import ledger
from nightlab.loop.state.config import (
    HeartbeatSettings,
    Redactor,
    Secret,
    Settings,
    changed_fields,
    environment_secrets,
)
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.ledger import Candidate, Experiment, HardwareClass
from nightlab.loop.state.store import Store, state_dir
from nightlab.loop.workspace import Workspace, harness_upgrade, installed_harness, workspace_score_version

# a pin that does not restrict where a run goes; candidates' pins are {hardware, node}
ANYWHERE = {"hardware": "", "node": ""}
# kv: a person's commit found on the session branch while runs were open; the next wave starts from it
USER_HEAD_KEY = "loop.user_head"


# The engine's one redactor (Context.redact), set where the engine starts: say() has no context.
# None before that: the lines of a failed start are scrubbed of this environment's keys.
_log_redact: Redactor | None = None


def say(message: str) -> None:
    # Beside the daemon's log lines: a time in a terminal, none under journald (it adds its own).
    stamp = "" if os.environ.get("JOURNAL_STREAM") else time.strftime("%H:%M:%S ")
    # scrubbed as the daemon's lines are (this process's stderr is the journal's as it is): the
    # text from outside is clean already (Context.redact); this also covers a traceback
    redact = _log_redact or Redactor.of(environment_secrets())
    print(f"{stamp}nightlab engine: {redact(message)}", file=sys.stderr, flush=True)


class Context:
    def __init__(
        self,
        settings: Settings,
        ws: Workspace,
        executor: Executor,
        proposer: Proposer,
        env: dict[str, str],
        handed: Iterable[Secret] = (),
    ) -> None:
        global _log_redact
        self.settings, self.ws, self.executor, self.proposer = settings, ws, executor, proposer
        self.env = env
        # The API keys of this environment (the agent's, the runs'), the chat tokens the config
        # reads from files and those the daemon `handed` over. Every text from them goes through it
        # where it enters (proposing, deciding, the patch, a crash's log tail), and every log line.
        self.redact = _log_redact = Redactor.known(settings, handed)
        self.store: Store = ws.store
        # The installed nightlab's harness as this engine found it ({}: a project of the user's), and
        # whether the workspace's copy waits to be brought up to it (loop/engine/upgrading.py).
        self.harness = installed_harness() if ws.builtin_trainer else {}
        self.upgrade_waiting = bool(self.harness) and bool(harness_upgrade(ws, self.harness))
        # whether the compile caches passed their bound: new candidates wait for a prune (async)
        self.prune_waiting = False
        self.cache_measured: float | None = None  # when the caches were last walked (monotonic)
        # the proposer's failures in a row, and when it is asked again (monotonic): loop/engine/proposing.py
        self.proposer_failures = 0
        self.propose_after = 0.0
        self.data: DataIdentity | None
        self.setting: str
        self.identify_data()
        self.git = Git(ws.path)
        self.slots = executor.slots()
        self.metric_name = settings.project.metric
        self.direction = settings.project.direction
        # One local slot: the run happens in the workspace itself, exactly as the single-slot loop
        # always did. Several slots, or a cluster (its nodes see only the shared filesystem): each
        # candidate runs in its own snapshot (a worktree at its commit), the workspace stays at the
        # wave's base, and the branch moves only when a wave is decided.
        self.in_place = len(self.slots) == 1 and executor.backend == "local"
        self.asynchronous = settings.loop.mode == "async" and not self.in_place
        self.max_experiments: int | None = None
        shared = executor.shared_dir
        self.run_root = state_dir(ws.path) if shared is None else shared / _run_dir_name(ws)
        # A slot's hardware as its last recorded run saw it (for pins to a class on slots that are
        # not probed ahead): kept here as experiments are recorded, not re-read at every step.
        self.slot_hardware: dict[str, str] = {}
        # (setting, commit) of every keep recorded: a result whose base was kept on its setting has it
        # to compare with; one whose base is not measured there yet (new data, an edited config) waits
        # for that measurement when it runs (cycle.py)
        self.kept: set[tuple[str, str]] = set()

    def learn(self, rows: list[Experiment]) -> None:
        """Note what recorded experiments tell about the slots and the keeps (at startup, and on each
        record)."""
        self.slot_hardware.update({e.slot: e.hardware for e in rows if e.hardware})
        self.kept.update((e.setting, e.commit) for e in rows if e.status == "keep" and e.setting)

    def apply_heartbeat(self, live: HeartbeatSettings) -> list[str]:
        """Settings the daemon reloaded on SIGHUP: what changed, as `name old -> new`."""
        old = self.settings.heartbeat
        changed = changed_fields(old, live, "heartbeat")
        self.settings = dataclasses.replace(self.settings, heartbeat=live)
        follow = getattr(self.executor, "apply_run_timeout", None)  # Slurm's --time follows run_timeout
        if follow is not None:
            follow(live.run_timeout)
        return changed

    def identify_data(self) -> None:
        """What the built-in trainer's runs are scored on as found now (None: a project of the
        user's), and the setting of runs from here on."""
        data_dir = self.env.get(hardware.DATA_DIR_ENV) if self.ws.builtin_trainer else None
        self.data = identify(self.store, Path(data_dir)) if data_dir else None
        self.setting = self.record_setting()

    def record_setting(self) -> str:
        """The setting digest of runs from the workspace as it is (its harness copy's score version,
        the data as this start found it, the config's metric and direction)."""
        project = self.settings.project
        return hardware.record_setting(self.store, self.ws.run_command, self.env, workspace_score_version(self.ws),
                                       self.data, hardware.goal_of(project.metric, project.direction))

    def run_class(self, run: ledger.RunRecord) -> HardwareClass:
        """What a run is compared within: the GPU model its start marker probed (else its slot's, as
        probed ahead) and the setting it started on (a run an older nightlab launched: as found now)."""
        hw = run_hardware(run.log_path) or next((s.hardware for s in self.slots if s.name == run.slot), "")
        return HardwareClass(hw, run.setting or self.setting)

    def hw_class(self, hardware_name: str) -> HardwareClass:
        return HardwareClass(hardware_name, self.setting)

    def best(self, rows: list[Experiment] | None = None) -> float | None:
        """The last recorded best."""
        rows = ledger.experiments(self.store, last=1) if rows is None else rows
        return rows[-1].best if rows else None

    def patch(self, base: str, commit: str) -> ledger.Patch:
        """`commit`'s change from `base` as the ledger keeps it for /diff: the bot cannot run git.
        Made before the transaction that records it, so no git call holds the store's lock."""
        # a key an agent wrote into train.py stays in the commit (the user's code), not in what /diff shows
        text = self.redact(self.git.patch(base, commit))
        return ledger.make_patch(base, commit, self.git.file_numstat(base, commit), text)

    def log_path(self, number: int) -> Path:
        return self.run_root / "runs" / f"{number}.log"

    def snapshot_path(self, number: int) -> Path:
        return self.run_root / "worktrees" / str(number)

    def run_dir(self, cand: Candidate) -> Path:
        return self.ws.path if self.in_place else self.snapshot_path(cand.number)

    def reset_tree(self, target: str, number: int) -> None:
        """The workspace's tree at `target` for experiment `number`, on the session branch (a person's
        checkout stops the engine: UserError). The engine commits or undoes its own edits at once, so
        edits of tracked files found here are someone else's (a person editing train.py while the
        loop runs): kept as a git stash entry and said, not reset away."""
        git, at = self.git, self.ws.path
        branch = git.branch()
        if branch != self.ws.branch:  # a person's checkout: the night's commits would land off the branch
            raise UserError(
                f"{at} was switched to {branch or 'a detached HEAD'} while the loop ran (it owns the workspace's"
                f" git; to look at an old commit use `git -C {at} show <commit>:train.py`); run"
                f" `git -C {at} checkout {self.ws.branch}` and start nightlab again: nothing recorded is lost")
        head = git.head()
        if head != target and not ledger.made_by_the_loop(self.store, head) and self.store.get(USER_HEAD_KEY) != head:
            # a person's commit on the branch (made while a run was left in flight): measured next, not reset away
            self.store.set(USER_HEAD_KEY, head)
            # a stop leaves a run's tree in the workspace: an edit committed there is made on its commit
            held = [n for sha in git.commits_between(target, head) if (n := ledger.number_of_commit(self.store, sha))]
            also = "".join(f"; it is made on #{n}'s commit, so it holds #{n}'s change too (`git -C {at} diff"
                           f" {target[:7]} {head[:7]}` shows all it changes)" for n in held[:1])
            self.store.emit("alert", text=(
                f"your commit {head[:7]} ({self.redact(git.subject(head))}) came while #{number} was open: kept, and"
                " measured as the baseline once the runs in flight are recorded; the loop goes on from it" + also))
        changed = git.changed_files()
        if head == target and not changed:
            return
        if not git.has_commit(target):  # git's own words would be a traceback, and restarts the same one
            raise UserError(
                f"commit {target[:7]}, which #{number} needs, is no longer in {at}: its history was rewritten or"
                f" cleaned (git gc) under the loop. Put it back if a backup or `git -C {at} fsck --lost-found` has"
                f" it, then start nightlab again; rewrite the session branch only while nightlab is stopped and no"
                " experiment is open")
        edited, new = git.stash_edits(f"nightlab: edits found in the workspace at #{number}") if changed else ([], [])
        if edited or new:
            saved = [*edited, *(f"{f} (new)" for f in new)]
            # the harness is never run edited (a committed edit stops the next start): not one to have "tried"
            harness = [p for p in edited if p in self.ws.protected]
            text = (f"edits nightlab did not make were in {', '.join(saved)} at #{number}: the loop owns the"
                    f" workspace's files while it runs, so they were not run; kept in `git -C {at} stash list`.")
            if len(harness) < len(saved):
                text += (f" To have them tried: `nightlab ctl pause`, then `git -C {at} stash pop`, commit them, and"
                         " resume")
            if harness:
                text += (f"{';' if len(harness) < len(saved) else ''} {', '.join(harness)}: the protected harness,"
                         f" which no run uses edited; keep it as recorded (`git -C {at} checkout --"
                         f" {' '.join(harness)}` after a stash pop; `nightlab doctor` says more)")
            if new:  # a run's own output, in the tree of the only slot, is stashed at every experiment
                text += (". Files your runs write belong in .gitignore (or .git/info/exclude): the loop leaves"
                         " ignored files where they are")
            self.store.emit("alert", text=text)
        git.reset_to(target)

    def log_tail(self, number: int, tail_bytes: int) -> str:
        return self.redact(read_tail(self.log_path(number), tail_bytes))


def _run_dir_name(ws: Workspace) -> str:
    """This workspace's folder on a shared filesystem: readable, and unique per workspace path."""
    digest = hashlib.sha1(str(ws.path).encode()).hexdigest()[:8]
    return f"{ws.path.name}-{ws.branch.replace('/', '-')}-{digest}"
