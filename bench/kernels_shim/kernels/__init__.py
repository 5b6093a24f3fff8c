"""A stand-in for the `kernels` package, used only by bench/trainer.py --other (never by nightlab).

Upstream autoresearch's train.py loads FA3 with `kernels.get_kernel(...)` at import, which needs
the network on first use; on an offline GPU box the bench puts this folder first on that run's
PYTHONPATH instead. Its flash_attn_func is PyTorch SDPA with a causal mask over the FULL context:
sliding windows are ignored, so such a run does full attention in every layer (the bench says so).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F

SHIM_NOTE = "kernels shim: flash_attn_func = SDPA causal full attention (window_size ignored)"


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), **_ignored):
    """(B, T, H, D) in and out, as FA3; GQA when k/v have fewer heads."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def get_kernel(repo: str, *args, **kwargs):
    return SimpleNamespace(flash_attn_interface=SimpleNamespace(flash_attn_func=flash_attn_func))
