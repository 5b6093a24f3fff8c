"""`nightlab doctor` through the real CLI: the machine's GPUs come from the fake nvidia-smi
(tests/fakes/bin), torch is this environment's (a CPU build) or an interpreter without it, the chat
channels are the fake Telegram and Slack servers reached with the real client libraries."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nightlab.heartbeat import cli
from nightlab.heartbeat.doctor import diagnose
from nightlab.loop.executors.sandbox import probe
from nightlab.loop.state.config import settings_from_table
from nightlab.trainer import prepare


def write_config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    table: dict[str, Any] = {"workspace": {"path": str(tmp_path / "ws")},
                             "data": {"source": "stdlib", "cache_dir": str(tmp_path / "cache")}, **sections}
    lines = []
    for name, values in table.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path = tmp_path / "nightlab.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value).lower() if isinstance(value, bool) else str(value)


def doctor(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["doctor", "--config", str(config)])
    return code, capsys.readouterr().out


def lines(out: str, start: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(start)]


def test_a_cpu_box_can_run_the_tiny_profile(tmp_path: Path, fake_gpus, capsys) -> None:
    fake_gpus([])  # nvidia-smi there, but no driver answering
    code, out = doctor(write_config(tmp_path), capsys)
    assert code == 0, out
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    assert lines(out, "WARN gpu") == [f"WARN gpu       no NVIDIA GPU: nvidia-smi failed (exit 9): {said}"]
    assert "(CPU-only build)" in lines(out, "ok   torch")[0] and "no GPU: runs train on the CPU" in out
    assert lines(out, "ok   profile")[0].startswith("ok   profile   'tiny': auto: no GPU visible")
    assert "In force: 40 optimizer steps (trainer.time_budget for seconds), seq 256, 8,192 eval tokens" in out
    assert lines(out, "WARN data")[0].startswith("WARN data      shards not prepared yet")
    # the command to type names this config (it said `--config <file>`)
    assert f"or now: nightlab prepare --config {tmp_path / 'nightlab.toml'}\n" in out
    assert lines(out, "ok   git") and out.rstrip().endswith("runs can start (2 warning(s))")
    assert lines(out, "ok   sandbox") == [f"ok   sandbox   the scorer confines the model's processes (landlock ABI"
                                          f" {prepare.landlock_abi()}, seccomp on {os.uname().machine})"]
    assert lines(out, "ok   packages") == ["ok   packages  each run checks the scorer's Python for files changed since"
                                           " its change began"]
    assert probe() or lines(out, "ok   runs") == ["ok   runs      each run sees the workspace's state and git"
                                                  " read-only (its training the data and the code that scores too),"
                                                  " and only its own processes"]


def test_a_box_without_find_is_told_its_runs_do_not_check_the_scorers_python(tmp_path: Path, capsys, monkeypatch) -> None:
    """`prepare.run` checks the scorer's Python with `find`; without it each run only says so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    code, out = doctor(write_config(tmp_path), capsys)
    assert code == 0, out
    assert lines(out, "WARN packages") == ["WARN packages  no `find` here: a run does not check the scorer's Python for"
                                           " changed files, and a .pth file a run or an agent plants in site-packages"
                                           " would run in the scorer"]
    assert "install findutils (sudo apt-get install -y findutils)" in out


def test_a_sandbox_turned_off_is_a_warning(tmp_path: Path, fake_gpus, capsys, monkeypatch) -> None:
    fake_gpus([])
    monkeypatch.setenv("NIGHTLAB_SANDBOX", "0")
    code, out = doctor(write_config(tmp_path), capsys)
    assert code == 0 and lines(out, "WARN sandbox") == [
        "WARN sandbox   NIGHTLAB_SANDBOX=0: the scorer's model processes run unconfined; a model can hand its calls"
        " to the probe's process or read the validation rows"], out
    assert lines(out, "WARN runs") == ["WARN runs      NIGHTLAB_SANDBOX=0: runs are not sandboxed: a run can write"
                                       " the ledger (.nightlab/state.db) the keep rule reads, and fake a win"], out


