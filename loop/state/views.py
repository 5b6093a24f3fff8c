"""Plain-text views of a workspace's ledger: the CLI prints them, the bot escapes and sends them.

Read-only: every view opens the store, reads, and formats; none of them needs the engine.
"""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

from nightlab.loop.state import ledger
from nightlab.loop.state.config import DAEMON_CONFIG_KEY
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.ledger import Experiment, HardwareClass, ended_at, started_at
from nightlab.loop.state.lock import DAEMON_LOCK, holder
from nightlab.loop.state.stats import (
    DIRECTION_KEY,
    HELDOUT_GAIN,
    NOISE_PRIOR_KEY,
    Comparison,
    Noise,
    compare,
    gain,
    gain_words,
    heldout_suspect,
    overtime_words,
    pooled_noise,
    suspect,
    suspicions,
)
from nightlab.loop.state.store import DB_FILENAME, Store, state_dir

ASSUMED_NOISE = "± from loop.noise_prior: no run repeated yet to measure the noise"
IDENTICAL_NOISE = "± from loop.noise_prior: the repeated runs gave the same number, so they measure no noise"


def recorded(workspace: Path) -> int:
    """Experiments in the ledger (0 for a workspace not started yet)."""
    if not (state_dir(Path(workspace)) / DB_FILENAME).exists():
        return 0
    store = Store.for_workspace(Path(workspace))
    try:
        return ledger.experiment_count(store)
    finally:
        store.close()


