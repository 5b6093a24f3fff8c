"""The FA3 prefetch against a fake Hugging Face Hub on 127.0.0.1 (tests/fakes/hf_hub.py), driven by
the real `kernels` library: it serves a small pure-Python "flash-attn3" kernel built for the variant
that kernels computes for this machine's torch (e.g. torch213-cpu-x86_64-linux), next to a CUDA
variant that must not be downloaded. The GPU is the fake nvidia-smi's (tests/fakes/bin)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nightlab.loop import kernel_prefetch as kp

from tests.fakes.hf_hub import FakeHub

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
H100 = "NVIDIA H100 80GB HBM3"
REPO = "kernels-community/flash-attn3"
_torch = version("torch").split("+")[0].split(".")
THIS_VARIANT = f"torch{_torch[0]}{_torch[1]}-cpu-{platform.machine()}-linux"
CUDA_VARIANT = f"torch{_torch[0]}{_torch[1]}-cxx11-cu128-x86_64-linux"

METADATA = json.dumps({"name": "flash-attn3", "id": "_flash_attn3_fake", "version": 1, "license": "BSD-3-Clause",
                       "python-depends": [], "backend": {"type": "cpu"}}).encode()
KERNEL = b'''"""A stand-in for FA3: the same call, computed with SDPA."""
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return y.transpose(1, 2)
'''


def kernel_repo(*variants: str) -> dict[str, dict[str, bytes]]:
    files = {"README.md": b"# flash-attn3 (fake)\n"}
    for variant in variants:
        files[f"build/{variant}/metadata.json"] = METADATA
        files[f"build/{variant}/flash_attn3/__init__.py"] = KERNEL
    return {"main": files, "v1": files}


@pytest.fixture
def hopper_box(fake_gpus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A box with one H100, online (the suite's default is HF_HUB_OFFLINE=1), an empty HF cache."""
    fake_gpus([H100])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "KERNELS_CACHE", "LOCAL_KERNELS", "HF_HUB_USER_AGENT_ORIGIN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({REPO: kernel_repo(THIS_VARIANT, CUDA_VARIANT)}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def run_python(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_prefetch_downloads_this_torchs_build_and_a_run_loads_it_offline(hopper_box: Path, hub: FakeHub,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Telemetry off: kernels' bare User-Agent would be refused by the HTTP client without the fix.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # In a fresh process, as the daemon calls it: it must not import torch or kernels itself.
    line = run_python("import sys\n"
                      "from nightlab.loop.kernel_prefetch import prefetch_fa3\n"
                      "print(prefetch_fa3().line)\n"
                      "assert 'torch' not in sys.modules and 'kernels' not in sys.modules\n")
    assert line == f"FA3 kernel: fetched {REPO} v1, build {THIS_VARIANT}, into {hopper_box}; runs load it offline"
    assert not list(hopper_box.rglob(f"{CUDA_VARIANT}*")), "only this torch's build is downloaded"
    asked = len(hub.requests)

    hub.stop()  # the box is offline now: a run must find the kernel in the cache alone
    # The harness's own loader, as a run calls it (harness.py imports prepare.py beside it)
    shape = run_python("import sys, torch\n"
                       f"sys.path.insert(0, {str(TRAINER)!r})\n"
                       "import harness\n"
                       "fa3, why = harness.load_fa3()\n"
                       "assert fa3 is not None, why\n"
                       "q = torch.randn(2, 16, 3, 8)\n"
                       "print(tuple(fa3.flash_attn_func(q, q, q, causal=True).shape))\n",
                       HF_HUB_OFFLINE="1")
    assert shape == "(2, 16, 3, 8)"

    again = kp.prefetch_fa3()
    assert again.outcome == "present"
    assert again.line == f"FA3 kernel: already present ({REPO} v1, build {THIS_VARIANT}, in {hopper_box})"
    assert len(hub.requests) == asked