def test_a_gpu_that_torch_cannot_use_fails_with_what_to_do(tmp_path: Path, fake_gpus, capsys) -> None:
    fake_gpus(["NVIDIA H100 80GB HBM3"])  # this venv's torch is a CPU build
    code, out = doctor(write_config(tmp_path, trainer={"time_budget": 120}), capsys)
    assert code == 1
    assert lines(out, "ok   gpu") == ["ok   gpu       0: NVIDIA H100 80GB HBM3 (80 GB, sm90), bf16 yes, driver 550.54.15"]
    (torch,) = lines(out, "FAIL torch")
    assert "cannot use the GPU nvidia-smi shows (a CPU-only build)" in torch
    assert "pip install --force-reinstall torch==2.13.0" in out.split(torch, 1)[1].splitlines()[1]
    assert "'default': auto: NVIDIA H100 80GB HBM3 (80 GB, sm90) -> the 'default' tier" in out
    assert "time budget 120 s, seq 2048" in out  # the config's budget over the profile's
    assert lines(out, "WARN attention")[0].startswith("WARN attention Hopper GPU but no FA3 kernel in the local cache")
    assert out.rstrip().endswith("1 problem(s) would make runs fail")


def test_a_cached_fa3_kernel_is_found(tmp_path: Path, fake_gpus, capsys, monkeypatch) -> None:
    from huggingface_hub.file_download import repo_folder_name
    from nightlab.loop.kernel_prefetch import FA3_KERNELS

    fake_gpus(["NVIDIA H200"])
    cache = tmp_path / "kernels"
    monkeypatch.setenv("KERNELS_CACHE", str(cache))
    repo = cache / repo_folder_name(repo_id=FA3_KERNELS[1].repo, repo_type="kernel")  # the laid-out cache
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / FA3_KERNELS[1].branch).write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    _, out = doctor(write_config(tmp_path), capsys)
    assert lines(out, "ok   attention") == [f"ok   attention FA3 kernel cached locally ({FA3_KERNELS[1]})"]


def test_a_t4_gets_the_fp16_variant(tmp_path: Path, fake_gpus, capsys) -> None:
    fake_gpus(["Tesla T4"])
    _, out = doctor(write_config(tmp_path), capsys)
    assert "0: Tesla T4 (15 GB, sm75), no bf16: trains in fp16" in out
    assert "'16gb-fp16': auto: Tesla T4 (15 GB, sm75) -> the '16gb' tier, fp16 because sm75 has no bf16" in out
    assert not lines(out, "WARN profile")
    _, out = doctor(write_config(tmp_path, trainer={"profile": "default"}), capsys)  # too big for a T4
    assert "'default-fp16': trainer.profile = 'default', fp16 because sm75 has no bf16" in out
    assert "auto would pick '16gb-fp16'" in out
    warning = ("WARN profile   'default-fp16' needs about 49 GB by its estimate, the GPU has 15 GB: train.py "
               "lowers the micro-batch to fit (slower steps)")
    assert lines(out, "WARN profile") == [warning]


def test_sizes_and_a_timeout_the_profile_cannot_run_with_fail(tmp_path: Path, fake_gpus, capsys) -> None:
    fake_gpus([])  # the tiny profile: 1,024 tokens a step
    code, out = doctor(write_config(tmp_path, trainer={"max_seq_len": 7, "eval_tokens": 5}), capsys)
    assert code == 1
    assert lines(out, "FAIL profile") == [
        "FAIL profile   a context of 7 tokens does not divide the 1,024 tokens of a 'tiny' step (TOTAL_BATCH_SIZE):"
        " every run would stop at its start",
        "FAIL profile   5 eval tokens are less than one row of 7: every run would fail when it is scored"]
    assert "-> trainer.max_seq_len = a power of two" in out and "-> trainer.eval_tokens = at least 7" in out
    fake_gpus(["NVIDIA H100 80GB HBM3"])  # `default` keeps train.py's own TOTAL_BATCH_SIZE (2**19)
    _, out = doctor(write_config(tmp_path, trainer={"max_seq_len": 1000}), capsys)
    assert lines(out, "FAIL profile")[0].startswith("FAIL profile   a context of 1000 tokens does not divide the"
                                                    " 524,288 tokens of a 'default' step")
    _, out = doctor(write_config(tmp_path, trainer={"max_seq_len": 1024, "eval_tokens": 1024}), capsys)
    assert not lines(out, "FAIL profile")
    # the config's own check sees only an explicit trainer.time_budget; this is the profile's 300 s
    _, out = doctor(write_config(tmp_path, heartbeat={"run_timeout": 100}), capsys)
    assert lines(out, "FAIL profile") == ["FAIL profile   heartbeat.run_timeout = 100 s is shorter than the 300 s budget"
                                          " + 120 s of start-up and eval: every run would be killed as a timeout"]