def counted(n: int, noun: str) -> str:
    """ "1 experiment", "3 experiments"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def numbered(numbers: Iterable[int]) -> str:
    """[41, 42] -> "#41, #42"."""
    return ", ".join(f"#{n}" for n in numbers)


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _metric_name(store: Store) -> str:
    return store.get("loop.metric_name", "val_bpb")


def _elapsed(run: ledger.RunRecord) -> str:
    """How long the command has run; a cluster job still waiting in the queue says so, and a
    command that has ended says when: the engine reads its result at its next poll, which a busy
    engine (a proposer at work, a keep being scored on held-out data) may not reach for minutes."""
    ended = ended_at(run.log_path)
    if ended is not None:
        return f"finished {duration(time.time() - ended)} ago, result not recorded yet"
    began = started_at(run.log_path)
    if began is None and run.handle and '"job_id": ""' not in run.handle:
        return f"queued {duration(time.time() - run.started_at)}"
    return f"running {duration(time.time() - (began or run.started_at))}"


def remaining_s(store: Store) -> float | None:
    """Expected seconds left of the running experiment: the median past duration minus elapsed
    (None once its command has ended: nothing is left of it but the engine's reading its result)."""
    runs = ledger.running_runs(store)
    past = [e.duration_s for e in ledger.experiments(store, last=20) if e.duration_s and e.metric is not None]
    if not runs or not past or ended_at(runs[-1].log_path) is not None:
        return None
    return max(0.0, statistics.median(past) - (time.time() - runs[-1].started_at))


def current_best(rows: list[Experiment]) -> tuple[Experiment | None, float | None]:
    """The experiment that set the current best and the best value on its hardware class. The
    best commit is the last kept change's, or a later baseline's of a commit not kept before: a
    commit of the user's put on the branch (an edit committed between nights), which the loop goes
    on from. A baseline of a commit kept before (another class, a re-measurement) only re-measures
    it. Of that commit: its last kept change, else its first class's baseline. The value is the mean
    of every measurement of the commit there (re-measurements included)."""
    keeps = [e for e in _current(rows) if e.status == "keep"]
    if not keeps:
        return None, None
    seen: set[str] = set()
    commit = keeps[0].commit
    for e in keeps:
        if e.kind != "baseline" or e.commit not in seen:
            commit = e.commit
        seen.add(e.commit)
    mine = [e for e in keeps if e.commit == commit]
    changes = [e for e in mine if e.kind != "baseline"]
    best = changes[-1] if changes else [e for e in mine if e.hardware_class == mine[0].hardware_class][-1]
    values = _best_values(rows, best)
    return best, statistics.fmean(values) if values else best.best


def best_runs(rows: list[Experiment]) -> list[float]:
    """Every run of the best commit on its hardware class: what the keep rule compares a change with."""
    best, _ = current_best(rows)
    return [] if best is None else ledger.results(rows, best.commit, best.hardware_class)


def _current(rows: list[Experiment]) -> list[Experiment]:
    """The experiments of the latest setting (the last run's): one measured under another budget,
    data or scorer is compared with nothing now, so it is no best and no class of the night's."""
    setting = ledger.last_setting(rows)
    return [e for e in rows if e.setting in (setting, "")]  # "": no run (a failed proposal)


def _best_values(rows: list[Experiment], best: Experiment) -> list[float]:
    """The runs that state the best's value. The runs that got a change kept were picked for
    luck (the winner's curse), so once it has been re-measured only the runs after its keep
    count here (the decision rule itself uses every run)."""
    fresh = _fresh_values(rows, best)
    return fresh if best.kind != "baseline" and fresh else ledger.results(rows, best.commit, best.hardware_class)


def _fresh_values(rows: list[Experiment], best: Experiment) -> list[float]:
    return ledger.results([e for e in rows if e.number > best.number], best.commit, best.hardware_class)


def _unconfirmed(rows: list[Experiment], best: Experiment, n: int) -> str:
    """Said beside a kept change's gain until a fresh run re-measures it: until then the gain
    comes from the `n` runs that got it kept, picked for luck (the winner's curse)."""
    if best.kind == "baseline" or _fresh_values(rows, best):
        return ""
    runs = "the run" if n == 1 else f"the {n} runs"
    return f"; not confirmed yet: from {runs} that got it kept, likely too high until a fresh run re-measures it"


def night_gain(store: Store, rows: list[Experiment]) -> tuple[float, Comparison] | None:
    """(the baseline's mean, the best's gain over it ± its standard error), on the best's hardware
    class (the best's value as `_best_values` states it), the noise pooled over that class's
    repeats. A gain is positive when the best is better, whichever the metric's direction."""
    return _gain(store, rows, _night(store, rows))


def _gain(store: Store, rows: list[Experiment], night: Night | None) -> tuple[float, Comparison] | None:
    """`night_gain` of a night read already (a view reads it once for its gain and its noise)."""
    if night is None:
        return None
    best, baseline, noise = night
    return statistics.fmean(baseline), compare(_best_values(rows, best), baseline, noise.sd,
                                               store.get(DIRECTION_KEY, "minimize"))


def night_noise(store: Store, rows: list[Experiment]) -> Noise | None:
    """The run-to-run noise on the best's hardware class (None before a baseline result there)."""
    night = _night(store, rows)
    return None if night is None else night[2]


Night = tuple[Experiment, list[float], Noise]  # the best, the baseline's results, the noise: `_night`


def _night(store: Store, rows: list[Experiment]) -> Night | None:
    """The best, the baseline's results on the best's hardware class, and the noise pooled over
    that class's repeats from the prior (noise_prior × the best's mean, as the judge scales it)."""
    best, _ = current_best(rows)
    if best is None:
        return None
    cls = best.hardware_class
    base = baseline(rows, cls)
    if base is None:
        return None
    baseline_values = ledger.results(rows, base.commit, cls)
    scale = abs(statistics.fmean(ledger.results(rows, best.commit, cls) or baseline_values)) or 1.0
    noise = pooled_noise(ledger.repeat_groups(rows, cls), store.get(NOISE_PRIOR_KEY, 0.0) * scale)
    return best, baseline_values, noise


def _unchanged(rows: list[Experiment], best: Experiment) -> bool:
    """The best is the night's baseline code: no change kept, nor a commit of the user's since."""
    base = baseline(rows, best.hardware_class)
    return best.kind == "baseline" and (base is None or base.commit == best.commit)


def baseline(rows: list[Experiment], cls: HardwareClass) -> Experiment | None:
    """The night's baseline on a hardware class: its first baseline with a result, what the best's
    gain is measured against (and its change shown against, by /diff)."""
    return next((e for e in rows if e.kind == "baseline" and e.hardware_class == cls and e.metric is not None), None)


def _classes_line(rows: list[Experiment]) -> str:
    """With more than one hardware class: each one's best commit as measured there."""
    refs = {}
    for e in _current(rows):
        if e.status == "keep" and e.hardware:
            refs[e.hardware_class] = e
    if len(refs) < 2:
        return ""
    return "per hardware: " + " · ".join(
        f"{cls.hardware} {_fmt(e.best)} ({e.commit[:7]})" for cls, e in sorted(refs.items()))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6f}"


