"""The Slurm executor: state mapping and config on their own, then against a real Slurm.

The real-cluster tests share one module-scoped cluster with two fake GPUs (tests/loop/conftest.py).
Slurm's own clocks set the pace: slurmctld sweeps for jobs past their time limit every 30 s and
notices a dead node after ~30 s, so the two slow events run at once on two clusters
(test_slow_events_...).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from nightlab.heartbeat.engine_child import EngineProcess
from nightlab.heartbeat.jobs import Heartbeat
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.engine import run_engine
from nightlab.loop.executors import RunHandle, RunSpec, RunStatus, Slot
from nightlab.loop.executors.runfiles import exit_file
from nightlab.loop.executors.slurm import JobState, SlurmExecutor, map_state, slurm_time
from nightlab.loop.state import ledger
from nightlab.loop.state.config import ConfigError, Settings, settings_from_table
from nightlab.loop.state.ledger import started_at
from nightlab.loop.state.store import Store

from tests.fakes.loop_workspace import Gates, make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.fakes.slurm_cluster import SlurmCluster
from tests.waiting import wait_until

# one worker under pytest-xdist: the module-scoped clusters start once, not once per worker
pytestmark = pytest.mark.xdist_group("slurm")


# -- no cluster needed ------------------------------------------------------------------------------
@pytest.mark.parametrize(("job", "code", "expected"), [
    (JobState("PENDING", ""), None, RunStatus("pending")),
    (JobState("REQUEUED", ""), None, RunStatus("pending")),
    (JobState("CONFIGURING", "n1"), None, RunStatus("pending", where="n1")),
    (JobState("RUNNING", "n1"), None, RunStatus("running", where="n1")),
    (JobState("COMPLETING", "n1"), 0, RunStatus("exited", 0, where="n1")),
    (JobState("COMPLETED", "n1"), 0, RunStatus("exited", 0, where="n1")),
    (JobState("FAILED", "n1"), 3, RunStatus("exited", 3, where="n1")),
    (JobState("FAILED", "n1"), None, RunStatus("lost", reason="Slurm says FAILED but the job wrote no exit status", where="n1")),
    (JobState("CANCELLED", "n1"), None, RunStatus("lost", reason="cancelled in Slurm (scancel)", where="n1")),
    (JobState("TIMEOUT", "n1"), None, RunStatus("lost", reason="timeout: the Slurm time limit (11:00) was reached", where="n1")),
    (JobState("NODE_FAIL", "n1"), None, RunStatus("lost", reason="node failure: the job's node stopped responding (not requeued)", where="n1")),
    (JobState("PREEMPTED", "n1"), None, RunStatus("lost", reason="preempted by Slurm (not requeued)", where="n1")),
    (None, 0, RunStatus("exited", 0)),
    (None, None, RunStatus("lost", reason="the job is gone from Slurm without an exit status")),
])
def test_slurm_states_map_onto_the_loops(job: JobState | None, code: int | None, expected: RunStatus) -> None:
    assert map_state(job, code, "11:00") == expected


def test_time_limit_is_the_run_timeout_plus_the_margin() -> None:
    assert slurm_time(600 + 300) == "15:00"
    assert slurm_time(5) == "1:00"  # Slurm counts limits in minutes


@pytest.mark.parametrize(("slurm", "message"), [
    ({}, "executor.slurm.shared_dir = '': expected a directory every compute node sees"),
    ({"shared_dir": "rel/dir"}, "executor.slurm.shared_dir = 'rel/dir': expected an absolute path"),
    ({"shared_dir": "/s", "jobs": 0}, "executor.slurm.jobs = 0: expected at least 1"),
    ({"shared_dir": "/s", "extra_args": ["--time=5"]}, "executor.slurm.extra_args = ['--time=5']: expected no --time"),
    ({"shared_dir": "/s", "partiton": "gpu"}, "unknown key 'executor.slurm.partiton'"),
])
def test_bad_slurm_config_names_key_value_and_expectation(slurm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        settings_from_table({"executor": {"kind": "slurm", "slurm": slurm}}, source="c.toml")
    assert message in str(err.value)


def test_old_local_handles_still_load() -> None:
    old = '{"backend": "local", "create_time": 12.5, "log_path": "/l", "pid": 7, "slot": "gpu0"}'
    handle = RunHandle.from_json(old)
    assert (handle.pid, handle.job_id, handle.key) == (7, "", "local:7:12.500")
    slurm = RunHandle("slurm", 0, 0.0, "/l", "slurm0", job_id="42")
    assert RunHandle.from_json(slurm.to_json()) == slurm and slurm.key == "slurm:42"


# -- a real Slurm -----------------------------------------------------------------------------------
def _executor(cluster: SlurmCluster, jobs: int = 3, **conf: Any) -> SlurmExecutor:
    table = {"executor": {"kind": "slurm", "slurm": {"shared_dir": str(cluster.root / "shared"), "jobs": jobs,
                                                     "poll_interval": 0.2, **conf}}}
    settings = settings_from_table(table)
    return SlurmExecutor(settings.executor.slurm, settings.heartbeat.run_timeout, env=cluster.env)


def _spec(cluster: SlurmCluster, name: str, command: str, slot: str = "slurm0") -> RunSpec:
    cwd = cluster.root / "shared" / "wt"
    cwd.mkdir(exist_ok=True)
    return RunSpec(command, cwd, cluster.root / "shared" / "runs" / f"{name}.log", Slot(slot), {"NIGHTLAB_X": "it's"})


EVERY = 0.2  # the tests poll Slurm this often (each poll is a squeue call)


def test_two_jobs_run_at_once_a_third_waits_and_polls_are_batched(slurm: SlurmCluster, tmp_path: Path) -> None:
    ex = _executor(slurm)
    gate = slurm.root / "shared" / f"gate-{tmp_path.name}"  # the jobs end once it exists
    cmd = (f'echo "cuda=$CUDA_VISIBLE_DEVICES x=$NIGHTLAB_X pwd=$(pwd)"; until [ -e {gate} ]; do sleep 0.05; done;'
           ' exit {code}')
    handles = [ex.launch(_spec(slurm, f"w{i}", cmd.format(code=i), f"slurm{i}")) for i in range(3)]
    states = wait_until(lambda: (s := ex.poll(handles)) and sorted(v.state for v in s.values()) == [
        "pending", "running", "running"] and s, "two jobs running, one pending", 30, every=EVERY)
    assert states[handles[2].key].state == "pending"  # the last submitted waits for a GPU
    gate.touch()
    before = ex.squeue_calls
    final = wait_until(lambda: (s := ex.poll(handles)) and all(v.state == "exited" for v in s.values()) and s,
                       "the three jobs to exit", 40, every=EVERY)
    assert [final[h.key].exit_code for h in handles] == [0, 1, 2]
    assert ex.squeue_calls - before <= (40 / EVERY) + 1  # never one call per job
    logs = [ex.read_log(h) for h in handles]
    assert sorted(log.split("cuda=")[1][0] for log in logs[:2]) == ["0", "1"]  # distinct GPUs
    assert all("x=it's" in log and f"pwd={slurm.root}/shared/wt" in log for log in logs)
    assert all(started_at(h.log_path) is not None for h in handles)


def test_one_squeue_call_for_many_jobs(slurm: SlurmCluster) -> None:
    ex = _executor(slurm, poll_interval=0.01)
    handles = [ex.launch(_spec(slurm, f"b{i}", "exit 0")) for i in range(5)]
    time.sleep(0.05)
    before = ex.squeue_calls
    ex.poll(handles)
    assert ex.squeue_calls == before + 1
    wait_until(lambda: all(s.state == "exited" for s in ex.poll(handles).values()), "the jobs to exit", 30,
               every=EVERY)


def test_cancel(slurm: SlurmCluster) -> None:
    ex = _executor(slurm)
    handle = ex.launch(_spec(slurm, "c", "sleep 300"))
    wait_until(lambda: ex.poll([handle])[handle.key].state == "running", "the job to run", 30, every=EVERY)
    ex.cancel(handle)
    status = wait_until(lambda: (s := ex.poll([handle])[handle.key]).state == "lost" and s, "the job to be lost", 30,
                        every=EVERY)
    assert status.reason == "cancelled in Slurm (scancel)"  # nightlab's own kill carries its reason


def _slurm_settings(tmp_path: Path, cluster: SlurmCluster, run_timeout: float = 600.0, margin: float = 300.0) -> Settings:
    return make_stub_workspace(
        tmp_path, executor={"kind": "slurm", "slurm": {"shared_dir": str(cluster.root / "shared"),
                                                       "poll_interval": 0.3, "time_margin": margin}},
        heartbeat={"run_timeout": run_timeout},
    )


class _Engine:
    def __init__(self, settings: Settings, cluster: SlurmCluster, steps: list[dict[str, Any]], limit: int,
                 gates: Gates | None = None) -> None:
        self.stop, self.result = threading.Event(), []  # type: ignore[var-annotated]
        # the jobs inherit sbatch's environment: the gates' folder reaches the stub trainer that way
        env = cluster.env if gates is None else {**cluster.env, "NIGHTLAB_STUB_GATES": str(gates.folder)}
        ex = SlurmExecutor(settings.executor.slurm, settings.heartbeat.run_timeout, env=env)

        def target() -> None:
            try:
                self.result.append(run_engine(settings, limit, self.stop, proposer=ScriptedProposer(steps), executor=ex))
            except BaseException as exc:  # noqa: BLE001 -- surfaced by join()
                self.result.append(exc)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the engine did not finish"
        assert self.result == [0], self.result


def _run_of(store: Store, number: int) -> ledger.RunRecord | None:
    cands = [c for c in ledger.open_candidates(store) if c.number == number]
    return ledger.run_for_candidate(store, cands[0].id) if cands else None


def test_engine_restart_reattaches_to_a_running_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    settings = _slurm_settings(tmp_path, slurm)
    store = Store.for_workspace(settings.workspace_path)
    steps = [{"set": {"VAL_BPB": [0.9]}}]
    gates = Gates(tmp_path / "gates")  # #2 runs until the second engine has polled it
    gates.open(1)
    first = _Engine(settings, slurm, steps, 2, gates)
    run = wait_until(lambda: (r := _run_of(store, 2)) and started_at(r.log_path) and r, "#2 to start", 30, every=EVERY)
    first.stop.set()
    first.join()
    job = RunHandle.from_json(run.handle).job_id
    assert job and ledger.get_run(store, run.id).state == "running"  # left running, not recorded
    ticks = [store.get("engine.tick")]

    def ticked_twice() -> bool:  # each checkpoint ticks, and a poll of the runs comes between two
        if (tick := store.get("engine.tick")) != ticks[-1]:
            ticks.append(tick)
        return len(ticks) > 2

    second = _Engine(settings, slurm, steps, 2, gates)
    wait_until(ticked_twice, "two ticks of the second engine", 30)
    assert ledger.get_run(store, run.id).state == "running"
    gates.open(2)
    second.join()
    rows = ledger.experiments(store)
    assert [(e.number, e.status, e.metric) for e in rows] == [(1, "keep", 1.0), (2, "keep", 0.9)]
    assert ledger.run_for_candidate(store, ledger.get_candidate(store, 2).id).id == run.id  # the same run
    assert rows[1].slot.startswith("slurm0@")  # the node it ran on
    assert ledger.running_runs(store) == []


def _kill_node(cluster: SlurmCluster, log_path: str) -> None:
    """The node dies: slurmd and the job's processes (its slurmstepd included) are gone."""
    cluster.kill_slurmd()
    victims = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("NIGHTLAB_EXIT_FILE") == str(exit_file(log_path)):
                victims.append(proc)  # the trainer; then its ancestors up to the job's slurmstepd
                for parent in proc.parents():
                    victims.append(parent)
                    if parent.name() == "slurmstepd":
                        break
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert victims, "the job's processes were not found"
    for signal_them in (psutil.Process.suspend, psutil.Process.kill):  # frozen first: a dead node writes nothing
        for proc in reversed(victims):
            try:
                signal_them(proc)
            except psutil.NoSuchProcess:
                pass