def test_a_program_the_config_starts_that_is_not_installed_fails(tmp_path: Path, fake_gpus, capsys) -> None:
    fake_gpus([])
    config = write_config(tmp_path, project={"run_command": "./train.sh --fast", "editable": ["train.sh"],
                                             "checks_command": "nosuch-pytest -q", "score_command": "./score.sh"},
                          proposer={"kind": "agent"}, **{"proposer.agent": {"command": "nosuch-agent -p {prompt_file}"}})
    code, out = doctor(config, capsys)
    assert code == 1
    assert lines(out, "FAIL programs") == [  # the checks and the scorer fail every run's decision too
        "FAIL programs  project.run_command starts './train.sh', which is not an executable file",
        "FAIL programs  project.checks_command starts 'nosuch-pytest', which is not on PATH",
        "FAIL programs  project.score_command starts './score.sh', which is not an executable file",
        "FAIL programs  proposer.agent.command starts 'nosuch-agent', which is not on PATH"]
    subprocess.run(["git", "init", "-q", str(tmp_path / "ws")], check=True)  # the user's project
    (tmp_path / "ws" / "train.sh").write_text("#!/bin/sh\n")
    (tmp_path / "ws" / "train.sh").chmod(0o755)
    config = write_config(tmp_path, project={"run_command": "./train.sh --fast", "editable": ["train.sh"],
                                             "protected": []},
                          proposer={"kind": "agent"},  # the shell's business: not checked
                          **{"proposer.agent": {"command": "AGENT=1 $SHELL {prompt_file}"}})
    code, out = doctor(config, capsys)
    assert not lines(out, "FAIL programs") and code == 0, out


def test_on_slurm_a_run_program_missing_here_is_a_warning_not_a_failure(tmp_path: Path, fake_gpus, capsys) -> None:
    """A node runs the run and its score with its own PATH (a module's program, a node's conda): the
    engine starts with them, and doctor failed the config for this host's PATH. The checks, which the
    engine runs here, still fail."""
    fake_gpus([])
    config = write_config(tmp_path, project={"run_command": "nosuch-train fit.py", "checks_command": "nosuch-lint",
                                             "editable": ["fit.py"], "protected": []},
                          executor={"kind": "slurm"}, **{"executor.slurm": {"shared_dir": str(tmp_path)}})
    _, out = doctor(config, capsys)
    assert lines(out, "FAIL programs") == ["FAIL programs  project.checks_command starts 'nosuch-lint', which is not on PATH"]
    assert lines(out, "WARN programs") == ["WARN programs  project.run_command starts 'nosuch-train', which is not on"
                                           " PATH here"]
    assert "-> a Slurm node's PATH decides there: install it on the nodes, or give its full path" in out


def test_a_project_file_the_repository_lacks_fails_before_the_workspace_is_made(
        tmp_path: Path, fake_gpus, capsys) -> None:
    """Doctor said "runs can start", then `nightlab run` refused to make the workspace."""
    fake_gpus([])
    subprocess.run(["git", "init", "-q", str(tmp_path / "ws")], check=True)  # the user's project
    (tmp_path / "ws" / "fit.py").write_text("print('---')\nprint('accuracy: 0.5')\n")
    config = write_config(tmp_path, project={"run_command": "python fit.py", "editable": ["fit.py", "model.py"],
                                             "protected": ["score.py"]})
    code, out = doctor(config, capsys)
    assert code == 1
    assert lines(out, "FAIL project") == [f"FAIL project   {tmp_path / 'ws'}: the files named in [project]"
                                          " editable/protected do not exist: model.py, score.py"]
    assert "-> fix the config or add them to the repository" in out


def test_an_editable_file_that_does_not_parse_is_named_with_its_line(tmp_path: Path, fake_gpus, capsys) -> None:
    """Doctor said "runs can start" of a train.py an editor left a stray character in: the engine's
    start then refused it (the search), or every run crashed on it (an agent's night)."""
    fake_gpus([])
    ws = tmp_path / "ws"
    subprocess.run(["git", "init", "-q", str(ws)], check=True)  # the user's project
    (ws / "fit.py").write_text("LR = 0.1 +\nprint('---')\n")
    (ws / "notes.md").write_text("not Python, not read as Python\n")
    config = write_config(tmp_path, project={"run_command": "python fit.py", "editable": ["fit.py", "notes.md"],
                                             "protected": []})
    code, out = doctor(config, capsys)
    assert code == 1
    assert lines(out, "FAIL python") == [f"FAIL python    {ws / 'fit.py'} is not valid Python (line 1: invalid syntax)"]
    assert "-> fix it (an edit not committed yet shows in `git diff`; commit the fix)" in out
    (ws / "fit.py").write_text("LR = 0.1\nprint('---')\n")
    code, out = doctor(config, capsys)
    assert not lines(out, "FAIL python") and code == 0, out


