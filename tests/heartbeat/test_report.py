"""`nightlab report` on the nights a user may wake up to: nothing yet, the baseline alone, crashes only."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from nightlab.bot.digest import describe
from nightlab.bot.format import Text
from nightlab.heartbeat import cli
from nightlab.heartbeat.engine_child import EngineProcess
from nightlab.heartbeat.jobs import Heartbeat
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import DigestSettings, settings_from_table
from nightlab.loop.state.store import Store


def record(store: Store, kind: str, status: str, metric: float | None, reason: str,
           finished_at: float | None = None, confirm_of: int | None = None) -> None:
    """One experiment as the engine records it (the fields the report reads)."""
    cand = ledger.new_candidate(store, kind, "base", description=kind, confirm_of=confirm_of)
    exp = ledger.Experiment(
        number=cand.number, kind=kind, confirm_of=confirm_of, commit="c0ffee", status=status, metric=metric,
        metrics={}, best=metric, confidence=None, description=kind, hypothesis="", area="", reason=reason,
        finished_at=time.time() if finished_at is None else finished_at,
    )
    ledger.record_experiment(store, cand.id, exp, {"number": cand.number, "status": status})


def report(tmp_path: Path, capsys: pytest.CaptureFixture[str], *rows: tuple[str, str, float | None, str]) -> str:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    for row in rows:
        record(store, *row)
    store.close()
    assert cli.main(["report", "--workspace", str(ws)]) == 0
    return capsys.readouterr().out


def test_an_empty_night(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report(tmp_path, capsys).splitlines()[-1] == "No experiments yet."


def test_a_night_of_crashes_says_there_is_no_result_and_what_to_run(tmp_path: Path, capsys) -> None:
    text = report(tmp_path, capsys, ("baseline", "crash", None, "exit code 2"),
                  ("baseline", "crash", None, "no val_bpb in the log"))
    # was a baseline, a best and a gain of "—", and "the baseline's runs ... measure the noise"
    assert "- no val_bpb yet: all 2 experiments failed before giving one (see What did not" \
           " work); `nightlab train --config FILE` runs one and shows all its output" in text
    assert "baseline val_bpb: —" not in text and "gain: —" not in text and "measure the noise" not in text
    assert "- #2 crash: baseline — no val_bpb in the log" in text


def test_the_baseline_alone_has_no_gain_yet(tmp_path: Path, capsys) -> None:
    text = report(tmp_path, capsys, ("baseline", "keep", 1.0, "baseline"))
    assert "- best val_bpb: 1.000000 (#1, `c0ffee`)" in text
    assert "- gain: none yet, the best is the baseline" in text  # was "+0.000000 ± 0.004243 (+0.00%, n = 1 vs 1)"


def test_a_change_kept_on_its_third_run_is_one_keep_and_its_first_runs_did_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rule re-runs a change it cannot decide yet; each run is a row. The report said
    "2 repeat" and no keep for a change kept on its third run, and listed its first two runs under
    "What did not work"."""
    text = report(tmp_path, capsys, ("baseline", "keep", 1.0, "baseline"),
                  ("proposal", "discard", 0.99, "re-running to decide: better by 0.0100 ± 0.0085"),
                  ("confirm", "discard", 0.985, "re-running to decide: better by 0.0125 ± 0.0067", None, 2),
                  ("confirm", "keep", 0.985, "better by 0.0133 ± 0.0041", None, 2),
                  ("proposal", "discard", 0.984, "re-running to decide: better by 0.0018 ± 0.0056"),
                  ("confirm", "discard", 1.5, "not better: worse by 0.2562 ± 0.0042", None, 5))
    assert "- experiments: 6 (1 baseline, 3 repeat, 1 keep, 1 discard) over" in text
    did_not_work = text.split("## What did not work\n\n", 1)[1].splitlines()
    assert did_not_work == ["- #6 discard: confirm — not better: worse by 0.2562 ± 0.0042"]
    # the history says so too, as each digest did ("undecided, runs again", not "discard")
    assert cli.main(["history", "--workspace", str(tmp_path / "ws")]) == 0
    statuses = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert statuses == ["keep", "undecided", "undecided", "keep", "undecided", "discard"]
    # and so do its filters: --status discard listed the runs every other view calls undecided
    for status, numbers in (("discard", ["#6"]), ("undecided", ["#2", "#3", "#5"])):
        assert cli.main(["history", "--workspace", str(tmp_path / "ws"), "--status", status]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == numbers


def daemon_heartbeat(ws: Path, store: Store) -> Heartbeat:
    """The daemon's heartbeat with the report at 07:30 UTC, as one start of `nightlab run` schedules it."""
    settings = settings_from_table({"heartbeat": {"report_time": "07:30"}})
    beat = Heartbeat(settings, ws, store, LocalExecutor(), EngineProcess(["true"]), Notifier(None),
                     on_engine_stopped=lambda *_: None)
    beat.schedule(BackgroundScheduler(timezone=UTC))
    return beat


def reports(store: Store) -> list[str]:
    return [e.payload["markdown"] for e in store.events_after(0) if e.kind == "report"]


def test_a_daemon_down_at_the_report_time_sends_the_missed_report_once(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    night = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    record(store, "baseline", "keep", 1.0, "baseline", finished_at=night.timestamp())
    # down from 07:00 to 08:10: the restart sends the 07:30 report, a second restart does not
    assert daemon_heartbeat(ws, store).missed_report(night.replace(hour=8, minute=10))
    assert not daemon_heartbeat(ws, store).missed_report(night.replace(hour=8, minute=15))
    assert len(reports(store)) == 1
    # the next morning on time; a restart within the same minute sends nothing more
    beat = daemon_heartbeat(ws, store)
    assert beat.daily_report(datetime(2026, 12, 2, 7, 30, 0, 5000, tzinfo=UTC))
    assert not daemon_heartbeat(ws, store).missed_report(datetime(2026, 12, 2, 7, 30, 40, tzinfo=UTC))
    assert not beat.daily_report(datetime(2026, 12, 2, 7, 30, 50, tzinfo=UTC))  # fired twice: once
    assert len(reports(store)) == 2


def test_a_report_sent_by_an_older_nightlab_counts_as_sent(tmp_path: Path) -> None:
    """Upgraded after this morning's report (it kept no time of it): a restart must not send it again."""
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    now = datetime.now(UTC)
    beat = daemon_heartbeat(ws, store)
    due = beat.report_due(now)
    assert due is not None
    record(store, "baseline", "keep", 1.0, "baseline", finished_at=(due - timedelta(hours=1)).timestamp())
    store.emit("report", markdown="# nightlab report", chart_path=None)  # as the older daemon did, at its time
    assert not beat.missed_report(now)
    assert len(reports(store)) == 1


def test_a_first_start_after_the_report_time_sends_no_report(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    start = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
    assert not daemon_heartbeat(ws, store).missed_report(start)  # nothing ran before 07:30
    record(store, "baseline", "keep", 1.0, "baseline", finished_at=(start + timedelta(minutes=5)).timestamp())
    assert not daemon_heartbeat(ws, store).missed_report(start + timedelta(hours=1))
    assert reports(store) == []


def test_the_morning_report_says_what_happened_since_the_last_one(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    monday = datetime(2026, 11, 30, 7, 30, tzinfo=UTC)
    record(store, "baseline", "keep", 1.0, "baseline", finished_at=(monday - timedelta(hours=5)).timestamp())
    beat = daemon_heartbeat(ws, store)
    assert beat.daily_report(monday)
    record(store, "proposal", "discard", 1.01, "not better", finished_at=(monday + timedelta(hours=15)).timestamp())
    record(store, "proposal", "crash", None, "exit code 1", finished_at=(monday + timedelta(hours=16)).timestamp())
    assert beat.daily_report(monday + timedelta(days=1))
    ledger.set_paused(store, "telegram:42", "looking at the logs", None)
    assert beat.daily_report(monday + timedelta(days=2))  # a night with nothing run: said, and why
    tuesday, wednesday = reports(store)[1:]
    last = time.strftime("%a %H:%M", time.localtime(monday.timestamp()))
    assert f"- since the last report ({last}): 2 experiments (1 discard, 1 crash)" in tuesday.splitlines()
    paused = time.strftime("%a %H:%M", time.localtime(ledger.paused(store).since))  # type: ignore[union-attr]
    last = time.strftime("%a %H:%M", time.localtime((monday + timedelta(days=1)).timestamp()))
    assert (f"- since the last report ({last}): no experiments; the loop is paused by telegram:42"
            f" since {paused}: looking at the logs") in wednesday.splitlines()


def test_the_morning_report_reads_on_a_phone(tmp_path: Path) -> None:
    """A chat shows markdown as it is: the report's seven-column table wrapped into a jumble of
    pipes, its headings and commits came with # and backticks."""
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    store.set("workspace.branch", "autoresearch/dec01")
    record(store, "baseline", "keep", 1.0, "baseline")
    record(store, "proposal", "keep", 0.99, "better by 0.0100 ± 0.0030")
    record(store, "proposal", "crash", None, "exit code 1")
    daemon_heartbeat(ws, store).daily_report()
    (event,) = [e for e in store.events_after(0) if e.kind == "report"]
    (message, _chart) = describe(event, DigestSettings())
    assert isinstance(message, Text)
    lines = "".join(span.text for span in message.spans).splitlines()
    assert lines[0] == "📋 nightlab report — autoresearch/dec01"
    assert "- #2 c0ffee val_bpb 0.990000, gain 0.010000: proposal" in lines
    assert "- #3 crash: proposal — exit code 1" in lines
    assert not [line for line in lines if line.startswith(("#", "|")) or "`" in line], lines
    assert "| 2 | `c0ffee` |" in event.payload["markdown"]  # the report's file keeps its table


def test_a_change_whose_re_run_the_night_did_not_reach_is_undecided_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A night stopped (--max-experiments, the demo) between a run the rule could not decide and
    its re-run: the report counted a discard and listed it under "What did not work", though the
    digest said it runs again and it may yet be kept."""
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    record(store, "baseline", "keep", 1.0, "baseline")
    record(store, "proposal", "discard", 0.999, "re-running to decide: better by 0.0010 ± 0.0034")
    ledger.new_candidate(store, "confirm", "base", phase="committed", confirm_of=2, description="confirm #2")
    store.close()
    assert cli.main(["report", "--workspace", str(ws)]) == 0
    text = capsys.readouterr().out
    assert "- experiments: 2 (1 baseline, 1 undecided) over" in text
    assert text.split("## What did not work\n\n", 1)[1].splitlines() == ["- nothing failed"]
    # the lines of /status and the history say so too, not "discard"
    assert cli.main(["history", "--workspace", str(ws)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("#2 undecided ")
    assert "  #2 undecided " in views.status_text(ws)


def test_ctl_plot_on_a_console_night_writes_the_chart_and_says_where(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Without a chat, `nightlab ctl plot` answered "the progress chart is sent by the chat bot": a
    console night had no way to see its chart. It is written beside the reports and its path said."""
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    assert cli.main(["ctl", "plot", "--workspace", str(ws)]) == 0
    assert capsys.readouterr().out == "no experiments yet: nothing to plot\n"
    record(store, "baseline", "keep", 1.0, "baseline")
    record(store, "proposal", "discard", 1.1, "not better")
    store.close()
    assert cli.main(["ctl", "plot", "--workspace", str(ws)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("progress chart: ") and said.endswith(".png\n")
    chart = Path(said.removeprefix("progress chart: ").strip())
    assert chart.parent == ws / ".nightlab" / "reports" and chart.read_bytes().startswith(b"\x89PNG")
