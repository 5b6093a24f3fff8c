"""Fetch the FlashAttention-3 kernel while the box is online, so training runs never download.

On a Hopper GPU (compute capability 9.0, asked of nvidia-smi by `hardware.query_gpus`) the built-in trainer's `auto`
attention backend wants FA3 from the Hugging Face kernel hub. A run must not download (a 5-minute
budget, a box that may be offline at night), so `nightlab prepare` and the daemon, before its first
run, fetch it here through the `kernels` library into the Hugging Face cache the runs read: the
runs inherit this process's environment, so HF_HOME / HF_HUB_CACHE (or KERNELS_CACHE) are the same.

Everything that imports `kernels` (and so torch) runs in a child process of the same Python
(`python -m nightlab.loop.kernel_prefetch REPO@VERSION ...`): the daemon never imports torch. The
child prints one JSON line; the parent turns it into one line for the user. Nothing here is fatal:
offline, a timeout or a missing build is one line, and the runs fall back to FlexAttention/SDPA.

How it is stored, and how a run must load it (kernels 0.17 with huggingface_hub 2.x):
- Version N of a kernel is the hub branch `vN`. It is downloaded as revision "vN" so the cache
  records `refs/vN` (downloading by `version=N` resolves the branch to a commit first and records
  no ref, so nothing could find it offline), and only this torch's build variant is downloaded.
- `kernels.get_kernel(repo, version=N)` cannot load such a kernel offline: its cache lookup asks
  huggingface_hub for the whole snapshot, which reports the other variants missing
  (IncompleteSnapshotError). `load_cached` is the lookup that works: the snapshot that `refs/vN`
  names, loaded with `kernels.get_local_kernel` (which picks this torch's variant in it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from nightlab.loop.hardware import query_gpus

FALLBACK = "runs will use FlexAttention/SDPA"
DEFAULT_TIMEOUT_S = 900.0  # a few hundred MB on a slow link; a hung connection must not hold the night
_HOPPER = (9, 0)  # compute capability


@dataclass(frozen=True)
class KernelRef:
    repo: str
    version: int

    @property
    def branch(self) -> str:
        return f"v{self.version}"

    def __str__(self) -> str:
        return f"{self.repo} v{self.version}"


# In the order the trainer tries them: varunneal's build is upstream autoresearch's choice on Hopper.
FA3_KERNELS = (KernelRef("varunneal/flash-attention-3", 1), KernelRef("kernels-community/flash-attn3", 1))

Outcome = Literal["fetched", "present", "not_needed", "failed"]


@dataclass(frozen=True)
class PrefetchResult:
    outcome: Outcome
    line: str  # one line for the console, the log and the daemon's start-up status


# -- the parent side (daemon, CLI): no torch ---------------------------------------------------------
def hopper_absent() -> str | None:
    """Why FA3 is not wanted on this box (no NVIDIA GPU, none of them Hopper), or None when one is."""
    report = query_gpus()
    if report.problem:
        return f"no NVIDIA GPU: {report.problem}"
    if any(gpu.capability == _HOPPER for gpu in report.gpus):
        return None
    seen = ", ".join(f"{gpu.name} is " + (f"sm{gpu.capability[0]}{gpu.capability[1]}" if gpu.capability else "of unknown capability")
                     for gpu in report.gpus)
    return f"no Hopper GPU: {seen or 'none listed'}"


def prefetch_fa3(timeout_s: float = DEFAULT_TIMEOUT_S, kernels: Sequence[KernelRef] = FA3_KERNELS) -> PrefetchResult:
    """Make sure the FA3 kernel for the installed torch is in the local cache. Never raises."""
    why_not = hopper_absent()
    if why_not is not None:
        return PrefetchResult("not_needed", f"FA3 kernel: not needed ({why_not}); {FALLBACK}")
    env = dict(os.environ)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # With HF_HUB_DISABLE_TELEMETRY=1, kernels 0.17 sends a User-Agent ending in "; ", which the HTTP
    # client refuses ("Illegal header value"); an origin tag ends it properly and sends nothing more.
    env.setdefault("HF_HUB_USER_AGENT_ORIGIN", "nightlab")
    argv = [sys.executable, "-m", __name__, *(f"{k.repo}@{k.version}" for k in kernels)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return PrefetchResult("failed", f"FA3 kernel: not fetched (timed out after {timeout_s:g}s); {FALLBACK}")
    except OSError as exc:
        return PrefetchResult("failed", f"FA3 kernel: not fetched (cannot start {sys.executable}: {exc}); {FALLBACK}")
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
        outcome, detail = report["outcome"], report["detail"]
    except (IndexError, ValueError, KeyError, TypeError):
        why = _first_line(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
        return PrefetchResult("failed", f"FA3 kernel: not fetched (the fetch process failed: {why}); {FALLBACK}")
    if outcome == "fetched":
        return PrefetchResult("fetched", f"FA3 kernel: fetched {detail}; runs load it offline")
    if outcome == "present":
        return PrefetchResult("present", f"FA3 kernel: already present ({detail})")
    return PrefetchResult("failed", f"FA3 kernel: not fetched ({detail}); {FALLBACK}")


def _first_line(text: str, limit: int = 300) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- the child side: imports kernels (and torch) ------------------------------------------------------
def cache_dir() -> Path:
    """The cache `kernels` downloads into: KERNELS_CACHE, else huggingface_hub's HF_HUB_CACHE."""
    from huggingface_hub import constants

    return Path(os.environ.get("KERNELS_CACHE") or constants.HF_HUB_CACHE)


