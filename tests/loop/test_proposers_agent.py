"""The agent proposer with scripted fake agents (tests/fakes/agent_*.py) in a real git repo."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.proposers import PastExperiment, ProposalContext, ProposalError
from nightlab.loop.proposers.agent import AgentProposer
from nightlab.loop.proposers.prompt import build_prompt
from nightlab.loop.state import ledger
from nightlab.loop.state.config import AgentSettings
from nightlab.loop.state.stats import Noise
from nightlab.loop.state.store import Store

from tests.fakes.loop_workspace import make_stub_workspace
from tests.waiting import wait_until

FAKES = Path(__file__).resolve().parents[1] / "fakes"
TRAIN = "DEPTH = 8\nMATRIX_LR = 0.04  # Muon\nWARMUP_RATIO = 0.0\n\nprint('training')\n"


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _unconfined(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the proposer does about an agent's misbehaviour where nothing confines the agent (a
    kernel that refuses the sandbox: loop/executors/sandbox.py); sandboxed, most of it cannot
    happen (tests/loop/test_sandbox.py)."""
    monkeypatch.setenv("NIGHTLAB_SANDBOX", "0")


@pytest.fixture()
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "nightlab test")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "test@example.invalid")
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "prepare.py").write_text("def evaluate_bpb():\n    return 1.0\n")
    (tmp_path / "program.md").write_text("Directive: prefer optimizer changes.\n")
    (tmp_path / ".gitignore").write_text(".nightlab/\n")
    git(tmp_path, "init", "-q", "-b", "autoresearch/test")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "baseline")
    return tmp_path


def ctx(ws: Path, **kw: object) -> ProposalContext:
    best = PastExperiment(1, "keep", 0.9979, "baseline", "", "", {})
    crash = PastExperiment(2, "crash", None, "DEPTH 8→64", "deeper is better", "architecture", {"DEPTH": 64},
                           reason="rejected by the harness: not causal: the model looks ahead")
    base = ProposalContext(
        workspace=ws, editable=("train.py",), metric_name="val_bpb", direction="minimize", best=best,
        history=(best, crash), focus="learning rates", notes=("try a warmup",), consecutive_failures=1,
        last_crash_log="torch.OutOfMemoryError: CUDA out of memory", last_crash=2, in_flight=("WARMUP_RATIO 0.0→0.1",),
        noise=Noise(0.0034, 2), keep_z=2.0,
    )
    return replace(base, **kw)


def agent(script: str, *args: str, timeout: float = 30.0, **kw: object) -> AgentProposer:
    command = shlex.join([sys.executable, str(FAKES / script), *args])
    return AgentProposer(AgentSettings(command=command, timeout=timeout), **kw)  # type: ignore[arg-type]


def test_agent_edits_train_py_and_describes_it_with_its_proposal_file(ws: Path) -> None:
    proposal = agent("agent_edit.py").propose(ctx(ws))
    assert proposal.description == "MATRIX_LR 0.04→0.05"
    assert proposal.hypothesis == "A higher Muon LR converges faster."
    assert proposal.area == "learning rates" and proposal.params == {}
    assert "MATRIX_LR = 0.05" in (ws / "train.py").read_text()
    assert git(ws, "status", "--porcelain") == " M train.py\n"  # nothing committed, state dir ignored
    prompt = (ws / ".nightlab/agent/prompt.md").read_text()
    for expected in (
        "Directive: prefer optimizer changes.", "val_bpb, minimize", "0.9979", "#2 crash, no metric: DEPTH 8→64",
        "deeper is better", "CUDA out of memory", "Work on: learning rates", "- try a warmup",
        "- WARMUP_RATIO 0.0→0.1", "Edit only train.py", "Do not commit", ".nightlab/agent/proposal.json",
        # how sure each decision was, and how big a change must be to show: the agent aims above the noise
        "deeper is better) — rejected by the harness: not causal", "about ± 0.0034 val_bpb",
        "measured from 3+ repeats", "more than 2 standard errors",
    ):
        assert expected in prompt, expected


def test_agent_that_edits_the_harness_returns_a_proposal_the_engine_can_reject(ws: Path) -> None:
    proposal = agent("agent_harness.py").propose(ctx(ws))
    assert proposal.description == "edit prepare.py, train.py: +2 −0 lines (CHEAT, WARMUP_RATIO)"
    assert proposal.hypothesis == "I made evaluation easier and added warmup."
    assert set(git(ws, "diff", "--name-only").split()) == {"prepare.py", "train.py"}