def _lines(rows: list[Experiment], undecided: set[int]) -> list[str]:
    """One line per experiment, in columns. `undecided`: the runs that do not say how their change
    went (`_undecided_runs`), shown so, as their digest said."""
    width = max((len(f"#{e.number}") for e in rows), default=0)  # #9 above #10: the columns stay
    return [_line(e, undecided, width) for e in rows]


def _line(e: Experiment, undecided: set[int], width: int) -> str:
    figure = _fmt(e.metric).ljust(8)
    why = f" ({e.reason})" if e.status != "keep" and e.reason else ""
    if e.status == "keep" and suspect(e.metrics):
        why = f" (SUSPECT: {'; '.join(suspicions(e.metrics))})"
    return f"{f'#{e.number}':<{width}} {_shown_status(e, undecided):<13} {figure}  {e.description or e.kind}{why}"


def _shown_status(e: Experiment, undecided: set[int]) -> str:
    """What a view calls a run: recorded as a discard, a run the rule runs again is undecided."""
    return "undecided" if e.number in undecided else e.status


def _heldout(e: Experiment) -> str:
    """A keep's second opinion: its gain on a held-out slice, SUSPECT when it vanishes there."""
    if HELDOUT_GAIN not in e.metrics:
        return "unscored SUSPECT" if heldout_suspect(e.metrics) else "—"
    return f"{e.metrics[HELDOUT_GAIN]:+.6f}" + (" SUSPECT" if heldout_suspect(e.metrics) else "")


def _overtime(e: Experiment) -> str:
    """Said after a keep's description where it trained past the budget (a column empty on most nights)."""
    over = overtime_words(e.metrics)
    return "" if over is None else f" (SUSPECT: {over})"


def _gain_text(store: Store, rows: list[Experiment], best: Experiment, night: Night | None) -> str:
    """ "+0.091757 ± 0.002100 (+6.34%, n = 3 vs 5)": positive = better (issue 14, item 13),
    whether its ± is a guess (no run repeated yet) and whether fresh runs have confirmed it."""
    found = _gain(store, rows, night)
    if found is None or night is None:
        return ""
    (baseline, c), noise = found, night[2]
    pct = f"{c.gain / abs(baseline) * 100:+.2f}%, " if baseline else ""
    # where every repeat gave the same number a fresh run gives this one again: none is awaited (or made)
    unconfirmed = "" if noise.identical else _unconfirmed(rows, best, c.n_candidate)
    return f"{c.gain:+.6f} ± {c.se:.6f} ({pct}n = {c.n_candidate} vs {c.n_incumbent}{_assumed(noise)}{unconfirmed})"


def _assumed(noise: Noise) -> str:
    """Said beside a ± that no repeated run has measured: it is `loop.noise_prior`'s guess."""
    return "" if noise.measured else f"; {IDENTICAL_NOISE if noise.identical else ASSUMED_NOISE}"


