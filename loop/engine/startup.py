"""Startup: the workspace as a restart finds it (stale git locks, the branch, a dirty tree, the
harness brought up to the installed nightlab's, the protected files), and the keys the views read
about this loop."""

from __future__ import annotations

import os
import time

from nightlab.loop.engine.context import Context, say
from nightlab.loop.engine.upgrading import cut_short, say_setting_change, upgrade_harness
from nightlab.loop.ratchet import clear_stale_git_locks
from nightlab.loop.state import ledger
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.stats import DIRECTION_KEY, NOISE_PRIOR_KEY
from nightlab.loop.workspace import dirty_error, edited_message, missing_program, project_commands, protected_mismatches


def startup(ctx: Context) -> None:
    ws, git, store = ctx.ws, ctx.git, ctx.store
    for lock in clear_stale_git_locks(ws.path):  # we hold the engine lock: they are stale
        say(f"removed a stale git lock left by a killed git process: {lock}")
    branch = git.branch()
    if branch != ws.branch:
        raise UserError(
            f"{ws.path} is on {branch or 'a detached HEAD'}, not the session branch"
            f" {ws.branch}; run `git -C {ws.path} checkout {ws.branch}`"
        )
    # said once here, not as a crash per run (or checks_failed per keep) until the loop pauses itself
    missing = [f"{key} starts {problem}" for key, command in project_commands(ctx.settings, here=True)
               if (problem := missing_program(command, ws.path)) is not None]
    if missing:
        raise UserError(f"{'; '.join(missing)} (a service's PATH may lack where it is installed: give its full"
                        f" path); install it, or fix [project] in {ctx.settings.origin}")
    ignored = sorted(git.ignored_files((*ws.editable, *ws.protected))) if not ctx.in_place else []
    if ignored:  # each run gets the commit's files in a snapshot of its own: every run would lack them
        raise UserError(f"git ignores {', '.join(ignored)}, named in [project]: runs on several slots or on Slurm get"
                        f" only the files of their commit, so every run would lack them (and be rejected); commit"
                        f" them (git -C {ws.path} add -f {' '.join(ignored)} && git -C {ws.path} commit -m ...), or"
                        f" take them out of [project] in {ctx.settings.origin}")
    open_ = ledger.open_candidates(store)
    changed = git.changed_files()
    if changed and not open_ and set(changed) - cut_short(ctx, changed):
        raise dirty_error(ws, changed)
    proposing = [c for c in open_ if c.phase == "proposing"]
    if proposing:
        git.reset_to(proposing[0].base_commit)  # our own interrupted edit
    upgrade_harness(ctx)
    say_setting_change(ctx)  # after the upgrade, which says a change at the same start in its line
    if not open_ or proposing:
        bad = protected_mismatches(ws)
        if bad:
            raise UserError(edited_message(ws, bad))
    ctx.learn(ledger.experiments(store))
    with store.transaction():
        store.set(ledger.AREAS_KEY, None if ctx.proposer.areas is None else list(ctx.proposer.areas))
        store.set("loop.metric_name", ctx.metric_name)
        store.set(DIRECTION_KEY, ctx.direction)
        store.set(NOISE_PRIOR_KEY, ctx.settings.loop.noise_prior)
        store.set("loop.slots", [s.name for s in ctx.slots])
        store.set("engine.finished", False)
        store.set("engine.pid", os.getpid())
    pause = ledger.paused(store)
    # a resume sent while the loop was down applies at the first checkpoint: no "until resume" then
    waiting = any(c.name == "resume" for c in store.pending_commands())
    if pause is not None and not waiting:  # else a restarted loop sits paused without a word
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(pause.since))
        say(f"the loop is paused (since {when}, by {pause.by}: {pause.reason}); nothing new starts until"
            f" resume: /resume in chat, or `nightlab ctl --config {ctx.settings.origin} resume`")
    areas, focus = ctx.proposer.areas, ledger.focus(store)
    if focus is not None and areas is not None and focus not in areas:
        # kept from another proposer's night (or set by an older nightlab that could not check it):
        # left on, every proposal would fail as "unknown focus area"
        with store.transaction():
            ledger.set_focus(store, None)
            store.emit("alert", text=f"focus {focus!r} is not an area of this proposer ({', '.join(areas)});"
                                     " focus is off. `focus <area>` to steer")