def test_the_first_repository_that_has_a_build_wins(hopper_box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repos = {"varunneal/flash-attention-3": kernel_repo(CUDA_VARIANT), REPO: kernel_repo(THIS_VARIANT)}
    with FakeHub(repos) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        result = kp.prefetch_fa3()
    assert result.outcome == "fetched" and f"{REPO} v1, build {THIS_VARIANT}" in result.line


def test_no_build_for_this_torch_is_one_line(hopper_box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub({"varunneal/flash-attention-3": kernel_repo(CUDA_VARIANT)}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        result = kp.prefetch_fa3(kernels=kp.FA3_KERNELS[:1])
    assert result.outcome == "failed"
    assert result.line.startswith("FA3 kernel: not fetched (varunneal/flash-attention-3 v1: FileNotFoundError: "
                                  "Cannot find a build variant for this system")
    assert result.line.endswith(f"; {kp.FALLBACK}") and "\n" not in result.line


def test_offline_box_is_one_line_and_the_night_goes_on(hopper_box: Path, hub: FakeHub) -> None:
    hub.stop()
    result = kp.prefetch_fa3()
    assert result.outcome == "failed"
    assert result.line == (f"FA3 kernel: not fetched (the hub at {hub.endpoint} is unreachable "
                           f"([Errno 111] Connection refused)); {kp.FALLBACK}")


def test_a_hub_that_never_answers_is_cut_off_by_the_timeout(hopper_box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        result = kp.prefetch_fa3(timeout_s=3)
    assert result == kp.PrefetchResult("failed", f"FA3 kernel: not fetched (timed out after 3s); {kp.FALLBACK}")


@pytest.mark.parametrize(("gpus", "why"), [
    ([], "no NVIDIA GPU: nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."),
    (["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"],
     "no Hopper GPU: NVIDIA A100-SXM4-80GB is sm80, NVIDIA GeForce RTX 4090 is sm89"),
])
def test_not_needed_without_a_hopper_gpu(fake_gpus, hub: FakeHub, gpus: list[str], why: str) -> None:
    fake_gpus(gpus)
    assert kp.prefetch_fa3() == kp.PrefetchResult("not_needed", f"FA3 kernel: not needed ({why}); {kp.FALLBACK}")
    assert hub.requests == []


def test_not_needed_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kp.prefetch_fa3().line == f"FA3 kernel: not needed (no NVIDIA GPU: nvidia-smi is not installed (no NVIDIA driver)); {kp.FALLBACK}"


# -- the call sites: `nightlab prepare` and the daemon before its first run ------------------------
@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A night on two tiny local shards, its data cache and workspace in tmp_path."""
    shards = tmp_path / "shards"
    shards.mkdir()
    text = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(400)]
    for i in range(2):
        pq.write_table(pa.table({"text": text[i::2]}), shards / f"shard_{i:05d}.parquet")
    path = tmp_path / "night.toml"
    path.write_text(f'[data]\nsource = "{shards}"\nshards = 1\ncache_dir = "{tmp_path / "cache"}"\n'
                    f'[workspace]\npath = "{tmp_path / "ws"}"\n')
    return path


def test_nightlab_prepare_fetches_the_kernel(hopper_box: Path, hub: FakeHub, config: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from nightlab.heartbeat.cli import main

    assert main(["prepare", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data and tokenizer ready in ")
    assert f"FA3 kernel: fetched {REPO} v1, build {THIS_VARIANT}, into {hopper_box}; runs load it offline" in out


def test_the_daemon_fetches_the_kernel_before_its_first_run(hopper_box: Path, hub: FakeHub, config: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from nightlab.heartbeat.daemon import Daemon, DaemonOptions
    from nightlab.loop.state.config import load_settings

    daemon = Daemon(load_settings(config), DaemonOptions())
    status = types.SimpleNamespace(startup_status="")  # the heartbeat's only part this step touches
    with caplog.at_level("INFO", logger="nightlab.daemon"):
        assert daemon._prepare_data(status)  # type: ignore[arg-type]
    assert f"FA3 kernel: fetched {REPO} v1, build {THIS_VARIANT}, into {hopper_box}; runs load it offline" \
        in caplog.messages