def status_text(workspace: Path) -> str:
    store = Store.existing(workspace)
    rows = ledger.experiments(store)
    name = _metric_name(store)
    lines = [f"nightlab · {store.get('workspace.branch', '?')} · profile {store.get('workspace.profile', '?')}"]
    flight = ledger.in_flight(store)
    if len(flight) == 1:
        cand, run = flight[0]
        left = remaining_s(store)
        lines.append(
            f"now: #{cand.number} {cand.kind} {_elapsed(run)}"
            + (f" (~{duration(left)} left)" if left is not None else "")
            + f" on {run.slot}: {cand.description or cand.kind}" + (f" [{cand.area}]" if cand.area else "")
        )
    elif flight:  # a wave: one line per slot
        slots = store.get("loop.slots") or []
        lines.append(f"now: {len(flight)} runs in flight" + (f" on {len(slots)} slots" if slots else ""))
        for cand, run in flight:
            lines.append(f"  {run.slot}: #{cand.number} {cand.kind} {_elapsed(run)}: {cand.description or cand.kind}"
                         + (f" [{cand.area}]" if cand.area else ""))
    else:
        lines.append("now: no run in flight")
    if holder(Path(workspace), DAEMON_LOCK) is None:  # `nightlab status` at 7 am: the night may have stopped
        tick = store.get("engine.tick")
        ago = f" (last active {duration(time.time() - tick)} ago)" if tick else ""
        started = (store.get(DAEMON_CONFIG_KEY) or {}).get("path")  # the file its last daemon ran with
        config = shlex.quote(started) if started else "FILE"
        lines.append(f"nightlab is not running{ago}: no new experiment starts until it does"
                     f" (systemctl start nightlab, or nightlab run --config {config})")
    pause = ledger.paused(store)
    if pause:
        lines.append(paused_text(pause, f"{duration(time.time() - pause.since)} ago"))
    best_exp, best = current_best(rows)
    if best_exp is not None:
        gain = "" if _unchanged(rows, best_exp) else _gain_text(store, rows, best_exp, _night(store, rows))
        lines.append(f"best {name}: {_fmt(best)} (#{best_exp.number}, {best_exp.commit[:7]})" + (f" · vs baseline {gain}" if gain else ""))
    classes = _classes_line(rows)
    if classes:
        lines.append(classes)
    lines.append(f"focus: {ledger.focus(store) or 'off'}")
    lines.append(f"experiments: {len(rows)} ({_counts(store, rows)})")
    if rows:
        lines.append("last:")
        later = _undecided_runs(store, rows)
        lines += [f"  {line}" for line in _lines(rows[-3:], later)]
    return "\n".join(lines)


def _counts(store: Store, rows: list[Experiment]) -> str:
    """What the runs were: the baseline's, repeats of a result, then the changes by outcome. A
    baseline run is recorded as a keep, and "3 keep" beside "nothing beat the baseline" would
    read as a contradiction; a change re-run to decide counts once, by its deciding run (a change
    kept on its third run was "2 repeat", and no keep), or as undecided while that run is to come.
    A run the data failed measured nothing, of a change or of the baseline: "bad data", apart (and
    likewise one during which the harness changed)."""
    measured = [e for e in rows if ledger.not_the_change(e.reason) is None]
    last = _decided_changes(measured)
    undecided = _undecided(store, last)
    decided = [e for e in last if e.number not in undecided]
    changes = [e for e in measured if e.kind != "baseline"]
    baselines = [e for e in measured if e.kind == "baseline"]
    # a baseline that crashed, failed its checks or was killed measured nothing: "2 baseline" hid it
    failed = ", ".join(f"{n} {s}" for s in ("crash", "checks_failed", "discard")
                       if (n := sum(e.status == s for e in baselines)))
    counts = {"repeat": len(changes) - len(last)}
    counts |= {s: sum(e.status == s for e in decided) for s in ("keep", "discard", "crash", "checks_failed")}
    counts["undecided"] = len(undecided)
    for kind in ledger.NOT_THE_CHANGE:
        counts[kind.words] = sum(ledger.not_the_change(e.reason) == kind for e in rows)
    parts = [f"{len(baselines)} baseline" + (f" ({failed})" if failed else "")] if baselines else []
    return ", ".join([*parts, *(f"{n} {s}" for s, n in counts.items() if n)]) or "none yet"


def _undecided(store: Store, last: list[Experiment]) -> set[int]:
    """The changes (each as its last run) whose re-run the rule asked for and is still to come: a
    night stopped between them. Recorded as a discard, yet the change may still be kept."""
    queued = {c.confirm_of for c in ledger.open_candidates(store) if c.confirm_of is not None and c.phase != "recorded"}
    return {e.number for e in last if e.status != "keep" and (e.number in queued or e.confirm_of in queued)}


def _undecided_runs(store: Store, rows: list[Experiment]) -> set[int]:
    """The runs that do not say how their change went: those the rule ran again to decide, and a
    last run whose re-run is still to come. Recorded as discards, shown as undecided."""
    return _re_run(rows) | _undecided(store, _decided_changes(rows))


