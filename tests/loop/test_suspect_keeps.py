"""A keep whose gain vanishes on its held-out slice (issue 18, item 4) is marked SUSPECT where
people look for the night's results: the report's table, `/best` and the history, not only in its
reason."""

from __future__ import annotations

from pathlib import Path

from nightlab.loop.second_opinion import SecondOpinion
from nightlab.loop.state import ledger, views
from nightlab.loop.state.stats import HELDOUT_GAIN
from nightlab.loop.state.store import Store


def _record(store: Store, number: int, kind: str, metric: float, best: float, heldout: float | None = None,
            status: str = "keep", confirm_of: int | None = None, metrics: dict[str, float] | None = None) -> None:
    cand = ledger.new_candidate(store, kind, "base", commit=f"{number:07d}abc", description=f"change {number}",
                                confirm_of=confirm_of)
    metrics = metrics if metrics is not None else {} if heldout is None else {HELDOUT_GAIN: heldout}
    exp = ledger.Experiment(
        number=cand.number, kind=kind, confirm_of=confirm_of, commit=f"{number:07d}abc", status=status, metric=metric,
        metrics=metrics, best=best, confidence=None if kind == "baseline" else 3.0, description=f"change {number}",
        hypothesis="", area="", finished_at=float(number), hardware="H200", setting="s",
    )
    assert ledger.record_experiment(store, cand.id, exp, {"number": number})


def _night(tmp_path: Path, last_heldout: float) -> Path:
    store = Store.for_workspace(tmp_path)
    store.set("workspace.branch", "autoresearch/test")
    _record(store, 1, "baseline", 1.0, 1.0)
    _record(store, 2, "proposal", 0.9, 0.9, heldout=0.05)  # the gain holds on held-out rows
    _record(store, 3, "proposal", 0.8, 0.8, heldout=last_heldout)
    return tmp_path


def test_a_suspect_keep_is_marked_in_the_report_table_and_in_best(tmp_path: Path) -> None:
    ws = _night(tmp_path, last_heldout=-0.02)
    report = views.report_markdown(ws)
    assert "| held-out gain |" in report
    row3 = next(line for line in report.splitlines() if line.startswith("| 3 |"))
    row2 = next(line for line in report.splitlines() if line.startswith("| 2 |"))
    assert "| -0.020000 SUSPECT |" in row3, row3
    assert "| +0.050000 |" in row2 and "SUSPECT" not in row2, row2
    best = views.best_text(ws)
    assert "held-out gain: -0.020000 SUSPECT (the gain vanishes on rows no decision saw)" in best, best
    history = views.history_text(ws).splitlines()
    assert history[2].endswith("change 3 (SUSPECT: its gain vanishes on held-out rows)"), history
    assert history[1].endswith("change 2"), history


def test_a_keep_that_holds_is_not_suspect(tmp_path: Path) -> None:
    ws = _night(tmp_path, last_heldout=0.01)
    assert "SUSPECT" not in views.report_markdown(ws) and "SUSPECT" not in views.history_text(ws)
    best = views.best_text(ws)
    assert "held-out gain: +0.010000" in best and "SUSPECT" not in best, best


def test_the_reports_counts_keep_baseline_runs_and_repeats_apart_from_kept_changes(tmp_path: Path) -> None:
    """Baseline runs and repeats are recorded as keeps; counted as such, a night that kept no change
    read "3 keep" above "Nothing beat the baseline yet"."""
    store = Store.for_workspace(tmp_path)
    for n in (1, 2, 3):
        _record(store, n, "baseline", 1.0, 1.0)
    _record(store, 4, "proposal", 1.1, 1.0, status="discard")
    report = views.report_markdown(tmp_path)
    assert "- experiments: 4 (3 baseline, 1 discard) over" in report and "Nothing beat the baseline yet" in report
    _record(store, 5, "proposal", 0.9, 1.0, status="discard")  # re-run to decide: kept on its re-run
    _record(store, 6, "confirm", 0.9, 0.9, confirm_of=5)
    assert "- experiments: 6 (3 baseline, 1 repeat, 1 keep, 1 discard) over" in views.report_markdown(tmp_path)
    assert "experiments: 6 (3 baseline, 1 repeat, 1 keep, 1 discard)" in views.status_text(tmp_path)