def test_missing_gpu_torch_git_disk_and_data_are_failures(tmp_path: Path, fake_gpus, capsys, monkeypatch) -> None:
    fake_gpus(["NVIDIA GeForce RTX 4090"])
    (tmp_path / "ws" / ".nightlab" / "agent").mkdir(parents=True)
    (tmp_path / "ws" / ".nightlab" / "agent" / "stdout.log").write_bytes(b"x" * 2 * 2**20)
    config = write_config(tmp_path, executor={"gpus": [3]}, heartbeat={"min_free_disk_gb": 1e9},
                          data={"source": str(tmp_path / "nowhere"), "cache_dir": str(tmp_path / "cache")})
    code, out = doctor(config, capsys)
    assert code == 1
    # what of nightlab's holds the space, and what may go
    assert f"nightlab's files: {tmp_path / 'ws'}/.nightlab/agent 2 MB (the agent's last output: safe to delete)" in out
    assert "FAIL gpu       executor.gpus = [3] but nvidia-smi failed (exit 6): No devices were found" in out
    assert len(lines(out, "FAIL disk")) == 2 and "under heartbeat.min_free_disk_gb" in out
    assert f"FAIL data      data.source = '{tmp_path / 'nowhere'}' is not a directory" in out
    empty = tmp_path / "bin"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")  # a folder of the user's: `nightlab run` would refuse it
    code, out = doctor(write_config(tmp_path, workspace={"path": str(tmp_path / "notes")}), capsys)
    assert code == 1 and lines(out, "FAIL workspace") == [
        f"FAIL workspace {tmp_path / 'notes'} exists, is not empty and is not a git repository; pick a new or empty"
        " directory, or run `git init` there first to use your own project"]
    monkeypatch.setenv("PATH", str(empty))  # no git (and no nvidia-smi) on this PATH
    code, out = doctor(write_config(tmp_path), capsys)
    assert code == 1 and lines(out, "FAIL git")[0].endswith("git is not installed (the loop commits every experiment)")


def shard_folder(folder: Path, *names: str) -> Path:
    """A source folder of small shards `<name>.parquet`, the last by name the validation shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    for name in names:
        pq.write_table(pa.table({"text": [f"{name} text {i}" for i in range(300)]}), folder / f"{name}.parquet")
    return folder


def test_a_bad_file_in_the_source_folder_fails_as_the_run_would(tmp_path: Path, fake_gpus, capsys) -> None:
    """The data was prepared, then the folder's last file replaced by one that is not parquet:
    doctor said `ok data`, and `nightlab run`, which prepares the folder again first, refused it."""
    from nightlab.trainer import prepare

    fake_gpus([])
    folder = shard_folder(tmp_path / "my shards", "a", "b")
    config = write_config(tmp_path, data={"source": str(folder), "cache_dir": str(tmp_path / "cache")})
    prepare.prepare(str(folder), -1, tmp_path / "cache", progress=lambda _: None, tokenizer_max_chars=10_000)
    code, out = doctor(config, capsys)
    assert code == 0 and lines(out, "ok   data")
    (folder / "b.parquet").write_text("not parquet\n")
    code, out = doctor(config, capsys)
    assert code == 1 and lines(out, "FAIL data") == [
        f"FAIL data      {folder / 'b.parquet'} is not a usable shard: no parquet magic at the start. Shards need"
        " rows with a string column `text`."]


def test_a_source_folder_changed_since_prepare_is_said_with_what_the_run_will_do(
    tmp_path: Path, fake_gpus, capsys
) -> None:
    """A folder's file removed after `prepare`: doctor said `ok data`, and `nightlab run` then made
    another file the validation shard, trained the tokenizer again and measured the best again."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nightlab.trainer import prepare

    fake_gpus([])
    folder = shard_folder(tmp_path / "shards", "a", "b", "c")
    config = write_config(tmp_path, data={"source": str(folder), "cache_dir": str(tmp_path / "cache")})
    data_dir = prepare.prepare(str(folder), -1, tmp_path / "cache", progress=lambda _: None)
    (folder / "c.parquet").unlink()
    code, out = doctor(config, capsys)
    assert code == 0 and out[out.index("WARN data"):].split("\n", 2)[:2] == [
        f"WARN data      {folder}'s files changed since it was prepared in {data_dir}; the tokenizer must be trained"
        f" again: it was trained on the text of {folder / 'b.parquet'}, the validation shard now, and must not have"
        " seen the text that scores the runs",
        "               -> `nightlab run` prepares it again first and trains the tokenizer again; runs are then"
        f" scored on other text: a new setting, the best is measured again; or now: nightlab prepare --config {config}"]
    prepare.prepare(str(folder), -1, tmp_path / "cache", progress=lambda _: None)
    assert lines(doctor(config, capsys)[1], "ok   data")
    pq.write_table(pa.table({"text": ["d text"] * 300}), folder / "d.parquet")  # sorts last: validates
    assert lines(doctor(config, capsys)[1], "WARN data") == [
        f"WARN data      {folder}'s files changed since it was prepared in {data_dir}; d.parquet validates now, not"
        " b.parquet"]
    (folder / "d.parquet").unlink()
    pq.write_table(pa.table({"text": ["ab text"] * 300}), folder / "ab.parquet")  # a training file more
    out = doctor(config, capsys)[1]
    assert "the same validation shard: the same setting" in out and "validates now" not in out