def _decided_changes(rows: list[Experiment]) -> list[Experiment]:
    """Each change once, as its last run so far left it."""
    later = _re_run(rows)
    return [e for e in rows if e.kind != "baseline" and e.number not in later]


def _re_run(rows: list[Experiment]) -> set[int]:
    """The runs of a change that the rule ran again to decide: a change has a row per run
    (`confirm_of` names the run it repeats; a rebase's, the change it re-makes), and only the
    last one says how it went."""
    root: dict[int, int] = {}
    last: dict[int, int] = {}
    for e in rows:
        if e.kind == "baseline":
            continue
        origin = e.confirm_of if e.kind in ("confirm", "rebase") and e.confirm_of is not None else e.number
        root[e.number] = root.get(origin, origin)
        last[root[e.number]] = e.number
    return {n for n, r in root.items() if last[r] != n}


def history_text(workspace: Path, n: int = 20, *, status: str | None = None, top: int | None = None,
                 direction: str = "minimize") -> str:
    """The last `n` experiments; with `status` only those as the views call them (keep, crash,
    undecided: a discard the rule runs again is not a discard); with `top` the `top` best results
    by the metric, best first, instead of the last ones: in the direction the ledger's results were
    judged in, as `best` and the report rank them (`direction`, the config's, for a ledger without one:
    a config changed since ranked the list against the best the other views named)."""
    store = Store.existing(workspace)
    direction = store.get(DIRECTION_KEY, direction)
    if status is None and top is None:
        rows = ledger.experiments(store, last=max(1, n))  # the last ones: their re-runs too
        later = _undecided_runs(store, rows)
        return "\n".join(_lines(rows, later)) if rows else "no experiments yet"
    every = ledger.experiments(store)
    later = _undecided_runs(store, every)
    rows = [e for e in every if status is None or _shown_status(e, later) == status]
    older = 0
    if top is not None:
        # a result of an earlier setting (another budget, data, metric) ranks against nothing now
        current = _current(rows)
        older = sum(e.metric is not None for e in rows) - sum(e.metric is not None for e in current)
        scored = sorted((e for e in current if e.metric is not None),
                        key=lambda e: (e.metric if direction == "minimize" else -e.metric, e.number))  # type: ignore[operator]
        rows = scored[:max(1, top)]
    else:
        rows = rows[-max(1, n):]
    if not rows:
        return f"no {status or 'scored'} experiments yet"
    several = len({e.hardware for e in rows}) > 1  # metrics of different classes are not comparable
    lines = [line + (f" [{e.hardware or 'no run'}]" if several else "") for e, line in zip(rows, _lines(rows, later))]
    if older:
        lines.append(f"(ranked within the current setting; {counted(older, 'result')} of an earlier one left out)")
    return "\n".join(lines)


def best_text(workspace: Path) -> str:
    store = Store.existing(workspace)
    rows = ledger.experiments(store)
    best_exp, best = current_best(rows)
    if best_exp is None:
        return "no result yet"
    name = _metric_name(store)
    text = f"best {name}: {_fmt(best)} — #{best_exp.number} {best_exp.commit[:7]}: {best_exp.description or best_exp.kind}"
    if best_exp.hypothesis:
        text += f"\nhypothesis: {best_exp.hypothesis}"
    night = _night(store, rows)
    found = _gain(store, rows, night)
    if found is not None and not _unchanged(rows, best_exp):
        text += f"\nvs baseline {_fmt(found[0])}: gain {_gain_text(store, rows, best_exp, night)}"
    if best_exp.hardware:
        text += f"\nmeasured on: {best_exp.hardware}"
    classes = _classes_line(rows)
    if classes:
        text += "\n" + classes
    if best_exp.confidence is not None:
        text += f"\nconfidence when kept: {best_exp.confidence:.1f} standard errors"
    if HELDOUT_GAIN in best_exp.metrics or heldout_suspect(best_exp.metrics):
        text += f"\nheld-out gain: {_heldout(best_exp)}" + (
            "" if not heldout_suspect(best_exp.metrics) else " (the gain vanishes on rows no decision saw)"
            if HELDOUT_GAIN in best_exp.metrics else " (its model could not be scored on rows no decision saw)")
    over = overtime_words(best_exp.metrics)
    if over is not None:
        text += f"\nSUSPECT: {over}"
    return text


