"""The fixed runtime harness trainer/harness.py: dtype choice, the budget, the causality probe,
and the fp16 (loss scaling) and bf16 paths run end to end on the CPU."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from nightlab.loop.judge import Measurement, failure_reason
from nightlab.loop.summary import parse_summary
from nightlab.trainer import profiles as P

from tests.trainer.test_prepare import damage_inside
from tests.trainer.test_train import finish_train, make_workspace, run_train, start_train


@pytest.mark.parametrize(("device", "capability", "requested", "expected"), [
    ("cuda", (9, 0), "", torch.bfloat16),  # H100
    ("cuda", (8, 6), "", torch.bfloat16),  # RTX 3090
    ("cuda", (7, 5), "", torch.float16),  # T4: no bf16, loss scaling
    ("cuda", (7, 0), "bf16", torch.float16),  # V100 asked for bf16: falls back, never crashes
    ("cpu", None, "", torch.float32),
    ("mps", None, "", torch.float32),
    ("cpu", None, "fp16", torch.float16),
    ("cpu", None, "BF16", torch.bfloat16),
    ("cuda", (9, 0), "fp32", torch.float32),
])
def test_dtype_choice(H, device, capability, requested, expected):
    dtype, why = H.choose_dtype(device, capability, requested)
    assert dtype == expected and why


def test_a_bad_dtype_is_named(H):
    with pytest.raises(H.HarnessError, match="NIGHTLAB_DTYPE='int8' is not one of bf16, fp16, fp32"):
        H.choose_dtype("cpu", None, "int8")


@pytest.mark.parametrize("key", ["../../x", "0123456789ab", "0123456789AB-0123456789ab"])
def test_a_rows_key_not_of_the_runs_making_is_refused_in_one_line(H, capsys, key):
    """It names the scored rows' cache files, which the scorer writes and prunes."""
    with pytest.raises(SystemExit) as ended:
        H.main(["score", "--rows-key", key])
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f" score: error: argument --rows-key: {key!r} is not a key of the scored rows (12 hex digits,"
        " '-', 12 hex digits); leave --rows-key out and the scorer hashes the data itself")


def test_wall_clock_budget_starts_after_the_untimed_steps(H):
    budget = H.Budget(seconds=3.0, untimed=2)
    dts = []
    while not budget.done:
        dts.append(budget.progress)
        budget.tick(1.0)
    assert budget.step == 5 and budget.counted == 3.0  # 2 untimed + 3 counted seconds
    assert dts == [0.0, 0.0, 0.0, 1 / 3, 2 / 3] and budget.progress == 1.0


def test_step_budget_counts_steps_whatever_they_cost(H, monkeypatch):
    monkeypatch.setenv("NIGHTLAB_BUDGET_STEPS", "4")
    budget = H.Budget.from_env()
    for dt in (100.0, 0.001, 50.0, 0.5):
        assert not budget.done
        budget.tick(dt)
    assert budget.done and budget.step == 4 and budget.progress == 1.0 and budget.remaining == "0 steps"
    assert budget.counted == pytest.approx(150.501)  # every step's time is reported


def test_causality_probe(H, T):
    model = T.build_model({"sequence_len": 32, "vocab_size": 96, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 32,
                               "window_pattern": "SL"}, torch.device("cpu"))
    torch.nn.init.normal_(model.lm_head.weight)  # untrained logits are near zero: make them move
    for block in model.transformer.h:
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
    rows = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        why, moved = H.causality_problem(model, rows, 96, torch.Generator().manual_seed(0))
        assert why is None and 0 <= moved < H.PROBE_ATOL  # how far an honest model's moved: numerical noise

        def peeks(x):  # position t also sees token t + 1
            return model(x) + 5 * torch.nn.functional.one_hot(torch.roll(x, -1, dims=1), 96)

        why, _ = H.causality_problem(peeks, rows, 96, torch.Generator().manual_seed(0))
    assert why and re.match(r"not causal: changing the tokens after position \d+ moved", why) and "looks ahead" in why
    with torch.no_grad():  # given the rows' logits (a scored batch), the probe reuses them
        assert H.causality_problem(peeks, rows, 96, torch.Generator().manual_seed(0), peeks(rows[:, :-1]))[0] == why
        # the new tokens taken from other rows (text, not noise): the same verdicts
        assert H.causality_problem(model, rows, 96, torch.Generator().manual_seed(0), pool=rows)[0] is None
        assert "looks ahead" in H.causality_problem(peeks, rows, 96, torch.Generator().manual_seed(0), pool=rows)[0]


REDUCED = ("fp16", "bf16")


