"""Micro-benchmark of the attention backends on the model's shapes (forward + backward).

    python bench/attention.py                          # the default profile's shapes on the GPU
    python bench/attention.py --device cpu --batch 2 --seq 256 --heads 2 --iters 2   # a CPU smoke run

Each row is one causal attention call of (batch, seq, heads, head_dim) in bf16 (fp32 on CPU),
timed with CUDA events over --iters calls after warm-up: `full` is plain causal attention,
`window` attends to the last seq/2 keys (the `S` layers of WINDOW_PATTERN "SSSL"). Window
results are checked against SDPA with an explicit boolean mask. The last table prices one
forward + backward of all layers for the pattern (8 layers of SSSL = 6 window + 2 full).
Backends that this torch or machine lacks are listed with the reason, not skipped silently.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Reference: SDPA with an explicit (T, T) band mask. q/k/v: (B, T, H, D)."""
    T = q.size(1)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    mask = (j <= i) & (i - j <= window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2)


def sdpa_causal(backend: str | None) -> Attn:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if backend is None:
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        else:
            with sdpa_kernel([chosen[backend]]):
                y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return y.transpose(1, 2)

    return run


def flex(T: int, window: int, device: torch.device, options: dict | None, transpose_contiguous: bool) -> Attn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q_idx, kv_idx):  # noqa: ANN001 - flex's mask_mod signature
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    mask = create_block_mask(band, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if transpose_contiguous:
            qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
        return compiled(qt, kt, vt, block_mask=mask, kernel_options=options).transpose(1, 2)

    return run


def varlen(T: int, window: int) -> Attn:
    """torch.nn.attention.varlen.varlen_attn: packed rows with a native left window (flash kernels)."""
    from torch.nn.attention.varlen import varlen_attn

    if "window_size" not in inspect.signature(varlen_attn).parameters:
        raise RuntimeError("this torch's varlen_attn has no window_size")

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, _, H, D = q.shape
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        w = (window, 0) if window < T - 1 else (-1, 0)
        y = varlen_attn(q.reshape(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, D), cu, cu, T, T, window_size=w)
        return y.view(B, T, H, D)

    return run


def candidates(T: int, window: int, device: torch.device) -> list[tuple[str, Callable[[], Attn]]]:
    """(name, factory) for a window; a factory raises when the backend is missing here."""
    full = window >= T - 1
    rows: list[tuple[str, Callable[[], Attn]]] = []
    if full:
        rows.append(("sdpa (default pick)", lambda: sdpa_causal(None)))
        if device.type == "cuda":
            rows.append(("sdpa flash", lambda: sdpa_causal("flash")))
            rows.append(("sdpa cudnn", lambda: sdpa_causal("cudnn")))
    else:
        rows.append(("sdpa + boolean mask", lambda: (lambda q, k, v: naive(q, k, v, window))))
    rows.append(("flex", lambda: flex(T, window, device, None, False)))
    if device.type == "cuda" and not full:  # tuning matters where flex is the only window kernel
        rows.append(("flex, contiguous q/k/v", lambda: flex(T, window, device, None, True)))
        for bm, bn, warps, stages in [(128, 64, 8, 3), (64, 64, 4, 3)]:
            opts = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            rows.append((f"flex {bm}x{bn} w{warps} s{stages}", lambda o=opts: flex(T, window, device, o, True)))
    rows.append(("varlen_attn", lambda: varlen(T, window)))
    return rows


def time_call(fn: Attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iters: int) -> float:
    """Median ms of forward + backward."""
    grad = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    if q.device.type != "cuda":
        import time

        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(q, k, v).backward(grad)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(q, k, v).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128, help="rows per forward (DEVICE_BATCH_SIZE)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4, help="512-dim model / head_dim 128 = 4 heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--pattern", default="SSSL", help="WINDOW_PATTERN for the per-model table")
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    # every flex variant is its own compiled graph (kernel options, grad/no-grad check): don't hit the limit
    torch._dynamo.config.recompile_limit = 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T = args.seq
    torch.manual_seed(0)
    shape = (args.batch, T, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"shape (B, T, H, D) = {shape}, {dtype}, forward + backward, median of {args.iters}")

    best: dict[str, tuple[str, float]] = {}
    print(f"{'window':<8} {'backend':<28} {'ms':>9}  {'max |err|':>9}")
    for label, window in (("full", T - 1), ("half", T // 2)):
        small = tuple(t[:1].detach() for t in (q, k, v))
        reference = naive(*small, window).float()
        for name, factory in candidates(T, window, device):
            try:
                fn = factory()
                err = (fn(*small).float() - reference).abs().max().item()
                ms = time_call(fn, q, k, v, args.iters)
            except Exception as e:  # a backend this machine lacks is a row, not a crash
                print(f"{label:<8} {name:<28} {'n/a':>9}  {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}")
                continue
            ok = err < (5e-2 if dtype == torch.bfloat16 else 1e-4)
            print(f"{label:<8} {name:<28} {ms:>9.2f}  {err:>9.1e}{'' if ok else '  WRONG'}")
            if ok and (label not in best or ms < best[label][1]):
                best[label] = (name, ms)
        torch.cuda.empty_cache() if device.type == "cuda" else None

    pattern = (args.pattern * args.layers)[: args.layers - 1] + "L"
    n_s, n_l = pattern.count("S"), pattern.count("L")
    print(f"\nper model, {args.layers} layers '{pattern}' ({n_s} window + {n_l} full), one forward + backward of attention:")
    if "full" in best:
        print(f"  all full windows with {best['full'][0]}: {args.layers * best['full'][1]:.1f} ms")
    if "full" in best and "half" in best:
        print(f"  pattern with {best['half'][0]} (window) + {best['full'][0]} (full): {n_s * best['half'][1] + n_l * best['full'][1]:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
