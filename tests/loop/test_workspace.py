from __future__ import annotations

import datetime
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from nightlab.loop.ratchet import Git
from nightlab.loop.state.errors import UserError
from nightlab.loop.workspace import BRANCH_PREFIX, default_tag, init_workspace, open_workspace, protected_mismatches

from tests.fakes.loop_workspace import git_out, make_stub_workspace, stub_settings


def test_adopts_a_users_repository(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    repo = settings.workspace_path
    ws = open_workspace(repo, settings)
    assert ws.branch == "autoresearch/test" and git_out(repo, "branch", "--show-current") == ws.branch
    assert ws.profile == "custom" and ws.editable == ("train.py",) and ws.protected == ("prepare.py",)
    assert "program.md" in git_out(repo, "ls-files")  # the directives are versioned with the code
    assert not os.stat(repo / "prepare.py").st_mode & stat.S_IWUSR
    assert git_out(repo, "status", "--porcelain") == ""  # .nightlab/ is excluded, not committed
    assert ".nightlab" not in git_out(repo, "ls-files")
    assert protected_mismatches(ws) == []
    (repo / "prepare.py").chmod(0o644)
    (repo / "prepare.py").write_text("tampered")
    assert protected_mismatches(ws) == ["prepare.py"]


def test_init_is_idempotent(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    head = git_out(settings.workspace_path, "rev-parse", "HEAD")
    said: list[str] = []
    again = init_workspace(settings.workspace_path, "other", settings, say=said.append)
    assert again.branch == "autoresearch/test" and git_out(settings.workspace_path, "rev-parse", "HEAD") == head
    # another tag is no new session, and is said so (it was kept quiet: the night went on the old branch)
    assert said == [f"{settings.workspace_path} is already a nightlab workspace (branch autoresearch/test, profile"
                    " custom); its session goes on there, not on autoresearch/other: a workspace holds one session"
                    " (its ledger); for a new one give another workspace path"]
    said.clear()
    init_workspace(settings.workspace_path, "test", settings, say=said.append)
    assert said == [f"{settings.workspace_path} is already a nightlab workspace (branch autoresearch/test, profile"
                    " custom)"]


def test_refuses_a_dirty_tree_naming_the_files(tmp_path: Path) -> None:
    repo = tmp_path / "ws"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "train.py").write_text("x = 1\n")
    (repo / "prepare.py").write_text("")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"], check=True)
    (repo / "train.py").write_text("x = 2\n")
    (repo / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"changes nightlab did not make: notes.txt, train.py; commit them") as err:
        init_workspace(repo, "t", stub_settings(repo), say=lambda _: None)
    # the advice, followed as printed, keeps the new file too (`commit -am` left it out, `clean -fd` deleted it)
    aside = re.search(r"put them aside \((git -C \S+ stash -u);", str(err.value))
    assert aside is not None, str(err.value)
    subprocess.run(shlex.split(aside.group(1)), check=True, capture_output=True)
    assert Git(repo).changed_files() == []
    subprocess.run(["git", "-C", str(repo), "stash", "pop", "-q"], check=True)
    assert (repo / "notes.txt").read_text() == "mine" and (repo / "train.py").read_text() == "x = 2\n"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: (p.mkdir(), (p / "x").write_text("x")), "is not empty and is not a git repository"),
        (lambda p: p.write_text("x"), "is a file"),
    ],
)
def test_bad_paths_are_clear_errors(tmp_path: Path, setup, message: str) -> None:
    path = tmp_path / "ws"
    setup(path)
    with pytest.raises(UserError, match=message):
        init_workspace(path, "t", stub_settings(path), say=lambda _: None)


def test_a_workspace_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "a-file" / "ws"  # as `nightlab init /data/ws` with /data not a folder of ours
    with pytest.raises(UserError) as err:
        init_workspace(path, "t", stub_settings(path), say=lambda _: None)
    assert str(err.value) == f"cannot create the workspace {path}: Not a directory; give a directory you can write to"


def test_missing_project_files_and_bad_tag(tmp_path: Path) -> None:
    path = tmp_path / "ws"
    settings = stub_settings(path, project={"editable": ["model.py"]})
    with pytest.raises(UserError, match="do not exist: model.py, prepare.py"):
        init_workspace(path, "t", settings, say=lambda _: None)
    with pytest.raises(UserError, match="valid git branch name"):
        init_workspace(tmp_path / "other", "a..b", stub_settings(tmp_path / "other"), say=lambda _: None)
    with pytest.raises(UserError, match="run `nightlab init"):
        open_workspace(tmp_path / "nowhere", settings)