CHAT_DIFF_CHARS = 2500  # a /diff in one chat message: Slack's 3000, less room for its escapes
_HEAD_CHARS = 160  # a long description (an agent's summary) leaves the message to the diff


def diff_text(workspace: Path, number: int | None = None, limit: int | None = None) -> str:
    """Experiment `number`'s change against the commit it was made on, or (None) the best's
    against the night's baseline: a stat line, then the unified diff, its first lines within
    `limit` characters (None: all the ledger holds); what is left out is said, with the git
    command that shows it all."""
    store = Store.existing(workspace)
    rows = ledger.experiments(store)
    if number is None:
        best, _ = current_best(rows)
        if best is None:
            return "no result yet"
        base = baseline(rows, best.hardware_class)
        if _unchanged(rows, best):
            # a setting's baseline can be the best measured again (another budget, new data): the
            # change kept before it is still the night's, against a baseline of a setting before
            # (the first whose patch to it was recorded with a keep)
            base = next((e for e in rows if e.kind == "baseline" and e.hardware == best.hardware and e.metric is not None
                         and e.commit != best.commit and ledger.recorded_patch(store, e.commit, best.commit)), None)
            if base is None:
                return f"the best is the baseline (#{best.number}, {best.commit[:7]}): no change has been kept yet"
        if base is not None:
            head = f"the best, #{best.number}, against the baseline, #{base.number}: {_short(best.description)}"
            return _change(store, workspace, head, base.commit, best.commit, limit)
        number = best.number  # no baseline measured on its hardware: its own change
    cand = ledger.candidate_numbered(store, number)
    if cand is None:
        last = ledger.last_number(store)
        raise UserError(f"there is no experiment #{number}" + (f"; the last recorded is #{last}" if last else " yet"))
    exp = next((e for e in rows if e.number == number), None)
    status = "in flight" if exp is None else _shown_status(exp, _undecided_runs(store, rows))
    head = f"#{number} {status}: {_short(cand.description or cand.kind)}"
    commit = cand.commit if exp is None else exp.commit
    if commit is None:
        return f"{head}\nno change yet: its proposal is being made"
    if commit == cand.base_commit:  # a baseline, or a proposal that ended before its commit
        why = "a baseline runs the code as it is" if cand.kind == "baseline" else exp.reason if exp else ""
        return f"{head}\nno change" + (f": {why}" if why else "")
    return _change(store, workspace, head, cand.base_commit, commit, limit)


def _change(store: Store, workspace: Path, head: str, base: str, commit: str, limit: int | None) -> str:
    command = f"git -C {shlex.quote(str(Path(workspace).resolve()))} diff {base} {commit}"
    found = ledger.recorded_patch(store, base, commit)
    if found is None:
        return f"{head}\nno patch in the ledger (recorded by an older nightlab); on the workspace's machine: {command}"
    stat = f"{base[:7]}..{commit[:7]} {_stat(found.files)}"
    lines = ledger.split_lines(found.text)
    if limit is not None:  # the note's numbers at their longest, so whatever is cut fits with it
        room = limit - len(head) - len(stat) - len(_cut(found.lines, found.lines, command)) - 3
        lines = ledger.first_lines(lines, room)
    out = [head, stat, "".join(lines).rstrip("\n")]
    if len(lines) < found.lines:
        out.append(_cut(found.lines - len(lines), found.lines, command))
    return "\n".join(out)


def _cut(left: int, total: int, command: str) -> str:
    return f"… {left} of {total} lines not shown; all of it: {command}"


def _stat(files: tuple[tuple[str, int, int], ...]) -> str:
    """ "train.py +3 -1", or "2 files +4 -2: train.py +3 -1, model.py +1 -1"."""
    each = ", ".join(f"{path} +{added} -{removed}" for path, added, removed in files)
    if len(files) == 1:
        return each
    return f"{len(files)} files +{sum(f[1] for f in files)} -{sum(f[2] for f in files)}" + (f": {each}" if each else "")


