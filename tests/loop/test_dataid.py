"""What the built-in trainer's runs are scored on is part of their setting (loop/dataid.py,
loop/hardware.py): a data dir keeps its name when `nightlab prepare` puts other text in it (a local
folder's is named after the folder's path, and its last file validates), so a validation shard or
a tokenizer that changed under that name would have had its results compared with the best
measured on the old ones.

The workspaces are the built-in trainer's (its harness copied in by init) with the stub trainer as
train.py and as the run; the data dirs are made by the real `prepare` from a local folder."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nightlab.bot.digest import describe
from nightlab.loop import dataid, hardware
from nightlab.loop.engine import Engine
from nightlab.loop.engine.startup import startup
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger
from nightlab.loop.state.config import DigestSettings, Settings, settings_from_table
from nightlab.loop.state.store import Event, Store
from nightlab.loop.workspace import PROTECTED_KEY, init_workspace, open_workspace, sha256_file
from nightlab.trainer import prepare as P

from tests.fakes.loop_workspace import STUB, Gates, make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.waiting import wait_until

RUN = f"{sys.executable} train.py"
CHARS = 300_000  # tokenizer training text: the full vocabulary in a fraction of a second
SYLLABLES = ["ka", "to", "ri", "mu", "sen", "del", "pha", "qua", "xi", "zo", "ber", "lin", "gor", "vet", "ul", "om"]


@pytest.fixture(autouse=True)
def _one_gpu(fake_gpus: Any) -> None:
    """The slot's class is known ahead and the same on every machine."""
    fake_gpus(["NVIDIA H100 80GB HBM3"])


def _shard(path: Path, seed: int) -> None:
    """600 documents of made-up words, other ones per seed."""
    r = random.Random(seed)
    docs = [" ".join("".join(r.choice(SYLLABLES) for _ in range(r.randint(1, 4))) for _ in range(200))
            for _ in range(600)]
    pq.write_table(pa.table({"text": docs}), path)


def _folder(tmp_path: Path, files: int) -> Path:
    """A user's folder of parquet shards (the last by name validates)."""
    folder = tmp_path / "shards"
    folder.mkdir(exist_ok=True)
    for i in range(files):
        _shard(folder / f"part_{i:02d}.parquet", i)
    return folder


def _prepare(folder: Path, cache: Path, chars: int = CHARS) -> Path:
    return P.prepare(str(folder), -1, cache, progress=lambda _: None, tokenizer_max_chars=chars)


def _workspace(tmp_path: Path, older_harness: bool = False, mode: str = "waves") -> Settings:
    """The built-in trainer's workspace, the stub as train.py; `older_harness`: its prepare.py as a
    nightlab from before SCORE_VERSION left it (recorded as its own copy)."""
    repo = tmp_path / "ws"
    settings = settings_from_table({
        "workspace": {"path": str(repo), "tag": "test"},
        "trainer": {"profile": "tiny"},
        "loop": {"checkpoint_interval": 0.1, "baseline_runs": 1, "remeasure_every": 0, "mode": mode},
    }, source="<test>")
    init_workspace(repo, "test", settings, say=lambda _: None)
    (repo / "train.py").chmod(0o644)
    shutil.copyfile(STUB, repo / "train.py")  # the stub trains: only the setting matters here
    if older_harness:
        (repo / "prepare.py").chmod(0o644)
        (repo / "prepare.py").write_bytes((repo / "prepare.py").read_bytes().replace(b"\nSCORE_VERSION = 1\n", b"\n"))
        store = Store.for_workspace(repo)
        store.set(PROTECTED_KEY, {**store.get(PROTECTED_KEY), "prepare.py": sha256_file(repo / "prepare.py")})
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "stub"],
                   check=True)
    return settings


