"""The `nightlab` command line as a person types it: options anywhere, a command only for the loop
the user named, clear one-line messages for bad input, --version and help on every option."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nightlab.heartbeat.cli import build_parser, main
from nightlab.heartbeat.lock import DaemonLock
from nightlab.loop.executors import RunSpec
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import DAEMON_CONFIG_KEY
from nightlab.loop.state.ledger import ended_at, started_at
from nightlab.loop.state.store import Store

from tests.conftest import REPO
from tests.fakes.daemon_config import write_daemon_config
from tests.fakes.loop_workspace import make_stub_workspace
from tests.waiting import wait_until


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of its own: a command must never create or touch ~/nightlab-workspace by default."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    store = Store.for_workspace(ws)
    store.set(ledger.AREAS_KEY, ["attention", "optimizer"])
    store.close()
    return ws


def pending(ws: Path) -> list[tuple[str, str]]:
    return [(c.name, c.args) for c in Store.for_workspace(ws).pending_commands()]


def test_ctl_options_may_come_anywhere(loop: Path, tmp_path: Path, home: Path) -> None:
    config = write_daemon_config(tmp_path / "n.toml", loop)
    assert main(["ctl", "focus", "attention", "--config", str(config)]) == 0
    assert main(["ctl", "note", "try", "--workspace", str(loop), "a longer warmup"]) == 0
    assert main(["ctl", "--workspace", str(loop), "note", "--", "--lr 0.1 looked good"]) == 0
    assert main(["ctl", "note", "--workspace", str(loop), "--", "--wd", "0.1 too"]) == 0  # options, then --
    assert main(["ctl", "pause", "--workspace", str(loop)]) == 0
    assert pending(loop) == [("focus", "attention"), ("note", "try a longer warmup"),
                             ("note", "--lr 0.1 looked good"), ("note", "--wd 0.1 too"), ("pause", "")]
    assert not (home / "nightlab-workspace").exists()


def test_a_key_in_a_ctl_note_is_queued_starred(loop: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The note went into the ledger and the next agent's prompt as typed."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-0123456789")
    assert main(["ctl", "note", "--workspace", str(loop), "the key is sk-ant-api03-0123456789"]) == 0
    assert pending(loop) == [("note", "the key is ***")]


def test_a_command_goes_only_to_a_loop_the_user_named(loop: Path, tmp_path: Path, home: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ctl", "pause"], ["status"], ["history", "-n", "3"]):
        assert main(argv) == 2
        assert "which loop? give --config FILE" in capsys.readouterr().err
    missing = tmp_path / "not" / "here"
    assert main(["ctl", "pause", "--workspace", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing} is not a nightlab workspace" in err and len(err.splitlines()) == 1
    config = tmp_path / "first night.toml"  # its workspace not started yet: the command names this file
    config.write_text(f'[workspace]\npath = "{missing}"\n')
    assert main(["status", "--config", str(config)]) == 2
    assert f"start one with `nightlab run --config '{config}'`" in capsys.readouterr().err
    assert not (home / "nightlab-workspace").exists() and not missing.exists()
    assert pending(loop) == []


def test_status_says_when_nightlab_is_not_running(loop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`nightlab status` read the ledger as if the night went on: a daemon that systemd gave up on
    looked like one between two experiments."""
    store = Store.for_workspace(loop)
    store.set("engine.tick", time.time() - 3 * 3600 - 60)
    assert main(["status", "--workspace", str(loop)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[2] == ("nightlab is not running (last active 3h01m ago): no new experiment starts until it does"
                       " (systemctl start nightlab, or nightlab run --config FILE)")
    store.set(DAEMON_CONFIG_KEY, {"path": "/home/me/nightlab.toml", "text": ""})  # as a daemon ran it
    assert main(["status", "--workspace", str(loop)]) == 0
    assert "(systemctl start nightlab, or nightlab run --config /home/me/nightlab.toml)" in capsys.readouterr().out
    with DaemonLock(loop):  # as `nightlab run` holds it
        assert main(["status", "--workspace", str(loop)]) == 0
    assert "not running" not in capsys.readouterr().out


def test_status_says_a_run_that_ended_finished_not_zero_seconds_left(loop: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose command had ended, its result not read yet by an engine busy elsewhere (an agent
    proposing, a keep scored on held-out data), showed "(~0s left)" for as long as that took; and
    systemd's STATUS= line (`systemctl status nightlab`) said "running" all along."""
    store = Store.for_workspace(loop)
    past = ledger.new_candidate(store, "baseline", "base", description="baseline")
    ledger.record_experiment(store, past.id, ledger.Experiment(
        number=past.number, kind="baseline", confirm_of=None, commit="c0ffee", status="keep", metric=1.0,
        metrics={}, best=1.0, confidence=None, description="baseline", hypothesis="", area="", reason="baseline",
        duration_s=3600.0), {})
    cand = ledger.new_candidate(store, "proposal", "c0ffee", phase="running", description="wider MLP")
    ex = LocalExecutor(cpu_slots=1)
    go = loop / "go"
    handle = ex.launch(RunSpec(f"while [ ! -e {go} ]; do sleep 0.05; done", loop, loop / "runs" / "2.log",
                               ex.slots()[0], {}))
    ledger.add_run(store, cand.id, handle.to_json(), handle.slot, str(handle.log_path))
    wait_until(lambda: started_at(handle.log_path), "the run to start")
    assert main(["status", "--workspace", str(loop)]) == 0
    running = capsys.readouterr().out.splitlines()[1]
    assert running.startswith("now: #2 proposal running ") and " left) on cpu0: wider MLP" in running  # the baseline's hour
    assert views.status_line(loop).startswith("exp #2 running ")
    go.touch()
    wait_until(lambda: ended_at(handle.log_path), "the run to end")
    assert main(["status", "--workspace", str(loop)]) == 0
    now = capsys.readouterr().out.splitlines()[1]
    assert now.startswith("now: #2 proposal finished ") and "left" not in now
    assert now.endswith(" ago, result not recorded yet on cpu0: wider MLP"), now
    line = views.status_line(loop)
    assert line.startswith("exp #2 finished ") and line.endswith(" ago, result not recorded yet · best 1.000000"), line


@pytest.mark.parametrize("argv", [
    ["run", "--config", "x.toml", "--max-experiments", "0"],
    ["run", "--config", "x.toml", "--max-experiments", "-2"],
    ["demo", "--experiments", "0"],
    ["ctl", "pause", "--frobnicate"],
])
def test_bad_arguments_are_refused_by_the_parser(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("from 1 to 999999999" in err or "unrecognized arguments" in err)


def test_ctl_without_a_command_asks_only_for_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    # said "the following arguments are required: name, words", though a command may take no words
    with pytest.raises(SystemExit) as exit_:
        main(["ctl"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "[--workspace WORKSPACE] COMMAND [ARG ...]" in " ".join(err.split())  # the usage, however wrapped
    assert err.splitlines()[-1] == "nightlab ctl: error: the following arguments are required: COMMAND"


def test_a_note_in_another_encoding_is_refused_and_nothing_queued(loop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`nightlab ctl note $'caf\xe9'` from a Latin-1 terminal: the byte arrives as a surrogate, which
    the store could not write (a UnicodeEncodeError's traceback)."""
    assert main(["ctl", "note", "caf\udce9", "--workspace", str(loop)]) == 2
    assert capsys.readouterr().err == ("nightlab: the text has a byte that is not UTF-8 after 'note caf'; send it as"
                                       " UTF-8 (from a terminal set to UTF-8, e.g. LANG=C.UTF-8)\n")
    assert pending(loop) == []


@pytest.mark.parametrize(("argv", "said"), [
    (["init", ""], "the workspace path is empty; give a folder, e.g. nightlab init ~/nightlab-workspace"),
    (["init", "", "--config", "n.toml"], "the workspace path is empty; give a folder, e.g. nightlab init ~/nightlab-workspace"),
    (["status", "--workspace", ""], "--workspace is empty; give a folder, e.g. --workspace ~/nightlab-workspace"),
    (["train", "--workspace", ""], "--workspace is empty; give a folder, e.g. --workspace ~/nightlab-workspace"),
    (["run", "--config", ""], "--config is empty; give the TOML file, e.g. --config nightlab.toml"),
])
def test_an_empty_path_is_refused_not_replaced_by_the_default(argv: list[str], said: str, home: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`nightlab init ""` (an unset variable) made ~/nightlab-workspace, or the config's, silently."""
    assert main(argv) == 2
    assert capsys.readouterr().err == f"nightlab: {said}\n"
    assert not (home / "nightlab-workspace").exists()


@pytest.mark.parametrize("command", ["run", "demo", "train"])
def test_a_workspace_that_cannot_be_a_directory_gets_a_message(command: str, tmp_path: Path, home: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    notes = tmp_path / "notes"  # a folder of the user's, not a git repository
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    config = write_daemon_config(tmp_path / "n.toml", tmp_path / "ws")
    for bad, says in ((afile, "is a file; give a directory for the workspace"), (afile / "below", "cannot create the workspace"),
                      (notes, "exists, is not empty and is not a git repository")):
        argv = [command, "--workspace", str(bad)] + (["--config", str(config)] if command == "run" else [])
        out = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", *argv],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 2, out.stderr
        assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]  # no state folder left in it


@pytest.mark.parametrize("source", ["climbmix", "stdlib"])
@pytest.mark.parametrize("shards", ["0", "-2", "100001", "99999999999999999999", "²"])
def test_prepare_with_shards_neither_positive_nor_all_is_refused(source: str, shards: str, home: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # 0 was once taken as "not given": the config's 10 shards were downloaded instead; and the
    # stdlib corpus, which has its own number of shards, was made for any number at all
    from nightlab.trainer import prepare

    made: list[int] = []
    monkeypatch.setattr(prepare, "prepare", lambda source, shards, cache: made.append(shards))
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--source", source, "--shards", shards])
    assert exit_.value.code == 2 and made == []
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nightlab prepare: error: argument --shards: expected -1 (all) or a number from 1 to 100000, got {shards!r}")
    assert not (home / ".cache").exists()
    assert [build_parser().parse_args(["prepare", "--shards", n]).shards for n in ("-1", "1", "100000")] == [-1, 1, 100000]


@pytest.mark.parametrize("command", ["history", "report"])
def test_a_reader_that_stops_early_gets_no_traceback(command: str, loop: Path) -> None:
    """`nightlab history | head`: the pipe is closed before nightlab writes (head has its lines)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", command, "--workspace", str(loop)],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (141, "")


def test_max_experiments_counts_from_now(tmp_path: Path, home: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    config = write_daemon_config(tmp_path / "n.toml", settings.workspace_path,
                                 heartbeat={"check_interval": 0.3, "report_time": ""},
                                 loop={"checkpoint_interval": 0.1})
    store = Store.for_workspace(settings.workspace_path)
    for recorded in (1, 3):  # the baseline, then two more
        more = "1" if recorded == 1 else "2"
        out = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", "run", "--config", str(config),
                              "--max-experiments", more], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert ledger.experiment_count(store) == recorded


def test_version_and_help_on_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("nightlab 0.")

    def walk(parser: argparse.ArgumentParser, where: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{where} {name}")
            elif not action.help:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(build_parser(), "nightlab") == []


def test_train_uses_what_prepare_made(tmp_path: Path, home: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nightlab.trainer.prepare import source_id

    from tests.trainer.test_prepare import _stdlib_paragraphs

    shards = tmp_path / "my shards"
    shards.mkdir()
    paras = _stdlib_paragraphs(400_000)
    for i in range(3):
        pq.write_table(pa.table({"text": paras[i::3]}), shards / f"part_{i}.parquet")
    env = {**os.environ, "HOME": str(home)}

    def nightlab(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", *argv], capture_output=True,
                              text=True, timeout=300, check=False, env=env)

    prepared = nightlab("prepare", "--source", str(shards), "--shards", "2")
    assert prepared.returncode == 0, prepared.stderr
    assert f'[data] source = "{shards}"' in prepared.stdout
    ws = tmp_path / "ws"
    assert nightlab("init", str(ws), "--tag", "t").returncode == 0
    store = Store.for_workspace(ws)  # a 2-step run: this test proves which data it used
    # (the tiny profile's step budget, not TIME_BUDGET, is what ends its runs)
    store.set("workspace.harness_env", {**store.get("workspace.harness_env"), "NIGHTLAB_BUDGET_STEPS": "2",
                                        "NIGHTLAB_EVAL_TOKENS": "2048"})
    store.close()
    trained = nightlab("train", "--profile", "tiny", "--workspace", str(ws))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"data source {shards} (from the last `nightlab prepare`" in trained.stderr
    cache = home / ".cache" / "nightlab"
    data = source_id(str(shards))  # nothing else fetched: the data dir and the harness's training view of it
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [data, f"{data}.train"]
    assert "summary: val_bpb=" in trained.stdout


def test_prepare_with_a_config_names_the_train_command_that_uses_it(tmp_path: Path, home: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """With a config, `nightlab train` reads that config's data cache and source, not what prepare
    made last in the default cache: the line said `nightlab train` uses it, and that trained on the
    config's source (climbmix: a download) or on other data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.trainer.test_prepare import _stdlib_paragraphs

    shards = tmp_path / "shards"
    shards.mkdir()
    paras = _stdlib_paragraphs(200_000)
    for i in range(2):
        pq.write_table(pa.table({"text": paras[i::2]}), shards / f"part_{i}.parquet")
    config = tmp_path / "n.toml"
    config.write_text('[data]\ncache_dir = "cache"\n')  # source: climbmix, the default
    assert main(["prepare", "--config", str(config), "--source", str(shards), "--shards", "1"]) == 0
    said = capsys.readouterr().out
    assert f"`nightlab train --config {config} --source {shards}` uses it" in said
    config.write_text(f'[data]\ncache_dir = "cache"\nsource = "{shards}"\n')
    assert main(["prepare", "--config", str(config)]) == 0
    assert f"`nightlab train --config {config}` uses it" in capsys.readouterr().out


def test_a_demo_run_again_on_its_workspace_goes_on() -> None:
    from nightlab.heartbeat.demo import demo_limit

    assert demo_limit(recorded=0, baseline_runs=3, experiments=5) == 8  # baseline + 5
    assert demo_limit(recorded=1, baseline_runs=3, experiments=5) == 8  # the baseline is finished first
    assert demo_limit(recorded=12, baseline_runs=3, experiments=5) == 17  # not: stop at once on 12 >= 8


def test_init_takes_the_workspace_from_the_config(tmp_path: Path, home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "n.toml"
    config.write_text('[workspace]\npath = "ws"\n')  # relative to the config's folder
    assert main(["init", "--config", str(config), "--tag", "t"]) == 0
    assert f"workspace ready: {tmp_path / 'ws'} on branch autoresearch/t" in capsys.readouterr().out
    assert main(["init"]) == 2
    assert "init: which directory? give it (nightlab init DIR)" in capsys.readouterr().err


def text_folder(folder: Path, offset: int = 0) -> Path:
    """A local data source: two parquet files of stdlib paragraphs (another `offset`, other text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.trainer.test_prepare import _stdlib_paragraphs

    paras = _stdlib_paragraphs(200_000)
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": paras[offset + i::3]}), folder / f"part_{i}.parquet")
    return folder


def test_prepare_after_the_data_folder_moved_names_the_data_dir_left_for_its_old_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A local folder's data dir is named after its path: moved (the same files, `[data] source` pointed
    at the new place), it left the old place's data dir in the cache, disk the user never heard of."""
    from nightlab.trainer.prepare import source_id

    old, new, other = text_folder(tmp_path / "old"), tmp_path / "new", text_folder(tmp_path / "other", 1)
    config = tmp_path / "n.toml"
    config.write_text('[data]\ncache_dir = "cache"\n')
    for source in (old, other):
        assert main(["prepare", "--config", str(config), "--source", str(source)]) == 0
    left = tmp_path / "cache" / source_id(str(old))
    capsys.readouterr()
    old.rename(new)
    assert main(["prepare", "--config", str(config), "--source", str(new)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert len(said) == 1, said  # not the other folder's data
    assert said[0].startswith(f"data: {left} (") and said[0].endswith(
        f" KB) holds these files as prepared at {old}, which is gone: nothing uses it now; `rm -rf {left}` frees it")
    assert left.is_dir()  # said, not removed: the user decides


def test_a_data_dir_left_for_a_moved_folder_is_named_with_its_training_view(tmp_path: Path) -> None:
    """A run made `<data dir>.train` beside the old place's data dir: the line that says how to free it
    removes both, the view found by the one name the harness gives it, and never named as a data dir."""
    from nightlab.heartbeat.health import left_data_dirs
    from nightlab.trainer import prepare

    old, new = text_folder(tmp_path / "old"), tmp_path / "new"
    left = prepare.prepare(str(old), -1, tmp_path / "cache", progress=lambda _: None)
    view = prepare.training_view(left)  # what a night's run made
    old.rename(new)
    here = prepare.prepare(str(new), -1, tmp_path / "cache", progress=lambda _: None)
    assert view == prepare.training_view_dir(left) and prepare.viewed_data_dir(view) == left
    (said,) = left_data_dirs(here)
    assert said.startswith(f"data: {left} (") and said.endswith(f"`rm -rf {left} {view}` frees it")


def test_the_training_views_name_is_written_once() -> None:
    """The harness makes `<data dir>.train`, reads a file's data dir back from it, and the heartbeat
    names it in the low-disk and moved-folder lines: three copies of the suffix, one definition now."""
    code = [p for package in ("trainer", "loop", "heartbeat", "bot") for p in (REPO / package).rglob("*.py")]
    written = [(p.relative_to(REPO).as_posix(), line.split("#")[0].strip()) for p in code
               for line in p.read_text().splitlines() if re.search(r"""\.train["'/]""", line)]
    assert written == [("trainer/prepare.py", 'TRAINING_VIEW_SUFFIX = ".train"')]


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_data_folder_that_is_not_there_is_refused_before_the_workspace_is_made(
        command: str, tmp_path: Path, home: Path) -> None:
    """`nightlab run` with `[data] source` naming a folder that is not there made the workspace (a git
    repository, its baseline commit, the ledger) and only then failed preparing the data."""
    nowhere, ws = tmp_path / "nowhere", tmp_path / "ws"
    config = tmp_path / "n.toml"
    config.write_text(f'[workspace]\npath = "{ws}"\ntag = "test"\n[data]\nsource = "{nowhere}"\n'
                      f'cache_dir = "{tmp_path / "cache"}"\n[trainer]\nprofile = "tiny"\n')
    out = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", command, "--config", str(config)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"nightlab: data source {str(nowhere)!r} is not a directory. Use `climbmix`, `stdlib`, an http(s) mirror"
        " URL, or a folder of parquet shards with a `text` column."), out.stderr
    assert not ws.exists() and not (tmp_path / "cache").exists()