def _short(text: str) -> str:
    one = " ".join(text.split())
    return one if len(one) <= _HEAD_CHARS else one[:_HEAD_CHARS - 1] + "…"


def improvements(rows: list[Experiment], direction: str = "minimize") -> list[tuple[Experiment, float]]:
    """Every kept change with its gain over the best of its hardware class before it (positive =
    better), largest first."""
    found: list[tuple[Experiment, float]] = []
    previous: dict[HardwareClass, float] = {}
    for e in rows:
        if e.status != "keep" or e.best is None:
            continue
        before = previous.get(e.hardware_class)
        if e.kind != "baseline" and before is not None:
            found.append((e, gain(e.best, before, direction)))
        previous[e.hardware_class] = e.best
    return sorted(found, key=lambda item: item[1], reverse=True)


def report_markdown(workspace: Path, since: float | None = None, chat: bool = False) -> str:
    """The session's report; with `since` (the last report's time) it first says what happened
    after it: the same totals every morning would hide a night when nothing ran. `chat`: for a
    phone, with no markdown marks (a chat shows them as they are) and lines for the table."""
    store = Store.existing(workspace)
    rows = ledger.experiments(store)
    name = _metric_name(store)
    code = (lambda text: text) if chat else (lambda text: f"`{text}`")
    out = [f"{'' if chat else '# '}nightlab report — {store.get('workspace.branch', '?')}", ""]
    if since is not None:
        out.append(_since_line(store, [e for e in rows if (e.finished_at or 0.0) > since], since))
    if not rows:
        return "\n".join([*out, "No experiments yet."])
    span = rows[-1].finished_at - (rows[0].started_at or rows[0].finished_at)
    best_exp, best = current_best(rows)
    night = _night(store, rows)
    found = _gain(store, rows, night)
    if all(e.metric is None for e in rows):  # what to do, not a baseline, a best and a gain of "—"
        out += [f"- experiments: {len(rows)} ({_counts(store, rows)}) over {duration(span)}",
                f"- no {name} yet: all {len(rows)} experiments failed before giving one (see What"
                f" did not work); {code('nightlab train --config FILE')} runs one and shows all its output"]
    else:
        gain = ("none yet, the best is the baseline" if best_exp is not None and _unchanged(rows, best_exp)
                else f"{(_gain_text(store, rows, best_exp, night) if best_exp else '') or '—'}"
                " (± one standard error; positive = better)")
        out += [
            f"- experiments: {len(rows)} ({_counts(store, rows)}) over {duration(span)}"
            + ("; the baseline's runs and the repeats (re-runs of a result, re-measurements of the best) measure"
               " the noise" if night is None or night[2].measured else ""),  # not measured: the gain's line says so
            f"- baseline {name}: {_fmt(found[0] if found else None)}",
            f"- best {name}: {_fmt(best)}"
            + (f" (#{best_exp.number}, {code(best_exp.commit[:7])})" if best_exp else ""),
            f"- gain: {gain}",
        ]
    out += ["", "Top improvements:" if chat else "## Top improvements"]
    top = improvements(rows, store.get(DIRECTION_KEY, "minimize"))[:10]
    if top and chat:  # a seven-column table wraps into a jumble on a phone
        for e, delta in top:
            conf = "" if e.confidence is None else f", {e.confidence:.1f} SE"
            held = "" if HELDOUT_GAIN not in e.metrics and not heldout_suspect(e.metrics) else f", held-out {_heldout(e)}"
            out.append(f"- #{e.number} {e.commit[:7]} {name} {_fmt(e.best)}, gain {delta:.6f}{conf}{held}:"
                       f" {e.description}{_overtime(e)}")
    elif top:
        out += ["", f"| # | commit | {name} | gain | confidence | held-out gain | description |",
                "|---|---|---|---|---|---|---|"]
        for e, delta in top:
            conf = "—" if e.confidence is None else f"{e.confidence:.1f}"
            out.append(f"| {e.number} | `{e.commit[:7]}` | {_fmt(e.best)} | {delta:.6f} | {conf} | {_heldout(e)}"
                       f" | {e.description}{_overtime(e)} |")
    else:
        out.append("Nothing beat the baseline yet." if chat else "\nNothing beat the baseline yet.")
    # a run re-run to decide is no failure: the change it was may be kept on its next run
    later = _undecided_runs(store, rows)
    failed = [e for e in rows if e.status != "keep" and e.number not in later][-15:]
    out += ["", "What did not work:"] if chat else ["", "## What did not work", ""]
    out += [f"- #{e.number} {e.status}: {e.description or e.kind} — {e.reason}" for e in failed] or ["- nothing failed"]
    return "\n".join(out)