def _engine(settings: Settings, data_dir: Path, slots: int = 1, steps: list[dict[str, Any]] | None = None,
            **env: str) -> Engine:
    ws = dataclasses.replace(open_workspace(settings.workspace_path, settings), run_command=RUN)
    # by default worse: discarded, the best stays
    proposer = ScriptedProposer(steps or [{"set": {"VAL_BPB": [1.5]}}])
    return Engine(settings, ws, LocalExecutor(gpus=tuple(range(slots))), proposer,
                  {P.ENV_DATA_DIR: str(data_dir), **env},
                  threading.Event())


def _alerts(store: Store) -> list[Event]:
    return [e for e in store.events_after(0) if e.kind == "alert"]


def test_a_validation_shard_added_to_the_folder_is_a_new_setting_and_the_best_is_measured_again(
    tmp_path: Path,
) -> None:
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    assert _engine(settings, data_dir).run(2) == 0  # the baseline (kept) and a worse proposal
    store = Store.for_workspace(settings.workspace_path)
    one, two = ledger.experiments(store)
    assert (one.kind, one.status, two.status, two.setting) == ("baseline", "keep", "discard", one.setting)
    # the user adds a file to the folder and prepares again: the same data dir, another validation shard
    _, val_before = P.split_shards(data_dir)
    _shard(folder / "part_03.parquet", 3)
    assert _prepare(folder, tmp_path / "cache") == data_dir
    _, val_after = P.split_shards(data_dir)
    assert val_after != val_before and val_after.read_bytes() != val_before.read_bytes()

    assert _engine(settings, data_dir).run(3) == 0  # the ledger's count: one more
    three = ledger.experiments(store)[-1]
    # the best measured again on the new text, not a proposal judged against #1's number
    assert (three.kind, three.commit, three.status) == ("baseline", one.commit, "keep")
    assert three.setting != one.setting
    [alert] = _alerts(store)
    assert alert.payload["text"] == (
        "the validation shard changed since the last run, so runs from here on are a new setting: the best is"
        " measured again and no result is compared with one from before")
    assert "🚨 the validation shard changed since the last run" in str(describe(alert, DigestSettings()))
    startup(_engine(settings, data_dir).ctx)  # a restart: said once
    assert len(_alerts(store)) == 1


def test_a_validation_file_rewritten_during_a_night_is_a_new_setting_from_the_next_wave(tmp_path: Path) -> None:
    """A folder's files are linked into the data dir, not copied: its last file rewritten while the
    loop ran (no `nightlab prepare`, no restart) changed the text every later run was scored on, and
    the night went on judging them against the best measured on the old text."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    engine = _engine(settings, data_dir)
    assert engine.run(2) == 0  # the baseline (kept) and a worse proposal
    _shard(folder / "part_02.parquet", 99)  # the user regenerates the validation split
    assert engine.run(3) == 0  # the same engine: no start in between
    one, _, three = ledger.experiments(engine.store)
    assert (three.kind, three.commit, three.status) == ("baseline", one.commit, "keep")
    assert three.setting != one.setting
    [alert] = _alerts(engine.store)
    assert alert.payload["text"].startswith("the validation shard changed since the last run")


def test_data_prepared_again_during_a_pause_is_a_new_setting_from_the_resume_on(tmp_path: Path) -> None:
    """A data problem pauses the loop and asks for `nightlab prepare`; the repair may bring another
    validation shard. Before, the engine found the data only at its start: the runs after /resume
    were judged against the best measured on the old shard."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    engine = _engine(settings, data_dir)
    store, before = engine.store, engine.ctx.setting
    ledger.set_paused(store, "the engine", "data problem: a shard is damaged", None)
    engine.checkpoint()
    _shard(folder / "part_03.parquet", 3)
    _prepare(folder, tmp_path / "cache")
    engine.checkpoint()
    assert engine.ctx.setting == before  # still paused: nothing runs, nothing changes
    ledger.resume(store)
    engine.checkpoint()
    assert engine.ctx.setting != before
    assert hardware.setting_changes(store, before, engine.ctx.setting) == ["the validation shard changed"]