def test_a_tag_git_refuses_says_what_a_tag_may_hold_and_leaves_no_repository(tmp_path: Path) -> None:
    """`nightlab init --tag 'my tag'` said only "does not make a valid branch name", after making
    the folder a git repository: the next try found a repository nobody asked for."""
    path = tmp_path / "ws"
    with pytest.raises(UserError, match=r"^tag 'my tag' does not make a valid git branch name \(autoresearch/my tag\):"
                                        r" use letters, digits, '-', '_' or '\.', e.g. 'nov23' \(--tag, or \[workspace\]"
                                        r" tag in the config\)$"):
        init_workspace(path, "my tag", stub_settings(path), say=lambda _: None)
    assert not path.exists()


def test_a_config_naming_a_missing_file_leaves_the_repository_as_it_was(tmp_path: Path) -> None:
    """The refusal came after program.md was written and the session branch made: fixed, the
    config's next `nightlab init` was refused for "changes nightlab did not make: program.md"."""
    path = tmp_path / "ws"
    repo = Git.init(path)
    repo.default_identity({"user.name": "t", "user.email": "t@example.com"})
    (path / "fit.py").write_text("print('---')\nprint('accuracy: 0.5')\n")
    repo.commit_all("mine")
    project = {"editable": ["fit.py"], "protected": ["score.py"], "run_command": "python fit.py"}
    with pytest.raises(UserError, match="do not exist: score.py"):
        init_workspace(path, "t", stub_settings(path, project=project), say=lambda _: None)
    assert repo.changed_files() == [] and repo.branch() != BRANCH_PREFIX + "t"
    init_workspace(path, "t", stub_settings(path, project={**project, "protected": []}), say=lambda _: None)


def test_default_tag_is_the_date() -> None:
    assert default_tag(datetime.date(2025, 11, 23)) == "nov23"


def test_builtin_trainer_gets_the_profile(tmp_path: Path) -> None:
    pytest.importorskip("nightlab.trainer.profiles")
    trainer = Path(__import__("nightlab.trainer", fromlist=["x"]).__path__[0])
    if not (trainer / "train.py").exists():
        pytest.skip("trainer/train.py is not there yet")
    from nightlab.loop.state.config import settings_from_table

    path = tmp_path / "ws"
    settings = settings_from_table({"workspace": {"path": str(path)}, "trainer": {"profile": "auto"}})
    said: list[str] = []
    ws = init_workspace(path, "", settings, say=said.append)
    assert ws.branch == "autoresearch/" + default_tag()
    if ws.profile == "tiny":  # no GPU here: auto says why it chose tiny
        assert any("no GPU visible" in s for s in said)
        assert "DEPTH = 2" in (path / "train.py").read_text()
        assert ws.harness_env["NIGHTLAB_TIME_BUDGET"] == "15"
    assert git_out(path, "status", "--porcelain") == ""
    assert set(git_out(path, "ls-files").split()) == {"train.py", "prepare.py", "harness.py", "program.md"}
    # the harness is protected with prepare.py, and every experiment runs it: train, then score
    assert ws.protected == ("prepare.py", "harness.py")
    assert ws.run_command.endswith("prepare.py run")


def test_a_project_with_a_score_command_runs_through_the_harness(tmp_path: Path) -> None:
    from nightlab.loop.state.config import settings_from_table
    from nightlab.loop.workspace import run_command

    def command(project: dict) -> str:
        return run_command(settings_from_table({"workspace": {"path": str(tmp_path)}, "project": project}))

    assert command({"run_command": "make train"}) == "make train"  # no score command: trusted as today
    scored = command({"run_command": "make train", "score_command": "python score.py", "protected": ["score.py"]})
    assert "-m nightlab.trainer.prepare run --command 'make train' --score 'python score.py'" in scored
    assert scored.endswith(" --protect score.py")  # checked again after training, before it scores


def test_on_slurm_only_the_checks_are_started_here(tmp_path: Path) -> None:
    """A node runs the run and its score with its own PATH: the engine's start checks only what it
    starts itself."""
    from nightlab.loop.workspace import project_commands

    project = {"run_command": "srun-only-train", "checks_command": "lint", "score_command": "score"}
    slurm = stub_settings(tmp_path, project=project, executor={"kind": "slurm", "slurm": {"shared_dir": str(tmp_path)}})
    assert project_commands(slurm, here=True) == [("project.checks_command", "lint")]
    assert [key for key, _ in project_commands(slurm)] == [
        "project.run_command", "project.checks_command", "project.score_command"]  # doctor says them all