@pytest.fixture(scope="module")
def reduced_precision_runs(tmp_path_factory, data_dir):
    """One run per reduced-precision dtype, both started at once: much of a run is one core's work
    (Python, torch, data, scoring), and they share nothing but the data they read."""
    tiny = P.PROFILES["tiny"]
    root = tmp_path_factory.mktemp("reduced")
    started = {}
    for dtype in REDUCED:
        # A quarter of the tiny profile's tokens per step (256 = 4 rows of 64): CPUs emulate fp16
        # slowly (~2 ms a token), and the loss still falls by ~1.4 in 8 steps (fp16 9.01 -> 7.62).
        ws = make_workspace(root / dtype, {**tiny.constants, "TOTAL_BATCH_SIZE": 2**8})
        started[dtype] = start_train(ws, data_dir, {**tiny.harness_env, "NIGHTLAB_DTYPE": dtype,
                                                    "NIGHTLAB_BUDGET_STEPS": "8", "NIGHTLAB_MAX_SEQ_LEN": "64",
                                                    "NIGHTLAB_EVAL_TOKENS": "2048"})
    return {dtype: finish_train(proc) for dtype, proc in started.items()}


@pytest.mark.slow
@pytest.mark.xdist_group("reduced-precision")  # both read the runs made once, on one worker
@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_precision_paths_train_on_cpu(reduced_precision_runs, dtype):
    proc = reduced_precision_runs[dtype]
    assert proc.returncode == 0, proc.stdout[-3000:]
    name = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert f"compute dtype {name} (NIGHTLAB_DTYPE={dtype})" in proc.stdout
    assert f"dtype: {name}" in proc.stdout
    losses = [float(m) for m in re.findall(r"\| loss (\d+\.\d+) \|", proc.stdout)]
    assert losses[-1] < losses[0] - 1.0, losses
    assert failure_reason(Measurement(proc.returncode, None, parse_summary(proc.stdout), ""), "val_bpb") is None


def test_bad_data_in_train_py_is_one_line_not_a_traceback(tmp_path, data_dir):
    """A shard damaged during the night, met by train.py's dataloader, ends the run with the harness's
    FAIL line (the engine pauses the night on it), what to do in it, and no traceback to read through."""
    tiny = P.PROFILES["tiny"]
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)  # the files themselves, not links to the shared fixture's
    damage_inside(data / "shard_00000.parquet")
    proc = run_train(make_workspace(tmp_path / "ws", tiny.constants), data, tiny.harness_env)
    assert proc.returncode == 1
    assert f"\nFAIL: data: {data / 'shard_00000.parquet'} is damaged (" in proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    reason = failure_reason(Measurement(1, None, parse_summary(proc.stdout), proc.stdout), "val_bpb")
    assert reason is not None and reason.startswith(f"data problem: {data / 'shard_00000.parquet'} is damaged (")


def test_a_data_failure_of_train_pys_own_making_is_its_crash(tmp_path, data_dir):
    """train.py reading a tokenizer from a folder of its own: the harness's hook in its process says
    `FAIL: data: …`, but the data it was given reads well, so the crash is the change's (it paused the
    night, and the change ran again after /resume)."""
    tiny = P.PROFILES["tiny"]
    ws = make_workspace(tmp_path / "ws", tiny.constants, edit=lambda source: source.replace(
        "tokenizer = Tokenizer.from_directory()", f"tokenizer = Tokenizer.from_directory({str(tmp_path)!r})"))
    proc = run_train(ws, data_dir, tiny.harness_env)
    assert proc.returncode == 1
    assert f"\ntrain.py| FAIL: data: no tokenizer at {tmp_path}/tokenizer.json. Run `python prepare.py" in proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert failure_reason(Measurement(1, None, parse_summary(proc.stdout), proc.stdout), "val_bpb") == "exit code 1"


def _no_file_over_4_mb():
    """In the run: files stop growing at 4 MB (a full disk, as the model's save meets it)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an error instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


def test_a_model_that_cannot_be_saved_is_one_line_not_a_traceback(tmp_path, data_dir):
    """torch says a full disk as "unexpected pos 576 vs 534" under a traceback; the run says what failed (the
    harness in the training process: shown as train.py's line, as every FAIL line of that process is)."""
    import os
    import subprocess
    import sys

    tiny = P.PROFILES["tiny"]
    ws = make_workspace(tmp_path / "ws", tiny.constants)
    env = {**os.environ, **tiny.harness_env, "NIGHTLAB_DATA_DIR": str(data_dir), "NIGHTLAB_BUDGET_STEPS": "1"}
    proc = subprocess.run([sys.executable, "prepare.py", "run"], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=180, check=False, preexec_fn=_no_file_over_4_mb)
    assert proc.returncode == 1
    assert f"\ntrain.py| FAIL: could not save the trained model in {ws}/.nightlab/artifact (" in proc.stdout
    assert " MB free there: a full disk? free space on it\n" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_scorers_buffers_go_to_dev_shm_only_where_they_fit(H):
    """A container's /dev/shm is often 64 MB: two file buffers of 128 MB written there end the process
    that writes past it (SIGBUS). Buffers that do not fit twice go to the temp dir."""
    free = (lambda st: st.f_bavail * st.f_frsize)(os.statvfs("/dev/shm"))
    assert H.buffer_dir(free // 4) == "/dev/shm"  # room for twice as much (other tests write there too)
    assert H.buffer_dir(free) is None