def _since_line(store: Store, rows: list[Experiment], since: float) -> str:
    """ "- since the last report (Tue 07:30): 12 experiments (1 keep, 11 discard)", or none, and
    why when the loop is paused."""
    head = f"- since the last report ({time.strftime('%a %H:%M', time.localtime(since))}): "
    if rows:
        return head + f"{len(rows)} experiments ({_counts(store, rows)})"
    pause = ledger.paused(store)
    why = f"; the loop is {paused_text(pause, time.strftime('since %a %H:%M', time.localtime(pause.since)))}" if pause else ""
    return head + "no experiments" + why


def paused_text(pause: ledger.Paused, when: str) -> str:
    """"paused by nightlab 3m ago: #2: the baseline crashed again (exit code 1): …". The reason comes
    last, not in parentheses: the engine's own may hold some, and ended in two."""
    waits = f", after #{pause.after} finishes" if pause.after else ""
    return f"paused by {pause.by} {when}{waits}: {pause.reason}"


def chart_caption(workspace: Path) -> str:
    """The words beside the progress chart, what a glance at a phone wants, within the current
    setting (the chart shows an earlier one's results too, compared with nothing now):
        41 experiments (3 baseline, 2 repeat, 3 keep, 30 discard, 3 crash)
        best val_bpb 0.987100 (#37), runs vary ± 0.0021
        vs the baseline 1.000000: better by 0.0129 ± 0.0017"""
    store = Store.existing(workspace)
    rows = ledger.experiments(store)
    current = _current(rows)
    older = len(rows) - len(current)
    lines = [f"{counted(len(current), 'experiment')} ({_counts(store, current)})"
             + (f"; {older} of an earlier setting not counted" if older else "")]
    best_exp, best = current_best(rows)
    if best_exp is None:
        return "\n".join([*lines, f"no {_metric_name(store)} yet"])
    night = _night(store, rows)
    noise = None if night is None else night[2]
    vary = ("" if noise is None or noise.sd == 0 else f", repeats gave the same number (± {noise.sd:.4f} assumed)"
            if noise.identical else f", runs vary ± {noise.sd:.4f}" + ("" if noise.measured else f" ({noise.how()})"))
    lines.append(f"best {_metric_name(store)} {_fmt(best)} (#{best_exp.number}){vary}")
    found = _gain(store, rows, night)
    if _unchanged(rows, best_exp):
        lines.append("nothing beat the baseline yet")
    elif found is not None:
        lines.append(f"vs the baseline {_fmt(found[0])}: {gain_words(found[1].gain, found[1].se)}")
    return "\n".join(lines)


def status_line(workspace: Path) -> str:
    """One line for systemd's STATUS=, e.g. "exp #42 running 3m12s · best 0.987100 · focus attention"
    (the run's state worded as `nightlab status` words it: queued, running, finished not recorded)."""
    store = Store.existing(workspace)
    parts = []
    flight = ledger.in_flight(store)
    if len(flight) > 1:
        parts.append(f"{len(flight)} runs in flight ({numbered(c.number for c, _ in flight)})")
    elif flight:
        parts.append(f"exp #{flight[0][0].number} {_elapsed(flight[0][1])}")
    elif ledger.paused(store):
        parts.append("paused")
    else:
        parts.append("idle")
    best = current_best(ledger.experiments(store))[1]
    if best is not None:
        parts.append(f"best {best:.6f}")
    area = ledger.focus(store)
    if area:
        parts.append(f"focus {area}")
    return " · ".join(parts)
