"""Upgrading: the workspace's copy of the built-in harness brought up to the installed nightlab's.

After `pip install -U nightlab` a workspace still scores with the harness copied into it at init.
At engine start, a copy that is still the one nightlab recorded (nobody edited it) and differs from
the installed one is replaced, committed on the session branch and its new hash recorded, with one
`harness_upgraded` event: said in the log and, by the bot, in chat. Automatic, because it is safe:
only an unedited copy of nightlab's own file is replaced, the old one stays in git, and the engine
that does it runs the code that goes with the new harness. An edited copy is never overwritten:
startup refuses it as it always did (workspace.edited_message says what to do).

Only between experiments: an in-place run reads harness.py again when it scores, so while any
candidate is open the upgrade waits for them to end (the asynchronous mode starts no new one
meanwhile); a run in flight scores with the copy it started with.

Comparisons stay honest through the setting digest (loop/hardware.py): it holds the copy's
SCORE_VERSION, so a harness that measures differently starts a new setting (its best measured
again, nothing compared across), and one changed only in messages keeps the setting. The digest
also holds the data the runs are scored on (loop/dataid.py) and the values the config gives runs: a
start on another validation shard, tokenizer or such a value than the last run's is said the same way
(`say_setting_change`), and once, also with an upgrade at the same start (one line for both).
"""

from __future__ import annotations

from nightlab.loop import hardware
from nightlab.loop.engine.context import Context, say
from nightlab.loop.state import ledger
from nightlab.loop.workspace import PROTECTED_KEY, harness_upgrade, write_harness

SETTING_SAID_KEY = "loop.setting_said"  # kv: the last setting whose change from the last run's was said


def cut_short(ctx: Context, changed: list[str]) -> set[str]:
    """Changed files that are an upgrade cut short before its commit, which the upgrade commits:
    harness files already the installed copy but not recorded (the owner's restore by `cp` looks
    the same, and is as welcome)."""
    return set(changed) & set(harness_upgrade(ctx.ws, ctx.harness).record) if ctx.upgrade_waiting else set()


def upgrade_harness(ctx: Context) -> None:
    """Bring the harness copy up to the installed one when it waits for that and no candidate is
    open; once: the new hash is recorded with the event."""
    if not ctx.upgrade_waiting or ledger.open_candidates(ctx.store):
        return
    ws, store = ctx.ws, ctx.store
    todo = harness_upgrade(ws, ctx.harness)
    ctx.upgrade_waiting = False
    if not todo:
        return
    hashes = write_harness(ws, ctx.harness, todo, ctx.git)
    commit = ctx.git.head()[:7]
    before = ledger.last_setting(ledger.experiments(store))
    # a change since the last run said already (at the start, the upgrade waiting for a run): not again
    since = ctx.setting if before is not None and store.get(SETTING_SAID_KEY) == ctx.setting else before
    with store.transaction():
        store.set(PROTECTED_KEY, {**store.get(PROTECTED_KEY, {}), **hashes})
        ctx.setting = ctx.record_setting()
        changes = hardware.setting_changes(store, since, ctx.setting) if since is not None else []
        text = f"the harness ({', '.join(hashes)}) is now the installed nightlab's, commit {commit}"
        if changes:
            text += f"; what it measures changed ({', '.join(changes)}), {hardware.NEW_SETTING}"
        elif since != before:
            text += (f"; what it measures is otherwise unchanged (score version {hardware.scorer_of(store, ctx.setting)}):"
                     " the new setting said above measures the best again at that commit")
        elif before is not None:
            text += (f"; what it measures is unchanged (score version {hardware.scorer_of(store, ctx.setting)}):"
                     " the best is measured again at that commit before anything is compared with it")
        store.set(SETTING_SAID_KEY, ctx.setting)
        store.emit("harness_upgraded", files=list(hashes), commit=commit,
                   setting_changed=bool(changes) or since != before, text=text)
    say(text)


def say_setting_change(ctx: Context) -> None:
    """At a start: say once, in the log and in chat, that what runs measure changed since the last
    run (the data they are scored on, prepared again; a value the config gives runs), so the best is
    measured again."""
    store = ctx.store
    before = ledger.last_setting(ledger.experiments(store))
    if before is None or before == ctx.setting or store.get(SETTING_SAID_KEY) == ctx.setting:
        return
    changes = hardware.setting_changes(store, before, ctx.setting)
    if not changes:  # only where things lie (a data dir recorded before the data counted): nothing to say
        return
    text = f"{', '.join(changes)} since the last run, {hardware.NEW_SETTING}"
    with store.transaction():
        store.set(SETTING_SAID_KEY, ctx.setting)
        store.emit("alert", text=text)
    say(text)


def notice_data_change(ctx: Context) -> None:
    """Between waves, at a resume, before a launch and a decision: the data found again (a local
    folder's files are links, and a data problem's repair happens during its pause; the asynchronous
    mode has no moment between runs); a change is said as at a start. Each run keeps the setting it
    started on (`runs.setting`), so one the data changed under is compared with neither best
    (deciding.judge_run). Cheap when nothing changed (it runs at every launch and decision): the
    data dir listed, its two files stat'ed, the harness copy's version read; no read of the experiments."""
    before = ctx.setting
    ctx.identify_data()
    if ctx.setting != before:
        say_setting_change(ctx)