def test_the_second_opinion_states_its_gain_as_better_is_positive_in_either_direction() -> None:
    held = SecondOpinion(slice=2, kept=0.95, base=1.0)  # lower bpb: better
    assert abs(held.gain - 0.05) < 1e-12
    assert not held.suspect and held.text().endswith("(+0.050000), holds")
    accuracy = SecondOpinion(slice=2, kept=0.95, base=1.0, direction="maximize")  # lower accuracy: worse
    assert accuracy.suspect and accuracy.text().endswith("(-0.050000), SUSPECT: the gain vanishes there")


KEEP_ON_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from nightlab.loop.second_opinion import keep_artifact
from nightlab.loop.state.errors import UserError
from nightlab.loop.workspace import Workspace

root = Path(sys.argv[1])
(root / "run" / ".nightlab" / "artifact").mkdir(parents=True)
(root / "run" / ".nightlab" / "artifact" / "model.pt").write_bytes(bytes(2 << 20))
ws = Workspace(root / "ws", "autoresearch/t", "tiny", {}, ("train.py",), (), "true", True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the copy stops at 1 MB: a full disk
try:
    keep_artifact(ws, root / "run", "abcdef0123")
except UserError as e:
    print(e)
print(sorted(p.name for p in (root / "ws" / ".nightlab" / "artifacts").iterdir()))
"""


def test_a_kept_model_that_cannot_be_copied_is_said_and_leaves_no_half_copy(tmp_path: Path) -> None:
    """An OSError traceback at every restart of the engine, and a half copy eating the space left."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", KEEP_ON_A_FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False)
    where = tmp_path / "ws" / ".nightlab" / "artifacts"
    assert out.stdout == (f"could not keep the kept model of abcdef0 in {where} ([Errno 27] File too large) for the"
                          f" held-out second opinion: free space there (`df -h {where}`), then start nightlab again\n"
                          "[]\n"), out.stderr


def test_a_keep_whose_models_an_agent_removed_says_it_got_no_second_opinion(tmp_path: Path) -> None:
    """An agent's `git clean -fdx` took .nightlab/artifacts: the next keep was recorded without a
    held-out score and without a word why, as if the second opinion did not exist."""
    from nightlab.loop.second_opinion import NoOpinion, second_opinion
    from nightlab.loop.workspace import open_workspace

    from tests.fakes.loop_workspace import make_stub_workspace

    settings = make_stub_workspace(tmp_path)
    ws = open_workspace(settings.workspace_path, settings)
    root = ws.path / ".nightlab" / "artifacts"
    kept, base = "a" * 40, "b" * 40
    (root / kept).mkdir(parents=True)
    (root / kept / "model.pt").write_bytes(b"the model just kept")  # the base's went with the clean
    opinion = second_opinion(ws, {}, kept, base, 0)
    assert opinion == NoOpinion(f"the model of bbbbbbb is not in {root} (removed?); the next keep is compared"
                                " with this one's")
    assert opinion.text().startswith("no held-out second opinion: the model of bbbbbbb") and opinion.metrics == {}


def test_a_held_out_score_the_run_saved_beside_its_model_is_not_its_second_opinion(tmp_path: Path) -> None:
    """The artifact folder is train.py's to write, and the kept model's folder was a copy of it: a
    `heldout-0.json` saved there was read as the held-out score already computed, so a keep that had
    memorised the scored rows could name its own held-out value and never be SUSPECT."""
    from nightlab.loop.second_opinion import heldout_bpb, keep_artifact
    from nightlab.loop.workspace import open_workspace

    from tests.fakes.loop_workspace import make_stub_workspace

    settings = make_stub_workspace(tmp_path)
    ws = open_workspace(settings.workspace_path, settings)
    saved = tmp_path / "run" / ".nightlab" / "artifact"
    saved.mkdir(parents=True)
    for name, text in {"model.pt": "weights", "meta.json": "{}", "train.py": "# code", "heldout-0.json": '{"bpb": 0.001}',
                       "notes.txt": "anything"}.items():
        (saved / name).write_text(text)
    kept = keep_artifact(ws, tmp_path / "run", "c" * 40)
    assert kept is not None and sorted(p.name for p in kept.iterdir()) == ["meta.json", "model.pt", "train.py"]
    assert heldout_bpb(ws, {}, "c" * 40, 0) is None  # scored by the harness (none in this stub workspace), not read