def test_agent_that_hangs_is_killed_with_every_descendant(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pids_file = tmp_path_factory.mktemp("pids") / "pids"
    # Its tick (the proposer's call while the agent runs) holds until the agent has written its
    # pids: the timeout can only cut it off after that, however slowly a loaded box starts it.
    started = agent("agent_hang.py", str(pids_file), timeout=2.0,
                    tick=lambda: wait_until(lambda: pids_file.is_file(), "the agent's pids"))
    with pytest.raises(ProposalError, match=r"timed out after 2s and was killed"):  # not the agent's 600 s
        started.propose(ctx(ws))
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2
    for pid in pids:  # the child in its group and the grandchild that escaped to its own session
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_tick_failure_kills_the_agent_and_propagates(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pids_file = tmp_path_factory.mktemp("pids") / "pids"
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if pids_file.exists() and len(ticks) >= 2:
            raise KeyboardInterrupt  # e.g. the engine is told to stop

    with pytest.raises(KeyboardInterrupt):
        agent("agent_hang.py", str(pids_file), timeout=60, tick=tick).propose(ctx(ws))
    for pid in map(int, pids_file.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_agent_that_changes_nothing_is_a_proposal_error(ws: Path) -> None:
    with pytest.raises(ProposalError, match="changed nothing.*nothing worth changing.*the flag that allows edits"):
        agent("agent_noop.py").propose(ctx(ws))


def test_agent_that_exits_1_is_a_proposal_error_with_its_stderr(ws: Path) -> None:
    with pytest.raises(ProposalError, match=r"exited with status 1 .*API key not set"):
        agent("agent_fail.py").propose(ctx(ws))


def test_agent_that_commits_has_its_commit_undone_and_its_edit_kept(ws: Path) -> None:
    head = git(ws, "rev-parse", "HEAD")
    proposal = agent("agent_commit.py").propose(ctx(ws))
    assert git(ws, "rev-parse", "HEAD") == head
    assert proposal.description == "edit train.py: +1 −1 lines (DEPTH)"
    assert "DEPTH = 10" in (ws / "train.py").read_text()


def test_prompt_tells_the_agent_to_change_direction_after_many_failures(ws: Path) -> None:
    agent("agent_edit.py", switch_area_after=3).propose(ctx(ws, consecutive_failures=3))
    assert "try a clearly different idea" in (ws / ".nightlab/agent/prompt.md").read_text()


H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"


def measured(number: int, status: str, metric: float, description: str, hardware: str = H100,
             older: bool = False, **kw: object) -> PastExperiment:
    return PastExperiment(number, status, metric, description, "", "", {}, group=f"{hardware}|{'old' if older else 'new'}",
                          hardware=hardware, older_setting=older, **kw)  # type: ignore[arg-type]


def test_a_prompt_of_one_gpu_and_one_setting_reads_as_it_always_did(ws: Path) -> None:
    """The labels of another GPU model or setting are said only where there is one: a night on one
    GPU gets the prompt it had before them, byte for byte."""
    best = measured(1, "keep", 0.9979, "baseline", kind="baseline")
    worse = measured(2, "discard", 1.0012, "MATRIX_LR 0.04→0.05", reason="not better: worse by 0.0033 ± 0.0034 (n = 1 vs 1)")
    failed = PastExperiment(3, "crash", None, "DEPTH 8→64", "deeper", "architecture", {}, reason="proposer failed: x")
    prompt = build_prompt(ctx(ws, best=best, history=(best, worse, failed)), "", 5)
    assert prompt.split("## Goal\n\n")[1].split("\n\n## Streak")[0] == (
        "Metric: val_bpb, minimize (lower is better).\n\n"
        "Best so far: val_bpb = 0.9979 (#1: baseline).\n\n"
        "## Noise\n\n"
        "Two runs of the same code differ by about ± 0.0034 val_bpb (one standard deviation, measured from 3+ repeats)."
        " A change is kept only when it beats the best by more than 2 standard errors of the difference; one in"
        " between is re-run first. Aim for changes you expect to be worth several times the noise: a smaller one costs"
        " runs and is discarded.\n\n"
        "## Recent experiments (last 3 of 3, oldest first)\n\n"
        "- #1 keep, 0.9979: baseline\n\n"
        "- #2 discard, 1.0012: MATRIX_LR 0.04→0.05 — not better: worse by 0.0033 ± 0.0034 (n = 1 vs 1)\n\n"
        "- #3 crash, no metric: DEPTH 8→64 (hypothesis: deeper) — proposer failed: x"
    )


def test_a_prompt_names_each_values_gpu_and_marks_an_older_settings_values(ws: Path) -> None:
    """A box with an A100 and an H100 (val_bpb 0.05 higher on the A100), and the time budget raised
    since #2: the prompt listed "#3 discard, 1.0273" beside "#4 keep, 0.97" unlabelled, so an
    agent read the A100's result as a change that hurt by 0.06, and #1's 300 s number as one to beat."""
    old = measured(1, "keep", 0.9979, "baseline", older=True, kind="baseline")
    h100 = measured(2, "keep", 0.9700, "MATRIX_LR 0.04→0.05")
    a100 = measured(3, "discard", 1.0273, "WARMUP_RATIO 0.0→0.1", A100)
    prompt = build_prompt(ctx(ws, best=h100, history=(old, h100, a100)), "", 5)
    assert f"Best so far: val_bpb = 0.97 on {H100} (#2: MATRIX_LR 0.04→0.05)." in prompt
    assert f"- #1 keep, 0.9979 on {H100} (older setting: not comparable): baseline" in prompt
    assert f"- #2 keep, 0.97 on {H100}: MATRIX_LR" in prompt
    assert f"- #3 discard, 1.0273 on {A100}: WARMUP_RATIO" in prompt
    assert "Values compare only within one GPU model" in prompt
    assert 'Values marked "older setting: not comparable" were measured under an older setting' in prompt


def test_a_best_of_an_older_setting_is_said_to_be_no_number_to_beat(ws: Path) -> None:
    """The budget changed between starts and nothing ran on the new one yet: the best is a 300 s run's."""
    best = measured(1, "keep", 0.9979, "baseline", older=True, kind="baseline")
    prompt = build_prompt(ctx(ws, best=best, history=(best,)), "", 5)
    assert "Best so far: val_bpb = 0.9979 (#1: baseline). It was measured under an older setting" in prompt
    assert "no number for the next run's to beat" in prompt


def test_a_proposal_file_with_a_lone_surrogate_is_read_as_text_the_ledger_can_store(tmp_path: Path) -> None:
    from nightlab.loop.proposers.agent import _read_proposal_file
    from nightlab.loop.state import ledger
    from nightlab.loop.state.store import Store

    path = tmp_path / "proposal.json"
    path.write_text('{"description": "LR \\udcff up", "hypothesis": "why \\ud800"}', encoding="utf-8")
    found, problem = _read_proposal_file(path)
    assert found == {"description": "LR ? up", "hypothesis": "why ?"} and problem == ""
    ledger.new_candidate(Store.for_workspace(tmp_path), "proposal", "base", **found)  # raised UnicodeEncodeError


def test_a_huge_proposal_file_gives_a_hypothesis_git_can_commit(ws: Path) -> None:
    from nightlab.loop.ratchet import Git

    proposal = agent("agent_misbehave.py", "huge-proposal").propose(ctx(ws))
    assert proposal.description == "deeper" and proposal.hypothesis.startswith("because because")
    # the engine's commit message; a 960 kB hypothesis was "Argument list too long" and killed the engine
    Git(ws).commit_all(f"#3: {proposal.description}\n\n{proposal.hypothesis}")


def test_an_agent_writing_terminal_codes_gives_a_proposal_git_can_commit(ws: Path) -> None:
    from nightlab.loop.ratchet import Git

    proposal = agent("agent_misbehave.py", "terminal").propose(ctx(ws))
    assert (proposal.description, proposal.hypothesis) == ("deeper now", "Deeper: DEPTH 8 -> 10")
    # a NUL in the commit message was git's "a NUL byte in commit log message not allowed": the engine's traceback
    Git(ws).commit_all(f"#3: {proposal.description}\n\n{proposal.hypothesis}")


def test_an_agent_failing_with_pages_of_stderr_is_said_in_one_line_ending_with_its_last_words(ws: Path) -> None:
    with pytest.raises(ProposalError) as failed:
        agent("agent_misbehave.py", "long-stderr").propose(ctx(ws))
    said = str(failed.value)
    assert "\n" not in said and len(said) < 600, said  # was 1,500 characters over 17 lines, cut mid-line
    assert said.startswith("agent exited with status 3 after ")
    assert "Error: 429 rate limit exceeded; try again in 30s" in said
    assert ".nightlab/agent/stderr.log" in said  # where the whole of it is


def test_an_agent_the_shell_cannot_start_is_said_with_what_to_fix(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    script = tmp_path_factory.mktemp("agents") / "agent.sh"
    script.write_text("#!/bin/sh\necho hi\n")  # never made executable
    for command, expected in (
        ("nightlab-test-no-such-agent -p {prompt_file}", r"status 127 .*not found.*install the agent or fix"),
        (str(script), r"status 126 .*Permission denied.*make it executable or fix"),
    ):
        with pytest.raises(ProposalError, match=expected + r" \[proposer.agent\] command"):
            AgentProposer(AgentSettings(command=command, timeout=30.0)).propose(ctx(ws))


def test_a_proposal_file_that_cannot_be_used_is_said_in_the_hypothesis(ws: Path) -> None:
    proposal = agent("agent_misbehave.py", "bad-json").propose(ctx(ws))
    assert proposal.description == "edit train.py: +1 −1 lines (DEPTH)"  # from the diff, as before
    assert proposal.hypothesis.startswith("(the agent gave no hypothesis) [.nightlab/agent/proposal.json ignored:"
                                          " not valid JSON: Expecting value"), proposal.hypothesis


def test_a_proposal_file_over_a_megabyte_is_not_read(tmp_path: Path) -> None:
    from nightlab.loop.proposers.agent import _read_proposal_file

    path = tmp_path / "proposal.json"
    path.write_text('{"description": "' + "x" * 2_000_000 + '"}')
    assert _read_proposal_file(path) == ({}, "over 1000 kB")
    assert _read_proposal_file(tmp_path / "none.json") == ({}, "")  # writing one is optional


def test_an_agent_that_links_its_logs_to_the_ledger_cannot_write_it_through_them(ws: Path, tmp_path: Path) -> None:
    """An agent's folder is its own to write: stdout.log made a link to state.db, the next proposal's
    output truncated the ledger through it (the sandbox holds the ledger read-only, not the link)."""
    ledger_file = tmp_path / "state.db"
    ledger_file.write_bytes(b"SQLite format 3\0" + b"x" * 10_000)
    proposer = agent("agent_misbehave.py", "link-log", str(ledger_file))
    proposer.propose(ctx(ws))
    proposer.propose(ctx(ws))  # writes its prompt and logs where the links are
    assert ledger_file.read_bytes() == b"SQLite format 3\0" + b"x" * 10_000


def test_an_agent_that_leaves_a_fifo_or_an_endless_link_does_not_hang_the_engine(ws: Path) -> None:
    """A FIFO as its proposal file blocked the engine's open() for ever (restarted, it hung again); a new
    file linked to /dev/zero was counted for ever. Both are said and the proposal goes on."""
    proposal = agent("agent_misbehave.py", "fifo-proposal").propose(ctx(ws))
    assert "[.nightlab/agent/proposal.json ignored: unreadable: not a regular file]" in proposal.hypothesis, \
        proposal.hypothesis
    git(ws, "checkout", "-q", "--", "train.py")
    assert agent("agent_misbehave.py", "zero-link").propose(ctx(ws)).description.startswith("edit train.py")


@pytest.mark.parametrize("mode", ["switch-branch", "detach"])
def test_an_agent_that_leaves_the_branch_is_refused_and_the_workspace_put_back(ws: Path, mode: str) -> None:
    head = git(ws, "rev-parse", "HEAD")
    with pytest.raises(ProposalError, match="agent left the branch autoresearch/test .*; switched back"):
        agent("agent_misbehave.py", mode).propose(ctx(ws))
    # left there, the next experiment was made on the agent's branch and a restarted engine refused the workspace
    assert git(ws, "symbolic-ref", "--short", "HEAD").strip() == "autoresearch/test"
    assert git(ws, "rev-parse", "HEAD") == head


def test_what_an_agent_leaves_in_git_ignored_places_is_removed_and_said(ws: Path) -> None:
    with (ws / ".git/info/exclude").open("a") as exclude:
        exclude.write("__pycache__/\n")
    (ws / "__pycache__").mkdir()
    (ws / "__pycache__/prepare.cpython-311.pyc").write_bytes(b"\0")  # an earlier run's: not the agent's
    proposal = agent("agent_misbehave.py", "hide-ignored").propose(ctx(ws))
    # the commit would not hold them, so the run must not see them either
    assert sorted(p.name for p in (ws / "__pycache__").iterdir()) == ["prepare.cpython-311.pyc"]
    assert proposal.hypothesis.endswith(
        "[removed what the agent left where git ignores it, which the commit would not hold: __pycache__/helper.py]"
    ), proposal.hypothesis
    assert (ws / ".nightlab/agent/prompt.md").is_file()  # our own state stays


def test_what_an_agent_leaves_in_its_own_folder_is_removed_and_said(ws: Path) -> None:
    """Its folder (.nightlab/agent) is the one place git never looks: a module train.py imported from it
    ran, and the commit did not hold it."""
    proposal = agent("agent_misbehave.py", "hide-in-own-folder").propose(ctx(ws))
    assert sorted(p.name for p in (ws / ".nightlab/agent").iterdir()) == ["prompt.md", "stderr.log", "stdout.log"]
    assert proposal.hypothesis.endswith("[removed what the agent left where git ignores it, which the commit would"
                                        " not hold: .nightlab/agent/hp.py, .nightlab/agent/pkg]"), proposal.hypothesis


def test_an_agent_that_only_changes_a_file_mode_changed_nothing(ws: Path) -> None:
    with pytest.raises(ProposalError, match="changed nothing; its last words: made it executable"):
        agent("agent_misbehave.py", "chmod").propose(ctx(ws))  # was a run of the best's code as "+0 −0 lines"


def test_an_agent_that_changes_gits_own_files_is_refused_and_they_are_put_back(ws: Path) -> None:
    exclude = (ws / ".git/info/exclude").read_bytes()
    with pytest.raises(ProposalError, match=r"agent changed git's own files \(config, hooks/post-commit,"
                                            r" info/exclude\); put back as they were"):
        agent("agent_misbehave.py", "git-own-files").propose(ctx(ws))
    # left there, every git command of the daemon's ran the agent's code
    assert not (ws / ".git/hooks/post-commit").exists()
    assert subprocess.run(["git", "config", "core.fsmonitor"], cwd=ws, check=False).returncode == 1
    assert (ws / ".git/info/exclude").read_bytes() == exclude
    git(ws, "commit", "-qam", "a commit runs no hook")
    assert not (ws / "hooked").exists() and not (ws / "fsmonitored").exists()


def test_an_agent_that_proposes_code_already_tried_is_refused_with_how_it_went(ws: Path) -> None:
    (ws / "train.py").write_text(TRAIN.replace("DEPTH = 8", "DEPTH = 10"))
    git(ws, "commit", "-qam", "#2: DEPTH 8→10")
    git(ws, "update-ref", "refs/nightlab/exp/2", "HEAD")
    git(ws, "reset", "-q", "--hard", "HEAD~1")  # discarded: the best is the baseline again
    with pytest.raises(ProposalError, match=r"agent proposed the code of #2 again \(crash: rejected by the harness:"
                                            r" not causal: the model looks ahead\); try something not tried yet"):
        agent("agent_misbehave.py", "deeper").propose(ctx(ws))  # was a whole run spent on a known result
    assert git(ws, "status", "--porcelain") == " M train.py\n"  # the index is not touched; the engine resets the tree


def test_an_agent_that_deletes_the_file_is_described_as_deleting_it(ws: Path) -> None:
    proposal = agent("agent_misbehave.py", "delete-train").propose(ctx(ws))
    # was "edit train.py: +0 −5 lines (...)"
    assert proposal.description == "delete train.py: +0 −5 lines (DEPTH, MATRIX_LR, WARMUP_RATIO)"


def test_an_agent_that_deletes_train_py_is_refused_before_any_run_and_the_night_goes_on(tmp_path: Path) -> None:
    """It was committed and run, recorded as "exit code 2" (python cannot open train.py): a run
    spent on nothing, and the agent told only that its code crashed."""
    command = shlex.join([sys.executable, str(FAKES / "agent_misbehave.py"), "delete-train"])
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": command}})
    assert run_engine(settings, 3) == 0
    store = Store.for_workspace(settings.workspace_path)
    rows = ledger.experiments(store)
    said = "rejected: the agent deleted train.py, which every run executes; the change was undone"
    assert [(e.status, e.reason, e.duration_s) for e in rows[1:]] == [("crash", said, None)] * 2
    assert [e.payload["number"] for e in store.events_after(0) if e.kind == "experiment_started"] == [1]
    ws = settings.workspace_path
    assert (ws / "train.py").is_file() and git(ws, "status", "--porcelain") == ""
    assert git(ws, "rev-parse", "HEAD").strip() == rows[0].commit


def test_an_agent_that_makes_train_py_a_link_is_refused_before_any_run(tmp_path: Path) -> None:
    """train.py -> /tmp/evil.py printing 0.5: kept as the night's best, its commit holding only the
    link, the code free to change after the keep."""
    outside = tmp_path / "evil.py"
    command = shlex.join([sys.executable, str(FAKES / "agent_misbehave.py"), "link-train", str(outside)])
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": command}})
    assert run_engine(settings, 2) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert (rows[1].status, rows[1].reason) == ("crash", "rejected: made train.py a symbolic link, whose code the"
                                                         " commit would not hold (undone: edit the file itself)")
    ws = settings.workspace_path
    assert not (ws / "train.py").is_symlink() and git(ws, "status", "--porcelain") == ""


def test_what_an_agent_leaves_running_in_the_background_is_killed(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pid_file = tmp_path_factory.mktemp("pids") / "pid"
    agent("agent_misbehave.py", "background", str(pid_file)).propose(ctx(ws))
    pid = int(pid_file.read_text())
    try:  # it left the agent's session and outlived it: found by the agent's environment
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if psutil.pid_exists(pid):
            psutil.Process(pid).kill()


def test_an_agent_that_times_out_is_said_with_its_last_words(ws: Path) -> None:
    # what it was waiting for is what to fix (a question, a permission, a login)
    # The tick holds until the question is out: the timeout cannot cut the agent off before it.
    out = ws / ".nightlab" / "agent" / "stdout.log"
    asks = agent("agent_misbehave.py", "asks", timeout=2.0,
                 tick=lambda: wait_until(lambda: "[y/N]" in out.read_text(), "the agent's question"))
    with pytest.raises(ProposalError, match=r"timed out after 2s .*; its last words: Apply these edits to train.py\? \[y/N\]"):
        asks.propose(ctx(ws))


def test_an_agent_printing_without_end_is_killed_at_its_output_cap_and_its_files_cut_to_it(ws: Path) -> None:
    # before: nothing capped the agent's files: it wrote until its timeout (15 minutes: gigabytes)
    command = shlex.join([sys.executable, str(FAKES / "agent_misbehave.py"), "flood"])
    flood = AgentProposer(AgentSettings(command=command, timeout=5.0, max_output_mb=1.0))
    with pytest.raises(ProposalError) as failed:
        flood.propose(ctx(ws))
    said = str(failed.value)
    assert said.startswith("agent printed more than 1 MB and was killed"), said
    assert "[proposer.agent] max_output_mb" in said and "\n" not in said
    assert (ws / ".nightlab/agent/stdout.log").stat().st_size <= 2**20


def test_an_agent_that_prints_past_its_cap_and_exits_at_once_has_its_file_cut_too(ws: Path) -> None:
    # before: the cap was checked once a second while the agent ran; one done sooner kept all 3 MB
    command = shlex.join([sys.executable, str(FAKES / "agent_misbehave.py"), "burst"])
    AgentProposer(AgentSettings(command=command, timeout=5.0, max_output_mb=1.0)).propose(ctx(ws))
    assert (ws / ".nightlab/agent/stdout.log").stat().st_size == 2**20


def test_an_agent_that_removes_gits_hooks_folder_has_it_put_back(ws: Path) -> None:
    (ws / ".git/hooks/pre-push").write_text("#!/bin/sh\nexit 0\n")  # the user's own hook
    with pytest.raises(ProposalError, match=r"agent changed git's own files \(hooks/pre-push"):
        agent("agent_misbehave.py", "rm-hooks").propose(ctx(ws))
    assert (ws / ".git/hooks/pre-push").read_text() == "#!/bin/sh\nexit 0\n"


def test_an_agent_that_breaks_the_repository_is_a_failed_proposal_said_in_one_line(ws: Path) -> None:
    with pytest.raises(ProposalError) as failed:
        agent("agent_misbehave.py", "break-branch").propose(ctx(ws))
    said = str(failed.value)
    # the first git command that fails names itself, on one line
    assert "\n" not in said and re.fullmatch(rf"git [^:]+ failed in {ws}: .*refs/heads/autoresearch/test.*", said), said


def test_a_file_the_engine_will_refuse_is_not_stored_in_git(ws: Path) -> None:
    """Checking whether the change ran before hashed the whole tree into .git: a checkpoint left
    beside train.py stayed there (unreachable, for weeks) though the engine refuses the change."""
    proposal = agent("agent_misbehave.py", "checkpoint").propose(ctx(ws))
    assert proposal.description.startswith("edit model.pt, train.py")  # the engine's check refuses it
    blob = git(ws, "hash-object", "model.pt").strip()  # its id, not written
    stored = subprocess.run(["git", "cat-file", "-e", blob], cwd=ws, check=False, capture_output=True)
    assert stored.returncode != 0


def test_an_agent_that_only_streams_progress_gives_no_hypothesis_rather_than_a_fragment_of_it(ws: Path) -> None:
    # was "k 4953 [tool] read_file train.py chunk 4954 …": the end of its log, cut mid-line, in every digest
    proposal = agent("agent_misbehave.py", "chatty").propose(ctx(ws))
    assert proposal.hypothesis == "(the agent gave no hypothesis)"
    (ws / "train.py").write_text(TRAIN)
    proposal = agent("agent_misbehave.py", "chatty", "closing").propose(ctx(ws))
    assert proposal.hypothesis == "Deeper: DEPTH 8 -> 10, more capacity for the same budget."


def test_an_agent_that_removes_its_state_folder_still_has_its_words_read(ws: Path) -> None:
    proposal = agent("agent_misbehave.py", "clean-state").propose(ctx(ws))  # was a proposer error, a traceback
    assert proposal.hypothesis == "Removed stale outputs; DEPTH 8 -> 10."


def test_new_files_are_counted_in_lines_as_git_would(tmp_path: Path) -> None:
    from nightlab.loop.proposers.agent import _line_count

    for text, lines in ((b"", 0), (b"a", 1), (b"a\n", 1), (b"a\nb", 2), (b"\n\n", 2), (b"x" * (1 << 20) + b"\ny", 2)):
        (tmp_path / "f").write_bytes(text)
        assert _line_count(tmp_path / "f") == lines == len(text.splitlines())


def test_a_long_nights_prompt_lists_every_experiment_and_stays_bounded(ws: Path) -> None:
    """Only the last 20 experiments were in the prompt, each with its whole hypothesis (an agent's
    closing paragraph, up to 1000 characters): by #100 the agent no longer knew what #1–#80 had
    tried and proposed them again, and paid for 16 kB a turn. Now the recent ones in full, the
    older ones a line each, the hypotheses cut."""
    why = "A faster Muon step suits the short budget. " * 20
    history = tuple(PastExperiment(n, "keep" if n % 10 == 0 else "discard", 0.99 - n / 10_000, f"idea {n:03d}", why, "", {},
                                   reason="not better: worse by 0.0048 ± 0.0034 (n = 1 vs 3)") for n in range(1, 301))
    prompt = build_prompt(ctx(ws, best=history[-1], history=history[:100]), "", 5)
    assert all(f"idea {n:03d}" in prompt for n in range(1, 101))
    assert "## Earlier experiments (#1–#90 in brief: 9 kept, 81 not)\n\n- #1 discard, 0.9899: idea 001\n\n" in prompt
    assert "## Recent experiments (last 10 of 100, oldest first)" in prompt
    assert len(prompt) < 14_000
    longer = build_prompt(ctx(ws, best=history[-1], history=history), "", 5)
    assert "- #100 keep, 0.98: idea 100" in longer and "idea 101" not in longer  # keeps always, the latest 100 others
    assert "(161 earlier not listed)" in longer and len(longer) < 20_000


@pytest.mark.parametrize(("direction", "said"), [
    ("minimize", "against the best (the mean of its 2 runs: 0.9805), a change's first run is kept at once below"
                 " 0.975601, re-run between that and 0.9805, discarded otherwise."),
    ("maximize", "against the best (the mean of its 2 runs: 0.9805), a change's first run is kept at once above"
                 " 0.985399, re-run between that and 0.9805, discarded otherwise."),
])
def test_the_keep_rule_is_said_in_the_metrics_own_numbers(ws: Path, direction: str, said: str) -> None:
    """"beats the best by more than 2 standard errors of the difference" left the agent to work out
    what value a run needs: 2 × 0.002 × √(1 + 1/2) from the best's 2 runs."""
    prompt = build_prompt(ctx(ws, direction=direction, noise=Noise(0.002, 4), best_runs=(0.98, 0.981)), "", 5)
    assert f"In numbers: {said}" in prompt


def test_where_every_repeat_gives_the_same_number_the_prompt_says_nothing_is_re_run(ws: Path) -> None:
    """A fixed-seed trainer (the tiny profile): a change under the bar is discarded after its one run,
    as a re-run gives the same number; the prompt told the agent it would be re-run first."""
    noise = Noise(0.002, 2, identical=True)
    prompt = build_prompt(ctx(ws, noise=noise, best_runs=(0.98, 0.98, 0.98)), "", 5)
    assert "re-run first" not in prompt and "re-run between" not in prompt
    assert ("standard errors of the difference; one in between is discarded (a re-run gives the same number)."
            in prompt)
    assert ("a change's first run is kept at once below 0.975381, discarded otherwise (the same number again"
            " on a re-run)." in prompt)


def test_a_prompt_says_one_failure_in_words_and_what_not_to_do(ws: Path) -> None:
    prompt = build_prompt(ctx(ws, consecutive_failures=1), "", 5)
    assert "## Streak\n\nThe last experiment did not improve on the best.\n" in prompt  # not "the last 1 experiments"
    assert "## Log tail of the last crash (#2)\n" in prompt
    assert "- Do not repeat an experiment listed above: the same code is refused" in prompt
    assert "- Improve the training itself: do not change how val_bpb is computed or printed." in prompt


def test_an_agent_nights_prompts_follow_the_best_the_crash_and_the_owners_note_and_focus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A night as the agent lives it, one prompt per turn (tests/fakes/agent_plan.py keeps each):
    a keep, a discard, a crash, a rejected edit, another keep; the owner's note and focus sent
    while the agent works. The crash's log was in every prompt after the keep that left it behind,
    unnamed, and the keep rule was said in standard errors only."""
    token = "123456:telegram-token-of-the-owner"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", token)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([
        {"set": {"VAL_BPB": "[0.95]"}, "describe": "MATRIX_LR 0.04→0.05", "why": "faster"},  # #2 keep
        {"set": {"VAL_BPB": "[0.97]"}, "describe": "warmup 0.1", "owner": "note try a longer warmup"},  # #3 discard
        {"set": {"MODE": "'crash'"}, "describe": "deeper", "owner": "focus attention"},  # #4 crash
        {"write": {"prepare.py": "# mine\n"}, "describe": "tweak the eval", "why": "a lighter eval"},  # #5 rejected
        {"set": {"VAL_BPB": "[0.9]"}, "describe": "wider MLP", "owner": "focus off"},  # #6 keep
        {"set": {"VAL_BPB": "[0.91]"}, "describe": "rope base 50k"},  # #7 discard
    ]))
    command = shlex.join([sys.executable, str(FAKES / "agent_plan.py"), str(plan)])
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": command}})
    assert run_engine(settings, 7) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [e.status for e in rows] == ["keep", "keep", "discard", "crash", "crash", "keep", "discard"]
    prompts = {n: (tmp_path / f"prompt-{n - 1}.md").read_text() for n in range(2, 8)}  # the prompt of #n
    assert "Best so far: val_bpb = 0.95 (#2: MATRIX_LR 0.04→0.05)." in prompts[3]
    assert "Best so far: val_bpb = 0.9 (#6: wider MLP)." in prompts[7]
    assert "kept at once below 0.892363, re-run between that and 0.9," in prompts[7]
    assert "- #5 crash, no metric: tweak the eval (hypothesis: a lighter eval) — rejected: changed the protected prepare.py" in prompts[6]
    assert [n for n, p in prompts.items() if "## Log tail of the last crash (#4)\n" in p] == [5, 6]  # not after #6's keep
    assert [n for n, p in prompts.items() if "- try a longer warmup" in p] == [4]
    assert [n for n, p in prompts.items() if "Work on: attention" in p] == [5, 6]
    assert not any(token in p for p in prompts.values())