def test_a_tokenizer_trained_again_is_a_new_setting(tmp_path: Path) -> None:
    """Moved aside and trained again (`nightlab prepare`) on other text: the same vocabulary size,
    other merges, so every val_bpb moves."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    before = _engine(settings, data_dir).ctx.setting
    tokenizer = data_dir / P.TOKENIZER_FILE
    old = tokenizer.read_bytes()
    tokenizer.rename(tmp_path / "tokenizer-aside.json")
    _prepare(folder, tmp_path / "cache", chars=CHARS * 5 // 6)
    assert tokenizer.read_bytes() != old
    assert P.Tokenizer.from_directory(tokenizer.parent).get_vocab_size() == P.VOCAB_SIZE
    after = _engine(settings, data_dir).ctx.setting
    assert after != before
    assert hardware.setting_changes(Store.for_workspace(settings.workspace_path), before, after) == ["the tokenizer changed"]
    # trained again on the same text (what a tokenizer's data problem asks for): the same merges, only
    # the training's timing note differs in the file, and the setting is the one before
    tokenizer.rename(tmp_path / "tokenizer-aside-2.json")
    _prepare(folder, tmp_path / "cache", chars=CHARS * 5 // 6)
    spec = json.loads(tokenizer.read_text())
    assert spec == json.loads((tmp_path / "tokenizer-aside-2.json").read_text()) | {"trained_on": spec["trained_on"]}
    spec["trained_on"]["seconds"] += 1.0  # as a training that took longer writes it (the clock, not the text)
    tokenizer.write_text(json.dumps(spec))
    assert _engine(settings, data_dir).ctx.setting == after


def test_a_tokenizer_trained_again_off_what_validates_now_is_one_new_setting_said_once(tmp_path: Path) -> None:
    """The folder's first file renamed to sort last: the text the tokenizer was trained on validates
    now, and `prepare` trains it again without it (other merges). One new setting for both, said once;
    prepared again unchanged, nothing is trained and the setting stays."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    assert _engine(settings, data_dir).run(1) == 0
    store = Store.for_workspace(settings.workspace_path)
    [one] = ledger.experiments(store)
    tokenizer = (data_dir / P.TOKENIZER_FILE).read_bytes()
    (folder / "part_00.parquet").rename(folder / "part_99.parquet")  # CHARS: the only file it read
    _prepare(folder, tmp_path / "cache")
    assert (data_dir / P.TOKENIZER_FILE).read_bytes() != tokenizer
    engine = _engine(settings, data_dir)
    assert hardware.setting_changes(store, one.setting, engine.ctx.setting) == [
        "the validation shard and the tokenizer changed"]
    startup(engine.ctx)
    tokenizer = (data_dir / P.TOKENIZER_FILE).read_bytes()
    _prepare(folder, tmp_path / "cache")
    assert (data_dir / P.TOKENIZER_FILE).read_bytes() == tokenizer
    again = _engine(settings, data_dir)
    assert again.ctx.setting == engine.ctx.setting
    startup(again.ctx)
    assert [a.payload["text"].split(",")[0] for a in _alerts(store)] == [
        "the validation shard and the tokenizer changed since the last run"]