# the workspace's scorer on a held-out slice: never ends for the commits in $HANGS_ON (a model's code
# can tell a held-out slice from the scorer's argv), scores the others 1.0
HELD_OUT_SCORER = """
import json, os, sys, time
open(os.environ["SCORER_PID_FILE"], "a").write(f"{os.getpid()}\\n")
if os.path.basename(sys.argv[sys.argv.index("--artifact") + 1]) in os.environ["HANGS_ON"].split():
    while True:
        time.sleep(60)
json.dump({"bpb": 1.0}, open(sys.argv[sys.argv.index("--result") + 1], "w"))
"""


def _held_out(tmp_path: Path, hangs_on: list[str]):
    """The second opinion on keeping "a"*40 over "b"*40, with HELD_OUT_SCORER stopped after 2 s."""
    import psutil
    from nightlab.loop.second_opinion import second_opinion
    from nightlab.loop.workspace import open_workspace

    from tests.fakes.loop_workspace import make_stub_workspace

    settings = make_stub_workspace(tmp_path)
    ws = open_workspace(settings.workspace_path, settings)
    (ws.path / "harness.py").write_text(HELD_OUT_SCORER)
    root = ws.path / ".nightlab" / "artifacts"
    for commit in ("a" * 40, "b" * 40):
        (root / commit).mkdir(parents=True)
        (root / commit / "model.pt").write_bytes(b"weights")
    pid_file = tmp_path / "scorer.pids"
    ticks: list[None] = []
    opinion = second_opinion(ws, {"SCORER_PID_FILE": str(pid_file), "HANGS_ON": " ".join(hangs_on),
                                  "NIGHTLAB_DATA_DIR": "/data/stdlib"}, "a" * 40,
                             "b" * 40, 0, timeout_s=2.0, tick=lambda: ticks.append(None))
    assert ticks  # the engine stayed alive to the daemon
    for pid in map(int, pid_file.read_text().split() if pid_file.is_file() else []):  # each stopped since
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return opinion


def test_a_held_out_scorer_that_never_ends_is_stopped_and_said(tmp_path: Path) -> None:
    """The held-out scorer ran with no limit: one that never ended held the engine until the daemon
    restarted it, and again at each restart (the decision is made again from stored state), until the
    restarts paused the night. It is stopped after [heartbeat] run_timeout, the engine ticking
    meanwhile, and the keep says it got no second opinion."""
    from nightlab.loop.second_opinion import NoOpinion

    artifacts = tmp_path / "ws" / ".nightlab" / "artifacts"
    assert _held_out(tmp_path, ["a" * 40, "b" * 40]) == NoOpinion(
        "the harness could not score the model of aaaaaaa on held-out slice 0 (`NIGHTLAB_DATA_DIR=/data/stdlib python"
        " harness.py score --split"
        f" heldout --slice 0 --artifact {artifacts / ('a' * 40)}` failed or ran past 2 s, [heartbeat] run_timeout;"
        " run it in the workspace to see why)")