def test_kept_models_are_kept_by_commit_and_only_the_newest_few(tmp_path: Path) -> None:
    import os

    from nightlab.loop.second_opinion import KEPT_ARTIFACTS, keep_artifact
    from nightlab.loop.workspace import Workspace

    ws = Workspace(path=tmp_path, branch="b", profile="tiny", harness_env={}, editable=("train.py",),
                   protected=(), run_command="", builtin_trainer=True)
    run_dir = tmp_path / "run"
    assert keep_artifact(ws, run_dir, "c0") is None  # the run saved no model
    (run_dir / ".nightlab" / "artifact").mkdir(parents=True)
    for i in range(KEPT_ARTIFACTS + 2):
        (run_dir / ".nightlab" / "artifact" / "model.pt").write_text(f"weights {i}")
        dest = keep_artifact(ws, run_dir, f"c{i}")
        assert dest is not None and (dest / "model.pt").read_text() == f"weights {i}"
        os.utime(dest, (i, i))  # newest last, whatever the file system's clock resolution
    left = sorted(p.name for p in (tmp_path / ".nightlab" / "artifacts").iterdir())
    assert left == [f"c{i}" for i in range(2, KEPT_ARTIFACTS + 2)]


def test_a_workspace_keeps_one_store(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    ws = open_workspace(settings.workspace_path, settings)
    assert ws.store is ws.store  # not a new connection (and schema run) per access
    assert ws.store.connection() is ws.store.connection()


def test_coding_agents_session_files_are_ignored_even_in_a_workspace_made_before(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    repo = settings.workspace_path
    exclude = repo / ".git/info/exclude"
    # as an older nightlab wrote it: aider then adds `.aider*` and `.env` to .gitignore on every run
    # (unless git ignores both already), and a change to .gitignore rejects the whole proposal
    exclude.write_text("".join(line for line in exclude.read_text().splitlines(keepends=True)
                               if "aider" not in line and "env" not in line))
    init_workspace(repo, "test", settings, say=lambda _: None)
    for name in (".aider.chat.history.md", ".aider.tags.cache.v4/x", ".env"):
        assert subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", name], check=False).returncode == 0, name


def test_a_projects_program_md_names_its_own_files_and_metric(tmp_path: Path) -> None:
    """The coding agent reads program.md before every experiment: in a project of the user's it
    must not be told that train.py is the file to change and val_bpb the goal."""
    settings = make_stub_workspace(tmp_path, project={"editable": ["train.py"], "metric": "accuracy",
                                                      "direction": "maximize"})
    program = (settings.workspace_path / "program.md").read_text()
    assert "`train.py`" in program and "`prepare.py`" in program and "accuracy" in program and "highest" in program
    assert "val_bpb" not in program and "harness.py" not in program


@pytest.mark.parametrize("command", [
    'eval "$(conda shell.bash hook)" && conda activate fit && python fit.py',
    "ulimit -v 64000000; python fit.py",
    "umask 002 && python fit.py",
    "trap 'rm -f lock' EXIT; python fit.py",
    "command -v python && python fit.py",
    "if true; then python fit.py; fi",
    ". .venv/bin/activate && python fit.py",
])
def test_a_command_starting_with_a_shell_builtin_is_left_to_the_shell(tmp_path: Path, command: str) -> None:
    """`eval`, `ulimit`, `umask` are no program on PATH but the shell's own: the engine's start
    refused such a run command as "'eval', which is not on PATH", and the loop never ran."""
    from nightlab.loop.workspace import missing_program

    assert missing_program(command, tmp_path) is None
    assert missing_program("nosuch-fit fit.py", tmp_path) == "'nosuch-fit', which is not on PATH"


def test_bashs_source_is_named_with_what_sh_has_instead(tmp_path: Path) -> None:
    """/bin/sh runs the commands; where it is dash, `source venv/bin/activate && …` fails every run."""
    from nightlab.loop.workspace import missing_program

    if subprocess.run(["/bin/sh", "-c", "command -v source"], capture_output=True, check=False).returncode == 0:
        pytest.skip("this /bin/sh has `source` (bash)")
    assert missing_program("source .venv/bin/activate && python fit.py", tmp_path) == (
        "'source', which /bin/sh (it runs the commands) does not have: write `. FILE` instead")


def test_the_files_a_run_executes_are_the_editable_ones_its_command_names(tmp_path: Path) -> None:
    """A proposal that deletes one is refused before it runs (tests/loop/test_proposers_agent.py)."""
    repo = make_stub_workspace(tmp_path).workspace_path

    def run_files(**project: object) -> tuple[str, ...]:
        return open_workspace(repo, stub_settings(repo, project=project)).run_files

    assert run_files() == ("train.py",)  # `python train.py`
    assert run_files(run_command="", editable=["model.py", "train.py"]) == ("train.py",)  # the built-in trainer's
    assert run_files(run_command="bash ./run.sh --fast", editable=["train.py", "run.sh"]) == ("run.sh",)
    assert run_files(run_command="make train", editable=["train.py"]) == ()  # named by no word: none refused