def cached_snapshot(ref: KernelRef) -> Path | None:
    """The cached snapshot of the kernel's branch (the one `refs/vN` names), or None."""
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = cache_dir() / repo_folder_name(repo_id=ref.repo, repo_type="kernel")
    try:
        commit = (repo_dir / "refs" / ref.branch).read_text().strip()
    except OSError:
        return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def load_cached(ref: KernelRef) -> ModuleType:
    """Load the cached kernel without any network, as a run does. Raises when it is not there."""
    from kernels import get_local_kernel

    snapshot = cached_snapshot(ref)
    if snapshot is None:
        raise FileNotFoundError(f"{ref} is not in {cache_dir()}")
    return get_local_kernel(snapshot)


def _variant(module: ModuleType) -> str:
    """The build variant a loaded kernel came from (its folder name, e.g. torch29-cxx11-cu128-x86_64-linux)."""
    path = Path(module.__file__ or "").parent
    return path.parent.name if (path.parent / "metadata.json").is_file() else path.name


def hub_unreachable(timeout_s: float = 10.0) -> str | None:
    """Why the hub cannot be reached, or None. Asked once before downloading: huggingface_hub retries
    a refused connection with back-off for ~25 s per request, which an offline box should not wait."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"the hub at {constants.ENDPOINT} is unreachable ({_first_line(str(reason))})"
    return None


def _fetch(kernels: Sequence[KernelRef]) -> tuple[Outcome, str]:
    try:
        from kernels import install_kernel
    except Exception as exc:  # noqa: BLE001 - a broken install is one line, not a traceback
        return "failed", f"the kernels package cannot be imported: {type(exc).__name__}: {_first_line(str(exc))}"
    for ref in kernels:
        try:
            module = load_cached(ref)
        except Exception:  # noqa: BLE001, S112 - not there (or broken): try the next, then download
            continue
        return "present", f"{ref}, build {_variant(module)}, in {cache_dir()}"
    offline = hub_unreachable()
    if offline is not None:
        return "failed", offline
    errors = []
    for ref in kernels:
        try:
            install_kernel(ref.repo, revision=ref.branch, trust_remote_code=[ref.repo])
            module = load_cached(ref)
        except Exception as exc:  # noqa: BLE001 - offline, no build for this torch, ...: the next one
            errors.append(f"{ref}: {type(exc).__name__}: {_first_line(str(exc), 200)}")
            continue
        return "fetched", f"{ref}, build {_variant(module)}, into {cache_dir()}"
    return "failed", "; ".join(errors)


def main(argv: Sequence[str] | None = None) -> int:
    refs = []
    for arg in sys.argv[1:] if argv is None else argv:
        repo, _, version = arg.rpartition("@")
        refs.append(KernelRef(repo, int(version)))
    outcome, detail = _fetch(refs)
    print(json.dumps({"outcome": outcome, "detail": detail}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