def test_a_relative_source_folder_is_found_from_any_directory(tmp_path: Path, fake_gpus, capsys, monkeypatch) -> None:
    """data.source = "my shards" was looked for in the shell's directory, unlike workspace.path and
    data.cache_dir (the config's folder): doctor from elsewhere said it was not a directory, and
    `nightlab run --config` from elsewhere refused it."""
    from nightlab.trainer import prepare

    fake_gpus([])
    folder = shard_folder(tmp_path / "my shards", "a", "b")
    prepare.prepare(str(folder), -1, tmp_path / "cache", progress=lambda _: None, tokenizer_max_chars=10_000)
    config = write_config(tmp_path, data={"source": "my shards", "cache_dir": "cache"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out = doctor(config, capsys)
    data_dir = tmp_path / "cache" / prepare.source_id(str(folder))
    assert code == 0 and lines(out, "ok   data") == [f"ok   data      2 shards and the tokenizer in {data_dir}"], out


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """`folder` as this user cannot write it: by its mode, or for root (who writes through any mode)
    immutable (chattr +i), where the file system and the container allow it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("root writes into any folder, and chattr +i is refused here")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("blocked", ["the data dir's folder", "the view", "a file in the view's place"])
def test_a_training_view_that_cannot_be_made_fails_with_what_to_do(
    tmp_path: Path, fake_gpus, capsys, blocked: str
) -> None:
    """Data prepared by another user in a folder this one cannot write: doctor said `ok data` and
    `runs can start`, and every run failed making the data dir train.py reads, next to the data dir."""
    from nightlab.trainer import prepare

    fake_gpus([])
    folder = shard_folder(tmp_path / "shards", "a", "b")
    config = write_config(tmp_path, data={"source": str(folder), "cache_dir": str(tmp_path / "cache")})
    data_dir = prepare.prepare(str(folder), -1, tmp_path / "cache", progress=lambda _: None, tokenizer_max_chars=10_000)
    view = prepare.training_view_dir(data_dir)
    if blocked == "a file in the view's place":
        view.write_text("")
        code, out = doctor(config, capsys)
        assert code == 1 and out[out.index("FAIL data"):].split("\n", 2)[:2] == [
            f"FAIL data      {view}, where runs put the data dir as train.py reads it, is not a folder",
            f"               -> remove {view}; `nightlab run` makes it"]
        return
    if blocked == "the view":
        prepare.training_view(data_dir)  # made by a run of the user who prepared the data
    target, verb = (view, "update") if blocked == "the view" else (data_dir.parent, "make")
    with unwritable(target):
        code, out = doctor(config, capsys)
    assert code == 1 and lines(out, "ok   data")  # the data itself reads well
    said = out[out.index("FAIL data"):].split("\n", 2)[:2]
    assert said[0].startswith(f"FAIL data      cannot {verb} {view}, the data dir as train.py reads it, kept next to"
                              f" the data dir: {target} cannot be written ("), said
    assert said[1] == (f"               -> make {target} writable for this user, or set data.cache_dir to a folder it"
                       " can write (then `nightlab prepare`)")
    assert out.rstrip().endswith("1 problem(s) would make runs fail")
    assert [p.name for p in target.iterdir() if p.name.startswith(".nightlab")] == []
    assert lines(doctor(config, capsys)[1], "FAIL data") == []  # writable again


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python")
def test_an_interpreter_without_torch(tmp_path: Path, fake_gpus) -> None:
    python = "/usr/bin/python3"
    if os.path.realpath(python) == os.path.realpath(sys.executable) or shutil.which("python3") is None:
        pytest.skip("the system python is this one")
    fake_gpus([])
    report = diagnose(settings_from_table({"workspace": {"path": str(tmp_path / "ws")}}), python=python)
    (torch,) = [f for f in report.findings if f.topic == "torch"]
    if torch.level != "fail":
        pytest.skip("the system python has torch")
    assert "ModuleNotFoundError: No module named 'torch'" in torch.text and "pip install torch" in torch.fix
    assert report.exit_code == 1


def test_one_process_probes_an_interpreter_s_torch_once(tmp_path: Path, fake_gpus) -> None:
    """Each diagnosis started a child importing torch (~1.5 s); an interpreter's torch does not
    change while one process asks again."""
    fake_gpus([])
    count = tmp_path / "probes"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho probed >> {count}\n"
                      'echo \'{"python": "3.11.7", "torch": "2.13.0+cpu", "cuda": null, "cuda_available": false, '
                      '"devices": [], "mps": false, "flex": true}\'\n')
    python.chmod(0o755)
    settings = settings_from_table({"workspace": {"path": str(tmp_path / "ws")}})
    first, second = (diagnose(settings, python=str(python)) for _ in range(2))
    assert [f for f in first.findings if f.topic == "torch"] == [f for f in second.findings if f.topic == "torch"]
    assert "torch 2.13.0+cpu (CPU-only build)" in next(f.text for f in second.findings if f.topic == "torch")
    assert count.read_text() == "probed\n"


def test_each_chat_channel_is_reached(tmp_path, fake_gpus, capsys, monkeypatch, telegram, slack) -> None:
    fake_gpus([])
    monkeypatch.setenv("TG", telegram.token)
    monkeypatch.setenv("SB", slack.bot_token)
    monkeypatch.setenv("SA", slack.app_token)
    config = write_config(
        tmp_path, telegram={"token": {"env": "TG"}, "operators": [1], "api_base": telegram.url},
        slack={"bot_token": {"env": "SB"}, "app_token": {"env": "SA"}, "operators": ["U1"], "api_base": slack.api_url})
    code, out = doctor(config, capsys)
    assert code == 0, out
    assert lines(out, "ok   channels")[0].startswith("ok   channels  telegram: reachable, bot @")
    assert lines(out, "ok   channels")[1].startswith("ok   channels  slack: reachable, bot ")
    monkeypatch.setenv("TG", "999:wrong-token")  # the fake answers 401
    monkeypatch.setenv("SB", "xoxb-wrong")
    code, out = doctor(config, capsys)
    assert code == 1
    (tg,) = [line for line in lines(out, "FAIL channels") if "telegram" in line]
    assert "not reachable" in tg and "999:wrong-token" not in out
    assert any("slack: not reachable" in line and "invalid_auth" in line for line in lines(out, "FAIL channels"))
    telegram.down()
    monkeypatch.setenv("TG", telegram.token)
    code, out = doctor(config, capsys)
    assert code == 1 and any("telegram: not reachable" in line for line in lines(out, "FAIL channels"))
    assert telegram.token not in out


def test_each_missing_token_is_a_finding_of_its_own(tmp_path, fake_gpus, capsys, monkeypatch) -> None:
    fake_gpus([])
    for name in ("NO_TG", "NO_SB", "NO_SA"):
        monkeypatch.delenv(name, raising=False)
    config = write_config(tmp_path, telegram={"token": {"env": "NO_TG"}, "operators": [1]},
                          slack={"bot_token": {"env": "NO_SB"}, "app_token": {"env": "NO_SA"}, "operators": ["U1"]})
    code, out = doctor(config, capsys)
    assert code == 1
    assert [line.split("'")[1] for line in lines(out, "FAIL channels")] == ["NO_TG", "NO_SB", "NO_SA"]


def test_an_api_base_that_answers_html_is_a_finding_without_a_traceback(tmp_path: Path) -> None:
    """A proxy or a wrong api_base answers an HTML error page: the client libraries log a traceback
    before they raise. In a terminal (no logging set up) that printed; only the finding should."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501, HTML
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        config = write_config(tmp_path, project={"run_command": "true"},  # no torch probe: channels only
                              telegram={"token": {"env": "TG"}, "operators": [1], "api_base": base},
                              slack={"bot_token": {"env": "SB"}, "app_token": {"env": "SA"}, "operators": ["U1"],
                                     "api_base": base + "api/"})
        env = {**os.environ, "TG": "123:SECRET", "SB": "xoxb-SECRET", "SA": "xapp-SECRET"}
        out = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", "doctor", "--config", str(config)],
                             capture_output=True, text=True, env=env, timeout=120, check=False)
    finally:
        server.shutdown()
    assert out.returncode == 1 and out.stderr == ""
    assert [line.split("(")[0] for line in lines(out.stdout, "FAIL channels")] == [
        "FAIL channels  telegram: not reachable ", "FAIL channels  slack: not reachable "]
    assert "SECRET" not in out.stdout


def test_run_logs_the_findings_and_stops_after_the_configured_experiments(tmp_path: Path) -> None:
    import subprocess

    from nightlab.loop.state import ledger
    from nightlab.loop.state.store import Store

    from tests.fakes.daemon_config import write_daemon_config
    from tests.fakes.loop_workspace import make_stub_workspace

    ws = make_stub_workspace(tmp_path).workspace_path
    config = write_daemon_config(tmp_path / "nightlab.toml", ws, loop={"checkpoint_interval": 0.1, "max_experiments": 1},
                                 heartbeat={"check_interval": 0.3, "min_free_disk_gb": 0.0, "report_time": ""})
    done = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "doctor: ok   git       git version" in done.stderr and "doctor: ok   channels  none configured" in done.stderr
    assert len(ledger.experiments(Store.for_workspace(ws))) == 1  # [loop] max_experiments = 1, no flag


def test_the_doctor_never_imports_torch_itself(tmp_path: Path, fake_gpus) -> None:
    import subprocess

    fake_gpus(["NVIDIA H100 80GB HBM3"])
    code = ("import sys\nfrom nightlab.heartbeat.doctor import diagnose\nfrom nightlab.loop.state.config import load_settings\n"
            f"report = diagnose(load_settings({str(write_config(tmp_path))!r}))\n"
            "assert any(f.topic == 'torch' for f in report.findings)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_an_older_harness_is_said_and_an_edited_one_fails_with_what_to_do(tmp_path: Path, fake_gpus, capsys) -> None:
    from nightlab.loop.state.config import load_settings
    from nightlab.loop.state.store import Store
    from nightlab.loop.workspace import PROTECTED_KEY, init_workspace, sha256_file

    fake_gpus([])
    config = write_config(tmp_path)
    repo = tmp_path / "ws"
    init_workspace(repo, "t", load_settings(config), say=lambda _: None)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam"]

    def put(text: str, message: str) -> None:
        (repo / "prepare.py").chmod(0o644)
        (repo / "prepare.py").write_text(text)
        subprocess.run([*git, message], check=True)

    installed = (repo / "prepare.py").read_text()
    put(installed.replace("\nSCORE_VERSION = 1\n", "\n"), "an older nightlab's harness")
    store = Store.for_workspace(repo)
    store.set(PROTECTED_KEY, {**store.get(PROTECTED_KEY), "prepare.py": sha256_file(repo / "prepare.py")})
    code, out = doctor(config, capsys)
    assert code == 0 and lines(out, "ok   harness") == [
        "ok   harness   prepare.py: not this nightlab's copy yet, brought up to it when the loop starts (a commit"
        " on the session branch, said in chat)"]
    put(installed + "\n# the owner's\n", "the owner's edit")
    code, out = doctor(config, capsys)
    assert code == 1 and lines(out, "FAIL protected") == [
        "FAIL protected changed since nightlab recorded them: prepare.py; the loop does not start on them"]
    assert f"or take this nightlab's harness: `cp -f {Path(cli.__file__).parents[1] / 'trainer' / 'prepare.py'}" in out
