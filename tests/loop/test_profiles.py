"""Hardware tiers: `auto` picks a profile from what nvidia-smi says (the fake in tests/fakes/bin
answers like the real one for each card), MPS or the CPU; the [trainer] budget keys reach every
run's environment and the recorded setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from nightlab.bot.digest import experiment_digest
from nightlab.loop import hardware
from nightlab.loop.engine import run_engine
from nightlab.loop.runenv import run_environment
from nightlab.loop.state import ledger
from nightlab.loop.state.config import ConfigError, settings_from_table
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import init_workspace, open_workspace
from nightlab.trainer import profiles as P

from tests.fakes.loop_workspace import make_stub_workspace

TRAINER = Path(P.__file__).parent


@pytest.mark.parametrize(("card", "expected", "dtype"), [
    ("Tesla T4", "16gb-fp16", "fp16"),
    ("Tesla V100-SXM2-16GB", "16gb-fp16", "fp16"),
    ("NVIDIA GeForce GTX 1080", "8gb-fp32", "fp32"),
    ("NVIDIA GeForce RTX 3060", "16gb", None),
    ("NVIDIA GeForce RTX 3070", "8gb", None),
    ("NVIDIA GeForce RTX 4090", "24gb", None),
    ("NVIDIA GeForce RTX 5090", "24gb", None),
    ("NVIDIA A100-SXM4-40GB", "default", None),
    ("NVIDIA A100-SXM4-80GB", "default", None),
    ("NVIDIA H100 80GB HBM3", "default", None),
    ("NVIDIA H200", "default", None),
])
def test_auto_picks_the_tier_from_nvidia_smi(fake_gpus, card: str, expected: str, dtype: str | None) -> None:
    fake_gpus([card])
    choice = P.choose("auto", hardware.machine())
    assert choice.profile.name == expected
    assert choice.profile.harness_env.get(P.DTYPE_ENV) == dtype
    assert card in choice.reason and "auto" in choice.reason
    if dtype:  # no bf16: never FlexAttention, and the reason says why
        assert choice.profile.constants["ATTENTION_BACKEND"] == "sdpa" and "no bf16" in choice.reason
    if dtype == "fp32":  # Pascal: no Triton, so no compile; fp32 activations take twice the room
        assert choice.profile.constants["COMPILE"] is False
        assert choice.profile.constants["DEVICE_BATCH_SIZE"] == P.PROFILES["8gb"].constants["DEVICE_BATCH_SIZE"] // 2


def test_several_gpus_use_the_smallest_and_the_executors_gpus(fake_gpus) -> None:
    fake_gpus(["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"])
    assert P.choose("auto", hardware.machine()).profile.name == "24gb"
    assert P.choose("auto", hardware.machine([0])).profile.name == "default"


def test_mps_and_no_gpu(fake_gpus) -> None:
    fake_gpus([])  # nvidia-smi is there and fails, as on a box without the driver loaded
    report = hardware.query_gpus()
    assert report.gpus == () and "exit 9" in report.problem
    assert P.choose("auto", P.Machine(report.gpus, mps=False)).profile.name == "tiny"
    choice = P.choose("auto", P.Machine((), mps=True))
    assert choice.profile.name == "mps" and "MPS" in choice.reason


def test_an_explicit_profile_is_kept_but_adapted_to_a_card_without_bf16(fake_gpus) -> None:
    fake_gpus(["Tesla T4"])
    choice = P.choose("24gb", hardware.machine())
    assert choice.profile.name == "24gb-fp16" and choice.profile.harness_env[P.DTYPE_ENV] == "fp16"
    assert P.choose("tiny", hardware.machine()).profile is P.PROFILES["tiny"]
    with pytest.raises(KeyError, match="unknown trainer profile"):
        P.choose("h100", hardware.machine())


def test_every_profile_fits_train_py_and_its_tiers_memory() -> None:
    source = (TRAINER / "train.py").read_text()
    for tier, capability in [(t, c) for t in P.PROFILES for c in (None, (7, 5), (6, 1))]:
        profile = P.for_capability(P.PROFILES[tier], capability)
        rewritten = P.apply_constants(source, profile.constants)  # every key is a train.py constant
        assert P.read_constants(rewritten, list(profile.constants)) == profile.constants
        if tier in P.TIER_MEMORY_GB:  # headroom: the estimate stays under 2/3 of the smallest card
            assert P.estimated_peak_bytes(profile) < 0.67 * P.TIER_MEMORY_GB[tier] * 2**30, profile.name
        seq = int(profile.harness_env.get("NIGHTLAB_MAX_SEQ_LEN", "2048"))
        assert int(str(profile.constants.get("TOTAL_BATCH_SIZE", 2**19))) % seq == 0


def test_init_writes_the_picked_tier_into_train_py(tmp_path: Path, fake_gpus) -> None:
    fake_gpus(["Tesla T4"])
    settings = settings_from_table({"workspace": {"path": str(tmp_path / "ws"), "tag": "t"}})
    said: list[str] = []
    ws = init_workspace(tmp_path / "ws", "t", settings, say=said.append)
    assert ws.profile == "16gb-fp16" and ws.harness_env["NIGHTLAB_DTYPE"] == "fp16"
    written = P.read_constants((ws.path / "train.py").read_text(), ["PROFILE", "DEPTH", "ATTENTION_BACKEND"])
    assert written == {"PROFILE": "16gb-fp16", "DEPTH": 6, "ATTENTION_BACKEND": "sdpa"}
    assert any("Tesla T4 (15 GB, sm75)" in line for line in said)


def test_budget_keys_reach_the_run_and_the_recorded_setting(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path, trainer={"time_budget": 120, "max_seq_len": 512, "eval_tokens": 4096})
    env = run_environment(open_workspace(settings.workspace_path, settings), settings)
    assert {k: env[k] for k in ("NIGHTLAB_TIME_BUDGET", "NIGHTLAB_MAX_SEQ_LEN", "NIGHTLAB_EVAL_TOKENS")} == {
        "NIGHTLAB_TIME_BUDGET": "120", "NIGHTLAB_MAX_SEQ_LEN": "512", "NIGHTLAB_EVAL_TOKENS": "4096"}
    assert run_engine(settings, 1) == 0
    store = Store.for_workspace(settings.workspace_path)
    (exp,) = ledger.experiments(store)
    recorded = store.get(hardware.SETTING_KEY + exp.setting)
    assert recorded["env"]["NIGHTLAB_TIME_BUDGET"] == "120" and recorded["env"]["NIGHTLAB_EVAL_TOKENS"] == "4096"
    logs = list((settings.workspace_path / ".nightlab" / "runs").rglob("*.log"))
    assert any("budget='120'" in log.read_text() for log in logs)  # what the run itself saw
    finished = [e for e in store.events_after(0) if e.kind == "experiment_finished"]
    assert finished[0].payload["harness"] == {"eval_tokens": "4096", "max_seq_len": "512", "time_budget": "120"}
    message = experiment_digest(finished[0].payload, 15)  # the first digest says what the night runs with
    digest = "".join(span.text for span in message.spans)  # type: ignore[union-attr]
    assert "\nprofile custom · eval_tokens 4096 · max_seq_len 512 · time_budget 120" in digest
    # another budget is another setting: results are never compared across the two
    other = settings_from_table({**_table(settings), "trainer": {"time_budget": 60}})
    assert hardware.setting_of("x", run_environment(open_workspace(other.workspace_path, other), other)) != \
        hardware.setting_of("x", env)


def _table(settings) -> dict:
    return {"workspace": {"path": str(settings.workspace_path), "tag": "test"},
            "project": {"run_command": settings.project.run_command}}


@pytest.mark.parametrize(("table", "message"), [
    ({"trainer": {"time_budget": -5}}, "trainer.time_budget = -5"),
    ({"trainer": {"time_budget": 900}}, "heartbeat.run_timeout = 600.0: expected at least trainer.time_budget"),
    ({"trainer": {"profile": "h100"}}, "'24gb'"),
    ({"loop": {"max_experiments": -1}}, "loop.max_experiments"),
])
def test_bad_budget_keys_are_named(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        settings_from_table(table, source="f.toml")


def test_budget_keys_are_the_harness_names() -> None:
    from nightlab.loop import judge, overtime
    from nightlab.loop.engine import launching
    from nightlab.loop.state.config import BUDGET_STEPS_ENV, HARNESS_ENV
    from nightlab.trainer import prepare

    assert set(HARNESS_ENV.values()) == {prepare.ENV_TIME_BUDGET, prepare.ENV_MAX_SEQ_LEN, prepare.ENV_EVAL_TOKENS}
    assert BUDGET_STEPS_ENV == prepare.ENV_BUDGET_STEPS
    assert judge.DATA_FAIL == prepare.DATA_FAIL  # how a run says its data failed
    assert judge.HARNESS_CHANGED == prepare.HARNESS_CHANGED  # how a run's refusal says its harness changed
    assert judge.PYTHON_CHANGED == prepare.PYTHON_CHANGED  # ... and that the scorer's Python changed
    assert overtime.TRAINING_WALL == prepare.TRAINING_WALL  # the training command's wall clock, timed by the harness
    assert launching.PYTHON_SINCE_ENV == prepare.ENV_PYTHON_SINCE
    settings = settings_from_table({"trainer": {"time_budget": 200}})
    assert prepare.harness_settings(settings.trainer.harness_overrides())["TIME_BUDGET"] == 200


def test_a_time_budget_replaces_the_tiny_profiles_step_budget() -> None:
    """tiny trains 40 steps, not seconds; a researcher who sets trainer.time_budget on a CPU box
    asked for seconds, and the digest shows the budget in force, not a time budget that is not."""
    tiny = P.PROFILES["tiny"].harness_env
    as_shipped = settings_from_table({"trainer": {"profile": "tiny"}}).trainer.harness_env(tiny)
    assert as_shipped["NIGHTLAB_BUDGET_STEPS"] == "40"
    assert hardware.harness_values(as_shipped) == {"budget_steps": "40", "eval_tokens": "8192", "max_seq_len": "256"}
    seconds = settings_from_table({"trainer": {"profile": "tiny", "time_budget": 60}}).trainer.harness_env(tiny)
    assert "NIGHTLAB_BUDGET_STEPS" not in seconds and seconds["NIGHTLAB_TIME_BUDGET"] == "60"
    assert hardware.harness_values(seconds) == {"eval_tokens": "8192", "max_seq_len": "256", "time_budget": "60"}
