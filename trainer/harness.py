"""The FIXED runtime harness of nightlab's built-in trainer, protected like prepare.py.

train.py (the file an agent edits) holds the model, the optimizer and the training loop; this
module holds what must stay the same between experiments and what the score must not depend on:
- `setup`: the device, the compute dtype (bf16 where the device has it, else fp16 with loss
  scaling on CUDA, else fp32; NIGHTLAB_DTYPE=bf16|fp16|fp32 forces one), torch.compile, and the
  attention backend (FA3 through `kernels` on Hopper, FlexAttention, SDPA) behind `attention`;
- `Runtime.fit`: the device batch fitted to memory (and halved on an out-of-memory);
- `Budget`: wall-clock seconds after warm-up steps (GPU profiles) or a fixed number of optimizer
  steps (NIGHTLAB_BUDGET_STEPS: the tiny CPU profile, repeatable under any load);
- `Runtime.finish`: saves the trained weights and the model's config, the run's only result;
- `score` (`python harness.py score`, run by `python prepare.py run` in its own process): runs the
  model (train.py's `build_model`, the saved weights) in processes of its own (`harness.py model`),
  checks causality, then computes val_bpb from the model's logits on inputs only and prints the
  summary block the daemon reads; it never imports train.py.
A change here that can move a run's val_bpb raises prepare.SCORE_VERSION (why: see there).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TextIO

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch
import torch.multiprocessing  # registers torch's reductions (CUDA IPC: `shared_buffer`) with ForkingPickler
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = None  # type: ignore[assignment]

if __name__ == "__main__" and str(Path(__file__).resolve().parent) not in sys.path:
    # run with -P (prepare.scorer_command): its own folder last, so a module a run wrote there
    # (torch.py, json.py) never comes before the installation's
    sys.path.append(str(Path(__file__).resolve().parent))

import prepare
from prepare import EVAL_TOKENS, MAX_SEQ_LEN, TIME_BUDGET, Tokenizer

ENV_DTYPE = "NIGHTLAB_DTYPE"
ENV_BUDGET_STEPS = prepare.ENV_BUDGET_STEPS
ENV_COMPILE = "NIGHTLAB_COMPILE"  # 0: never torch.compile (a device where it cannot run)
UNTIMED_STEPS = 10  # the first steps (compilation, warm-up) do not count against TIME_BUDGET
ARTIFACT_FORMAT = "nightlab-artifact/1"
REJECTED_EXIT = prepare.REJECTED_EXIT  # `score`: the model was refused (the line before says why)
SEED = 42  # `setup`'s, and every build of a scored model's (`built_model`)
PROBE_ATOL = 1e-2  # logits are soft-capped at ~15; a model that looks ahead moves them far more
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class HarnessError(Exception):
    """The run cannot go on; the message says why and what to do."""


class Rejected(Exception):
    """The trained model is refused by the scorer; the message is the reason recorded."""


def one_line(text: str, limit: int) -> str:
    """text on one line (whitespace runs as one space), cut at `limit` characters: what a message to
    chat or a log line holds of an error."""
    return " ".join(text.split())[:limit]


def error_line(error: BaseException) -> str:
    """`Type: message` of an error, on one line."""
    return f"{type(error).__name__}: {one_line(str(error), 300)}"


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"\nFAIL: {message}", flush=True)
    sys.exit(code)


def _data_errors_said(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    """sys.excepthook of a training process: bad data reaching train.py (a shard damaged during the
    night, a missing tokenizer) ends it with the one line that says what to do, not a traceback
    (`prepare.run` prefixes it as train.py's and reads the data through before it says so itself);
    any other error is train.py's own and keeps its traceback."""
    if isinstance(error, prepare.PrepareError):
        print(f"\nFAIL: {prepare.fail_text(error)}", flush=True)
        return
    sys.__excepthook__(kind, error, tb)


# ---------------------------------------------------------------------------
# Device helpers: peak FLOPs table, memory, synchronisation
# ---------------------------------------------------------------------------

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, FP32 accumulate, from NVIDIA's datasheets.
# Matched in order against torch.cuda.get_device_name(): more specific names first.
gpu_peak_bf16_flops = [
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),      # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.5e12),
    ("H200 NVL", 835.5e12),
    ("H200", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
    ("RTX 5090", 209.5e12),
]


def peak_flops_for(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a GPU name, or None when unknown (MFU is then reported as n/a)."""
    for key, flops in gpu_peak_bf16_flops:
        if key.lower() in device_name.lower():
            return flops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the device the model lives on (CPU: the process's peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024 / 1024
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_train_bytes(config: dict[str, Any], num_params: int, rows: int, T: int) -> int:
    """Rough peak memory of one forward/backward: activations per token (calibrated on upstream's
    45 GB at depth 8, dim 512, 128 x 2048 rows) + fp32 logits + params, grads and optimizer state."""
    per_token = 24 * config.get("n_layer", 8) * config.get("n_embd", 512) + 12 * config.get("vocab_size", 8192)
    return rows * T * per_token + 16 * num_params


def fit_device_batch(config: dict[str, Any], num_params: int, T: int, total_batch_size: int,
                     device_batch_size: int, device: torch.device) -> int:
    """Largest device batch <= device_batch_size that divides the rows of total_batch_size and
    (by the estimate above) fits the device's free memory. Grad accumulation keeps the total."""
    if total_batch_size % T != 0 or total_batch_size < T:
        raise HarnessError(f"TOTAL_BATCH_SIZE ({total_batch_size}) must be a positive multiple of MAX_SEQ_LEN ({T})")
    total_rows = total_batch_size // T
    candidates = [b for b in range(min(device_batch_size, total_rows), 0, -1) if total_rows % b == 0]
    if not candidates:
        raise HarnessError(f"DEVICE_BATCH_SIZE must be >= 1, not {device_batch_size}")
    free = available_memory_bytes(device)
    if free is None:
        return candidates[0]
    for b in candidates:
        if estimate_train_bytes(config, num_params, b, T) <= 0.9 * free:
            return b
    return candidates[-1]


def smaller_batch(B: int, total_rows: int) -> int | None:
    """Next smaller divisor of total_rows below B (for an OOM retry), or None."""
    for b in range(B // 2, 0, -1):
        if total_rows % b == 0:
            return b
    return None


def cpu_hint(device_type: str, flops_per_step: float) -> str | None:
    """A line suggesting the tiny profile when there is no GPU and the constants are GPU-sized."""
    if device_type == "cuda" or flops_per_step <= 1e13:
        return None
    return (f"HINT: no GPU found, and train.py still has GPU-sized constants ({flops_per_step:.1e} FLOPs per "
            f"optimizer step): one step will take many minutes here. Use the tiny profile (trainer/profiles.py "
            f"PROFILES['tiny']; nightlab picks it automatically on machines without a GPU).")


def choose_dtype(device_type: str, capability: tuple[int, int] | None, requested: str = "") -> tuple[torch.dtype, str]:
    """(compute dtype, why). bf16 on CUDA from sm80, fp16 (with loss scaling) on older CUDA GPUs,
    fp32 elsewhere; `requested` (NIGHTLAB_DTYPE) forces one, but bf16 on a CUDA GPU without it
    falls back to fp16 rather than crash."""
    requested = requested.strip().lower()
    if requested and requested not in DTYPES:
        raise HarnessError(f"{ENV_DTYPE}={requested!r} is not one of {', '.join(DTYPES)}; set one of them or unset it")
    cuda_bf16 = device_type == "cuda" and capability is not None and tuple(capability) >= (8, 0)
    if requested == "bf16" and device_type == "cuda" and not cuda_bf16:
        return torch.float16, f"{ENV_DTYPE}=bf16, but this GPU has no bf16: fp16 with loss scaling"
    if requested:
        return DTYPES[requested], f"{ENV_DTYPE}={requested}"
    if device_type == "cuda":
        return (torch.bfloat16, "bf16 (sm80+)") if cuda_bf16 else (torch.float16, "fp16 with loss scaling (no bf16 before sm80)")
    return torch.float32, f"fp32 on {device_type}"


# ---------------------------------------------------------------------------
# Attention backends: FA3 (Hopper, via `kernels`), FlexAttention, SDPA
# ---------------------------------------------------------------------------

fa3: Any = None  # the flash_attn_interface module when the fa3 backend is in use
fa3_repos = ["varunneal/flash-attention-3", "kernels-community/flash-attn3"]
BACKEND = "sdpa"  # the backend `attention` uses, set by `setup`
MASKS: dict[tuple[str, int, int], Any] = {}  # attention masks by (backend, T, window), built before compiling


def load_fa3():
    """Load the FA3 kernel `nightlab prepare` fetched (kernels' cache, branch v1 of each repo in
    fa3_repos). Returns (module, None) or (None, why). Never downloads: the run must not hang on an
    offline box. Reads the snapshot refs/v1 names: kernels' own offline lookup asks for the whole
    snapshot (every build) and fails on a cache that holds only this torch's build."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
        from kernels import get_local_kernel
    except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: another backend
        return None, f"kernels package unusable ({type(e).__name__}: {e})"
    cache = Path(os.environ.get("KERNELS_CACHE") or constants.HF_HUB_CACHE)
    errors = []
    for repo in fa3_repos:
        repo_dir = cache / repo_folder_name(repo_id=repo, repo_type="kernel")
        try:
            commit = (repo_dir / "refs" / "v1").read_text().strip()
            kernel = get_local_kernel(repo_dir / "snapshots" / commit)
            module = getattr(kernel, "flash_attn_interface", kernel)
            if not hasattr(module, "flash_attn_func"):
                raise AttributeError("no flash_attn_func")
            return module, None
        except FileNotFoundError:
            errors.append(f"{repo}: not in {cache}")
        except Exception as e:  # noqa: BLE001 - as above, per repository
            errors.append(f"{repo}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return None, "; ".join(errors) + " (`nightlab prepare` fetches it while online)"


def fa3_works(module, device):
    """Run FA3 once on a tiny input: a kernel that loads but cannot run must not be chosen."""
    try:
        q = torch.randn(1, 128, 1, 64, device=device, dtype=torch.bfloat16)
        y = module.flash_attn_func(q, q, q, causal=True, window_size=(64, 0))
        y = y[0] if isinstance(y, tuple) else y
        synchronize(device)
        return bool(torch.isfinite(y.float()).all())
    except Exception:  # noqa: BLE001 - a kernel that cannot run is not chosen, whatever the error
        return False


def flex_available():
    return flex_attention is not None


def select_attention_backend(device_type, capability=None, requested="auto", compile_model=True):
    """Pick the attention backend. Returns (name, fa3_module_or_None, note explaining the choice).
    auto: fa3 on Hopper when the kernel is cached locally and runs; else flex on CUDA when the
    model is compiled (flex is slow eager); else sdpa (CPU, MPS, or no compile)."""
    requested = requested.lower()
    if requested not in ("auto", "fa3", "flex", "sdpa"):
        raise HarnessError(f"ATTENTION_BACKEND must be auto, fa3, flex or sdpa, not {requested!r}")
    notes = []
    if requested in ("auto", "fa3"):
        if device_type != "cuda":
            notes.append(f"fa3 needs CUDA (device is {device_type})")
        elif capability is not None and tuple(capability) != (9, 0):
            notes.append(f"fa3 needs Hopper sm90 (this GPU is sm{capability[0]}{capability[1]})")
        else:
            module, why = load_fa3()
            if module is not None and fa3_works(module, torch.device("cuda")):
                return "fa3", module, "FA3 kernel loaded from the local kernels cache"
            notes.append(f"fa3 kernel not available ({why or 'failed a smoke test'})")
        if requested == "fa3":
            notes.append("falling back")
    if requested == "flex" or (requested in ("auto", "fa3") and device_type == "cuda" and compile_model):
        if flex_available():
            return "flex", None, "; ".join(notes + ["FlexAttention with sliding-window block masks"])
        notes.append("FlexAttention unavailable in this torch")
    return "sdpa", None, "; ".join(notes + ["SDPA (causal; explicit boolean mask for sliding windows)"])


def use_backend(name: str, fa3_module=None) -> None:
    """Make `attention` use this backend (and forget masks built for another)."""
    global BACKEND, fa3
    BACKEND, fa3 = name, fa3_module
    MASKS.clear()


def window_mask(T, window, device):
    """Boolean (T, T) mask: query i sees keys j with i - window <= j <= i (FA's window_size=(window, 0))."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


def flex_block_mask(T, window, device):
    def sliding_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def build_masks(T: int, windows: list[int], device) -> None:
    """Build the masks `attention` needs for sequence length T up front (not inside a compiled graph)."""
    for window in windows:
        if window >= T - 1:
            continue  # full context needs no mask (attention uses SDPA's causal kernel)
        if BACKEND == "flex" and ("flex", T, window) not in MASKS:
            MASKS[("flex", T, window)] = flex_block_mask(T, min(window, T), device)
        elif BACKEND == "sdpa" and ("sdpa", T, window) not in MASKS:
            MASKS[("sdpa", T, window)] = window_mask(T, window, device)


def attention(q, k, v, window):
    """Causal attention with a left window. q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D)."""
    T, H = q.size(1), q.size(2)
    if BACKEND == "fa3":
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.size(1) != H
    if window >= T - 1:
        # full context: SDPA's pick (cuDNN on an H200) beats flex, 4.9 vs 7.2 ms fwd+bwd (bench/attention.py)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif BACKEND == "flex":
        key = ("flex", T, window)
        if key not in MASKS:
            MASKS[key] = flex_block_mask(T, min(window, T), q.device)
        y = flex_attention(q, k, v, block_mask=MASKS[key], enable_gqa=gqa)
    else:
        key = ("sdpa", T, window)
        if key not in MASKS:
            MASKS[key] = window_mask(T, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=MASKS[key], enable_gqa=gqa)
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------
# The budget: wall clock after warm-up (GPU) or a number of optimizer steps (tiny CPU profile)
# ---------------------------------------------------------------------------


@dataclass
class Budget:
    seconds: float = TIME_BUDGET
    steps: int | None = None  # a step budget: the same work on any machine under any load
    untimed: int = UNTIMED_STEPS
    step: int = 0  # optimizer steps done
    counted: float = 0.0  # seconds counted against `seconds` (steps after `untimed`)

    @classmethod
    def from_env(cls) -> Budget:
        if not os.environ.get(ENV_BUDGET_STEPS, "").strip():
            return cls(seconds=TIME_BUDGET)
        # every step counts: a step budget has no clock to protect from warm-up
        return cls(seconds=TIME_BUDGET, steps=prepare._env_int(os.environ, ENV_BUDGET_STEPS, 1), untimed=0)

    @property
    def progress(self) -> float:
        """Fraction of the budget used, 0..1 (the LR schedule's clock)."""
        if self.steps is not None:
            return min(self.step / self.steps, 1.0)
        return min(self.counted / self.seconds, 1.0)

    def tick(self, dt: float) -> None:
        if self.step >= self.untimed:
            self.counted += dt
        self.step += 1

    @property
    def done(self) -> bool:
        if self.steps is not None:
            return self.step >= self.steps
        return self.step > self.untimed and self.counted >= self.seconds

    @property
    def remaining(self) -> str:
        if self.steps is not None:
            return f"{max(0, self.steps - self.step)} steps"
        return f"{max(0.0, self.seconds - self.counted):.0f}s"

    def describe(self) -> str:
        if self.steps is not None:
            return f"{self.steps} optimizer steps ({ENV_BUDGET_STEPS})"
        return f"{self.seconds:g}s of training after {self.untimed} untimed warm-up steps"


# ---------------------------------------------------------------------------
# The runtime train.py gets from `setup`
# ---------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    device_name: str
    capability: tuple[int, int] | None
    dtype: torch.dtype
    compile: bool
    backend: str
    peak_flops: float | None
    scaler: Any = None  # torch.amp.GradScaler for fp16
    # start-up is counted from the run's start (`prepare.py run` sets it), python and torch import included
    t_start: float = field(default_factory=lambda: float(os.environ.get(prepare.ENV_RUN_STARTED) or time.time()))
    t_training: float | None = None
    interactive: bool = field(default_factory=lambda: sys.stdout.isatty())
    smooth_loss: float = 0.0
    last_print: float = 0.0

    @property
    def ns_dtype(self) -> torch.dtype:
        """Dtype of Muon's orthogonalisation: bf16 where the device has it, else fp32 (fp16 overflows)."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 and self.device.type == "cuda" else torch.float32

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer) -> None:
        """optimizer.step(); with fp16, unscaled first and skipped on inf/NaN gradients."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def fit(self, model, config: dict[str, Any], num_params: int, total_batch_size: int,
            device_batch_size: int, make_loader):
        """(model to train, loader, first batch, device batch, grad accumulation steps).

        The device batch is the largest that divides the total rows and fits memory by estimate;
        on CUDA one forward/backward is tried first (it also compiles) and halved on OOM.
        make_loader(B) -> an endless (x, y, epoch) iterator."""
        T = MAX_SEQ_LEN
        try:
            device_batch = fit_device_batch(config, num_params, T, total_batch_size, device_batch_size, self.device)
        except HarnessError as e:
            fail(str(e))
        total_rows = total_batch_size // T
        if device_batch != device_batch_size:
            print(f"Device batch size: {device_batch} (DEVICE_BATCH_SIZE {device_batch_size} lowered to fit memory / divide {total_rows} rows)")
        raw_model = model
        if self.compile:
            model = torch.compile(model, dynamic=False)
        while True:
            loader = make_loader(device_batch)
            x, y, epoch = next(loader)
            if self.device.type != "cuda":
                break
            try:
                with self.autocast():
                    loss = model(x, y)
                loss.backward()
                raw_model.zero_grad(set_to_none=True)
                del loss
                x, y, epoch = next(loader)
                break
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                    raise
                del loader, x, y
                raw_model.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                smaller = smaller_batch(device_batch, total_rows)
                if smaller is None:
                    fail(f"out of memory at device batch 1 (seq {T}); the model does not fit this device")
                print(f"Out of memory at device batch {device_batch}; retrying with {smaller}")
                device_batch = smaller
        grad_accum = total_rows // device_batch
        print(f"Device batch: {device_batch} x {T} tokens, gradient accumulation steps: {grad_accum}")
        self.t_training = time.time()
        return model, loader, (x, y, epoch), device_batch, grad_accum

    def log_step(self, budget: Budget, loss: float, lrm: float, dt: float, tokens: int,
                 flops_per_token: float, epoch: int) -> None:
        """Fail fast on a NaN/inf or exploding loss; print the progress line (every 0.5 s at most
        when not a terminal); free Python's GC after the first step (it stalls ~500 ms)."""
        step = budget.step - 1
        if math.isnan(loss) or math.isinf(loss):
            fail(f"loss is {'nan' if math.isnan(loss) else 'inf'} at step {step}")
        if loss > 100:
            fail(f"loss exploded to {loss:.1f} at step {step}")
        beta = 0.9
        self.smooth_loss = beta * self.smooth_loss + (1 - beta) * loss
        debiased = self.smooth_loss / (1 - beta ** (step + 1))
        mfu = f"{100 * flops_per_token * tokens / dt / self.peak_flops:.1f}%" if self.peak_flops else "n/a"
        now = time.time()
        if self.interactive or budget.step <= budget.untimed + 1 or budget.done or now - self.last_print >= 0.5:
            self.last_print = now
            line = (f"step {step:05d} ({100 * budget.progress:.1f}%) | loss {debiased:.3f} | lrm {lrm:.2f} | "
                    f"dt {dt * 1000:.0f}ms | tok/sec {int(tokens / dt):,} | mfu {mfu} | epoch {epoch} | "
                    f"remaining {budget.remaining}")
            print(f"\r{line}    " if self.interactive else line, end="" if self.interactive else "\n", flush=True)
        if budget.step == 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif budget.step % 5000 == 0:
            gc.collect()

    def finish(self, model, config: dict[str, Any], budget: Budget, *, tokens_per_step: int,
               flops_per_token: float, num_params: int, **figures: Any) -> Path:
        """Save the trained weights + config for the scorer; print the training figures. The run's
        score is computed from these by `python harness.py score`, never by train.py."""
        if self.interactive:
            print()
        gc.enable()
        timed = budget.step - min(budget.step, budget.untimed)
        tokens_per_sec = tokens_per_step * timed / budget.counted if budget.counted > 0 else 0.0
        mfu = 100 * flops_per_token * tokens_per_sec / self.peak_flops if self.peak_flops else None
        train = {
            "training_seconds": budget.counted,
            "peak_vram_mb": peak_memory_mb(self.device),
            "mfu_percent": mfu,
            "total_tokens_M": budget.step * tokens_per_step / 1e6,
            "num_steps": budget.step,
            "budget_steps": budget.steps,  # None under a time budget
            "num_params_M": num_params / 1e6,
            "tokens_per_sec": tokens_per_sec,
            "startup_seconds": (self.t_training or self.t_start) - self.t_start,
            "flops_per_token": flops_per_token,
            "peak_flops": self.peak_flops,
            "device": f"{self.device.type} ({self.device_name})",
            "attention_backend": self.backend,
            "dtype": str(self.dtype).replace("torch.", ""),
            "cuda_capability": f"{self.capability[0]}.{self.capability[1]}" if self.capability else None,
            **figures,
        }
        out = artifact_dir()
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        try:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(state, out / "model.pt.tmp")
            os.replace(out / "model.pt.tmp", out / "model.pt")
            main_file = getattr(sys.modules.get("__main__"), "__file__", None)
            if not (out / "train.py").exists() and main_file:
                shutil.copyfile(main_file, out / "train.py")  # a direct `python train.py`: score what ran
            meta = {"format": ARTIFACT_FORMAT, "config": config, "train": train}
            (out / "meta.json").write_text(json.dumps(meta, indent=1))
        except (OSError, RuntimeError) as e:  # torch says a full disk as "unexpected pos 576 vs 534"
            (out / "model.pt.tmp").unlink(missing_ok=True)
            probe = out
            while not probe.exists():
                probe = probe.parent
            free = shutil.disk_usage(probe).free
            fail(f"could not save the trained model in {out} ({one_line(str(e), 200)}); {free / 2**20:,.0f} MB"
                 " free there: a full disk? free space on it")
        print(f"Training done: {budget.step} steps in {budget.counted:.1f}s counted; weights saved to {out}", flush=True)
        return out


def artifact_dir() -> Path:
    """Where a run's trained model goes: $NIGHTLAB_ARTIFACT_DIR, else .nightlab/artifact in the cwd."""
    raw = os.environ.get(prepare.ENV_ARTIFACT_DIR, "").strip()
    return Path(raw) if raw else Path(prepare.DEFAULT_ARTIFACT_DIR)


def pick_device() -> tuple[torch.device, tuple[int, int] | None, str]:
    """(device, CUDA compute capability, name): CUDA, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps"), None, "Apple MPS"
    return torch.device("cpu"), None, "CPU"


def setup(seed: int = SEED, attention_backend: str = "auto", compile: bool = True) -> Runtime:
    """Seed, device, dtype, compile and attention backend for this process; prints what it chose."""
    sys.excepthook = _data_errors_said
    torch.manual_seed(seed)
    # and the other global generators a build_model may draw from: what the scorer's build draws
    # (`built_model` seeds them so), or a model was scored with other unsaved values than it trained with
    random.seed(seed)
    np.random.seed(seed)
    torch.set_float32_matmul_precision("high")
    device, capability, device_name = pick_device()
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    try:
        dtype, dtype_note = choose_dtype(device.type, capability, os.environ.get(ENV_DTYPE, ""))
    except HarnessError as e:
        fail(str(e))
    use_compile = compile and device.type == "cuda" and os.environ.get(ENV_COMPILE, "1") != "0"
    print(f"Device: {device.type} ({device_name}{f', sm{capability[0]}{capability[1]}' if capability else ''}), "
          f"compute dtype {str(dtype).replace('torch.', '')} ({dtype_note}), compile {use_compile}")
    try:
        backend, fa3_module, note = select_attention_backend(device.type, capability, attention_backend, use_compile)
    except HarnessError as e:
        fail(str(e))
    use_backend(backend, fa3_module)
    print(f"Attention backend: {backend} ({note})")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Runtime(device=device, device_name=device_name, capability=capability, dtype=dtype,
                   compile=use_compile, backend=backend,
                   peak_flops=peak_flops_for(device_name) if device.type == "cuda" else None, scaler=scaler)


# ---------------------------------------------------------------------------
# Scoring: in the harness's own process, from the saved model, on inputs only
# ---------------------------------------------------------------------------


def eval_rows(tokenizer: Tokenizer, data_dir: Path, split: str = "val", slice_index: int = 0,
              rows_key: str | None = None) -> torch.Tensor:
    """The scored rows [EVAL_TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN + 1] of the validation shard,
    tokenized once per data dir and cached there. `val`: the first rows (what evaluate_bpb
    scores); `heldout` slice k: the k+1-th block of as many rows after them, never scored for
    keep decisions. rows_key: `prepare.scored_rows_key(data_dir)` if known (None: hashed here)."""
    if split not in ("val", "heldout"):
        raise HarnessError(f"split must be val or heldout, not {split!r}")
    T, n = prepare.scored_shape(MAX_SEQ_LEN, EVAL_TOKENS)
    start = 0 if split == "val" else n * (1 + slice_index)
    return prepare.cached_rows(tokenizer, Path(data_dir), T, start, n, rows_key)


def _eval_batch(n_rows: int, T: int, vocab: int, device: torch.device) -> int:
    """Rows per scoring batch: the largest divisor of n_rows whose fp32 logits stay under a cap
    (every batch has one shape: the probed batch, drawn at random, looks like any other). On a GPU
    about eight batches of logits live at once (the model's output, both model processes' shared
    buffers, the probed batch's copy, the loss's), so the cap is a sixteenth of its memory (in
    bytes) up to 2^29 logits (2 GB a batch, eight of which an 8 GB card cannot hold)."""
    if device.type == "cuda":
        cap_elements = min(2**29, torch.cuda.get_device_properties(device).total_memory // (4 * 16))
    else:
        cap_elements = 2**25
    cap = max(1, cap_elements // (T * vocab))
    return max(b for b in range(1, min(cap, n_rows) + 1) if n_rows % b == 0)


def model_failed(error: BaseException, artifact: Path) -> Rejected:
    """An error raised by the scored model's code, as one line: what and where in its train.py (no
    traceback: the reason goes to chat)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = next((f" (train.py line {f.lineno})" for f in reversed(frames) if Path(f.filename) == artifact / "train.py"), "")
    message = one_line(str(error), 200)
    return Rejected(f"train.py's model failed while the harness scored it: {type(error).__name__}"
                    f"{': ' + message if message else ''}{where}")


def saved_meta(artifact: Path) -> dict[str, Any]:
    """The saved model's meta.json (its config and training figures), read by the scorer; Rejected
    when the artifact is missing or was not saved through `finish`."""
    meta_path, weights = artifact / "meta.json", artifact / "model.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise Rejected("train.py saved no trained model: it must end with the harness's finish(...)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise Rejected(f"the saved model's meta.json is not JSON ({e}): train.py must save through the harness's finish(...)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(meta.get("train"), dict):
        raise Rejected("the saved model's meta.json has no config and train figures: train.py must save through the"
                       " harness's finish(...)")
    return meta


def built_model(artifact: Path, meta: dict[str, Any], rt: Runtime):
    """A model built from scratch: the artifact's train.py run as a module of its own, its
    `build_model(config, device, dtype)`, the weights read from model.pt. Nothing of an earlier
    one's (its calls, its module's globals) is in it: the probe's model is built so. Each build draws
    from the same seed: random values a build draws but does not save (a non-persistent buffer of
    random features) differed in the probe's model, and an honest model was refused as not causal.
    A training run's build draws the same (`setup` seeds these generators so, and nothing draws in between)."""
    torch.manual_seed(SEED)  # every device's
    random.seed(SEED)  # and the other global generators a train.py may draw from
    np.random.seed(SEED)
    spec = importlib.util.spec_from_file_location("nightlab_scored_train", artifact / "train.py")
    if spec is None or spec.loader is None or not (artifact / "train.py").is_file():
        raise Rejected(f"no train.py saved with the model in {artifact}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # its main() is behind `if __name__ == "__main__"`: nothing trains
        if not hasattr(module, "build_model"):
            raise Rejected("train.py has no build_model(config, device, dtype): the harness cannot score it")
        model = module.build_model(meta["config"], rt.device, rt.dtype)
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own code: whatever it raises refuses the run
        raise model_failed(e, artifact) from None
    if not isinstance(model, torch.nn.Module):
        raise Rejected(f"build_model(config, device, dtype) returned {type(model).__name__}, not a torch.nn.Module")
    try:
        # mmap: the weights go from the page cache straight into the built model (one copy)
        state = torch.load(artifact / "model.pt", map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        # a model saved whole (torch.save(model)), or a file that is no torch.save's: a traceback had ended the scorer
        raise Rejected(f"the saved model.pt is not weights the harness can read ({type(e).__name__}:"
                       f" {one_line(str(e), 160)}): train.py must save through the harness's finish(...)") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise Rejected(f"the saved weights do not fit build_model(config): {str(e).splitlines()[0]}") from None
    model.eval()
    return model


def causality_problem(forward, rows: torch.Tensor, vocab: int, generator: torch.Generator,
                      logits: torch.Tensor | None = None, pool: torch.Tensor | None = None) -> tuple[str | None, float]:
    """Change each row's tokens after its own position t (a random cut per row): the logits up to t
    must not move. The new tokens are another row's of `pool` at those positions (text, not noise a
    model that looks ahead could tell apart), random ones without a pool. One forward of the changed
    batch, plus one of the rows unless `logits` (forward of the rows' inputs, e.g. a scored batch's)
    is given. Returns why the model fails (or None) and how far the logits up to the cuts moved at most
    (an honest model's: the numerical noise PROBE_ATOL must stay above; `bench/scoring.py` prints it)."""
    x = rows[:, :-1]
    R, T = x.shape
    cuts = torch.randint(0, max(1, T - 1), (R,), generator=generator).tolist()
    changed = x.clone()
    donors = pool[:, :-1] if pool is not None and pool.size(0) > 1 else None
    for r, t in enumerate(cuts):
        if donors is not None:
            donor = int(torch.randint(0, donors.size(0), (), generator=generator))
            changed[r, t + 1:] = donors[donor, t + 1:]
        else:
            changed[r, t + 1:] = torch.randint(0, vocab, (T - t - 1,), generator=generator).to(x.device)
    before = (forward(x) if logits is None else logits).float()
    after = forward(changed).float()
    moved = torch.stack([(before[r, : t + 1] - after[r, : t + 1]).abs().amax() for r, t in enumerate(cuts)]).tolist()
    for r, t in enumerate(cuts):
        if not math.isfinite(moved[r]):  # a NaN logit, or -inf on both sides: a token the model rules out did not move
            b, a = before[r, : t + 1], after[r, : t + 1]
            if b.isnan().any() or a.isnan().any():
                return "the model's logits hold NaN: it must return finite logits (or -inf) for every position", math.nan
            moved[r] = (b - a).abs().masked_fill_(b == a, 0.0).amax().item()
    for r, t in sorted(enumerate(cuts), key=lambda cut: cut[1]):
        if moved[r] > PROBE_ATOL:
            return (f"not causal: changing the tokens after position {t} moved the logits at positions <= {t}"
                    f" by up to {moved[r]:.3g} (tolerance {PROBE_ATOL:g}); the model looks ahead"), max(moved)
    return None, max(moved)


class Phases:
    """Seconds per phase of the scorer, summed by name (the device synchronised at each lap)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.time()

    def lap(self, name: str, device: torch.device | None = None) -> None:
        if device is not None:
            synchronize(device)
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def model_logits(model, x: torch.Tensor, vocab: int, artifact: Path, rt: Runtime) -> torch.Tensor:
    """The model's logits for inputs x, checked: [B, T, vocab] on the model's device; Rejected when
    its code fails or returns anything else."""
    try:
        with rt.autocast():
            out = model(x.long().contiguous())
    except Exception as e:  # noqa: BLE001 - the model's own code: whatever it raises refuses the run
        raise model_failed(e, artifact) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.size(0), x.size(1), vocab):
        raise Rejected(f"model(inputs) must return logits [B, T, {vocab}], got "
                       f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.device != x.device:
        raise Rejected(f"model(inputs) must return its logits on {x.device}, where the inputs are, not on {out.device}")
    return out


# --- the model's own process: train.py's code never runs where the score is computed ---------------


_POOLS: list[Any] = []  # `shared_buffer`'s CUDA memory pools


def shared_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, folder: Path) -> tuple[torch.Tensor, Any]:
    """A tensor the scorer and a model process both see, and what the model process attaches it by
    (`attached`): GPU memory shared through CUDA IPC, else a file in `folder` (tmpfs where there is one)."""
    if device.type == "cuda":
        # CUDA IPC maps the whole segment a tensor lies in into the other process: a segment of its own
        # for each buffer (a pool of its own, where torch has them, and a size the caching allocator
        # neither rounds up nor splits: whole 2 MiB, at least 12 MiB), or the model's process could
        # write the scorer's sums or other buffers sharing it, or leave data there for the probe's.
        # CUDA IPC of memory from expandable segments hands file descriptors over, which the model's
        # process can only take by tracing the scorer's: these come from plain segments.
        nbytes = math.prod(shape) * dtype.itemsize
        padded = max(12 << 20, -(-nbytes // (2 << 20)) * (2 << 20))
        pool = torch.cuda.MemPool() if hasattr(torch.cuda, "MemPool") else None
        _POOLS.append(pool)  # alive as long as the scorer: a pool's memory goes with it
        expandable = "expandable_segments:True" in os.environ.get("PYTORCH_ALLOC_CONF", "")
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
            tensor = torch.empty(padded, dtype=torch.uint8, device=device)[:nbytes].view(dtype).view(shape)
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return tensor, ("cuda", bytes(ForkingPickler.dumps(tensor)))
    fd, path = tempfile.mkstemp(suffix=".bin", dir=folder)
    os.close(fd)
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape), ("file", path, shape, dtype)


def buffer_dir(need: int) -> str | None:
    """Where the model processes' buffers go: /dev/shm (memory) when it has room for twice `need`
    bytes, else the temp dir (its pages cached all the same). A container's /dev/shm is often 64 MB,
    and a shared file written past a full tmpfs ends the process that writes it (SIGBUS)."""
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if shm.f_bavail * shm.f_frsize >= 2 * need else None


def attached(token: Any) -> torch.Tensor:
    """The tensor `shared_buffer` made, in the model process."""
    if token[0] == "cuda":
        return pickle.loads(token[1])
    _, path, shape, dtype = token
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)


ENV_SANDBOX = prepare.ENV_SANDBOX
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = prepare.LANDLOCK_CREATE_RULESET, 445, 446
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _read_roots(artifact: Path) -> list[Path]:
    """What a model process may read: the Python installation and its import path (the harness's
    folder excepted: the workspace), the system's libraries and devices' state, and the artifact."""
    here = Path(__file__).resolve().parent
    roots = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots |= {Path(p).resolve() for p in sys.path if p and Path(p).resolve() != here}
    roots |= {Path(p) for p in ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys")}
    roots |= {Path(os.environ[k]) for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)}
    return sorted(r for r in roots | {artifact.resolve()} if r.exists())


# the devices a GPU is driven through (NVIDIA, AMD, WSL) and the harmless ones; not /dev/shm, /dev/mqueue
# or /dev/kmsg, where two processes could meet
_DEVICES = ("null", "zero", "full", "random", "urandom", "nvidia*", "dri", "kfd", "dxg")


def confine(artifact: Path, private: Path) -> str:
    """Confine this process (a model process, before train.py is imported) with Linux's landlock
    and seccomp: it reads only `_read_roots` and the harness's two files, writes only its own
    `private` folder (its TMPDIR) and the GPU's devices (the shared buffers are mapped before),
    connects no TCP socket, reaches no abstract socket, signal or process outside itself, and makes
    no socket, io_uring, System V IPC object or key. So the scored model's process cannot leave its calls for
    the probe's (a file, a socket, shared memory: the probe's model had found the scored rows' logits
    there), nor read the validation rows (the data dir, the cached rows) to predict from or to undo
    the probe's change. Returns what it did, in words; raises OSError where the kernel refuses
    (landlock missing: nothing is applied)."""
    abi = prepare.landlock_abi()
    if abi < 1:
        raise OSError(0, "the kernel has no landlock")
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    truncate, ioctl_dev = (1 << 14 if abi >= 3 else 0), (1 << 15 if abi >= 5 else 0)
    every = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | truncate | ioctl_dev
    execute, write_file, read_file, read_dir = 1 << 0, 1 << 1, 1 << 2, 1 << 3
    attr = _RulesetAttr(every, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # TCP bind and connect; abstract sockets, signals
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock refused the ruleset ({os.strerror(ctypes.get_errno())})")
    here = Path(__file__).resolve().parent
    rules = [(root, read_file | read_dir | execute) for root in _read_roots(artifact)]
    rules += [(here / name, read_file) for name in ("harness.py", "prepare.py")] + [(private, every)]
    rules += [(dev, read_file | write_file | ioctl_dev | read_dir) for pattern in _DEVICES for dev in Path("/dev").glob(pattern)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone meanwhile, or not ours to open
            try:
                if not path.is_dir():  # a file takes a file's rights only
                    access &= execute | write_file | read_file | truncate | ioctl_dev
                rule = _PathBeneath(access, fd)
                if syscall(_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock refused a rule for {path} ({os.strerror(ctypes.get_errno())})")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self failed ({os.strerror(ctypes.get_errno())})")
    finally:
        os.close(ruleset)
    said = f"landlock ABI {abi} (reads the Python installation and the artifact, writes its own folder)"
    data = prepare.get_data_dir().resolve()
    exposed = next((root for root, _ in rules if data.is_relative_to(root.resolve())), None)
    if exposed is not None:  # a data dir inside the repository of an editable install, say
        said += f", but the data dir {data} lies beneath {exposed}, which it reads: keep the data elsewhere"
    return said + _deny_ipc(libc)


def _deny_ipc(libc: Any) -> str:
    """seccomp: socket(), socketpair(), System V IPC, POSIX message queues, keyrings and io_uring fail with
    EPERM from now on (landlock covers files, TCP and abstract sockets: a UDP socket, a shared memory
    segment or a key passed the calls on), as does any call of another architecture's numbering. Returns its
    words for `confine`'s."""
    machine = os.uname().machine
    if machine not in prepare.SECCOMP_DENIED:
        return f"; sockets and System V IPC not denied (no seccomp table for {machine})"
    arch, numbers = prepare.SECCOMP_DENIED[machine]
    ld_abs, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    denied = len(numbers) + 2  # the last instruction, counted from the one after the load of the number
    # seccomp_data: the call's number at offset 0, its architecture at 4; x32's numbers have bit 30 set
    program = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, eperm), (ld_abs, 0, 0, 0),
               (jset, denied - 1, 0, 0x40000000)]
    program += [(jeq, len(numbers) - i, 0, number) for i, number in enumerate(numbers)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    filters = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"seccomp refused its filter ({os.strerror(ctypes.get_errno())})")
    return "; no sockets, System V IPC, message queues or keys"


def _self_check(rt: Runtime) -> None:
    """What an honest model's forward needs of the device (a matmul, SDPA), run by the harness's own
    code once the process is confined: a sandbox that breaks the device shows here, before train.py
    is imported, never as a model refused."""
    x = torch.randn(1, 2, 8, 16, device=rt.device)
    with torch.no_grad(), rt.autocast():
        F.scaled_dot_product_attention(x, x, x, is_causal=True)
        torch.nn.Linear(16, 16).to(rt.device)(x)
    synchronize(rt.device)


def serve_model(artifact: Path, requests: BinaryIO, replies: TextIO) -> None:
    """`harness.py model`, started by the scorer (`ModelProcess`): maps the shared buffers, confines
    itself (`confine`, unless the scorer says not to), builds train.py's model from the artifact
    when the scorer asks (a line), then for each request (a number of rows, a line) writes its
    logits for that many rows of the shared inputs into the shared logits, and answers a JSON line. Whatever train.py's code does
    here (replace torch's functions, keep its calls) stays in this process, which sees inputs only."""

    def say(**message: Any) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:  # the harness's own steps, before any of train.py's code: what fails here is not the model's doing
        rt = setup(attention_backend="sdpa", compile=False)
        shared = pickle.load(requests)  # the scorer's: trusted
        inputs, out = attached(shared["inputs"]), attached(shared["logits"])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - setup's FAIL (a SystemExit), CUDA IPC refused, ...
        say(failed=error_line(e))
        return
    try:
        sandbox = f"none ({ENV_SANDBOX}=0)"
        if shared["private"] is not None:
            try:
                sandbox = confine(artifact, Path(shared["private"]))
            except OSError as e:
                sandbox = f"none ({e.strerror or e})"
            try:
                _self_check(rt)
            except Exception as e:  # noqa: BLE001 - the harness's own code failed under the sandbox
                say(broken=error_line(e))
                return
        say(sandbox=sandbox)
        # train.py's code runs once the scorer says so (`ModelProcess.build`): the probe's process only
        # after the scored one's is gone
        if not requests.readline():
            return
        model = built_model(artifact, shared["meta"], rt)
        say(ready=True)
        with torch.no_grad():
            for line in requests:
                rows = int(line)
                out[:rows].copy_(model_logits(model, inputs[:rows].to(rt.device), out.size(-1), artifact, rt))
                synchronize(out.device)
                say(done=rows)
    except Rejected as e:
        say(rejected=str(e))


class ModelProcess:
    """train.py's model built anew in a process of its own (`harness.py model`), which gets inputs
    and gives logits through buffers of its own; closing it kills it. The scorer computes the loss
    from those logits: code in train.py that patched torch's cross-entropy, or reached the scorer's
    sums, patched them in a process that computes nothing that counts. Its output goes to a file of
    its own (the scorer's stdout, a pipe, could be opened again for reading through /proc and read
    by the other model process); the tail is shown when it ends without an answer. `sandboxed`:
    confined (`confine`) in a private folder of `folder`."""

    def __init__(self, artifact: Path, meta: dict[str, Any], rows: int, T: int, vocab: int,
                 device: torch.device, folder: Path, sandboxed: bool) -> None:
        self.device = device
        self.inputs, inputs_token = shared_buffer((rows, T), torch.int64, device, folder)
        self.logits, logits_token = shared_buffer((rows, T, vocab), torch.float32, device, folder)
        self.files = [Path(token[1]) for token in (inputs_token, logits_token) if token[0] == "file"]
        private = Path(tempfile.mkdtemp(dir=folder))
        self.output = private.with_suffix(".log")
        self.answered = False  # its first answer may say the harness failed it (`serve_model`)
        requests_in, requests_out = os.pipe()
        replies_in, replies_out = os.pipe()
        command = prepare.scorer_command(Path(__file__).resolve(), "--artifact", str(artifact), "--requests",
                                         str(requests_in), "--replies", str(replies_out), command="model")
        with self.output.open("wb") as output:
            self.proc = subprocess.Popen(command, pass_fds=(requests_in, replies_out), stdin=subprocess.DEVNULL,
                                         stdout=output, stderr=subprocess.STDOUT,
                                         env={**os.environ, "TMPDIR": str(private)})
        os.close(requests_in)
        os.close(replies_out)
        self.requests = os.fdopen(requests_out, "wb")
        self.replies = os.fdopen(replies_in, "rb")
        self.requests.write(pickle.dumps({"inputs": inputs_token, "logits": logits_token, "meta": meta,
                                          "private": str(private) if sandboxed else None}))
        self.requests.flush()

    def answer(self) -> dict[str, Any]:
        """Its next answer; Rejected when it refused the model, ended, or said anything else."""
        line = self.replies.readline(1 << 16)
        if not line:
            code = self.proc.wait()
            raise Rejected(f"train.py's model ended its process (exit code {code}) while the harness scored it"
                           + self._last_line())
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict) and isinstance(message.get("rejected"), str):
            raise Rejected(one_line(message["rejected"], 500))
        first, self.answered = not self.answered, True
        if first and isinstance(message, dict) and isinstance(message.get("failed"), str):  # before train.py ran
            raise HarnessError(f"the scorer's model process could not start ({message['failed']}){self._last_line()}")
        if not isinstance(message, dict) or not message.keys() <= {"ready", "done", "sandbox", "broken"}:
            raise Rejected("train.py's model wrote into the harness's channel with its scorer (fd "
                           f"{self.replies.fileno()}): {line[:80]!r}")
        return message

    def _last_line(self) -> str:
        """"; its last line: …" of its output, where it wrote one."""
        tail = [t for t in self.output.read_text(errors="replace").splitlines() if t.strip()][-1:]
        return f"; its last line: {one_line(tail[0], 200)}" if tail else ""

    def unlink_files(self) -> None:
        """Its buffers' files, once it has mapped them (its first answer): the memory stays both sides',
        and a scorer killed at run_timeout (no `finally` runs) leaves no files of logits in /dev/shm."""
        for path in self.files:
            path.unlink(missing_ok=True)

    def build(self) -> None:
        """Have it build train.py's model (until now it ran the harness's code only); `answer` says when."""
        self._request(b"build\n")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for x (fp32): its shared buffer, until the next call."""
        self.inputs[: x.size(0)].copy_(x)
        synchronize(self.device)  # the inputs are there before the model process reads them
        self._request(f"{x.size(0)}\n".encode())
        self.answer()
        return self.logits[: x.size(0)]

    def _request(self, line: bytes) -> None:
        try:
            self.requests.write(line)
            self.requests.flush()
        except BrokenPipeError:  # its process ended between two calls, or its code closed the pipe
            raise Rejected(f"train.py's model stopped reading the harness's requests (fd {self.requests.fileno()}) while"
                           " the harness scored it: its process ended, or its code closed them") from None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(BrokenPipeError):  # a request it never read: closing flushes it again
            self.requests.close()
        self.replies.close()


def started_models(artifact: Path, meta: dict[str, Any], rows: int, T: int, vocab: int, device: torch.device,
                   folder: Path) -> list[ModelProcess]:
    """The scored model's process and the probe's, confined (`confine`) unless NIGHTLAB_SANDBOX=0,
    each answered once (how it is confined). Where confining broke what the harness's own forward
    needs of the device (`_self_check`, before train.py is imported: a model cannot cause it), both
    are started again unconfined, saying so."""
    sandboxed = os.environ.get(ENV_SANDBOX, "1").strip() != "0"
    models = [ModelProcess(artifact, meta, rows, T, vocab, device, folder, sandboxed) for _ in range(2)]
    try:
        first = [model.answer() for model in models]
        broken = next((said["broken"] for said in first if "broken" in said), None)
        if broken is not None:
            for model in models:
                model.close()
            print(f"note: the sandbox of the model's processes broke the device ({broken}); they run without it",
                  flush=True)
            models = [ModelProcess(artifact, meta, rows, T, vocab, device, folder, False) for _ in range(2)]
            first = [model.answer() for model in models]
    except BaseException:
        for model in models:
            model.close()
        raise
    for model in models:
        model.unlink_files()
    print(f"Model processes: sandbox {first[0].get('sandbox', 'none')}", flush=True)
    return models


def score(artifact: Path, data_dir: Path, split: str = "val", slice_index: int = 0,
          seed: int | None = None, rows_key: str | None = None) -> dict[str, Any]:
    """Score a saved model: {"bpb", "score_seconds", "eval_seconds", "phases", "meta", "rows",
    "probe_moved" (`causality_problem`'s)}.
    Raises Rejected. `seed`: the causality probe's draws (None: the system's randomness; tests).
    `rows_key`: see `eval_rows`.

    The model runs in processes of its own (`ModelProcess`); this one never imports train.py and
    computes the loss from the logits they give. Eager and SDPA, whatever the training used: the
    scorer runs one forward-only pass per experiment, and a changed model would compile afresh each
    time (tens of seconds cold, several warm) for little gain; SDPA (its causal kernel, or an
    explicit window mask) is exact attention, fast eager, and needs no kernel loaded. Every model is
    scored the same way."""
    t0 = time.time()
    phases = Phases()
    device = pick_device()[0]
    # MPS memory is not shared between processes: the model's process moves its logits to the CPU
    shared_device = device if device.type == "cuda" else torch.device("cpu")
    meta = saved_meta(artifact)
    # a .pyc dated as the copy would run instead of it (code the commit never showed): compiled anew
    shutil.rmtree(artifact / "__pycache__", ignore_errors=True)
    tokenizer = Tokenizer.from_directory(Path(data_dir) / prepare.TOKENIZER_DIR)
    vocab = tokenizer.get_vocab_size()
    T, n = prepare.scored_shape(MAX_SEQ_LEN, EVAL_TOKENS)
    B = _eval_batch(n, T, vocab, shared_device)
    need = 0 if shared_device.type == "cuda" else 2 * B * T * (vocab * 4 + 8)  # two processes' file buffers
    folder = Path(tempfile.mkdtemp(prefix="nightlab-score-", dir=buffer_dir(need)))
    models: list[ModelProcess] = []
    # what a model process leaves running (a double fork) comes to this process, which kills it: the scored
    # one's, before the probe's builds (it would hand the calls on), and the probe's when it is done
    with prepare.reaping() as others:
        try:
            # Two processes start at once (their start-ups overlap this one's work): the scored model, and
            # one for the probe, which sees nothing but its one changed batch, built anew (the scored one kept
            # its calls in its process, and gave them back where the changed rows agreed with them: a model
            # that looked ahead on every batch passed). The probe's runs train.py's code only once the scored
            # one, and all it started, is killed: running side by side, the scored one handed it its calls
            # through what the sandbox leaves them (their command lines, read in /proc).
            models = started_models(artifact, meta, B, T, vocab, shared_device, folder)
            scored, fresh = models
            scored.build()
            phases.lap("start")
            rows = eval_rows(tokenizer, data_dir, split, slice_index, rows_key).to(shared_device)
            token_bytes = prepare.get_token_bytes(shared_device, tokenizer)
            phases.lap("rows", shared_device)
            scored.answer()
            phases.lap("model")
            # The probed batch and its cuts are drawn here, from the system's randomness: a model cannot know
            # which of its calls is checked (a fixed first batch and fixed cuts let one look ahead elsewhere).
            generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
            probed = int(torch.randint(0, n // B, (), generator=generator)) * B
            total_nats = torch.zeros((), dtype=torch.float64, device=shared_device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=shared_device)
            for i in range(0, n, B):  # the sums stay on the device
                batch = rows[i : i + B].long()
                x, y = batch[:, :-1], batch[:, 1:]
                logits = scored.forward(x)
                if i == probed:  # a copy: what the model's process writes into its buffer later is not what it gave
                    logits = probed_logits = logits.clone()
                nats = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="none")
                nbytes = token_bytes[y.reshape(-1)]
                total_nats += torch.where(nbytes > 0, nats, 0.0).sum(dtype=torch.float64)
                total_bytes += nbytes.sum()
            scored.close()
            prepare.end_leftovers(others | {fresh.proc.pid})  # what it left running: reparented here, the subreaper
            phases.lap("eval", shared_device)
            fresh.build()
            fresh.answer()
            why, moved = causality_problem(fresh.forward, rows[probed : probed + B].long(), vocab, generator, probed_logits, rows)
            if why:
                raise Rejected(why)
            phases.lap("probe", shared_device)
        finally:
            for model in models:
                model.close()
            prepare.end_leftovers(others)
            shutil.rmtree(folder, ignore_errors=True)
    bpb = total_nats.item() / (math.log(2) * total_bytes.item())
    if not math.isfinite(bpb):  # inf where a target's logit is -inf, NaN from NaN or +inf logits
        raise Rejected(f"val_bpb is {bpb}: the model's logits are not finite where they are scored (NaN, +inf, or"
                       " -inf at a token that comes)")
    phases.lap("eval")
    return {"bpb": bpb, "score_seconds": time.time() - t0, "eval_seconds": phases.seconds["eval"],
            "phases": phases.seconds, "meta": meta, "rows": n, "probe_moved": moved}


def rows_key_arg(text: str) -> str:
    """--rows-key's value, in `prepare.scored_rows_key`'s form only: it names cache files."""
    if not re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{12}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a key of the scored rows (12 hex digits, '-', 12 hex"
                                         " digits); leave --rows-key out and the scorer hashes the data itself")
    return text


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(description="Score a trained model saved by train.py (the harness's metric).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score the model in --artifact on the validation rows (or a held-out slice)")
    p.add_argument("--artifact", type=Path, default=None, help=f"default: ${prepare.ENV_ARTIFACT_DIR} or {prepare.DEFAULT_ARTIFACT_DIR}")
    p.add_argument("--split", choices=["val", "heldout"], default="val")
    p.add_argument("--slice", type=int, default=0, help="which held-out slice (0, 1, ...)")
    p.add_argument("--rows-key", type=rows_key_arg, default=None,
                   help="the data dir's scored_rows_key, hashed by `prepare.py run` before the training (default: hashed here)")
    p.add_argument("--result", type=Path, default=None,
                   help="write the result here as JSON instead of printing the summary (what `prepare.py run` reads)")
    m = sub.add_parser("model", help="(started by `score`) run train.py's model for the scorer, through the given pipes")
    m.add_argument("--artifact", type=Path, required=True)
    m.add_argument("--requests", type=int, required=True, help="the pipe the scorer's requests come through")
    m.add_argument("--replies", type=int, required=True, help="the pipe this process answers through")
    args = parser.parse_args(argv)
    if args.command == "model":
        try:
            with os.fdopen(args.requests, "rb") as requests, os.fdopen(args.replies, "w") as replies:
                serve_model(args.artifact, requests, replies)
        except BaseException:  # noqa: BLE001 - into its output, whose last line the scorer shows
            traceback.print_exc()
        finally:  # whatever ended it (a SystemExit from the model's code too): no exit hook train.py set runs
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    artifact = args.artifact or artifact_dir()
    # what a model process leaves running (it could write the result file itself) is killed in `score`
    try:
        found = score(artifact, prepare.get_data_dir(), args.split, args.slice, rows_key=args.rows_key)
        result = {"bpb": found["bpb"], "score_seconds": found["score_seconds"], "eval_seconds": found["eval_seconds"],
                  "rows": found["rows"], "split": args.split, "slice": args.slice, "train": found["meta"]["train"],
                  "phases": found["phases"], "probe_moved": found["probe_moved"]}
        code = 0
    except Rejected as e:
        result, code = {"rejected": str(e)}, REJECTED_EXIT
    except prepare.PrepareError as e:
        result, code = {"error": prepare.fail_text(e)}, 1
    except HarnessError as e:
        result, code = {"error": str(e)}, 1
    if args.result is not None:
        tmp = args.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, args.result)
    else:
        prepare.print_result(result, None)
    sys.stdout.flush()
    os._exit(code)  # without the interpreter's teardown of torch: 0.6 s of every run's scoring here


if __name__ == "__main__":
    # One harness in the process: train.py's `import harness` (in a model process: the scored model's
    # attention and masks) gets this module, the one `setup` configured, not a second, unconfigured copy.
    sys.modules["harness"] = sys.modules[__name__]
    main()