def test_a_keep_whose_own_model_cannot_be_scored_on_held_out_rows_is_suspect(tmp_path: Path) -> None:
    """A model's code can tell a held-out slice from the scorer's argv: a keep that memorised the
    scored rows and failed (or never ended) there got "no held-out second opinion", never SUSPECT,
    and so escaped the one check that shows such a keep. Its model unscored where the one it
    replaced scored is suspect, in the reason, the report's table, /best and the history."""
    (tmp_path / "night").mkdir()
    opinion = _held_out(tmp_path / "night", ["a" * 40])
    artifacts = tmp_path / "night" / "ws" / ".nightlab" / "artifacts"
    assert opinion.text() == ("held-out slice 0: SUSPECT: its model could not be scored there (the model of"
                              " bbbbbbb it replaced could; `NIGHTLAB_DATA_DIR=/data/stdlib python harness.py score"
                              " --split heldout --slice 0"
                              f" --artifact {artifacts / ('a' * 40)}` failed or ran past 2 s, [heartbeat]"
                              " run_timeout; run it in the workspace to see why)")
    store = Store.for_workspace(tmp_path)
    store.set("workspace.branch", "autoresearch/test")
    _record(store, 1, "baseline", 1.0, 1.0)
    _record(store, 2, "proposal", 0.9, 0.9, metrics=opinion.metrics)
    row = next(line for line in views.report_markdown(tmp_path).splitlines() if line.startswith("| 2 |"))
    assert "| unscored SUSPECT |" in row, row
    assert "held-out gain: unscored SUSPECT (its model could not be scored on rows no decision saw)" in views.best_text(
        tmp_path)
    assert views.history_text(tmp_path).splitlines()[1].endswith(
        "change 2 (SUSPECT: its model could not be scored on held-out rows)")


# the workspace's scorer on a held-out slice: fails (as out of the GPU's memory) on any GPU but the one in
# $FREE_GPU, where it scores 1.0
SCORER_ON_A_BUSY_GPU = """
import json, os, sys
if os.environ.get("CUDA_VISIBLE_DEVICES") != os.environ["FREE_GPU"]:
    sys.exit("torch.OutOfMemoryError: CUDA out of memory (another slot's training holds it)")
json.dump({"bpb": 1.0}, open(sys.argv[sys.argv.index("--result") + 1], "w"))
"""


def test_a_keep_is_scored_on_held_out_rows_on_its_own_slots_gpu_not_another_slots(tmp_path: Path) -> None:
    """The held-out scorer saw every GPU and took the first: in an asynchronous night a keep from slot
    gpu1 was scored on gpu0 while gpu0's run trained there (slowing that run, or out of its memory),
    and an unscorable keep is SUSPECT. It runs on the GPU of the run just recorded, free until the
    next launch, as that run did."""
    import dataclasses
    import threading

    from nightlab.loop.engine import Engine
    from nightlab.loop.engine.deciding import held_out_opinion
    from nightlab.loop.engine.outcome import Outcome
    from nightlab.loop.executors.local import LocalExecutor
    from nightlab.loop.second_opinion import SecondOpinion
    from nightlab.loop.workspace import open_workspace
    from nightlab.trainer.prepare import DEFAULT_ARTIFACT_DIR

    from tests.fakes.loop_workspace import make_stub_workspace
    from tests.fakes.scripted_proposer import ScriptedProposer

    settings = make_stub_workspace(tmp_path)
    ws = open_workspace(settings.workspace_path, settings)
    ctx = Engine(settings, ws, LocalExecutor(gpus=(0, 1)), ScriptedProposer([]), {"FREE_GPU": "1"}, threading.Event()).ctx
    ctx.ws = dataclasses.replace(ctx.ws, builtin_trainer=True)  # the stub workspace's run stands for the harness's
    (ws.path / "harness.py").write_text(SCORER_ON_A_BUSY_GPU)
    kept, base = "a" * 40, "b" * 40
    (ws.path / ".nightlab" / "artifacts" / base).mkdir(parents=True)
    (ws.path / ".nightlab" / "artifacts" / base / "model.pt").write_bytes(b"weights")
    cand = ledger.new_candidate(ctx.store, "proposal", base, commit=kept, description="a change")
    ledger.add_run(ctx.store, cand.id, "{}", "gpu1", str(tmp_path / "1.log"))
    artifact = ctx.run_dir(cand) / DEFAULT_ARTIFACT_DIR
    artifact.mkdir(parents=True, exist_ok=True)
    (artifact / "model.pt").write_bytes(b"weights")
    opinion = held_out_opinion(ctx, cand, Outcome("keep", 0.9, 0.9, "kept"), [])
    assert opinion == SecondOpinion(0, 1.0, 1.0), opinion.text() if opinion else opinion
