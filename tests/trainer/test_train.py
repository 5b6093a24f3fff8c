"""The editable baseline trainer/train.py and trainer/profiles.py, on CPU.

Model and optimizer pieces are tested in-process (train.py is imported from its file with the
fixed harness importable as `prepare` and `harness`; importing it does not train). The whole run
(`python prepare.py run`: train, then score in the harness) is tested as a subprocess in a
throwaway workspace: the tiny profile end to end, and a NaN fast-fail.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from nightlab.loop.judge import Measurement, failure_reason
from nightlab.loop.summary import parse_summary
from nightlab.trainer import prepare
from nightlab.trainer import profiles as P

from tests.conftest import REPO

TRAINER = REPO / "trainer"
SUMMARY_FORMATS = [  # upstream's block: names, order, number formats
    ("val_bpb", r"\d+\.\d{6}"),
    ("training_seconds", r"\d+\.\d"),
    ("total_seconds", r"\d+\.\d"),
    ("peak_vram_mb", r"\d+\.\d"),
    ("mfu_percent", r"(\d+\.\d{2}|n/a)"),
    ("total_tokens_M", r"(\d+\.\d|0\.\d{6})"),  # every token under a million (tiny's)
    ("num_steps", r"\d+"),
    ("num_params_M", r"\d+\.\d"),
    ("depth", r"\d+"),
]


# ---------------------------------------------------------------------------
# train.py as a module
# ---------------------------------------------------------------------------


def small_model(T, seq=32, vocab=96, n_layer=3, n_embd=32, n_head=2, pattern="SL", backend="sdpa"):
    torch.manual_seed(0)
    T.harness.use_backend(backend)
    config = {"sequence_len": seq, "vocab_size": vocab, "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_head,
                  "n_embd": n_embd, "window_pattern": pattern}
    return T.build_model(config, torch.device("cpu"))


def naive_attention(q, k, v, window):
    """Reference: (B, T, H, D) inputs, causal with left window, explicit softmax."""
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
    Tn = q.size(2)
    i = torch.arange(Tn)[:, None]
    j = torch.arange(Tn)[None, :]
    allowed = (j <= i) & (i - j <= window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_import_does_not_train_and_constants_are_top_level(T):
    assert T.DEPTH == 8 and T.ASPECT_RATIO == 64 and T.HEAD_DIM == 128 and T.WINDOW_PATTERN == "SSSL"
    constants = P.read_constants((TRAINER / "train.py").read_text())
    assert constants["TOTAL_BATCH_SIZE"] == 2**19
    assert all(name.isupper() for name in constants)  # the only UPPER_CASE globals are hyperparameters
    config = T.build_model_config(T.DEPTH, 8192, 2048)
    assert (config.n_embd, config.n_head, config.n_layer) == (512, 4, 8)


def test_forward_backward_shapes(T):
    model = small_model(T)
    B, S = 2, 32
    x = torch.randint(0, 96, (B, S))
    y = torch.randint(0, 96, (B, S))
    logits = model(x)
    assert logits.shape == (B, S, 96) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap
    per_token = model(x, y, reduction="none")
    assert per_token.shape == (B * S,)
    loss = model(x, y)
    assert loss.ndim == 0 and torch.isclose(loss, per_token.mean())
    assert abs(loss.item() - math.log(96)) < 0.1  # untrained: near-uniform predictions
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    # Shorter sequences work (masks built lazily outside the precomputed length)
    assert model(x[:, :20], y[:, :20]).ndim == 0


def test_architecture_details(T):
    model = small_model(T, n_layer=4, pattern="SSL")
    assert model.window_sizes == [16, 16, 32, 32]  # S = half, L = full, last layer always full
    assert sorted(model.value_embeds.keys()) == ["1", "3"]  # alternating, last included
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [False, True, False, True]
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied
    assert model.resid_lambdas.shape == (4,) and model.x0_lambdas.shape == (4,)
    with pytest.raises(ValueError, match="WINDOW_PATTERN"):
        T.compute_window_sizes(4, 32, "SXL")


@pytest.mark.parametrize("window", [0, 3, 17, 38, 39, 500])
def test_sdpa_window_matches_naive(H, window):
    torch.manual_seed(window)
    q, k, v = (torch.randn(2, 40, 3, 8) for _ in range(3))
    H.use_backend("sdpa")
    y = H.attention(q, k, v, window)
    assert y.shape == q.shape
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [0, 5, 20, 39])
def test_flex_window_matches_naive(H, window):
    if not H.flex_available():
        pytest.skip("FlexAttention unavailable")
    torch.manual_seed(100 + window)
    q, k, v = (torch.randn(2, 40, 3, 8) for _ in range(3))
    H.use_backend("flex")
    y = H.attention(q, k, v, window)  # eager flex on CPU: slow reference path, exact masks
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_backends_agree(T):
    if not T.harness.flex_available():
        pytest.skip("FlexAttention unavailable")
    x = torch.randint(0, 96, (2, 32))
    a = small_model(T, backend="sdpa")
    with torch.no_grad():
        expected = a(x)
    b = small_model(T, backend="flex")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # flex has no backward on CPU
        torch.testing.assert_close(b(x), expected, atol=1e-4, rtol=1e-4)
    T.harness.use_backend("sdpa")


def test_attention_flops_use_real_windows(T):
    for Tn, window in [(40, 5), (40, 39), (2048, 1024), (2048, 2048), (7, 0)]:
        i = torch.arange(Tn)[:, None]
        j = torch.arange(Tn)[None, :]
        keys = ((j <= i) & (i - j <= window)).sum().item() / Tn
        assert T.mean_attended_keys(Tn, window) == pytest.approx(keys)
    # Upstream's shape: a full-context layer costs more than a half-window one
    model = small_model(T, seq=32, n_layer=2, pattern="S")
    full = small_model(T, seq=32, n_layer=2, pattern="L")
    assert model.estimate_flops() < full.estimate_flops()


def test_optimizer_step_lowers_loss(T):
    model = small_model(T)
    optimizer = model.setup_optimizer(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                                      compile_steps=False, ns_dtype=torch.float32)
    kinds = sorted({g["kind"] for g in optimizer.param_groups})
    assert kinds == ["adamw", "muon"]
    muon_params = {id(p) for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}  # Muon: block matrices only
    torch.manual_seed(1)
    x = torch.randint(0, 96, (4, 32))
    y = torch.roll(x, -1, dims=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(8):
        loss = model(x, y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.5, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "transformer.h.0.mlp.c_fc.weight" in changed and "lm_head.weight" in changed and "transformer.wte.weight" in changed


def test_muon_orthogonalises(T):
    torch.manual_seed(0)
    g = torch.randn(1, 64, 32)
    p = torch.zeros(1, 64, 32)
    one = lambda v: torch.tensor(v)
    T.muon_step(g.clone(), p, torch.zeros_like(g), torch.zeros(1, 64, 1), one(0.0), one(1.0), one(0.0), one(0.0),
                5, -1, torch.float32)
    s = torch.linalg.svdvals(p[0])
    assert s.max() / s.min() < 3  # singular values pulled together (polar express is approximate)


def test_lr_schedule(T):
    assert T.get_lr_multiplier(0.0) == 1.0
    assert T.get_lr_multiplier(0.5) == pytest.approx(1.0)
    assert T.get_lr_multiplier(0.75) == pytest.approx(0.5)
    assert T.get_lr_multiplier(1.0) == pytest.approx(T.FINAL_LR_FRAC)


def test_peak_flops_table(H):
    assert H.peak_flops_for("NVIDIA H100 80GB HBM3") == 989.5e12
    assert H.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert H.peak_flops_for("NVIDIA H200") == 989.5e12
    assert H.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert H.peak_flops_for("NVIDIA L40S") == 362e12
    assert H.peak_flops_for("NVIDIA GeForce RTX 4090") == 165.2e12
    assert H.peak_flops_for("NVIDIA GeForce RTX 3090") == 71e12
    assert H.peak_flops_for("NVIDIA GeForce RTX 5090") == 209.5e12
    assert H.peak_flops_for("Tesla T4") is None
    assert H.peak_flops_for("CPU") is None


def test_cpu_hint_only_for_gpu_sized_constants(H):
    assert "tiny profile" in H.cpu_hint("cpu", 3e8 * 2**19)
    assert H.cpu_hint("cpu", 1e7 * 1024) is None
    assert H.cpu_hint("cuda", 3e8 * 2**19) is None


def test_fit_device_batch(H, T, monkeypatch):
    config = vars(T.build_model_config(8, 8192, 2048))
    monkeypatch.setattr(H, "available_memory_bytes", lambda device: 80 * 2**30)
    assert H.fit_device_batch(config, 50_000_000, 2048, 2**19, 128, torch.device("cuda")) == 128
    monkeypatch.setattr(H, "available_memory_bytes", lambda device: 24 * 2**30)
    b = H.fit_device_batch(config, 50_000_000, 2048, 2**19, 128, torch.device("cuda"))
    assert b < 128 and 256 % b == 0  # grad accumulation keeps TOTAL_BATCH_SIZE
    with pytest.raises(H.HarnessError, match="multiple of MAX_SEQ_LEN"):
        H.fit_device_batch(config, 1, 2048, 3000, 128, torch.device("cpu"))
    assert H.smaller_batch(128, 256) == 64 and H.smaller_batch(6, 6) == 3 and H.smaller_batch(1, 4) is None


# ---------------------------------------------------------------------------
# Attention backend selection
# ---------------------------------------------------------------------------


def test_backend_on_cpu_is_sdpa(H):
    name, module, note = H.select_attention_backend("cpu", None, "auto")
    assert (name, module) == ("sdpa", None) and "fa3 needs CUDA" in note
    assert H.select_attention_backend("cpu", None, "flex")[0] == "flex"
    with pytest.raises(H.HarnessError):
        H.select_attention_backend("cpu", None, "xformers")


def test_backend_falls_back_when_kernels_cannot_load(H, monkeypatch, tmp_path):
    import kernels
    from huggingface_hub.file_download import repo_folder_name

    for repo in H.fa3_repos:  # both kernels are in the cache, as `nightlab prepare` lays it out
        repo_dir = tmp_path / repo_folder_name(repo_id=repo, repo_type="kernel")
        (repo_dir / "snapshots" / "abc").mkdir(parents=True)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "v1").write_text("abc")
    calls = []

    def broken(path, **kwargs):
        calls.append(path)
        raise OSError(f"cannot load {path}: no build for this torch")

    monkeypatch.setattr(kernels, "get_local_kernel", broken)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path))
    name, module, note = H.select_attention_backend("cuda", (9, 0), "auto", compile_model=True)
    assert (name, module) == ("flex", None)
    assert len(calls) == len(H.fa3_repos) and "fa3 kernel not available" in note and "no build" in note
    assert H.select_attention_backend("cuda", (9, 0), "auto", compile_model=False)[0] == "sdpa"
    assert H.select_attention_backend("cuda", (8, 0), "auto")[2].startswith("fa3 needs Hopper")


def test_real_kernels_lookup_fails_fast_offline(H, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(Path(os.environ["NIGHTLAB_CACHE"]) / "hf"))  # an empty cache
    t0 = time.time()
    module, why = H.load_fa3()
    assert module is None and why
    assert time.time() - t0 < 30


# ---------------------------------------------------------------------------
# profiles.py
# ---------------------------------------------------------------------------

SOURCE = '''import os
DEPTH = 8               # number of layers
NAME = "SSSL" # pattern with a # inside? no
LR = 0.04
BETAS = (0.8, 0.95)  # betas
TOTAL = 2**19 # tokens
def f():
    DEPTH = 3
x = DEPTH == 8
'''


def test_apply_constants_round_trip():
    values = {"DEPTH": 12, "NAME": "S#L", "LR": 1e-3, "BETAS": (0.9, 0.99), "TOTAL": 2**17}
    out = P.apply_constants(SOURCE, values)
    assert "DEPTH = 12              # number of layers\n" in out  # comment kept at its column
    assert "NAME = 'S#L'  # pattern with a # inside? no\n" in out
    assert "BETAS = (0.9, 0.99)  # betas\n" in out and "LR = 0.001\n" in out
    assert "    DEPTH = 3\n" in out and "x = DEPTH == 8\n" in out  # only top-level assignments
    assert P.read_constants(out, list(values)) == values
    # back again: NAME's comment keeps the two spaces its shorter value gave it (never fewer than a line has)
    assert P.apply_constants(out, P.read_constants(SOURCE, list(values))) == SOURCE.replace(
        "NAME = \"SSSL\" #", "NAME = 'SSSL'  #").replace("TOTAL = 2**19", "TOTAL = 524288")


def test_apply_constants_keeps_the_spaces_before_a_comment_when_the_value_grows():
    # a longer value left one space where the line had two (PEP 8's, and train.py's own style)
    source = "LR = 0.04  # peak\nWD = 0.1 # decay\nDEPTH = 8       # layers\n"
    out = P.apply_constants(source, {"LR": 0.000123, "WD": 0.0625, "DEPTH": 123456789012})
    assert out == "LR = 0.000123  # peak\nWD = 0.0625 # decay\nDEPTH = 123456789012  # layers\n"


def test_apply_constants_errors():
    with pytest.raises(KeyError, match="MISSING"):
        P.apply_constants(SOURCE, {"MISSING": 1})
    with pytest.raises(ValueError):
        P.apply_constants(SOURCE, {"LR": float("nan")})
    with pytest.raises(ValueError):
        P.apply_constants(SOURCE + "LR = 1\n", {"LR": 2})
    with pytest.raises(ValueError, match="line"):
        P.apply_constants("A = (1,\n     2)\n", {"A": (3, 4)})
    with pytest.raises(ValueError):
        P.apply_constants(SOURCE, {"lower": 1})


def test_profiles_fit_train_py():
    source = (TRAINER / "train.py").read_text()
    names = set(P.read_constants(source))
    assert set(P.PROFILES) >= {"default", "tiny"}
    assert P.PROFILES["default"].constants == {} and P.PROFILES["default"].harness_env == {}
    for profile in P.PROFILES.values():
        assert set(profile.constants) <= names, profile.name  # every key is a top-level constant
        assert set(profile.harness_env) <= {"NIGHTLAB_TIME_BUDGET", "NIGHTLAB_MAX_SEQ_LEN", "NIGHTLAB_EVAL_TOKENS",
                                            "NIGHTLAB_BUDGET_STEPS"}
        assert prepare.harness_settings(profile.harness_env)  # values the harness accepts
        rewritten = P.apply_constants(source, profile.constants)
        compile(rewritten, "train.py", "exec")
        assert P.read_constants(rewritten, list(profile.constants)) == profile.constants
    tiny = P.PROFILES["tiny"]
    assert tiny.constants["DEPTH"] <= 2 and int(tiny.harness_env["NIGHTLAB_MAX_SEQ_LEN"]) <= 256


def test_profiles_do_not_import_torch():
    code = "import sys; import nightlab.trainer.profiles; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_building_the_model_leaves_torch_dynamo_unloaded():
    """An eager process (the scorer every experiment, CPU and MPS training) never needs dynamo;
    building on the meta device imported it (about 1 s a process)."""
    code = ("import sys, torch, train; from dataclasses import asdict; "
            "c = train.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32); "
            "train.build_model(asdict(c), torch.device('cpu')); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=TRAINER, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# Whole runs (subprocess) on small self-made data
# ---------------------------------------------------------------------------


def make_workspace(root: Path, constants: dict, edit=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("prepare.py", "harness.py"):
        shutil.copy(TRAINER / name, root / name)
    source = P.apply_constants((TRAINER / "train.py").read_text(), constants)
    (root / "train.py").write_text(edit(source) if edit else source)
    return root


def start_train(workspace: Path, data_dir: Path, env: dict) -> subprocess.Popen:
    """`python prepare.py run` as the loop runs it: train, then the harness scores."""
    full_env = {**os.environ, **env, "NIGHTLAB_DATA_DIR": str(data_dir)}
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([sys.executable, "prepare.py", "run"], cwd=workspace, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_train(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_train(workspace: Path, data_dir: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return finish_train(start_train(workspace, data_dir, env), timeout)


TINY_RUN_STEPS = 10  # the tiny profile with a quarter of its 40 steps: it learns as clearly, in half the time
# the tests reading the one run: one worker under pytest-xdist, which trains once
ON_THE_TINY_RUNS_WORKER = pytest.mark.xdist_group("tiny-run")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    tiny = P.PROFILES["tiny"]
    ws = make_workspace(tmp_path_factory.mktemp("ws") / "tiny", tiny.constants)
    proc = run_train(ws, data_dir, {**tiny.harness_env, "NIGHTLAB_BUDGET_STEPS": str(TINY_RUN_STEPS)})
    return proc, ws


@pytest.mark.slow
@ON_THE_TINY_RUNS_WORKER
def test_tiny_run_prints_upstream_summary_and_metrics(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index("---")
    block = lines[start + 1 : start + 1 + len(SUMMARY_FORMATS)]
    for line, (name, fmt) in zip(block, SUMMARY_FORMATS, strict=True):
        assert re.fullmatch(rf"{name}:\s+{fmt}", line), line
        assert line[17] == " " and line[18] != " "  # values aligned at column 18, as upstream
    assert "mfu_percent:      n/a" in block  # CPU: no peak FLOPs, no made-up MFU
    before = lines[:start]
    assert "attention_backend: sdpa" in before and "profile: tiny" in before
    assert any(re.fullmatch(r"step \d{5} \(\d+\.\d%\) \| loss \d+\.\d{3} \| lrm \d\.\d\d \| dt \d+ms \| tok/sec [\d,]+ \| "
                            r"mfu n/a \| epoch \d+ \| remaining \d+ steps", line) for line in before)
    summary = parse_summary(proc.stdout)
    metrics = [line for line in lines[start:] if line.startswith("METRIC ")]
    names = {m.split()[1].split("=")[0] for m in metrics}
    assert {n for n, _ in SUMMARY_FORMATS} - {"mfu_percent"} <= names and "mfu_percent" not in names
    assert {"tokens_per_sec", "device_batch_size", "grad_accum_steps", "startup_seconds", "eval_seconds",
            "score_seconds"} <= names
    assert failure_reason(Measurement(proc.returncode, None, summary, ""), "val_bpb") is None  # as the loop judges it
    assert summary.get("depth") == P.PROFILES["tiny"].constants["DEPTH"]
    assert summary.get("mfu_percent") is None


@pytest.mark.slow
@ON_THE_TINY_RUNS_WORKER
def test_tiny_run_stops_at_its_step_budget(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = parse_summary(proc.stdout)
    assert summary.get("num_steps") == TINY_RUN_STEPS
    # the budget in force is said, not the time budget it overrides (METRIC time_budget=15 misled)
    assert summary.get("budget_steps") == summary.get("num_steps") and summary.get("time_budget") is None
    assert summary.get("total_seconds") >= summary.get("training_seconds")


@pytest.mark.slow
@ON_THE_TINY_RUNS_WORKER
def test_tiny_run_learns(tiny_run, data_dir):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    val_bpb = parse_summary(proc.stdout).get("val_bpb")
    # An untrained model predicts ~uniformly: log2(vocab) bits per token over the bytes per token
    tokenizer = prepare.Tokenizer.from_directory(Path(data_dir) / "tokenizer")
    lengths = tokenizer.token_byte_lengths()
    _, val_path = prepare.split_shards(Path(data_dir))
    text = "".join(pq.read_table(val_path).column("text").to_pylist()[:200])
    ids = tokenizer.encode(text)
    bytes_per_token = sum(lengths[i] for i in ids) / len(ids)
    untrained_bpb = math.log2(tokenizer.get_vocab_size()) / bytes_per_token
    assert val_bpb is not None and val_bpb < 0.8 * untrained_bpb, (val_bpb, untrained_bpb)
    losses = [float(m) for m in re.findall(r"\| loss (\d+\.\d+) \|", proc.stdout)]
    assert losses[-1] < losses[0] - 1.0, losses  # the loss falls through the run, not only at first


@pytest.mark.slow
@ON_THE_TINY_RUNS_WORKER
def test_tiny_run_saves_trained_weights_for_the_harness(tiny_run):
    proc, ws = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    artifact = ws / prepare.DEFAULT_ARTIFACT_DIR
    state = torch.load(artifact / "model.pt", map_location="cpu")
    assert "lm_head.weight" in state and "transformer.h.0.attn.c_q.weight" in state
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (artifact / "train.py").read_text() == (ws / "train.py").read_text()  # scored with the code that trained


@pytest.mark.slow
def test_nan_loss_fails_fast(tmp_path, data_dir):
    tiny = P.PROFILES["tiny"]
    ws = make_workspace(tmp_path / "nan", tiny.constants,
                        edit=lambda s: re.sub(r"^SOFTCAP = .*$", 'SOFTCAP = float("nan")', s, flags=re.MULTILINE))
    proc = run_train(ws, data_dir, tiny.harness_env)
    assert proc.returncode != 0
    assert "FAIL: loss is nan at step 0" in proc.stdout
    assert "FAIL: the training command exited with code 1" in proc.stdout
    assert "---" not in proc.stdout.splitlines()  # no summary block for a failed run
    assert not parse_summary(proc.stdout).complete