def _node_idle(cluster: SlurmCluster) -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False, env=cluster.env)
    return out.stdout.strip() == "idle"


def _agents_idle(cluster: SlurmCluster) -> bool:
    """slurmctld has no RPC to a node in flight or queued for a retry (sdiag's agent counters)."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, check=False, env=cluster.env).stdout
    counts = dict(re.findall(r"^(Agent queue size|Agent count):\s+(\d+)$", out, re.MULTILINE))
    return counts == {"Agent queue size": "0", "Agent count": "0"}


def _squeue(cluster: SlurmCluster, job: str, fields: str = "%T|%r") -> str:
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", fields],
                         capture_output=True, text=True, env=cluster.env, check=False)
    return out.stdout.strip()


def test_slow_events_node_failure_requeues_the_same_candidate_and_time_limit_is_a_timeout_crash(
    slurm: SlurmCluster, slurm_b: SlurmCluster, tmp_path: Path,
) -> None:
    # Cluster B: a run that hangs past its Slurm time limit (no heartbeat here: the limit is the
    # backstop). It runs while cluster A loses its node.
    (tmp_path / "b").mkdir()
    timeout_settings = _slurm_settings(tmp_path / "b", slurm_b, run_timeout=5.0, margin=0.0)  # --time=1:00
    b_store = Store.for_workspace(timeout_settings.workspace_path)
    hang = _Engine(timeout_settings, slurm_b, [{"set": {"MODE": "hang"}}], 2)

    (tmp_path / "a").mkdir()
    gates = Gates(tmp_path / "gates")  # #2's first attempt never gets past its gate: the node dies first
    gates.open(1)
    settings = _slurm_settings(tmp_path / "a", slurm)
    store = Store.for_workspace(settings.workspace_path)
    engine = _Engine(settings, slurm, [{"set": {"VAL_BPB": [0.8]}}], 2, gates)

    hung = wait_until(lambda: (r := _run_of(b_store, 2)) and started_at(r.log_path) and r, "B's #2 to start", 60,
                      every=EVERY)
    hung_job = RunHandle.from_json(hung.handle).job_id
    assert _squeue(slurm_b, hung_job, "%l") == "1:00"  # nightlab's limit: run_timeout + margin
    # An admin's cut to 0 (end time = start) puts the job past its limit now instead of in a minute;
    # slurmctld's next time-limit sweep (every 30 s) ends it as TIMEOUT, as it would have at 1:00.
    subprocess.run(["scontrol", "update", f"JobId={hung_job}", "TimeLimit=0"], env=slurm_b.env, check=True)

    run = wait_until(lambda: (r := _run_of(store, 2)) and started_at(r.log_path) and r, "#2 to start", 60, every=EVERY)
    job = RunHandle.from_json(run.handle).job_id
    _kill_node(slurm, run.log_path)
    gates.open(2)  # for the next attempt
    # Slurm notices the silent node (SlurmdTimeout), marks it down and requeues the job
    wait_until(lambda: _squeue(slurm, job).startswith("PENDING"), "the job requeued", 60, every=0.5)
    slurm.start_slurmd()
    # The node's return must settle first: slurmctld's kill for the failed attempt (retried by its
    # agent until the node answers) reaches the new slurmd and would also kill an attempt started at
    # that very moment (same job id).
    wait_until(lambda: _node_idle(slurm) and _agents_idle(slurm), "the node idle, no RPC to it pending", 30,
               every=0.3)
    # a requeued job is held back for a while (reason BeginTime); an admin's nudge skips the wait
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, check=True)
    engine.join(90)
    rows = ledger.experiments(store)
    assert [(e.number, e.status, e.metric) for e in rows] == [(1, "keep", 1.0), (2, "keep", 0.8)]
    runs = store.connection().execute("SELECT handle FROM runs WHERE candidate_id = ?",
                                      (ledger.get_candidate(store, 2).id,)).fetchall()
    assert [RunHandle.from_json(r["handle"]).job_id for r in runs] == [job]  # one run, the same job
    started = [e for e in store.events_after(0, 10_000) if e.kind == "experiment_started"]
    assert [e.payload["number"] for e in started] == [1, 2]  # announced once
    assert Path(run.log_path).read_text().count("step 00001") == 1  # the log is the last attempt's

    hang.join(90)
    b = ledger.experiments(b_store)
    assert [(e.number, e.status) for e in b] == [(1, "keep"), (2, "crash")]
    assert b[1].reason == "timeout: the Slurm time limit (1:00) was reached"


def test_sbatch_errors_are_clear(slurm: SlurmCluster) -> None:
    ex = _executor(slurm, partition="nosuchpartition")
    with pytest.raises(Exception, match="sbatch failed"):
        ex.launch(_spec(slurm, "e", "true"))


def test_make_executor_refuses_without_slurm_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = settings_from_table({"executor": {"kind": "slurm", "slurm": {"shared_dir": "/s"}}}, source="c.toml")
    with pytest.raises(ConfigError, match="executor.kind = 'slurm': sbatch, squeue, scancel not found on PATH"):
        SlurmExecutor.from_settings(settings)



def test_a_job_whose_log_an_agent_removed_is_not_killed_as_stalled(slurm: SlurmCluster, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An agent's `git clean -fdx` took .nightlab/runs: the job writes on on its node into the removed
    file, out of the heartbeat's sight (the /proc fallback is a local run's), which took it for silent
    since it started and killed it as stalled."""
    ex = _executor(slurm)
    gate = slurm.root / "shared" / f"gate-{tmp_path.name}"
    spec = _spec(slurm, "cleaned", f"until [ -e {gate} ]; do echo step; sleep 0.1; done")
    handle = ex.launch(spec)
    wait_until(lambda: ex.poll([handle])[handle.key].state == "running", "the job to run", 30, every=EVERY)
    # Slurm says RUNNING once the job has its node, a moment before the node's step opens the log
    wait_until(lambda: spec.log_path.is_file() and "step" in spec.log_path.read_text(), "the job to print", 30,
               every=EVERY)
    settings = settings_from_table({"heartbeat": {"stall_after": 1.0}})
    store = Store.for_workspace(tmp_path / "ws")
    ledger.add_run(store, 1, handle.to_json(), "slurm0", str(spec.log_path))
    beat = Heartbeat(settings, tmp_path / "ws", store, ex, EngineProcess(["true"]), Notifier(None),
                     on_engine_stopped=lambda why, code: None)
    spec.log_path.unlink()
    removed = time.time()

    def beats_for_three_stall_afters() -> bool:
        beat.check_runs()
        return time.time() - removed > 3.0

    wait_until(beats_for_three_stall_afters, "beats for three times stall_after", 30, every=EVERY,
               abort=lambda: ledger.get_run(store, 1).kill_reason)
    assert ledger.get_run(store, 1).kill_reason is None and ex.poll([handle])[handle.key].state == "running"
    assert caplog.text.count("its log") == 1  # said once: only run_timeout bounds it now
    gate.touch()
    wait_until(lambda: ex.poll([handle])[handle.key].state == "exited", "the job to end", 30, every=EVERY)
    assert "step\nstep\n" in spec.log_path.read_text()  # written back by its wrapper