def test_the_same_data_is_the_same_setting_and_a_file_seen_before_is_not_read_again(tmp_path: Path) -> None:
    data_dir = _prepare(_folder(tmp_path, 3), tmp_path / "cache")
    settings = _workspace(tmp_path)
    first = _engine(settings, data_dir).ctx
    assert _engine(settings, data_dir).ctx.setting == first.setting and first.data is not None
    # the validation shard rewritten in place to the same size and time: an engine start does not
    # read it again, it only compares the file's path, size, time and inode with what it hashed
    _, validation = P.split_shards(data_dir)
    seen = validation.stat()
    text = bytearray(validation.read_bytes())
    text[len(text) // 2] ^= 1
    with validation.open("r+b") as f:
        f.write(text)
    os.utime(validation, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    assert _engine(settings, data_dir).ctx.data == first.data
    os.utime(validation, ns=(seen.st_atime_ns, seen.st_mtime_ns + 1))  # touched: hashed again
    assert _engine(settings, data_dir).ctx.data != first.data


def test_a_setting_recorded_before_the_data_counted_keeps_its_digest_and_a_later_change_is_new(
    tmp_path: Path,
) -> None:
    """Upgrading nightlab costs no baseline: the first start takes the data it finds as the recorded
    setting's; only a change after that is a new setting."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    store = Store.for_workspace(settings.workspace_path)
    env = {P.ENV_DATA_DIR: str(data_dir)}
    # what an older nightlab recorded: the same setting without the data, the baseline and #2 under it
    legacy = hardware.record_setting(store, RUN, env, "1")
    assert _engine(settings, data_dir).run(2) == 0
    assert {e.setting for e in ledger.experiments(store)} == {legacy}
    recorded = store.get(hardware.SETTING_KEY + legacy)
    store.set(hardware.SETTING_KEY + legacy, {k: v for k, v in recorded.items() if k != "data"})
    store.delete(dataid.FILES_KEY)

    engine = _engine(settings, data_dir)
    assert engine.ctx.setting == legacy and engine.run(3) == 0
    three = ledger.experiments(store)[-1]
    assert (three.kind, three.setting) == ("proposal", legacy) and _alerts(store) == []  # no baseline again
    assert store.get(hardware.SETTING_KEY + legacy)["data"] == engine.ctx.data.to_json()  # adopted
    assert _engine(settings, data_dir).ctx.setting == legacy  # and kept at the next start
    _shard(folder / "part_03.parquet", 3)
    _prepare(folder, tmp_path / "cache")
    changed = _engine(settings, data_dir)
    assert changed.ctx.setting != legacy
    startup(changed.ctx)
    assert [a.payload["text"].split(",")[0] for a in _alerts(store)] == ["the validation shard changed since the last run"]


def test_a_moved_data_cache_is_the_same_setting(tmp_path: Path) -> None:
    data_dir = _prepare(_folder(tmp_path, 3), tmp_path / "cache")
    settings = _workspace(tmp_path)
    before = _engine(settings, data_dir).ctx.setting
    shutil.copytree(tmp_path / "cache", tmp_path / "elsewhere" / "cache", symlinks=True)
    moved = tmp_path / "elsewhere" / "cache" / data_dir.name
    assert _engine(settings, moved).ctx.setting == before


def test_a_moved_source_folder_is_the_same_setting_when_its_files_are_the_same(tmp_path: Path) -> None:
    """The data dir is named after the folder's path: a folder moved and the config pointed at its new
    path gave a new data dir, the tokenizer trained again (the same merges), and a new setting without
    a word: the best was measured again (a 5-minute GPU run) and an undecided candidate's repeat was
    discarded, 'not compared'. What runs are scored on is the same, so the setting is."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    assert _engine(settings, data_dir).run(1) == 0
    store = Store.for_workspace(settings.workspace_path)
    [one] = ledger.experiments(store)
    moved = folder.rename(tmp_path / "elsewhere")
    new_dir = _prepare(moved, tmp_path / "cache")
    assert new_dir != data_dir  # the tokenizer trained again in it
    assert _engine(settings, new_dir).run(2) == 0
    two = ledger.experiments(store)[-1]
    assert (two.kind, two.setting) == ("proposal", one.setting) and _alerts(store) == []
    # moved with another validation file: what is scored on changed, a new setting, said
    _shard(moved / "part_02.parquet", 99)
    moved = moved.rename(tmp_path / "third")
    changed = _engine(settings, _prepare(moved, tmp_path / "cache"))
    assert hardware.setting_changes(store, one.setting, changed.ctx.setting) == ["the validation shard changed"]


def test_a_project_of_the_users_has_no_data_in_its_setting(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    ws = open_workspace(settings.workspace_path, settings)
    env = {P.ENV_DATA_DIR: str(tmp_path / "nothing-here")}  # its own variable, whatever it names
    engine = Engine(settings, ws, LocalExecutor(gpus=(0,)), ScriptedProposer([]), env, threading.Event())
    assert engine.ctx.data is None and engine.ctx.setting == hardware.setting_of(ws.run_command, env)


def test_data_changed_at_a_harness_upgrade_is_said_in_the_upgrade_s_one_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path, older_harness=True)
    older = _engine(settings, data_dir)
    older.ctx.upgrade_waiting = False  # the older nightlab had no upgrade to make
    assert older.run(1) == 0
    _shard(folder / "part_03.parquet", 3)
    _prepare(folder, tmp_path / "cache")
    store = Store.for_workspace(settings.workspace_path)
    startup(_engine(settings, data_dir).ctx)
    [upgraded] = [e for e in store.events_after(0) if e.kind == "harness_upgraded"]
    assert "; what it measures changed (score version not declared -> 1, the validation shard changed), so runs from" \
        " here on are a new setting" in upgraded.payload["text"] and upgraded.payload["setting_changed"]
    assert _alerts(store) == []
    startup(_engine(settings, data_dir).ctx)
    assert _alerts(store) == [] and [e.kind for e in store.events_after(0)].count("harness_upgraded") == 1


def test_data_that_cannot_be_read_at_a_start_changes_no_setting(tmp_path: Path) -> None:
    """Broken after `prepare` (a source folder renamed, a tokenizer removed): the runs fail on it and
    name the file, the loop pauses; the start itself neither stops nor makes a new setting."""
    folder = _folder(tmp_path, 3)
    data_dir = _prepare(folder, tmp_path / "cache")
    settings = _workspace(tmp_path)
    before = _engine(settings, data_dir).ctx
    folder.rename(tmp_path / "gone")  # the data dir's links to it dangle
    (data_dir / P.TOKENIZER_FILE).unlink()
    assert _engine(settings, data_dir).ctx.setting == before.setting
    fresh = _workspace(tmp_path / "another")  # nothing remembered: no data in the setting, as before
    assert _engine(fresh, data_dir).ctx.data is None


def test_a_last_experiment_without_a_run_is_no_change_of_setting(tmp_path: Path) -> None:
    """A proposal that failed before any run is recorded without a setting: what a start compares
    with is the last experiment that ran."""
    data_dir = _prepare(_folder(tmp_path, 3), tmp_path / "cache")
    settings = _workspace(tmp_path)
    engine = _engine(settings, data_dir)
    engine.ctx.proposer = ScriptedProposer([{"raise": "the agent found nothing to try"}])
    assert engine.run(2) == 0
    store = Store.for_workspace(settings.workspace_path)
    assert [e.setting == "" for e in ledger.experiments(store)] == [False, True]
    startup(_engine(settings, data_dir).ctx)
    assert _alerts(store) == []


def test_a_budget_the_config_changed_is_said_once_with_its_values(tmp_path: Path) -> None:
    """A value the config gives runs (here the time budget) changed between two starts: a new
    setting, as for other data. It came unsaid: the best was measured again, and a researcher who
    had forgotten the edit saw a baseline in the middle of the night without a word why."""
    data_dir = _prepare(_folder(tmp_path, 3), tmp_path / "cache")
    settings = _workspace(tmp_path)
    assert _engine(settings, data_dir, NIGHTLAB_TIME_BUDGET="300").run(2) == 0
    engine = _engine(settings, data_dir, NIGHTLAB_TIME_BUDGET="600", NIGHTLAB_EVAL_TOKENS="4096")
    assert engine.run(3) == 0
    one, _, three = ledger.experiments(engine.store)
    assert (three.kind, three.commit, three.setting != one.setting) == ("baseline", one.commit, True)
    [alert] = _alerts(engine.store)
    assert alert.payload["text"] == (
        "eval_tokens default -> 4096, time_budget 300 -> 600 since the last run, so runs from here on are a new"
        " setting: the best is measured again and no result is compared with one from before")
    startup(_engine(settings, data_dir, NIGHTLAB_TIME_BUDGET="600", NIGHTLAB_EVAL_TOKENS="4096").ctx)
    assert len(_alerts(engine.store)) == 1  # a restart says nothing again
    # the best measured under the new budget is no gain over the old one's: not "🏆 NEW BEST"
    finished = {e.payload["number"]: e.payload for e in engine.store.events_after(0) if e.kind == "experiment_finished"}
    assert (finished[1]["new_best"], finished[3]["new_best"]) == (True, False)


@contextmanager
def _async_night(tmp_path: Path, fake_gpus: Any, gates: Gates, slots: int, steps: list[dict[str, Any]]) -> Iterator[
        tuple[Engine, Path]]:
    """An asynchronous night on `slots` GPUs, its engine in a thread: (the engine, the user's folder
    of shards, whose last file validates). Every proposal takes the first of `steps` while nothing
    but the baseline is recorded (the scripted proposer counts the history)."""
    fake_gpus(["NVIDIA H100 80GB HBM3"] * slots)
    folder = _folder(tmp_path, 3)
    engine = _engine(_workspace(tmp_path, mode="async"), _prepare(folder, tmp_path / "cache"), slots, steps)
    thread = threading.Thread(target=engine.run, args=(None,), daemon=True)
    thread.start()
    try:
        yield engine, folder
    finally:
        engine.stop.set()
        gates.open(*range(1, 20))
        thread.join(30)


def _phase(store: Store, number: int) -> str:
    """Candidate #number's phase ("ended": its run exited, not decided yet; "": none yet)."""
    cand = ledger.candidate_numbered(store, number)
    if cand is None:
        return ""
    run = ledger.run_for_candidate(store, cand.id) if cand.phase == "running" else None
    return "ended" if run is not None and run.state == "exited" else cand.phase


def test_in_async_mode_a_validation_shard_rewritten_mid_run_is_noticed_and_no_result_is_judged_across_it(
    tmp_path: Path, fake_gpus: Any, gates: Gates,
) -> None:
    """The asynchronous mode has no moment between waves: the engine found the data only at its
    start, so every run after a rewritten validation shard was judged against the best measured on
    the old text. Now the data is found again at each launch and each decision: a run the change
    happened under measured neither text (it is re-run), and the best is measured on the new one
    before the re-run is compared with it."""
    with _async_night(tmp_path, fake_gpus, gates, 2, [{"set": {"VAL_BPB": [0.5]}}]) as (engine, folder):
        store = engine.store
        gates.open(1)
        wait_until(lambda: [_phase(store, n) for n in (2, 3)] == ["running"] * 2, "#2 and #3 running")
        _shard(folder / "part_02.parquet", 99)  # the user regenerates the validation split
        gates.open(2)
        wait_until(lambda: ledger.experiment_count(store) == 2, "#2 recorded")
        gates.open(4)  # the best measured again, on the new text
        wait_until(lambda: ledger.experiment_count(store) == 3, "#4 recorded")
        gates.open(5)  # #2's change run again, now on the new text
        wait_until(lambda: ledger.experiment_count(store) == 4, "#5 recorded")
    one, two, four, five = ledger.experiments(store)[:4]  # a next proposal may be recorded already
    # #2 started on the old text and was scored on the new: compared with neither best
    assert (two.number, two.status, two.metric, two.setting) == (2, "discard", None, one.setting)
    assert two.reason.startswith("not compared: the validation shard changed while it ran")
    finished = next(e.payload for e in store.events_after(0) if e.kind == "experiment_finished" and e.payload["number"] == 2)
    assert (two.best, finished["best"]) == (None, None)  # not its own 0.5: no best was measured after it
    assert (four.number, four.kind, four.commit, four.status) == (4, "baseline", one.commit, "keep")
    assert four.setting != one.setting
    assert (five.number, five.kind, five.confirm_of, five.setting) == (5, "confirm", 2, four.setting)
    assert five.status == "keep" and five.best == 0.5 and not five.reason.startswith("not compared")
    [alert] = _alerts(store)
    assert alert.payload["text"].startswith("the validation shard changed since the last run")


def test_in_async_mode_a_re_run_that_ends_before_the_best_is_measured_on_the_new_data_waits_for_it(
    tmp_path: Path, fake_gpus: Any, gates: Gates,
) -> None:
    """Each result is decided as it ends: #2's re-run on the new text, ending before the best's
    measurement there, found nothing on its setting to be compared with, and the change was lost.
    While it waits its slot runs the next candidate (it stood idle until the measurement ended)."""
    with _async_night(tmp_path, fake_gpus, gates, 3, [{"set": {"VAL_BPB": [0.5]}}]) as (engine, folder):
        store = engine.store
        gates.open(1)
        wait_until(lambda: [_phase(store, n) for n in (2, 3, 4)] == ["running"] * 3, "#2, #3 and #4 running")
        _shard(folder / "part_02.parquet", 99)
        gates.open(2)  # #5 measures the best on the new text, #6 re-runs #2's change
        wait_until(lambda: _phase(store, 5) == "running", "#5 running")
        gates.open(3)  # frees the slot #6 runs in
        wait_until(lambda: _phase(store, 6) == "running", "#6 running")
        gates.open(6)
        wait_until(lambda: _phase(store, 6) != "running", "#6 ended")
        wait_until(lambda: _phase(store, 7) == "running", "#7 running in #6's slot while #6 waits")
        assert (_phase(store, 5), _phase(store, 6)) == ("running", "ended")
        # #3's change runs again too, after the same measurement: #5, not a second one
        assert [c.number for c in ledger.open_candidates(store) if c.kind == "baseline"] == [5]
        gates.open(5)
        wait_until(lambda: ledger.experiment_count(store) == 5, "#5 and #6 recorded")
    five, six = ledger.experiments(store)[3:5]  # a next proposal may be recorded already
    assert (five.number, five.kind, five.status, six.number, six.kind) == (5, "baseline", "keep", 6, "confirm")
    assert six.setting == five.setting and six.status == "keep" and six.best == 0.5


def test_a_run_in_flight_at_a_restart_with_another_config_is_judged_on_the_setting_it_ran_under(
    tmp_path: Path, gates: Gates,
) -> None:
    """Only the data changing under a run makes it measure neither setting: a config edited before
    a restart changed nothing for the run in flight, which ran with the values it started with."""
    data_dir = _prepare(_folder(tmp_path, 3), tmp_path / "cache")
    settings = _workspace(tmp_path)
    first = _engine(settings, data_dir, steps=[{"set": {"VAL_BPB": [0.5]}}])
    thread = threading.Thread(target=first.run, args=(None,), daemon=True)
    thread.start()
    try:
        gates.open(1)
        wait_until(lambda: _phase(first.store, 2) == "running", "#2 running")
    finally:
        first.stop.set()
        thread.join(30)
    restarted = _engine(settings, data_dir)
    restarted.ctx.env = {**restarted.ctx.env, "NIGHTLAB_TIME_BUDGET": "7"}  # the config's budget, edited
    restarted.ctx.identify_data()
    assert restarted.ctx.setting != first.ctx.setting
    gates.open(2)
    assert restarted.run(2) == 0
    one, two = ledger.experiments(restarted.store)
    assert (two.setting, two.status, two.metric) == (one.setting, "keep", 0.5), two.reason
